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
//
// Large offsets: both passes centre x as (x - mean) - mean_lo, mean_lo the rounding error
// of the float32 mean (half an ulp of 1e4 is 5e-4 of a unit std). The op gets only the
// float32 mean, so a first launch (refine_mean_kernel) recomputes mean_lo from x for the
// groups whose mean is large against their std, and writes 0 for the others.
#include <initializer_list>

#include "gna_common.cuh"

namespace tfpn {
namespace {

template <typename T>
struct BwdArgs : ArgsBase<T> {
  const T* __restrict__ dy;
  T* __restrict__ dx;
  const float* __restrict__ mean;     // (N, G)
  const float* __restrict__ inv_std;  // (N, G)
  float* dgamma;
  float* dbeta;
  float* dproxy_mean;
  float* dproxy_inv_std;
  float4* part;     // (n, split, channel) partials [da, da xhat, dy, dy (h - pm)]
  float2* gsum;     // (N, G) [m1, m2]
  float* mean_lo;   // (N, G) rounding error of mean, from refine_mean_kernel
};

// Per-channel constants of both passes.
struct GradConst {
  // mean, its rounding error, inv_std, gamma, beta, proxy scale, proxy mean
  float mu, lo, is, gm, bt, ps, pm;
};

// The refinement of the float32 mean of a group is skipped when its rounding, at most
// |mean| 2^-24, is below 2^-21 (5e-7) of the std: |mean| * inv_std <= 8.
constexpr float kRefineMinMeanOverStd = 8.0f;

// mean_lo[n, g] = mean(x - mean) over the group's values where the refinement is needed,
// else 0. Block = one (example, group) at a time (grid-stride, block-uniform), threads
// striding over the group's values, then a fixed-order block sum (deterministic). Only a
// correction of at most one ulp of the float32 mean is kept: that is the forward's rounding
// of x's group mean (a mean input that is not, e.g. a caller's own, is used as given).
// Assumptions: blockDim.x == kThreads; g.p > 0.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    refine_mean_kernel(const T* x, const float* mean, const float* inv_std, float* mean_lo,
                       const Geometry g) {
  __shared__ float s_sum[kWarps];
  const int64_t groups = g.n * g.groups;
  const int64_t values = g.d * g.p;
  for (int64_t ng = blockIdx.x; ng < groups; ng += gridDim.x) {
    const float mu = mean[ng];
    if (!(fabsf(mu) * inv_std[ng] > kRefineMinMeanOverStd)) {
      if (threadIdx.x == 0) mean_lo[ng] = 0.0f;
      continue;
    }
    const int64_t n = ng / g.groups, c0 = (ng % g.groups) * g.d;
    float sum = 0.0f;
    for (int64_t k = threadIdx.x; k < values; k += kThreads) {
      // Channels-last: value k is (position k / d, channel c0 + k % d); else contiguous.
      const int64_t i = g.cl ? (n * g.p + k / g.d) * g.c + c0 + k % g.d
                             : (n * g.c + c0) * g.p + k;
      float v[1];
      load_vec<T, 1, kCacheDefault>(x + i, v);
      sum += v[0] - mu;
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
    if ((threadIdx.x & 31) == 0) s_sum[threadIdx.x >> 5] = sum;
    __syncthreads();
    if (threadIdx.x == 0) {
      float total = 0.0f;
      for (int w = 0; w < kWarps; ++w) total += s_sum[w];
      const float lo = total / static_cast<float>(values);
      const float m = fabsf(mu);
      const float ulp = __uint_as_float(__float_as_uint(m) + 1u) - m;  // NaN for inf
      mean_lo[ng] = fabsf(lo) <= ulp ? lo : 0.0f;
    }
    __syncthreads();  // s_sum is reused by the next group
  }
}

template <typename T>
__device__ __forceinline__ GradConst grad_const(const BwdArgs<T>& a, int64_t n, int64_t c) {
  const int64_t grp = c / a.g.d;
  GradConst k;
  k.mu = __ldg(a.mean + n * a.g.groups + grp);
  k.lo = a.mean_lo[n * a.g.groups + grp];  // written by an earlier launch
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
  const float xh = ((xv - k.mu) - k.lo) * k.is;
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
  const float inv_m =
      static_cast<float>(1.0 / (static_cast<double>(g.d) * static_cast<double>(g.p)));
  finalize_groups(
      g, n, make_float2(0.0f, 0.0f),
      [&](float2 sum, int64_t c, int64_t, int64_t i) {
        const float4 v = __ldcg(part + i);
        const float gm = __ldg(gamma + c);
        sum.x = fmaf(gm, v.x, sum.x);
        sum.y = fmaf(gm, v.y, sum.y);
        return sum;
      },
      [smem](float2 sum, int team) { return team_reduce_sum2(sum, team, smem); },
      [&](int64_t grp, float2 sum) {
        gsum[n * g.groups + grp] = make_float2(sum.x * inv_m, sum.y * inv_m);
      });
}

// Pass 1, channels-last. Block = (example n, tile of tx*V channels, split of positions).
// Assumptions: x, dy are (N, P, C); V divides C, pointers 16-byte aligned when V > 1;
// tx * ty == kThreads; x and dy stay cacheable (pass 2 of the next launch re-reads them).
template <typename T, int V, int ACT>
__device__ __forceinline__ void reduce_cl(const BwdArgs<T>& a, int64_t bid, float4* s_acc,
                                          int* s_flag) {
  const Geometry& g = a.g;
  const ClBlock b = cl_block<1>(a, bid);
  const bool active = b.cv * V < g.c;
  float4 acc[V];
#pragma unroll
  for (int i = 0; i < V; ++i) acc[i] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  if (active) {
    GradConst k[V];
#pragma unroll
    for (int i = 0; i < V; ++i) k[i] = grad_const(a, b.n, b.cv * V + i);
    const int64_t off = b.n * g.p * g.c + b.cv * V;
    const T* xb = a.x + off;
    const T* db = a.dy + off;
    const int64_t step = g.ty;
    int64_t pp = b.p0 + b.ty;
    for (; pp + (kUnroll - 1) * step < b.p1; pp += kUnroll * step) {
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
    for (; pp < b.p1; pp += step) {
      float xv[V], dv[V];
      load_vec<T, V, kCacheDefault>(xb + pp * g.c, xv);
      load_vec<T, V, kCacheDefault>(db + pp * g.c, dv);
#pragma unroll
      for (int i = 0; i < V; ++i) grad_accumulate<ACT>(xv[i], dv[i], k[i], acc[i], a.act);
    }
  }
  const int tid = b.tid, ty = b.ty;
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
  if (store_partials_cl<V>(a, b, a.part, s_acc, s_flag))
    finalize_grad(g, a.part, a.gamma, b.n, a.gsum, reinterpret_cast<float*>(s_acc));
}

// Pass 1, channels-first. One warp per item (channel c, split s of the row (n, c)).
// Assumptions: x, dy are (N, C, P); V divides P and split_len; items are warp-uniform.
template <typename T, int V, int ACT>
__device__ __forceinline__ void reduce_cf(const BwdArgs<T>& a, int64_t bid, float* smem,
                                          int* s_flag) {
  const Geometry& g = a.g;
  const CfItem it = cf_item<1>(a, bid);
  if (it.valid) {
    const GradConst k = grad_const(a, it.n, it.c);
    const int64_t off = (it.n * g.c + it.c) * g.p;
    const T* xr = a.x + off;
    const T* dr = a.dy + off;
    float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    constexpr int64_t kStep = 32 * V;
    int64_t e = it.e0 + it.lane * V;
    for (; e + (kUnroll - 1) * kStep < it.e1; e += kUnroll * kStep) {
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
    for (; e < it.e1; e += kStep) {
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
    if (it.lane == 0) a.part[it.n * g.ps_n + it.c * g.ps_c + it.s] = acc;
  }
  if (last_block(a, it.n, s_flag))
    finalize_grad(g, a.part, a.gamma, it.n, a.gsum, smem);
}

// dx of one element.
struct DxConst {
  float mu, lo, is, gm, bt, gp, m1, m2;  // gp = gamma * proxy scale
};

template <typename T>
__device__ __forceinline__ DxConst dx_const(const BwdArgs<T>& a, int64_t n, int64_t c) {
  const GradConst k = grad_const(a, n, c);
  const float2 m = a.gsum[n * a.g.groups + c / a.g.d];
  return DxConst{k.mu, k.lo, k.is, k.gm, k.bt, k.gm * k.ps, m.x, m.y};
}

template <int ACT>
__device__ __forceinline__ float dx_one(float xv, float dyv, const DxConst& k, int act) {
  const float xh = ((xv - k.mu) - k.lo) * k.is;
  float dact = 1.0f;
  if (ACT != TFPN_ACT_IDENTITY) act_forward_grad<ACT>(fmaf(xh, k.gm, k.bt), &dact, act);
  return k.is * (fmaf(dyv * k.gp, dact, -k.m1) - xh * k.m2);
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

// The backward as a direction of gna_kernel (gna_common.cuh): pass 1 partial sums and
// m1/m2, pass 2 dx, and the parameter gradients as the tail role of the last launch.
struct Backward {
  template <typename T>
  using Args = BwdArgs<T>;
  template <int V>
  struct Shared {
    float4 acc[kThreads * V];  // per-thread sums of reduce_cl and param_grads
    int flag;
  };
  using Part = float4;
  static constexpr bool kTail = true;
  static constexpr int kMinBlocksPerSm = 2;
  static constexpr int kPass1Tensors = 2;  // x, dy
  static constexpr const char* kWhat = "GroupNormActGrad kernel launch";
  // gsum then mean_lo after the partials.
  static size_t tail_bytes(const tfpn_problem& pr) {
    return static_cast<size_t>(pr.n * pr.groups) * (sizeof(float2) + sizeof(float));
  }
  static int64_t tail_blocks(const Geometry& g) { return ceil_div(g.c, 32); }

  template <typename T, int V, int ACT, int CL>
  static __device__ __forceinline__ void pass1(const BwdArgs<T>& a, int64_t bid,
                                               Shared<V>& sh) {
    if constexpr (CL) {
      reduce_cl<T, V, ACT>(a, bid, sh.acc, &sh.flag);
    } else {
      reduce_cf<T, V, ACT>(a, bid, reinterpret_cast<float*>(sh.acc), &sh.flag);
    }
  }
  // Pass 2: dx = dx_one(x, dy).
  template <typename T, int V, int ACT, int CL>
  static __device__ __forceinline__ void pass2(const BwdArgs<T>& a, int64_t bid) {
    elementwise_pass<CL, T, V>(
        a, bid, {a.x, a.dy}, a.dx, [&](int64_t n, int64_t c) { return dx_const(a, n, c); },
        [&](const DxConst& k, float x, float dy) { return dx_one<ACT>(x, dy, k, a.act); });
  }
  template <typename T, int V>
  static __device__ __forceinline__ void tail(const BwdArgs<T>& a, int64_t bid, Shared<V>& sh) {
    param_grads<T>(a, bid, sh.acc);
  }
};

template <typename T>
int bwd_impl(const tfpn_problem& pr, const void* dy, const void* x, const float* gamma,
             const float* beta, const float* proxy_mean, const float* proxy_inv_std,
             const float* mean, const float* inv_std, void* dx, float* dgamma, float* dbeta,
             float* dproxy_mean, float* dproxy_inv_std, void* workspace,
             tfpn_stream_t stream) {
  BwdArgs<T> a;
  const Workspace ws = init_args<Backward>(a, pr, aligned16({x, dy, dx}), x, gamma, beta,
                                           proxy_mean, proxy_inv_std, workspace);
  a.dy = static_cast<const T*>(dy);
  a.dx = static_cast<T*>(dx);
  a.mean = mean, a.inv_std = inv_std;
  a.dgamma = dgamma, a.dbeta = dbeta, a.dproxy_mean = dproxy_mean;
  a.dproxy_inv_std = dproxy_inv_std;
  a.part = static_cast<float4*>(ws.part);
  a.gsum = static_cast<float2*>(ws.tail);
  a.mean_lo = reinterpret_cast<float*>(a.gsum + pr.n * pr.groups);
  const int64_t refine_blocks = clamp64(pr.n * pr.groups, 1, int64_t{1} << 20);
  launch(refine_mean_kernel<T>, refine_blocks, stream, a.x, mean, inv_std, a.mean_lo, a.g);
  const int rc = check_cuda("GroupNormActGrad mean refinement launch");
  if (rc != TFPN_OK) return rc;
  return launch_chunks<Backward, T>(a, pr, stream);
}

}  // namespace
}  // namespace tfpn

extern "C" {

int tfpn_group_norm_act_bwd(const tfpn_problem* p, const void* dy, const void* x,
                            const float* gamma, const float* beta, const float* proxy_mean,
                            const float* proxy_inv_std, const float* mean,
                            const float* inv_std, void* dx, float* dgamma, float* dbeta,
                            float* dproxy_mean, float* dproxy_inv_std, void* workspace,
                            size_t workspace_bytes, tfpn_stream_t stream) {
  int rc = tfpn::check_call(p);
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
  rc = tfpn::check_tensors(pr, {dy, x, dx, mean, inv_std}, gamma, beta, proxy_mean,
                           proxy_inv_std);
  if (rc == TFPN_OK) rc = tfpn::check_workspace<tfpn::Backward>(pr, workspace, workspace_bytes);
  if (rc != TFPN_OK) return rc;
  return tfpn::with_dtype(pr.dtype, [&](auto type) {
    return tfpn::bwd_impl<typename decltype(type)::type>(
        pr, dy, x, gamma, beta, proxy_mean, proxy_inv_std, mean, inv_std, dx, dgamma, dbeta,
        dproxy_mean, dproxy_inv_std, workspace, stream);
  });
}

size_t tfpn_group_norm_act_bwd_workspace_size(const tfpn_problem* p) {
  return tfpn::workspace_size<tfpn::Backward>(p);
}

}  // extern "C"
