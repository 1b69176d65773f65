// Backward CUDA kernels of TfProxyNorm>GroupNormAct (docs/fused_op_contract.md):
//   xhat = (x - mean) * inv_std, a = gamma xhat + beta, h = act(a)
//   dh = use_proxy ? dy * proxy_inv_std : dy,  da = dh * act'(a)
//   dgamma = sum da xhat, dbeta = sum da, dproxy_mean = -proxy_inv_std sum dy,
//   dproxy_inv_std = sum dy (h - proxy_mean)                       (sums over n, positions)
//   dx = inv_std (gamma da - m1 - xhat m2), m1 = mean_group(gamma da),
//        m2 = mean_group(gamma da xhat)
// Pass 1 computes per-(example, split, channel) partials of [da, da xhat, dy,
// dy (h - proxy_mean)]; the last block of each example reduces them into m1/m2 of its
// groups (the group sums are sum_c gamma_c * channel sums). Pass 2 computes dx. A third
// role reduces the partials over examples and splits into the (C,) gradients.
#include <initializer_list>

#include "gna_common.cuh"

namespace tfpn {
namespace {

template <typename T>
struct BwdArgs {
  Geometry g;
  const T* __restrict__ dy;
  const T* __restrict__ x;
  T* __restrict__ dx;
  const float* __restrict__ gamma;
  const float* __restrict__ beta;
  const float* __restrict__ proxy_mean;
  const float* __restrict__ proxy_inv_std;
  const float* __restrict__ mean;     // (N, G)
  const float* __restrict__ inv_std;  // (N, G)
  float* dgamma;
  float* dbeta;
  float* dproxy_mean;
  float* dproxy_inv_std;
  float4* part;        // (n, split, channel) partials [da, da xhat, dy, dy (h - pm)]
  float2* gsum;        // (N, G) [m1, m2]
  unsigned* counters;  // (N,) tickets, zero on entry
  int use_proxy;
  int act;  // activation id, used when ACT == kActRuntime
  int64_t red_n0, red_blocks;  // pass-1 role
  int64_t ew_n0, ew_blocks;    // pass-2 role, blocks [red_blocks, red_blocks + ew_blocks)
  int64_t pf_blocks;           // parameter-gradient role, after the pass-2 blocks
};

// Per-channel constants of both passes.
struct GradConst {
  float mu, is, gm, bt, ps, pm;  // mean, inv_std, gamma, beta, proxy scale, proxy mean
};

template <typename T>
__device__ __forceinline__ GradConst grad_const(const BwdArgs<T>& a, int64_t n, int64_t c) {
  const int64_t grp = c / a.g.d;
  GradConst k;
  k.mu = __ldg(a.mean + n * a.g.groups + grp);
  k.is = __ldg(a.inv_std + n * a.g.groups + grp);
  k.gm = __ldg(a.gamma + c);
  k.bt = __ldg(a.beta + c);
  if (a.use_proxy) {
    k.ps = __ldg(a.proxy_inv_std + c);
    k.pm = __ldg(a.proxy_mean + c);
  } else {
    k.ps = 1.0f, k.pm = 0.0f;
  }
  return k;
}

// Accumulates one element into [da, da xhat, dy, dy (h - pm)].
template <int ACT>
__device__ __forceinline__ void grad_accumulate(float xv, float dyv, const GradConst& k,
                                                float4& acc, int act) {
  const float xh = (xv - k.mu) * k.is;
  float dact;
  const float h = act_forward_grad<ACT>(fmaf(xh, k.gm, k.bt), &dact, act);
  const float da = dyv * k.ps * dact;
  acc.x += da;
  acc.y = fmaf(da, xh, acc.y);
  acc.z += dyv;
  acc.w = fmaf(dyv, h - k.pm, acc.w);
}

__device__ __forceinline__ float4 add4(const float4& a, const float4& b) {
  return make_float4(a.x + b.x, a.y + b.y, a.z + b.z, a.w + b.w);
}

// Merges the partials of example n into gsum = [m1, m2] of its groups.
// Run by the last pass-1 block of the example; all threads of the block call it.
// Assumptions: all partials of example n are written and visible; smem >= 2 * kWarps
// floats.
__device__ void finalize_grad(const Geometry& g, const float4* part, const float* gamma,
                              int64_t n, float2* gsum, float* smem) {
  const int64_t G = g.groups, D = g.d, S = g.splits, K = D * S;
  const int team = team_size(G, K);
  const int teams = kThreads / team;
  const int t = threadIdx.x / team, l = threadIdx.x & (team - 1);
  const float inv_m = static_cast<float>(1.0 / (static_cast<double>(D) * static_cast<double>(g.p)));
  for (int64_t g0 = 0; g0 < G; g0 += teams) {
    const int64_t grp = g0 + t;
    float2 sum = make_float2(0.0f, 0.0f);
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
        const float4 v = __ldcg(part + n * g.ps_n + ss * g.ps_s + c * g.ps_c);
        const float gm = __ldg(gamma + c);
        sum.x = fmaf(gm, v.x, sum.x);
        sum.y = fmaf(gm, v.y, sum.y);
      }
    }
    sum = team_reduce_sum2(sum, team, smem);
    if (grp < G && l == 0) gsum[n * G + grp] = make_float2(sum.x * inv_m, sum.y * inv_m);
  }
}

// Pass 1, channels-last. Block = (example n, tile of tx*V channels, split of positions).
// Assumptions: x, dy are (N, P, C); V divides C, pointers 16-byte aligned when V > 1;
// tx * ty == kThreads; x and dy stay cacheable (pass 2 of the next launch re-reads them).
template <typename T, int V, int ACT>
__device__ __forceinline__ void reduce_cl(const BwdArgs<T>& a, int64_t bid, float4* s_acc,
                                          int* s_flag) {
  const Geometry& g = a.g;
  const int64_t n = a.red_n0 + bid / g.red_blocks_per_ex;
  const int64_t r = bid % g.red_blocks_per_ex;
  const int64_t ct = r % g.ctiles, s = r / g.ctiles;
  const int tid = threadIdx.x;
  const int tx = tid & (g.tx - 1), ty = tid >> g.tx_log2;
  const int64_t cv = ct * g.tx + tx;
  const bool active = cv * V < g.c;
  float4 acc[V];
#pragma unroll
  for (int i = 0; i < V; ++i) acc[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  if (active) {
    GradConst k[V];
#pragma unroll
    for (int i = 0; i < V; ++i) k[i] = grad_const(a, n, cv * V + i);
    const int64_t p0 = s * g.split_len;
    const int64_t p1 = (p0 + g.split_len < g.p) ? p0 + g.split_len : g.p;
    const int64_t off = n * g.p * g.c + cv * V;
    const T* xb = a.x + off;
    const T* db = a.dy + off;
    const int64_t step = g.ty;
    int64_t pp = p0 + ty;
    for (; pp + (kUnroll - 1) * step < p1; pp += kUnroll * step) {
      float xv[kUnroll][V], dv[kUnroll][V];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        load_vec<T, V, kCacheDefault>(xb + (pp + u * step) * g.c, xv[u]);
        load_vec<T, V, kCacheDefault>(db + (pp + u * step) * g.c, dv[u]);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int i = 0; i < V; ++i) grad_accumulate<ACT>(xv[u][i], dv[u][i], k[i], acc[i], a.act);
      }
    }
    for (; pp < p1; pp += step) {
      float xv[V], dv[V];
      load_vec<T, V, kCacheDefault>(xb + pp * g.c, xv);
      load_vec<T, V, kCacheDefault>(db + pp * g.c, dv);
#pragma unroll
      for (int i = 0; i < V; ++i) grad_accumulate<ACT>(xv[i], dv[i], k[i], acc[i], a.act);
    }
  }
#pragma unroll
  for (int i = 0; i < V; ++i) s_acc[tid * V + i] = acc[i];
  __syncthreads();
  for (int st = g.ty >> 1; st > 0; st >>= 1) {
    if (ty < st) {
      const int other = tid + st * g.tx;
#pragma unroll
      for (int i = 0; i < V; ++i) s_acc[tid * V + i] = add4(s_acc[tid * V + i], s_acc[other * V + i]);
    }
    __syncthreads();
  }
  if (ty == 0 && active) {
#pragma unroll
    for (int i = 0; i < V; ++i) a.part[n * g.ps_n + s * g.ps_s + cv * V + i] = s_acc[tid * V + i];
  }
  if (last_block_of_example(a.counters + n, static_cast<unsigned>(g.red_blocks_per_ex), s_flag))
    finalize_grad(g, a.part, a.gamma, n, a.gsum, reinterpret_cast<float*>(s_acc));
}

// Pass 1, channels-first. One warp per item (channel c, split s of the row (n, c)).
// Assumptions: x, dy are (N, C, P); V divides P and split_len; items are warp-uniform.
template <typename T, int V, int ACT>
__device__ __forceinline__ void reduce_cf(const BwdArgs<T>& a, int64_t bid, float* smem,
                                          int* s_flag) {
  const Geometry& g = a.g;
  const int64_t n = a.red_n0 + bid / g.red_blocks_per_ex;
  const int64_t item = (bid % g.red_blocks_per_ex) * kWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (item < g.c * g.splits) {
    const int64_t c = item / g.splits, s = item % g.splits;
    const GradConst k = grad_const(a, n, c);
    const int64_t e0 = s * g.split_len;
    const int64_t e1 = (e0 + g.split_len < g.p) ? e0 + g.split_len : g.p;
    const int64_t off = (n * g.c + c) * g.p;
    const T* xr = a.x + off;
    const T* dr = a.dy + off;
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    constexpr int64_t kStep = 32 * V;
    int64_t e = e0 + lane * V;
    for (; e + (kUnroll - 1) * kStep < e1; e += kUnroll * kStep) {
      float xv[kUnroll][V], dv[kUnroll][V];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        load_vec<T, V, kCacheDefault>(xr + e + u * kStep, xv[u]);
        load_vec<T, V, kCacheDefault>(dr + e + u * kStep, dv[u]);
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
        for (int i = 0; i < V; ++i) grad_accumulate<ACT>(xv[u][i], dv[u][i], k, acc, a.act);
      }
    }
    for (; e < e1; e += kStep) {
      float xv[V], dv[V];
      load_vec<T, V, kCacheDefault>(xr + e, xv);
      load_vec<T, V, kCacheDefault>(dr + e, dv);
#pragma unroll
      for (int i = 0; i < V; ++i) grad_accumulate<ACT>(xv[i], dv[i], k, acc, a.act);
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
      acc.x += __shfl_xor_sync(0xffffffffu, acc.x, o);
      acc.y += __shfl_xor_sync(0xffffffffu, acc.y, o);
      acc.z += __shfl_xor_sync(0xffffffffu, acc.z, o);
      acc.w += __shfl_xor_sync(0xffffffffu, acc.w, o);
    }
    if (lane == 0) a.part[n * g.ps_n + c * g.ps_c + s] = acc;
  }
  if (last_block_of_example(a.counters + n, static_cast<unsigned>(g.red_blocks_per_ex), s_flag))
    finalize_grad(g, a.part, a.gamma, n, a.gsum, smem);
}

// dx of one element.
struct DxConst {
  float mu, is, gm, bt, gp, m1, m2;  // gp = gamma * proxy scale
};

template <typename T>
__device__ __forceinline__ DxConst dx_const(const BwdArgs<T>& a, int64_t n, int64_t c) {
  const GradConst k = grad_const(a, n, c);
  const float2 m = a.gsum[n * a.g.groups + c / a.g.d];
  return DxConst{k.mu, k.is, k.gm, k.bt, k.gm * k.ps, m.x, m.y};
}

template <int ACT>
__device__ __forceinline__ float dx_one(float xv, float dyv, const DxConst& k, int act) {
  const float xh = (xv - k.mu) * k.is;
  float dact = 1.0f;
  if (ACT != TFPN_ACT_IDENTITY) act_forward_grad<ACT>(fmaf(xh, k.gm, k.bt), &dact, act);
  return k.is * (fmaf(dyv * k.gp, dact, -k.m1) - xh * k.m2);
}

// Pass 2, channels-last. Block = (example, tile of channels, range of positions).
// Assumptions: gsum of the example was written by an earlier launch; x and dy are read
// for the last time, dx written once (streaming hints); V divides C, 16-byte alignment.
template <typename T, int V, int ACT>
__device__ __forceinline__ void dx_cl(const BwdArgs<T>& a, int64_t bid) {
  const Geometry& g = a.g;
  const int64_t n = a.ew_n0 + bid / g.ew_blocks_per_ex;
  const int64_t r = bid % g.ew_blocks_per_ex;
  const int64_t ct = r % g.ctiles, s = r / g.ctiles;
  const int tid = threadIdx.x;
  const int tx = tid & (g.tx - 1), ty = tid >> g.tx_log2;
  const int64_t cv = ct * g.tx + tx;
  if (cv * V >= g.c) return;
  DxConst k[V];
#pragma unroll
  for (int i = 0; i < V; ++i) k[i] = dx_const(a, n, cv * V + i);
  const int64_t p0 = s * g.ew_len;
  const int64_t p1 = (p0 + g.ew_len < g.p) ? p0 + g.ew_len : g.p;
  const int64_t off = n * g.p * g.c + cv * V;
  const T* xb = a.x + off;
  const T* db = a.dy + off;
  T* ob = a.dx + off;
  const int64_t step = g.ty;
  int64_t pp = p0 + ty;
  for (; pp + (kUnroll - 1) * step < p1; pp += kUnroll * step) {
    float xv[kUnroll][V], dv[kUnroll][V];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      load_vec<T, V, kCacheStream>(xb + (pp + u * step) * g.c, xv[u]);
      load_vec<T, V, kCacheStream>(db + (pp + u * step) * g.c, dv[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int i = 0; i < V; ++i) xv[u][i] = dx_one<ACT>(xv[u][i], dv[u][i], k[i], a.act);
      store_vec<T, V, kCacheStream>(ob + (pp + u * step) * g.c, xv[u]);
    }
  }
  for (; pp < p1; pp += step) {
    float xv[V], dv[V];
    load_vec<T, V, kCacheStream>(xb + pp * g.c, xv);
    load_vec<T, V, kCacheStream>(db + pp * g.c, dv);
#pragma unroll
    for (int i = 0; i < V; ++i) xv[i] = dx_one<ACT>(xv[i], dv[i], k[i], a.act);
    store_vec<T, V, kCacheStream>(ob + pp * g.c, xv);
  }
}

// Pass 2, channels-first. One warp per item (channel, range of the row).
// Assumptions: as dx_cl; V divides P and ew_len.
template <typename T, int V, int ACT>
__device__ __forceinline__ void dx_cf(const BwdArgs<T>& a, int64_t bid) {
  const Geometry& g = a.g;
  const int64_t n = a.ew_n0 + bid / g.ew_blocks_per_ex;
  const int64_t item = (bid % g.ew_blocks_per_ex) * kWarps + (threadIdx.x >> 5);
  if (item >= g.c * g.ew_splits) return;
  const int lane = threadIdx.x & 31;
  const int64_t c = item / g.ew_splits, s = item % g.ew_splits;
  const DxConst k = dx_const(a, n, c);
  const int64_t e0 = s * g.ew_len;
  const int64_t e1 = (e0 + g.ew_len < g.p) ? e0 + g.ew_len : g.p;
  const int64_t off = (n * g.c + c) * g.p;
  const T* xr = a.x + off;
  const T* dr = a.dy + off;
  T* orow = a.dx + off;
  constexpr int64_t kStep = 32 * V;
  int64_t e = e0 + lane * V;
  for (; e + (kUnroll - 1) * kStep < e1; e += kUnroll * kStep) {
    float xv[kUnroll][V], dv[kUnroll][V];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      load_vec<T, V, kCacheStream>(xr + e + u * kStep, xv[u]);
      load_vec<T, V, kCacheStream>(dr + e + u * kStep, dv[u]);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int i = 0; i < V; ++i) xv[u][i] = dx_one<ACT>(xv[u][i], dv[u][i], k, a.act);
      store_vec<T, V, kCacheStream>(orow + e + u * kStep, xv[u]);
    }
  }
  for (; e < e1; e += kStep) {
    float xv[V], dv[V];
    load_vec<T, V, kCacheStream>(xr + e, xv);
    load_vec<T, V, kCacheStream>(dr + e, dv);
#pragma unroll
    for (int i = 0; i < V; ++i) xv[i] = dx_one<ACT>(xv[i], dv[i], k, a.act);
    store_vec<T, V, kCacheStream>(orow + e, xv);
  }
}

// Second stage of the parameter gradients: block = 32 channels x 8 row-lanes, each
// summing a strided subset of the N * splits partials of its channel, then a fixed-order
// sum of the 8 lanes (deterministic).
// Assumptions: all partials of all examples were written by earlier launches.
template <typename T>
__device__ __forceinline__ void param_grads(const BwdArgs<T>& a, int64_t bid, float4* s_acc) {
  const Geometry& g = a.g;
  const int lane = threadIdx.x & 31, row = threadIdx.x >> 5;
  const int64_t c = bid * 32 + lane;
  const int64_t rows = g.n * g.splits;
  float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  if (c < g.c) {
    const unsigned s32 = static_cast<unsigned>(g.splits);
    for (unsigned j = row; j < static_cast<unsigned>(rows); j += kWarps) {
      const int64_t nn = j / s32, ss = j % s32;
      acc = add4(acc, __ldcg(a.part + nn * g.ps_n + ss * g.ps_s + c * g.ps_c));
    }
  }
  s_acc[threadIdx.x] = acc;
  __syncthreads();
  if (row == 0 && c < g.c) {
    float4 t = s_acc[lane];
    for (int k = 1; k < kWarps; ++k) t = add4(t, s_acc[k * 32 + lane]);
    a.dgamma[c] = t.y;
    a.dbeta[c] = t.x;
    if (a.use_proxy) {
      a.dproxy_mean[c] = -__ldg(a.proxy_inv_std + c) * t.z;
      a.dproxy_inv_std[c] = t.w;
    } else {
      a.dproxy_mean[c] = 0.0f;
      a.dproxy_inv_std[c] = 0.0f;
    }
  }
}

// One launch of the backward: blocks [0, red_blocks) run pass 1 of one chunk of examples,
// the next ew_blocks pass 2 (dx) of the previous chunk, the last pf_blocks (last launch
// only) the parameter gradients.
// Assumptions: blockDim.x == kThreads, 1-D grid; see the role functions.
template <typename T, int V, int ACT, int CL>
__global__ void __launch_bounds__(kThreads, 2) gna_bwd_kernel(const BwdArgs<T> a) {
  __shared__ float4 s_acc[kThreads * V];
  __shared__ int s_flag;
  const int64_t b = blockIdx.x;
  if (b < a.red_blocks) {
    if constexpr (CL) {
      reduce_cl<T, V, ACT>(a, b, s_acc, &s_flag);
    } else {
      reduce_cf<T, V, ACT>(a, b, reinterpret_cast<float*>(s_acc), &s_flag);
    }
  } else if (b < a.red_blocks + a.ew_blocks) {
    if constexpr (CL) {
      dx_cl<T, V, ACT>(a, b - a.red_blocks);
    } else {
      dx_cf<T, V, ACT>(a, b - a.red_blocks);
    }
  } else {
    param_grads<T>(a, b - a.red_blocks - a.ew_blocks, s_acc);
  }
}

template <typename T>
using BwdKernel = void (*)(BwdArgs<T>);

template <typename T, int CL>
BwdKernel<T> pick_act(int act) {
  switch (act) {
    case TFPN_ACT_RELU: return gna_bwd_kernel<T, kVec, TFPN_ACT_RELU, CL>;
    case TFPN_ACT_SILU: return gna_bwd_kernel<T, kVec, TFPN_ACT_SILU, CL>;
    case TFPN_ACT_GELU: return gna_bwd_kernel<T, kVec, TFPN_ACT_GELU, CL>;
    case TFPN_ACT_LEAKY_RELU: return gna_bwd_kernel<T, kVec, TFPN_ACT_LEAKY_RELU, CL>;
    default: return gna_bwd_kernel<T, kVec, TFPN_ACT_IDENTITY, CL>;
  }
}

template <typename T>
BwdKernel<T> pick_kernel(const Geometry& g, int act) {
  if (g.cl) return g.vec == kVec ? pick_act<T, 1>(act) : gna_bwd_kernel<T, 1, kActRuntime, 1>;
  return g.vec == kVec ? pick_act<T, 0>(act) : gna_bwd_kernel<T, 1, kActRuntime, 0>;
}

struct BwdWorkspace {
  unsigned* counters;
  float4* part;
  float2* gsum;
  size_t bytes;
};

BwdWorkspace bwd_workspace(const tfpn_problem& pr, void* base) {
  BwdWorkspace w;
  char* p = static_cast<char*>(base);
  const size_t counters = align256(static_cast<size_t>(pr.n) * sizeof(unsigned));
  const size_t part =
      align256(static_cast<size_t>(max_partials(pr, elem_bytes_of(pr.dtype))) * sizeof(float4));
  const size_t gsum = align256(static_cast<size_t>(pr.n * pr.groups) * sizeof(float2));
  w.counters = reinterpret_cast<unsigned*>(p);
  w.part = reinterpret_cast<float4*>(p + counters);
  w.gsum = reinterpret_cast<float2*>(p + counters + part);
  w.bytes = counters + part + gsum;
  return w;
}

template <typename T>
int bwd_impl(const tfpn_problem& pr, const void* dy, const void* x, const float* gamma,
             const float* beta, const float* proxy_mean, const float* proxy_inv_std,
             const float* mean, const float* inv_std, void* dx, float* dgamma, float* dbeta,
             float* dproxy_mean, float* dproxy_inv_std, void* workspace,
             tfpn_stream_t stream) {
  const bool aligned = ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(dy) |
                         reinterpret_cast<uintptr_t>(dx)) &
                        15u) == 0;
  BwdArgs<T> a;
  a.g = make_geometry(pr, sizeof(T), aligned);
  a.dy = static_cast<const T*>(dy);
  a.x = static_cast<const T*>(x);
  a.dx = static_cast<T*>(dx);
  a.gamma = gamma, a.beta = beta, a.proxy_mean = proxy_mean, a.proxy_inv_std = proxy_inv_std;
  a.mean = mean, a.inv_std = inv_std;
  a.dgamma = dgamma, a.dbeta = dbeta, a.dproxy_mean = dproxy_mean;
  a.dproxy_inv_std = dproxy_inv_std;
  const BwdWorkspace ws = bwd_workspace(pr, workspace);
  a.part = ws.part;
  a.gsum = ws.gsum;
  a.counters = ws.counters;
  a.use_proxy = pr.use_proxy;
  a.act = pr.activation;
  const BwdKernel<T> kernel = pick_kernel<T>(a.g, pr.activation);

  int rc = memset_async(ws.counters, static_cast<size_t>(pr.n) * sizeof(unsigned), stream);
  if (rc != TFPN_OK) return rc;
  const int64_t chunk =
      chunk_examples(pr, 2 * a.g.p * a.g.c * static_cast<int64_t>(sizeof(T)));
  const int64_t nchunks = ceil_div(pr.n, chunk);
  for (int64_t k = 0; k <= nchunks; ++k) {
    const int64_t red_count = k < nchunks ? (k + 1 < nchunks ? chunk : pr.n - k * chunk) : 0;
    const int64_t ew_count = k > 0 ? (k < nchunks ? chunk : pr.n - (k - 1) * chunk) : 0;
    a.red_n0 = k * chunk;
    a.red_blocks = red_count * a.g.red_blocks_per_ex;
    a.ew_n0 = (k - 1) * chunk;
    a.ew_blocks = ew_count * a.g.ew_blocks_per_ex;
    a.pf_blocks = k == nchunks ? ceil_div(pr.c, 32) : 0;
    const int64_t blocks = a.red_blocks + a.ew_blocks + a.pf_blocks;
    if (blocks > 0x7fffffff)
      return set_error(TFPN_ERR_INVALID_ARGUMENT, "tensor too large (%lld blocks)",
                       static_cast<long long>(blocks));
    launch(kernel, blocks, stream, a);
    rc = check_cuda("GroupNormActGrad kernel launch");
    if (rc != TFPN_OK) return rc;
  }
  return TFPN_OK;
}

}  // namespace
}  // namespace tfpn

extern "C" {

size_t tfpn_group_norm_act_bwd_workspace_size(const tfpn_problem* p) {
  if (tfpn::validate_problem(p) != TFPN_OK) return 0;
  if (tfpn::is_degenerate(*p)) return 0;
  return tfpn::bwd_workspace(*p, nullptr).bytes;
}

int tfpn_group_norm_act_bwd(const tfpn_problem* p, const void* dy, const void* x,
                            const float* gamma, const float* beta, const float* proxy_mean,
                            const float* proxy_inv_std, const float* mean,
                            const float* inv_std, void* dx, float* dgamma, float* dbeta,
                            float* dproxy_mean, float* dproxy_inv_std, void* workspace,
                            size_t workspace_bytes, tfpn_stream_t stream) {
  int rc = tfpn::validate_problem(p);
  if (rc != TFPN_OK) return rc;
  rc = tfpn_cuda_check(nullptr, nullptr);
  if (rc != TFPN_OK) return rc;
  const tfpn_problem& pr = *p;
  if (pr.c > 0 &&
      (dgamma == nullptr || dbeta == nullptr || dproxy_mean == nullptr || dproxy_inv_std == nullptr))
    return tfpn::set_error(TFPN_ERR_INVALID_ARGUMENT, "NULL gradient pointer");
  if (tfpn::is_degenerate(pr)) {
    // No values: every sum is empty; dx has no elements.
    for (float* q : {dgamma, dbeta, dproxy_mean, dproxy_inv_std}) {
      rc = tfpn::fill_async(q, pr.c, 0.0f, stream);
      if (rc != TFPN_OK) return rc;
    }
    return TFPN_OK;
  }
  if (dy == nullptr || x == nullptr || dx == nullptr || gamma == nullptr || beta == nullptr ||
      mean == nullptr || inv_std == nullptr ||
      (pr.use_proxy && (proxy_mean == nullptr || proxy_inv_std == nullptr)))
    return tfpn::set_error(TFPN_ERR_INVALID_ARGUMENT, "NULL tensor pointer");
  const size_t need = tfpn::bwd_workspace(pr, nullptr).bytes;
  if (workspace == nullptr || workspace_bytes < need ||
      (reinterpret_cast<uintptr_t>(workspace) & 15u) != 0)
    return tfpn::set_error(TFPN_ERR_WORKSPACE,
                           "workspace of %zu bytes at %p: need %zu bytes, 16-byte aligned",
                           workspace_bytes, workspace, need);
  switch (pr.dtype) {
    case TFPN_FLOAT16:
      return tfpn::bwd_impl<__half>(pr, dy, x, gamma, beta, proxy_mean, proxy_inv_std, mean,
                                    inv_std, dx, dgamma, dbeta, dproxy_mean, dproxy_inv_std,
                                    workspace, stream);
    case TFPN_BFLOAT16:
      return tfpn::bwd_impl<__nv_bfloat16>(pr, dy, x, gamma, beta, proxy_mean, proxy_inv_std,
                                           mean, inv_std, dx, dgamma, dbeta, dproxy_mean,
                                           dproxy_inv_std, workspace, stream);
    default:
      return tfpn::bwd_impl<float>(pr, dy, x, gamma, beta, proxy_mean, proxy_inv_std, mean,
                                   inv_std, dx, dgamma, dbeta, dproxy_mean, dproxy_inv_std,
                                   workspace, stream);
  }
}

}  // extern "C"
