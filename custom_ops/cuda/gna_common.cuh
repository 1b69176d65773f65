// Shared pieces of the CUDA kernels of GroupNormAct (forward: gna_forward.cu, backward:
// gna_backward.cu): element conversion and vector access, Welford statistics merged with
// Chan's formula, warp/team/block reductions, the launch geometry and the runtime shim.
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

// ACT >= 0: compile-time activation (fast path); kActRuntime: switch on `act` (the scalar
// fallback path, to halve the number of kernel instantiations).
constexpr int kActRuntime = -1;

template <int ACT>
__device__ __forceinline__ float act_forward(float a, int act) {
  using tf_proxynorm::ActForward;
  if constexpr (ACT >= 0) {
    return ActForward<ACT, CudaMath>(a);
  } else {
    switch (act) {
      case TFPN_ACT_RELU: return ActForward<TFPN_ACT_RELU, CudaMath>(a);
      case TFPN_ACT_SILU: return ActForward<TFPN_ACT_SILU, CudaMath>(a);
      case TFPN_ACT_GELU: return ActForward<TFPN_ACT_GELU, CudaMath>(a);
      case TFPN_ACT_LEAKY_RELU: return ActForward<TFPN_ACT_LEAKY_RELU, CudaMath>(a);
      default: return a;
    }
  }
}

template <int ACT>
__device__ __forceinline__ float act_forward_grad(float a, float* deriv, int act) {
  using tf_proxynorm::ActForwardAndGrad;
  if constexpr (ACT >= 0) {
    return ActForwardAndGrad<ACT, CudaMath>(a, deriv);
  } else {
    switch (act) {
      case TFPN_ACT_RELU: return ActForwardAndGrad<TFPN_ACT_RELU, CudaMath>(a, deriv);
      case TFPN_ACT_SILU: return ActForwardAndGrad<TFPN_ACT_SILU, CudaMath>(a, deriv);
      case TFPN_ACT_GELU: return ActForwardAndGrad<TFPN_ACT_GELU, CudaMath>(a, deriv);
      case TFPN_ACT_LEAKY_RELU:
        return ActForwardAndGrad<TFPN_ACT_LEAKY_RELU, CudaMath>(a, deriv);
      default: *deriv = 1.0f; return a;
    }
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

}  // namespace tfpn

#endif  // TFPN_GNA_COMMON_CUH_
