// Shared pieces of the CUDA kernels of GroupNormAct (forward: gna_forward.cu, backward:
// gna_backward.cu): element conversion and vector access, the activation dispatch,
// Welford statistics merged with Chan's formula, warp/team/block reductions, the launch
// geometry, the block roles and the elementwise pass, the kernel template of a direction
// and its host side (kernel choice, workspace, chunked launches, argument checks, dtype
// dispatch), and the runtime shim.
// No TensorFlow. Compiles with nvcc, or with g++ and -DTFPN_CUDA_EMULATION against the CPU
// emulator of custom_ops/gpu_test/cuda_emu.h (used to test this code without a GPU).
//
// Work decomposition (both directions; x is (N, P, C) channels-last or (N, C, P)):
//   pass 1, "reduction": per (example, group) statistics (forward: mean/M2; backward: the
//     sums behind mean(dxhat) and mean(dxhat * xhat)) and per-channel parameter-gradient
//     sums. Blocks write per-(example, split, channel) partials to the workspace; the last
//     block to finish an example (atomic ticket, no spinning) merges that example's
//     partials into per-(example, group) results: a two-stage reduction that needs no
//     co-residency and no extra launch.
//   pass 2, "elementwise": y (forward) or dx (backward) from x (and dy) and the pass-1
//     results. The backward's parameter gradients are a third, tiny pass over the
//     partials (the second stage of the two-stage parameter-gradient reduction).
//   Channels-last tiles are (positions x 32 vectors of channels) per 256-thread block;
//   channels-first uses one warp per (row (n, c), segment of the row).
//
// L2 reuse: the batch is processed in chunks of examples whose bytes fit in a quarter of
// the L2 cache; launch k runs pass 1 of chunk k and pass 2 of chunk k-1 (one grid, two
// block roles), so pass 2 re-reads its inputs from L2 and DRAM sees each tensor about once.
#ifndef TFPN_GNA_COMMON_CUH_
#define TFPN_GNA_COMMON_CUH_

#if defined(TFPN_CUDA_EMULATION)
#include "../gpu_test/cuda_emu.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <stddef.h>
#include <stdint.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <initializer_list>
#include <type_traits>

#include "../cc/activations.h"
#include "group_norm_act_cuda.h"

namespace tfpn {

constexpr int kThreads = 256;               // threads of every block
constexpr int kWarps = kThreads / 32;
constexpr int kMaxSplits = 64;              // pass-1 splits of one (example, channel)
constexpr int64_t kTileBytes = 32 * 1024;   // input bytes of one channels-last block
constexpr int64_t kWarpItemBytes = 8 * 1024;  // input bytes of one channels-first warp item
constexpr int kUnroll = 4;                  // vector loads in flight per thread

// ---------------------------------------------------------------------------------------
// Elements: float, __half, __nv_bfloat16 as raw bits, converted to/from float in registers.

template <typename T>
struct Elem;
template <>
struct Elem<float> {
  using Bits = unsigned int;
};
template <>
struct Elem<__half> {
  using Bits = unsigned short;
};
template <>
struct Elem<__nv_bfloat16> {
  using Bits = unsigned short;
};

// Elements per vector access of the fast path (16-byte accesses for float, 8-byte for the
// 16-bit types: 8-wide vectors doubled the per-channel constants held in registers, up to
// 200 registers per thread in the backward). The fallback path (unaligned pointers or a
// contiguous dimension not divisible by 4) uses scalar accesses.
constexpr int kVec = 4;

template <typename T>
__device__ __forceinline__ float bits_to_float(unsigned b);
template <>
__device__ __forceinline__ float bits_to_float<float>(unsigned b) {
  return __uint_as_float(b);
}
template <>
__device__ __forceinline__ float bits_to_float<__half>(unsigned b) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(b)));
}
template <>
__device__ __forceinline__ float bits_to_float<__nv_bfloat16>(unsigned b) {
  return __uint_as_float((b & 0xffffu) << 16);
}

template <typename T>
__device__ __forceinline__ unsigned float_to_bits(float f);
template <>
__device__ __forceinline__ unsigned float_to_bits<float>(float f) {
  return __float_as_uint(f);
}
template <>
__device__ __forceinline__ unsigned float_to_bits<__half>(float f) {
  return __half_as_ushort(__float2half_rn(f));
}
// Round to nearest even, NaN stays NaN (same results as __float2bfloat16_rn).
template <>
__device__ __forceinline__ unsigned float_to_bits<__nv_bfloat16>(float f) {
  unsigned u = __float_as_uint(f);
  if ((u & 0x7fffffffu) > 0x7f800000u) return ((u >> 16) | 0x0040u) & 0xffffu;
  u += 0x7fffu + ((u >> 16) & 1u);
  return u >> 16;
}

enum CacheHint { kCacheDefault = 0, kCacheStream = 1 };

template <int HINT, typename R>
__device__ __forceinline__ R load_raw(const R* p) {
  if constexpr (HINT == kCacheStream) {
    return __ldcs(p);  // last use: evict first
  } else {
    return *p;
  }
}
template <int HINT, typename R>
__device__ __forceinline__ void store_raw(R* p, R v) {
  if constexpr (HINT == kCacheStream) {
    __stcs(p, v);
  } else {
    *p = v;
  }
}

// 32-bit words of one vector of V elements of T.
template <typename T, int V>
struct VecWords {
  static constexpr int kBytes = V * static_cast<int>(sizeof(typename Elem<T>::Bits));
  static constexpr int kWords = kBytes >= 4 ? kBytes / 4 : 1;
};

template <typename T, int V>
__device__ __forceinline__ void words_to_floats(const unsigned (&w)[VecWords<T, V>::kWords],
                                                float (&f)[V]) {
  if constexpr (sizeof(typename Elem<T>::Bits) == 4) {
#pragma unroll
    for (int i = 0; i < V; ++i) f[i] = bits_to_float<T>(w[i]);
  } else if constexpr (V == 1) {
    f[0] = bits_to_float<T>(w[0]);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) f[i] = bits_to_float<T>(w[i / 2] >> (16 * (i & 1)));
  }
}

template <typename T, int V>
__device__ __forceinline__ void floats_to_words(const float (&f)[V],
                                                unsigned (&w)[VecWords<T, V>::kWords]) {
  if constexpr (sizeof(typename Elem<T>::Bits) == 4) {
#pragma unroll
    for (int i = 0; i < V; ++i) w[i] = float_to_bits<T>(f[i]);
  } else if constexpr (V == 1) {
    w[0] = float_to_bits<T>(f[0]);
  } else {
#pragma unroll
    for (int i = 0; i < V / 2; ++i)
      w[i] = float_to_bits<T>(f[2 * i]) | (float_to_bits<T>(f[2 * i + 1]) << 16);
  }
}

// Loads V consecutive elements (16-byte aligned when V > 1) as floats.
template <typename T, int V, int HINT>
__device__ __forceinline__ void load_vec(const T* p, float (&f)[V]) {
  constexpr int kBytes = VecWords<T, V>::kBytes;
  unsigned w[VecWords<T, V>::kWords];
  if constexpr (kBytes == 16) {
    const uint4 r = load_raw<HINT>(reinterpret_cast<const uint4*>(p));
    w[0] = r.x, w[1] = r.y, w[2] = r.z, w[3] = r.w;
  } else if constexpr (kBytes == 8) {
    const uint2 r = load_raw<HINT>(reinterpret_cast<const uint2*>(p));
    w[0] = r.x, w[1] = r.y;
  } else if constexpr (kBytes == 4) {
    w[0] = load_raw<HINT>(reinterpret_cast<const unsigned*>(p));
  } else {
    static_assert(kBytes == 2, "unsupported vector");
    w[0] = load_raw<HINT>(reinterpret_cast<const unsigned short*>(p));
  }
  words_to_floats<T, V>(w, f);
}

template <typename T, int V, int HINT>
__device__ __forceinline__ void store_vec(T* p, const float (&f)[V]) {
  constexpr int kBytes = VecWords<T, V>::kBytes;
  unsigned w[VecWords<T, V>::kWords];
  floats_to_words<T, V>(f, w);
  if constexpr (kBytes == 16) {
    store_raw<HINT>(reinterpret_cast<uint4*>(p), make_uint4(w[0], w[1], w[2], w[3]));
  } else if constexpr (kBytes == 8) {
    store_raw<HINT>(reinterpret_cast<uint2*>(p), make_uint2(w[0], w[1]));
  } else if constexpr (kBytes == 4) {
    store_raw<HINT>(reinterpret_cast<unsigned*>(p), w[0]);
  } else {
    static_assert(kBytes == 2, "unsupported vector");
    store_raw<HINT>(reinterpret_cast<unsigned short*>(p), static_cast<unsigned short>(w[0]));
  }
}

// ---------------------------------------------------------------------------------------
// Activations: the shared definitions of custom_ops/cc/activations.h with CUDA math.

struct CudaMath {
  __host__ __device__ static float Exp(float x) { return expf(x); }
  __host__ __device__ static float Erf(float x) { return erff(x); }
};

// The C API's ids (enum tfpn_activation, group_norm_act_cuda.h: plain C) are the C++ ones
// (tf_proxynorm::Activation, activations.h); tests/test_activation_ids.py checks Python's.
constexpr bool same_id(int c_id, int cc_id) { return c_id == cc_id; }
static_assert(same_id(TFPN_ACT_IDENTITY, tf_proxynorm::kIdentity),
              "TFPN_ACT_IDENTITY != kIdentity");
static_assert(same_id(TFPN_ACT_RELU, tf_proxynorm::kRelu), "TFPN_ACT_RELU != kRelu");
static_assert(same_id(TFPN_ACT_SILU, tf_proxynorm::kSilu), "TFPN_ACT_SILU != kSilu");
static_assert(same_id(TFPN_ACT_GELU, tf_proxynorm::kGelu), "TFPN_ACT_GELU != kGelu");
static_assert(same_id(TFPN_ACT_LEAKY_RELU, tf_proxynorm::kLeakyRelu),
              "TFPN_ACT_LEAKY_RELU != kLeakyRelu");
static_assert(TFPN_ACT_LEAKY_RELU + 1 == tf_proxynorm::kNumActivations,
              "an activation of activations.h is missing from enum tfpn_activation");

template <int ACT>
using ActId = std::integral_constant<int, ACT>;

// The one switch from a run-time activation id to a compile-time one: returns
// f(ActId<act>()) (an unknown id, which validate_problem rejects, runs as identity). Used
// by the host to pick a kernel and by the kernels' run-time-activation fallback.
#if defined(__NVCC__)
#pragma nv_exec_check_disable
#endif
template <typename F>
__host__ __device__ __forceinline__ decltype(auto) with_activation(int act, F&& f) {
  static_assert(tf_proxynorm::kNumActivations == 5, "with_activation: add the new activation");
  switch (act) {
    case TFPN_ACT_RELU: return f(ActId<TFPN_ACT_RELU>());
    case TFPN_ACT_SILU: return f(ActId<TFPN_ACT_SILU>());
    case TFPN_ACT_GELU: return f(ActId<TFPN_ACT_GELU>());
    case TFPN_ACT_LEAKY_RELU: return f(ActId<TFPN_ACT_LEAKY_RELU>());
    default: return f(ActId<TFPN_ACT_IDENTITY>());
  }
}

// ACT >= 0: compile-time activation (fast path); kActRuntime: switch on `act` (the scalar
// fallback path, to halve the number of kernel instantiations).
constexpr int kActRuntime = -1;

template <int ACT>
__device__ __forceinline__ float act_forward(float a, int act) {
  using tf_proxynorm::ActForward;
  if constexpr (ACT >= 0) {
    return ActForward<ACT, CudaMath>(a);
  } else {
    return with_activation(
        act, [a](auto id) { return ActForward<decltype(id)::value, CudaMath>(a); });
  }
}

template <int ACT>
__device__ __forceinline__ float act_forward_grad(float a, float* deriv, int act) {
  using tf_proxynorm::ActForwardAndGrad;
  if constexpr (ACT >= 0) {
    return ActForwardAndGrad<ACT, CudaMath>(a, deriv);
  } else {
    return with_activation(act, [a, deriv](auto id) {
      return ActForwardAndGrad<decltype(id)::value, CudaMath>(a, deriv);
    });
  }
}

// ---------------------------------------------------------------------------------------
// Welford / Chan.

struct Welford {
  float mean, m2, count;
};

// One more value with the running count already incremented; rc = 1 / count.
__device__ __forceinline__ void welford_step(float& mean, float& m2, float x, float rc) {
  const float d = x - mean;
  mean = fmaf(d, rc, mean);
  m2 = fmaf(d, x - mean, m2);
}

// Chan et al. Safe with empty operands; NaN data propagates (counts are never NaN).
__device__ __forceinline__ Welford welford_merge(const Welford& a, const Welford& b) {
  if (b.count == 0.0f) return a;
  if (a.count == 0.0f) return b;
  const float n = a.count + b.count;
  const float delta = b.mean - a.mean;
  const float fb = b.count / n;
  Welford r;
  r.mean = fmaf(delta, fb, a.mean);
  r.m2 = a.m2 + b.m2 + delta * delta * a.count * fb;
  r.count = n;
  return r;
}

__device__ __forceinline__ Welford welford_shfl_xor(const Welford& w, int o) {
  Welford r;
  r.mean = __shfl_xor_sync(0xffffffffu, w.mean, o);
  r.m2 = __shfl_xor_sync(0xffffffffu, w.m2, o);
  r.count = __shfl_xor_sync(0xffffffffu, w.count, o);
  return r;
}

// Number of rows r' in [0, len) with r' = r (mod m): rows a thread-row represents.
__device__ __forceinline__ float rows_of(int64_t len, int64_t r, int64_t m) {
  return len > r ? static_cast<float>((len - 1 - r) / m + 1) : 0.0f;
}

// Teams: power-of-two groups of consecutive threads that cooperate on one (example,
// group) in the finalization; the largest size that keeps every thread busy over `groups`
// and is not larger than needed for `items` values.
__device__ __forceinline__ int team_size(int64_t groups, int64_t items) {
  int t = 1;
  while (t < kThreads && 2 * t * groups <= kThreads && t < items) t *= 2;
  return t;
}

// Reduces a Welford over a team of `team` threads. Must be called by every thread of the
// block (it synchronizes when team > 32). The result is valid in the team's first thread.
// smem: at least 3 * kWarps floats, free for use.
__device__ __forceinline__ Welford team_reduce_welford(Welford w, int team, float* smem) {
  const int width = team < 32 ? team : 32;
  for (int o = width >> 1; o > 0; o >>= 1) w = welford_merge(w, welford_shfl_xor(w, o));
  if (team > 32) {
    const int warp = threadIdx.x >> 5;
    __syncthreads();
    if ((threadIdx.x & 31) == 0) {
      smem[3 * warp] = w.mean;
      smem[3 * warp + 1] = w.m2;
      smem[3 * warp + 2] = w.count;
    }
    __syncthreads();
    if ((threadIdx.x & (team - 1)) == 0) {
      for (int k = 1; k < team / 32; ++k) {
        const Welford o = {smem[3 * (warp + k)], smem[3 * (warp + k) + 1],
                           smem[3 * (warp + k) + 2]};
        w = welford_merge(w, o);
      }
    }
  }
  return w;
}

// Same for a pair of sums.
__device__ __forceinline__ float2 team_reduce_sum2(float2 v, int team, float* smem) {
  const int width = team < 32 ? team : 32;
  for (int o = width >> 1; o > 0; o >>= 1) {
    v.x += __shfl_xor_sync(0xffffffffu, v.x, o);
    v.y += __shfl_xor_sync(0xffffffffu, v.y, o);
  }
  if (team > 32) {
    const int warp = threadIdx.x >> 5;
    __syncthreads();
    if ((threadIdx.x & 31) == 0) {
      smem[2 * warp] = v.x;
      smem[2 * warp + 1] = v.y;
    }
    __syncthreads();
    if ((threadIdx.x & (team - 1)) == 0) {
      for (int k = 1; k < team / 32; ++k) {
        v.x += smem[2 * (warp + k)];
        v.y += smem[2 * (warp + k) + 1];
      }
    }
  }
  return v;
}

// Ticket of the two-stage reductions: called by every thread of a pass-1 block after it
// wrote its partials; true in the last block of the example to arrive (block-uniform).
__device__ __forceinline__ bool last_block_of_example(unsigned* counter, unsigned blocks,
                                                      int* s_flag) {
  __threadfence();  // this thread's partials are visible device-wide before the ticket
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned prev = atomicAdd(counter, 1u);
    *s_flag = (prev + 1u == blocks) ? 1 : 0;
  }
  __syncthreads();
  const bool last = *s_flag != 0;
  if (last) __threadfence();
  return last;
}

// ---------------------------------------------------------------------------------------
// Launch geometry (computed on the host, read by the kernels).

struct Geometry {
  int64_t n, c, p;   // batch, channels, positions
  int64_t d;         // channels per group
  int32_t groups;
  int32_t cl;        // channels-last layout (also used for any layout when p == 1)
  int32_t vec;       // elements per vector access
  int32_t splits;    // pass 1: splits of the positions of one (example, channel)
  int64_t split_len;
  int32_t ew_splits;  // pass 2: same for the elementwise pass
  int64_t ew_len;
  int32_t tx, tx_log2, ty;  // channels-last block: tx vectors of channels x ty positions
  int32_t ctiles;           // channels-last: blocks across the channels
  int64_t red_blocks_per_ex, ew_blocks_per_ex;
  int64_t ps_n, ps_s, ps_c;  // strides of the (n, split, channel) partials
};

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline int64_t round_up(int64_t a, int64_t b) { return ceil_div(a, b) * b; }
inline int64_t clamp64(int64_t v, int64_t lo, int64_t hi) {
  return v < lo ? lo : (v > hi ? hi : v);
}

// `elem_bytes`: 4 or 2; `aligned`: all tensor pointers are 16-byte aligned.
inline Geometry make_geometry(const tfpn_problem& pr, int elem_bytes, bool aligned) {
  Geometry g;
  std::memset(&g, 0, sizeof(g));
  g.n = pr.n;
  g.c = pr.c;
  g.p = pr.positions;
  g.groups = pr.groups;
  g.d = pr.c / pr.groups;
  g.cl = (pr.channels_last || pr.positions == 1) ? 1 : 0;
  const int vmax = kVec;
  if (g.cl) {
    g.vec = (aligned && g.c % vmax == 0) ? vmax : 1;
    const int64_t cv = g.c / g.vec;
    int tx = 1, tx_log2 = 0;
    while (tx < 32 && tx < cv) tx *= 2, ++tx_log2;
    g.tx = tx;
    g.tx_log2 = tx_log2;
    g.ty = kThreads / tx;
    g.ctiles = static_cast<int32_t>(ceil_div(cv, tx));
    const int64_t tile_c = g.c < static_cast<int64_t>(tx) * g.vec ? g.c : tx * g.vec;
    const int64_t row_bytes = tile_c * elem_bytes;
    const int64_t rows = ceil_div(kTileBytes, row_bytes);
    const int64_t cand = rows > 2 * g.ty ? rows : 2 * g.ty;
    g.splits = static_cast<int32_t>(clamp64(ceil_div(g.p, cand), 1, kMaxSplits));
    g.split_len = ceil_div(g.p, g.splits);
    g.splits = static_cast<int32_t>(ceil_div(g.p, g.split_len));
    const int64_t cand_ew = rows > g.ty ? rows : g.ty;
    g.ew_splits = static_cast<int32_t>(ceil_div(g.p, cand_ew));
    g.ew_len = ceil_div(g.p, g.ew_splits);
    g.ew_splits = static_cast<int32_t>(ceil_div(g.p, g.ew_len));
    g.red_blocks_per_ex = static_cast<int64_t>(g.ctiles) * g.splits;
    g.ew_blocks_per_ex = static_cast<int64_t>(g.ctiles) * g.ew_splits;
    g.ps_n = static_cast<int64_t>(g.splits) * g.c;
    g.ps_s = g.c;
    g.ps_c = 1;
  } else {
    g.vec = (aligned && g.p % vmax == 0) ? vmax : 1;
    g.tx = 32, g.tx_log2 = 5, g.ty = kWarps, g.ctiles = 1;
    const int64_t cand0 = kWarpItemBytes / elem_bytes;
    const int64_t cand = cand0 > 32 * g.vec ? cand0 : 32 * g.vec;
    g.splits = static_cast<int32_t>(clamp64(ceil_div(g.p, cand), 1, kMaxSplits));
    g.split_len = round_up(ceil_div(g.p, g.splits), g.vec);
    g.splits = static_cast<int32_t>(ceil_div(g.p, g.split_len));
    g.ew_splits = static_cast<int32_t>(ceil_div(g.p, cand));
    g.ew_len = round_up(ceil_div(g.p, g.ew_splits), g.vec);
    g.ew_splits = static_cast<int32_t>(ceil_div(g.p, g.ew_len));
    g.red_blocks_per_ex = ceil_div(g.c * g.splits, kWarps);
    g.ew_blocks_per_ex = ceil_div(g.c * g.ew_splits, kWarps);
    g.ps_n = g.c * g.splits;
    g.ps_s = 1;
    g.ps_c = g.splits;
  }
  return g;
}

// Largest number of (n, split, channel) partials over the two vector widths, so that the
// workspace size does not depend on pointer alignment.
inline int64_t max_partials(const tfpn_problem& pr, int elem_bytes) {
  const Geometry a = make_geometry(pr, elem_bytes, true);
  const Geometry b = make_geometry(pr, elem_bytes, false);
  const int64_t s = a.splits > b.splits ? a.splits : b.splits;
  return pr.n * s * pr.c;
}

inline size_t align256(size_t b) { return (b + 255) & ~static_cast<size_t>(255); }

inline int elem_bytes_of(int dtype) { return dtype == TFPN_FLOAT32 ? 4 : 2; }

// Problems with nothing to compute in the kernels: outputs are only filled.
inline bool is_degenerate(const tfpn_problem& pr) {
  return pr.n == 0 || pr.c == 0 || pr.positions == 0;
}

// ---------------------------------------------------------------------------------------
// Kernel arguments, block roles and the kernel of a direction.
//
// A direction (struct Forward in gna_forward.cu, struct Backward in gna_backward.cu)
// provides:
//   Args<T>           its kernel arguments, derived from ArgsBase<T>
//   Shared<V>         the shared memory of a block
//   pass1<T, V, ACT, CL>(a, bid, shared), pass2<T, V, ACT, CL>(a, bid): the device code of
//                     the two passes (CL: channels-last), bid the block's index in its role
//   kTail, tail<T, V>(a, bid, shared), tail_blocks(g): a third role run by the last launch
//                     (kTail false: none)
//   kMinBlocksPerSm   the kernel's __launch_bounds__ occupancy
//   kPass1Tensors     tensors of x's size read by pass 1 (for the chunk size)
//   Part, tail_bytes(pr): the workspace (see Workspace)
//   kWhat             the kernel's name in error messages

// The fields every direction has.
template <typename T>
struct ArgsBase {
  Geometry g;
  const T* __restrict__ x;
  const float* __restrict__ gamma;
  const float* __restrict__ beta;
  const float* __restrict__ proxy_mean;
  const float* __restrict__ proxy_inv_std;
  unsigned* counters;  // (N,) tickets, zero on entry
  int use_proxy;
  int act;  // activation id, used when ACT == kActRuntime
  // Roles of the blocks of one launch: pass 1 of examples red_n0.. in [0, red_blocks),
  // pass 2 of examples ew_n0.. in the next ew_blocks, the tail role in the tail_blocks after.
  int64_t red_n0, red_blocks;
  int64_t ew_n0, ew_blocks;
  int64_t tail_blocks;
};

// A channels-last block of pass PASS: example n, split s of the positions, the thread's
// vector of channels cv (channels [cv * V, cv * V + V): active when cv * V < C), its row ty
// of the tile, positions [p0, p1) of the split.
struct ClBlock {
  int64_t n, s, cv, p0, p1;
  int tid, ty;
};

template <int PASS, typename T>
__device__ __forceinline__ ClBlock cl_block(const ArgsBase<T>& a, int64_t bid) {
  const Geometry& g = a.g;
  const int64_t per_ex = PASS == 1 ? g.red_blocks_per_ex : g.ew_blocks_per_ex;
  const int64_t len = PASS == 1 ? g.split_len : g.ew_len;
  ClBlock b;
  b.n = (PASS == 1 ? a.red_n0 : a.ew_n0) + bid / per_ex;
  const int64_t r = bid % per_ex;
  b.s = r / g.ctiles;
  b.tid = threadIdx.x;
  b.ty = b.tid >> g.tx_log2;
  b.cv = (r % g.ctiles) * g.tx + (b.tid & (g.tx - 1));
  b.p0 = b.s * len;
  b.p1 = (b.p0 + len < g.p) ? b.p0 + len : g.p;
  return b;
}

// A channels-first warp item of pass PASS: example n, row (n, c), split s of the row,
// elements [e0, e1) of the row; `valid` is false for the warps past the example's items
// (warp-uniform).
struct CfItem {
  int64_t n, c, s, e0, e1;
  int lane;
  bool valid;
};

template <int PASS, typename T>
__device__ __forceinline__ CfItem cf_item(const ArgsBase<T>& a, int64_t bid) {
  const Geometry& g = a.g;
  const int64_t per_ex = PASS == 1 ? g.red_blocks_per_ex : g.ew_blocks_per_ex;
  const int64_t splits = PASS == 1 ? g.splits : g.ew_splits;
  const int64_t len = PASS == 1 ? g.split_len : g.ew_len;
  CfItem it;
  it.n = (PASS == 1 ? a.red_n0 : a.ew_n0) + bid / per_ex;
  const int64_t item = (bid % per_ex) * kWarps + (threadIdx.x >> 5);
  it.lane = threadIdx.x & 31;
  it.valid = item < g.c * splits;
  it.c = it.s = it.e0 = it.e1 = 0;
  if (it.valid) {
    it.c = item / splits;
    it.s = item % splits;
    it.e0 = it.s * len;
    it.e1 = (it.e0 + len < g.p) ? it.e0 + len : g.p;
  }
  return it;
}

// Pass-1 ticket of example n: last_block_of_example with the example's block count.
template <typename T>
__device__ __forceinline__ bool last_block(const ArgsBase<T>& a, int64_t n, int* s_flag) {
  return last_block_of_example(a.counters + n, static_cast<unsigned>(a.g.red_blocks_per_ex),
                               s_flag);
}

// v[0][i] = op(k_of(i), v[0][i], ..., v[NIN - 1][i]) for the V elements of a vector.
template <int V, int NIN, typename KOf, typename Op>
__device__ __forceinline__ void apply_op(const KOf& k_of, float (&v)[NIN][V], const Op& op) {
  static_assert(NIN == 1 || NIN == 2, "one or two inputs");
#pragma unroll
  for (int i = 0; i < V; ++i) {
    if constexpr (NIN == 1) {
      v[0][i] = op(k_of(i), v[0][i]);
    } else {
      v[0][i] = op(k_of(i), v[0][i], v[1][i]);
    }
  }
}

// The elementwise loop of one thread: vectors j = e, e + step, ... (j < end) at j * stride
// from in[t] (read) and out (written), streaming cache hints; kUnroll vectors of each
// input in flight.
template <typename T, int V, int NIN, typename KOf, typename Op>
__device__ __forceinline__ void elementwise_loop(const T* const (&in)[NIN], T* out, int64_t e,
                                                 int64_t end, int64_t step, int64_t stride,
                                                 const KOf& k_of, const Op& op) {
  for (; e + (kUnroll - 1) * step < end; e += kUnroll * step) {
    float v[kUnroll][NIN][V];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int t = 0; t < NIN; ++t)
        load_vec<T, V, kCacheStream>(in[t] + (e + u * step) * stride, v[u][t]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      apply_op<V, NIN>(k_of, v[u], op);
      store_vec<T, V, kCacheStream>(out + (e + u * step) * stride, v[u][0]);
    }
  }
  for (; e < end; e += step) {
    float v[NIN][V];
#pragma unroll
    for (int t = 0; t < NIN; ++t) load_vec<T, V, kCacheStream>(in[t] + e * stride, v[t]);
    apply_op<V, NIN>(k_of, v, op);
    store_vec<T, V, kCacheStream>(out + e * stride, v[0]);
  }
}

// Pass 2 of one block: out = op(k, in[0][e], ..., in[NIN - 1][e]) for every element e of
// the block, k = make_const(n, c) the constants of its example and channel; the inputs
// and the output have x's shape. The inputs are read for the last time and the output
// written once (streaming hints, to keep the next chunk in L2).
// Channels-last: block = (example, tile of channels, range of positions); channels-first:
// one warp per item (channel, range of the row).
// Assumptions: what op reads was written by an earlier launch; V divides the contiguous
// dimension (C or P; channels-first: also ew_len), pointers 16-byte aligned when V > 1.
template <int CL, typename T, int V, int NIN, typename MakeConst, typename Op>
__device__ __forceinline__ void elementwise_pass(const ArgsBase<T>& a, int64_t bid,
                                                 const T* const (&in)[NIN], T* out,
                                                 const MakeConst& make_const, const Op& op) {
  const Geometry& g = a.g;
  using K = decltype(make_const(int64_t(), int64_t()));
  const T* src[NIN];
  if constexpr (CL) {
    const ClBlock b = cl_block<2>(a, bid);
    if (b.cv * V >= g.c) return;
    K k[V];
#pragma unroll
    for (int i = 0; i < V; ++i) k[i] = make_const(b.n, b.cv * V + i);
    const int64_t off = b.n * g.p * g.c + b.cv * V;
#pragma unroll
    for (int t = 0; t < NIN; ++t) src[t] = in[t] + off;
    elementwise_loop<T, V, NIN>(src, out + off, b.p0 + b.ty, b.p1, g.ty, g.c,
                                [&](int i) -> const K& { return k[i]; }, op);
  } else {
    const CfItem it = cf_item<2>(a, bid);
    if (!it.valid) return;
    const K k = make_const(it.n, it.c);
    const int64_t off = (it.n * g.c + it.c) * g.p;
#pragma unroll
    for (int t = 0; t < NIN; ++t) src[t] = in[t] + off;
    elementwise_loop<T, V, NIN>(src, out + off, it.e0 + it.lane * V, it.e1, 32 * V, 1,
                                [&](int) { return k; }, op);
  }
}

// End of a channels-last pass-1 block whose thread tid holds the sums of its tile column
// over the block's positions in s[tid * V + i]: row 0 of the tile stores them to the
// example's partials `part`; then the ticket. True in the example's last block
// (block-uniform: every thread calls it).
template <int V, typename T, typename P>
__device__ __forceinline__ bool store_partials_cl(const ArgsBase<T>& a, const ClBlock& b,
                                                  P* part, const P* s, int* s_flag) {
  const Geometry& g = a.g;
  if (b.ty == 0 && b.cv * V < g.c) {
#pragma unroll
    for (int i = 0; i < V; ++i) part[b.n * g.ps_n + b.s * g.ps_s + b.cv * V + i] = s[b.tid * V + i];
  }
  return last_block(a, b.n, s_flag);
}

// Finalization of example n, run by every thread of the example's last pass-1 block once
// all its partials are visible: teams of threads (team_size) take the groups in turn; each
// thread folds the (channel c, split s) partials k = l, l + team, ... of its team's group,
// acc = fold(acc, c, s, index of the partial), starting from `zero`; then
// acc = reduce(acc, team) over the team (called by every thread: it may synchronize the
// block), and the team's first thread calls store(group, acc).
template <typename Acc, typename Fold, typename Reduce, typename Store>
__device__ __forceinline__ void finalize_groups(const Geometry& g, int64_t n, Acc zero,
                                                Fold fold, Reduce reduce, Store store) {
  const int64_t G = g.groups, D = g.d, S = g.splits, K = D * S;
  const int team = team_size(G, K);
  const int teams = kThreads / team;
  const int t = threadIdx.x / team, l = threadIdx.x & (team - 1);
  for (int64_t g0 = 0; g0 < G; g0 += teams) {
    const int64_t grp = g0 + t;
    Acc acc = zero;
    if (grp < G) {
      // 32-bit index math: K = D * S <= 64 C.
      const unsigned d32 = static_cast<unsigned>(D), s32 = static_cast<unsigned>(S);
      for (unsigned k = l; k < static_cast<unsigned>(K); k += team) {
        int64_t dd, ss;
        if (g.cl) {
          dd = k % d32, ss = k / d32;
        } else {
          ss = k % s32, dd = k / s32;
        }
        const int64_t c = grp * D + dd;
        acc = fold(acc, c, ss, n * g.ps_n + ss * g.ps_s + c * g.ps_c);
      }
    }
    acc = reduce(acc, team);
    if (grp < G && l == 0) store(grp, acc);
  }
}

// The kernel of direction Dir: one launch runs pass 1 of a chunk of examples, pass 2 of the
// previous chunk and, in the last launch, the tail role (see ArgsBase).
// Assumptions: blockDim.x == kThreads, 1-D grid; see the directions' role functions.
template <typename Dir, typename T, int V, int ACT, int CL>
__global__ void __launch_bounds__(kThreads, Dir::kMinBlocksPerSm)
    gna_kernel(const typename Dir::template Args<T> a) {
  __shared__ typename Dir::template Shared<V> shared;
  const int64_t b = blockIdx.x;
  if (b < a.red_blocks) {
    Dir::template pass1<T, V, ACT, CL>(a, b, shared);
    return;
  }
  if constexpr (Dir::kTail) {
    if (b >= a.red_blocks + a.ew_blocks) {
      Dir::template tail<T, V>(a, b - a.red_blocks - a.ew_blocks, shared);
      return;
    }
  }
  Dir::template pass2<T, V, ACT, CL>(a, b - a.red_blocks);
}

template <typename Dir, typename T>
using KernelPtr = void (*)(typename Dir::template Args<T>);

// The kernel instance for a geometry and activation: the vector path with the activation
// as a template argument, or the scalar fallback with the activation switched at run time.
template <typename Dir, typename T, int CL>
KernelPtr<Dir, T> pick_kernel_of_layout(const Geometry& g, int act) {
  if (g.vec != kVec) return gna_kernel<Dir, T, 1, kActRuntime, CL>;
  return with_activation(act, [](auto id) -> KernelPtr<Dir, T> {
    return gna_kernel<Dir, T, kVec, decltype(id)::value, CL>;
  });
}

template <typename Dir, typename T>
KernelPtr<Dir, T> pick_kernel(const Geometry& g, int act) {
  return g.cl ? pick_kernel_of_layout<Dir, T, 1>(g, act)
              : pick_kernel_of_layout<Dir, T, 0>(g, act);
}

// ---------------------------------------------------------------------------------------
// Host side: errors, runtime shim, chunking.

// Records the calling thread's last error (gna_runtime.cu); returns `code`.
int set_error(int code, const char* fmt, ...);
// Validates the common fields; returns TFPN_OK or sets the error.
int validate_problem(const tfpn_problem* p);
// Examples per step for `bytes_per_example` bytes of pass-1 inputs (>= 1).
int64_t chunk_examples(const tfpn_problem& pr, int64_t bytes_per_example);
// TFPN_OK or TFPN_ERR_CUDA (with the message) after a launch or async call.
int check_cuda(const char* what);
// Zeroes `bytes` at `p` on the stream.
int memset_async(void* p, size_t bytes, tfpn_stream_t stream);
// Fills `count` floats with `value` on the stream.
int fill_async(float* p, int64_t count, float value, tfpn_stream_t stream);

#if defined(TFPN_CUDA_EMULATION)
template <typename... KArgs, typename... Args>
inline void launch(void (*kernel)(KArgs...), int64_t blocks, tfpn_stream_t, Args... args) {
  emu::launch(dim3(static_cast<unsigned>(blocks)), dim3(kThreads), [&]() { kernel(args...); });
}
#else
template <typename... KArgs, typename... Args>
inline void launch(void (*kernel)(KArgs...), int64_t blocks, tfpn_stream_t stream,
                   Args... args) {
  kernel<<<static_cast<unsigned>(blocks), kThreads, 0, reinterpret_cast<cudaStream_t>(stream)>>>(
      args...);
}
#endif

// ---------------------------------------------------------------------------------------
// Host side of a direction: workspace, arguments, chunked launches, entry-point checks.

// The workspace of a direction: (N,) tickets, the (n, split, channel) partials of type
// Dir::Part (as many as the larger of the two vector widths need, so that the size does not
// depend on pointer alignment), then Dir::tail_bytes(pr) bytes; each part 256-byte
// aligned. With base == nullptr only `bytes` is set.
struct Workspace {
  unsigned* counters;
  void* part;
  void* tail;
  size_t bytes;
};

template <typename Dir>
Workspace workspace_layout(const tfpn_problem& pr, void* base) {
  const size_t counters = align256(static_cast<size_t>(pr.n) * sizeof(unsigned));
  const size_t part = align256(static_cast<size_t>(max_partials(pr, elem_bytes_of(pr.dtype))) *
                               sizeof(typename Dir::Part));
  Workspace w = {nullptr, nullptr, nullptr, counters + part + align256(Dir::tail_bytes(pr))};
  if (base != nullptr) {
    char* p = static_cast<char*>(base);
    w.counters = reinterpret_cast<unsigned*>(p);
    w.part = p + counters;
    w.tail = p + counters + part;
  }
  return w;
}

// Bytes of the workspace of a call, 0 for an invalid or degenerate problem.
template <typename Dir>
size_t workspace_size(const tfpn_problem* p) {
  if (validate_problem(p) != TFPN_OK || is_degenerate(*p)) return 0;
  return workspace_layout<Dir>(*p, nullptr).bytes;
}

// True when every pointer is 16-byte aligned (the vector path).
inline bool aligned16(std::initializer_list<const void*> ptrs) {
  uintptr_t bits = 0;
  for (const void* q : ptrs) bits |= reinterpret_cast<uintptr_t>(q);
  return (bits & 15u) == 0;
}

// Sets the fields of ArgsBase (all but the roles) and returns the workspace layout.
// `aligned`: x and the direction's other tensors of x's shape are 16-byte aligned.
template <typename Dir, typename T>
Workspace init_args(ArgsBase<T>& a, const tfpn_problem& pr, bool aligned, const void* x,
                    const float* gamma, const float* beta, const float* proxy_mean,
                    const float* proxy_inv_std, void* workspace) {
  a.g = make_geometry(pr, sizeof(T), aligned);
  a.x = static_cast<const T*>(x);
  a.gamma = gamma, a.beta = beta, a.proxy_mean = proxy_mean, a.proxy_inv_std = proxy_inv_std;
  const Workspace ws = workspace_layout<Dir>(pr, workspace);
  a.counters = ws.counters;
  a.use_proxy = pr.use_proxy;
  a.act = pr.activation;
  return ws;
}

// Runs direction Dir over the batch (the chunks of the top of this file): zeroes the
// tickets, then launch k runs pass 1 of chunk k and pass 2 of chunk k - 1 (k = 0..chunks),
// the last launch also the tail role. `a`: all fields but the roles set.
template <typename Dir, typename T>
int launch_chunks(typename Dir::template Args<T> a, const tfpn_problem& pr,
                  tfpn_stream_t stream) {
  const KernelPtr<Dir, T> kernel = pick_kernel<Dir, T>(a.g, a.act);
  int rc = memset_async(a.counters, static_cast<size_t>(pr.n) * sizeof(unsigned), stream);
  if (rc != TFPN_OK) return rc;
  const int64_t chunk =
      chunk_examples(pr, Dir::kPass1Tensors * a.g.p * a.g.c * static_cast<int64_t>(sizeof(T)));
  const int64_t nchunks = ceil_div(pr.n, chunk);
  for (int64_t k = 0; k <= nchunks; ++k) {
    const int64_t red_count = k < nchunks ? (k + 1 < nchunks ? chunk : pr.n - k * chunk) : 0;
    const int64_t ew_count = k > 0 ? (k < nchunks ? chunk : pr.n - (k - 1) * chunk) : 0;
    a.red_n0 = k * chunk;
    a.red_blocks = red_count * a.g.red_blocks_per_ex;
    a.ew_n0 = (k - 1) * chunk;
    a.ew_blocks = ew_count * a.g.ew_blocks_per_ex;
    a.tail_blocks = 0;
    if constexpr (Dir::kTail) a.tail_blocks = k == nchunks ? Dir::tail_blocks(a.g) : 0;
    const int64_t blocks = a.red_blocks + a.ew_blocks + a.tail_blocks;
    if (blocks > 0x7fffffff)
      return set_error(TFPN_ERR_INVALID_ARGUMENT, "tensor too large (%lld blocks)",
                       static_cast<long long>(blocks));
    launch(kernel, blocks, stream, a);
    rc = check_cuda(Dir::kWhat);
    if (rc != TFPN_OK) return rc;
  }
  return TFPN_OK;
}

// First checks of an entry point: the problem's fields, then the device and driver.
inline int check_call(const tfpn_problem* p) {
  const int rc = validate_problem(p);
  return rc != TFPN_OK ? rc : tfpn_cuda_check(nullptr, nullptr);
}

// TFPN_OK, or an error when one of `tensors` or of the parameters is NULL (the proxy ones
// only with use_proxy).
inline int check_tensors(const tfpn_problem& pr, std::initializer_list<const void*> tensors,
                         const float* gamma, const float* beta, const float* proxy_mean,
                         const float* proxy_inv_std) {
  bool null = gamma == nullptr || beta == nullptr ||
              (pr.use_proxy && (proxy_mean == nullptr || proxy_inv_std == nullptr));
  for (const void* q : tensors) null = null || q == nullptr;
  return null ? set_error(TFPN_ERR_INVALID_ARGUMENT, "NULL tensor pointer") : TFPN_OK;
}

// TFPN_OK, or TFPN_ERR_WORKSPACE when the workspace is missing, small or misaligned.
template <typename Dir>
int check_workspace(const tfpn_problem& pr, void* workspace, size_t workspace_bytes) {
  const size_t need = workspace_layout<Dir>(pr, nullptr).bytes;
  if (workspace == nullptr || workspace_bytes < need ||
      (reinterpret_cast<uintptr_t>(workspace) & 15u) != 0)
    return set_error(TFPN_ERR_WORKSPACE,
                     "workspace of %zu bytes at %p: need %zu bytes, 16-byte aligned",
                     workspace_bytes, workspace, need);
  return TFPN_OK;
}

template <typename T>
struct TypeTag {
  using type = T;
};

// The one switch from enum tfpn_dtype to the element type: returns f(TypeTag<T>()).
template <typename F>
decltype(auto) with_dtype(int dtype, F&& f) {
  switch (dtype) {
    case TFPN_FLOAT16: return f(TypeTag<__half>());
    case TFPN_BFLOAT16: return f(TypeTag<__nv_bfloat16>());
    default: return f(TypeTag<float>());
  }
}

}  // namespace tfpn

#endif  // TFPN_GNA_COMMON_CUH_
