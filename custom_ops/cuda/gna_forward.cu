// Forward CUDA kernels of TfProxyNorm>GroupNormAct (docs/fused_op_contract.md):
//   mean, var = moments of x over (example, group); inv_std = 1 / sqrt(var + eps)
//   y = act(gamma * (x - mean) * inv_std + beta), then (y - proxy_mean) * proxy_inv_std
// See gna_common.cuh for the decomposition (pass 1 statistics with a last-block merge,
// pass 2 elementwise, chunks of examples for L2 reuse).
//
// Large offsets (|mean| up to 1e4 std): pass 1 accumulates the Welford statistics of
// x - pilot, the pilot being the group's first value, so that the float32 running means
// hold O(std) values instead of O(|mean|) ones (whose rounding, ulp(1e4) = 1e-3, would be
// the error of the mean). The finalization splits pilot + mean(x - pilot) into the float32
// mean and its rounding error mean_lo (workspace), which pass 2 folds into its offset, so
// that y is computed from (x - mean) - mean_lo.
#include "gna_common.cuh"

namespace tfpn {
namespace {

template <typename T>
struct FwdArgs : ArgsBase<T> {
  T* __restrict__ y;
  float* mean;     // (N, G) output, read back by pass 2 of a later launch
  float* mean_lo;  // (N, G) workspace: the rounding error of mean (the mean is mean + mean_lo)
  float* inv_std;  // (N, G)
  float2* part;    // (n, split, channel) partial (mean, M2), strides g.ps_*
  float eps;
};

// The pilot of group grp of example n: its first value (first position, first channel).
template <typename T>
__device__ __forceinline__ float group_pilot(const FwdArgs<T>& a, int64_t n, int64_t grp) {
  const Geometry& g = a.g;
  const int64_t c = grp * g.d;
  float v[1];
  load_vec<T, 1, kCacheDefault>(a.x + (g.cl ? n * g.p * g.c + c : (n * g.c + c) * g.p), v);
  return v[0];
}

// Merges the (split, channel) partials (moments of x - pilot) of example n into mean,
// mean_lo and inv_std of its groups.
// Run by the last pass-1 block of the example; all threads of the block call it.
// Assumptions: all partials of example n are written and visible; split s holds
// min(split_len, p - s * split_len) positions; smem has >= 3 * kWarps floats.
template <typename T>
__device__ void finalize_stats(const FwdArgs<T>& a, int64_t n, float* smem) {
  const Geometry& g = a.g;
  const float2* part = a.part;
  finalize_groups(
      g, n, Welford{0.0f, 0.0f, 0.0f},
      [&](const Welford& w, int64_t, int64_t ss, int64_t i) {
        const float2 v = __ldcg(part + i);
        const int64_t left = g.p - ss * g.split_len;
        const float cnt = static_cast<float>(left < g.split_len ? left : g.split_len);
        return welford_merge(w, Welford{v.x, v.y, cnt});
      },
      [smem](const Welford& w, int team) { return team_reduce_welford(w, team, smem); },
      [&](int64_t grp, const Welford& w) {
        float var = w.count > 0.0f ? w.m2 / w.count : 0.0f;
        var = var < 0.0f ? 0.0f : var;  // keeps NaN
        // mean = pilot + w.mean as a float and its rounding error (Knuth's TwoSum, exact).
        const float pilot = group_pilot(a, n, grp);
        const float mean = pilot + w.mean;
        const float back = mean - pilot;
        a.mean[n * g.groups + grp] = mean;
        a.mean_lo[n * g.groups + grp] = (pilot - (mean - back)) + (w.mean - back);
        a.inv_std[n * g.groups + grp] = rsqrtf(var + a.eps);
      });
}

// Pass 1, channels-last. Block = (example n, tile of tx*V channels, split of positions).
// Assumptions: x is (N, P, C); V divides C and x is 16-byte aligned when V > 1; tx is a
// power of two, tx * ty == kThreads; per-thread Welford over its rows (one count for its V
// channels), then a shared-memory tree over the ty rows with the exact row counts.
template <typename T, int V>
__device__ __forceinline__ void stats_cl(const FwdArgs<T>& a, int64_t bid, float2* s_w,
                                         int* s_flag) {
  const Geometry& g = a.g;
  const ClBlock b = cl_block<1>(a, bid);
  const bool active = b.cv * V < g.c;

  float mean[V], m2[V], pilot[V];
#pragma unroll
  for (int i = 0; i < V; ++i) mean[i] = 0.0f, m2[i] = 0.0f, pilot[i] = 0.0f;
  if (active) {
#pragma unroll
    for (int i = 0; i < V; ++i) pilot[i] = group_pilot(a, b.n, (b.cv * V + i) / g.d);
    const T* base = a.x + b.n * g.p * g.c + b.cv * V;
    const int64_t step = g.ty;
    float cnt = 0.0f;
    int64_t pp = b.p0 + b.ty;
    for (; pp + (kUnroll - 1) * step < b.p1; pp += kUnroll * step) {
      float v[kUnroll][V];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        load_vec<T, V, kCacheDefault>(base + (pp + u * step) * g.c, v[u]);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        cnt += 1.0f;
        const float rc = __frcp_rn(cnt);
#pragma unroll
        for (int i = 0; i < V; ++i) welford_step(mean[i], m2[i], v[u][i] - pilot[i], rc);
      }
    }
    for (; pp < b.p1; pp += step) {
      float v[V];
      load_vec<T, V, kCacheDefault>(base + pp * g.c, v);
      cnt += 1.0f;
      const float rc = __frcp_rn(cnt);
#pragma unroll
      for (int i = 0; i < V; ++i) welford_step(mean[i], m2[i], v[i] - pilot[i], rc);
    }
  }
  const int tid = b.tid, ty = b.ty;
#pragma unroll
  for (int i = 0; i < V; ++i) s_w[tid * V + i] = make_float2(mean[i], m2[i]);
  __syncthreads();
  // Before the step with stride st, thread-row r holds the rows = r (mod 2 st).
  const int64_t len = b.p1 - b.p0;
  for (int st = g.ty >> 1; st > 0; st >>= 1) {
    if (ty < st) {
      const float na = rows_of(len, ty, 2 * st), nb = rows_of(len, ty + st, 2 * st);
      const int other = tid + st * g.tx;
#pragma unroll
      for (int i = 0; i < V; ++i) {
        const float2 A = s_w[tid * V + i], B = s_w[other * V + i];
        const Welford m = welford_merge(Welford{A.x, A.y, na}, Welford{B.x, B.y, nb});
        s_w[tid * V + i] = make_float2(m.mean, m.m2);
      }
    }
    __syncthreads();
  }
  if (store_partials_cl<V>(a, b, a.part, s_w, s_flag))
    finalize_stats(a, b.n, reinterpret_cast<float*>(s_w));
}

// Pass 1, channels-first. One warp per item (channel c, split s of the row (n, c)).
// Assumptions: x is (N, C, P); V divides P and split_len, x 16-byte aligned when V > 1;
// items are warp-uniform, so the shuffles run with full warps.
template <typename T, int V>
__device__ __forceinline__ void stats_cf(const FwdArgs<T>& a, int64_t bid, float* smem,
                                         int* s_flag) {
  const Geometry& g = a.g;
  const CfItem it = cf_item<1>(a, bid);
  if (it.valid) {
    const T* row = a.x + (it.n * g.c + it.c) * g.p;
    const float pilot = group_pilot(a, it.n, it.c / g.d);
    float mean[V], m2[V], cnt = 0.0f;
#pragma unroll
    for (int i = 0; i < V; ++i) mean[i] = 0.0f, m2[i] = 0.0f;
    constexpr int64_t kStep = 32 * V;
    int64_t e = it.e0 + it.lane * V;
    for (; e + (kUnroll - 1) * kStep < it.e1; e += kUnroll * kStep) {
      float v[kUnroll][V];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) load_vec<T, V, kCacheDefault>(row + e + u * kStep, v[u]);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        cnt += 1.0f;
        const float rc = __frcp_rn(cnt);
#pragma unroll
        for (int i = 0; i < V; ++i) welford_step(mean[i], m2[i], v[u][i] - pilot, rc);
      }
    }
    for (; e < it.e1; e += kStep) {
      float v[V];
      load_vec<T, V, kCacheDefault>(row + e, v);
      cnt += 1.0f;
      const float rc = __frcp_rn(cnt);
#pragma unroll
      for (int i = 0; i < V; ++i) welford_step(mean[i], m2[i], v[i] - pilot, rc);
    }
    Welford w = {mean[0], m2[0], cnt};
#pragma unroll
    for (int i = 1; i < V; ++i) w = welford_merge(w, Welford{mean[i], m2[i], cnt});
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) w = welford_merge(w, welford_shfl_xor(w, o));
    if (it.lane == 0) a.part[it.n * g.ps_n + it.c * g.ps_c + it.s] = make_float2(w.mean, w.m2);
  }
  if (last_block(a, it.n, s_flag)) finalize_stats(a, it.n, smem);
}

// Per-channel constants of pass 2: y = fma(act((x - mu) * sc + bt), ps, pb).
struct ApplyConst {
  float mu, sc, bt, ps, pb;
};

template <typename T>
__device__ __forceinline__ ApplyConst apply_const(const FwdArgs<T>& a, int64_t n, int64_t c) {
  const int64_t grp = c / a.g.d;
  const float is = a.inv_std[n * a.g.groups + grp];
  ApplyConst k;
  k.mu = a.mean[n * a.g.groups + grp];
  k.sc = __ldg(a.gamma + c) * is;
  // (x - mu - mean_lo) * sc + beta, with mean_lo folded into the offset.
  k.bt = __ldg(a.beta + c) - a.mean_lo[n * a.g.groups + grp] * k.sc;
  if (a.use_proxy) {
    k.ps = __ldg(a.proxy_inv_std + c);
    k.pb = -__ldg(a.proxy_mean + c) * k.ps;
  } else {
    k.ps = 1.0f, k.pb = 0.0f;
  }
  return k;
}

template <int ACT>
__device__ __forceinline__ float apply_one(float x, const ApplyConst& k, int act) {
  return fmaf(act_forward<ACT>(fmaf(x - k.mu, k.sc, k.bt), act), k.ps, k.pb);
}

// The forward as a direction of gna_kernel (gna_common.cuh): pass 1 statistics, pass 2
// normalize, affine, activation, proxy; no tail role.
struct Forward {
  template <typename T>
  using Args = FwdArgs<T>;
  template <int V>
  struct Shared {
    float2 w[kThreads * V];  // per-thread (mean, M2) of stats_cl, floats of stats_cf
    int flag;
  };
  using Part = float2;
  static constexpr int kMinBlocksPerSm = 3;
  static constexpr int kPass1Tensors = 1;  // x
  static constexpr bool kTail = false;
  static constexpr const char* kWhat = "GroupNormAct forward kernel launch";
  // mean_lo after the partials.
  static size_t tail_bytes(const tfpn_problem& pr) {
    return static_cast<size_t>(pr.n * pr.groups) * sizeof(float);
  }

  template <typename T, int V, int ACT, int CL>
  static __device__ __forceinline__ void pass1(const FwdArgs<T>& a, int64_t bid,
                                               Shared<V>& sh) {
    if constexpr (CL) {
      stats_cl<T, V>(a, bid, sh.w, &sh.flag);
    } else {
      stats_cf<T, V>(a, bid, reinterpret_cast<float*>(sh.w), &sh.flag);
    }
  }
  // Pass 2: y = apply_one(x).
  template <typename T, int V, int ACT, int CL>
  static __device__ __forceinline__ void pass2(const FwdArgs<T>& a, int64_t bid) {
    elementwise_pass<CL, T, V>(
        a, bid, {a.x}, a.y, [&](int64_t n, int64_t c) { return apply_const(a, n, c); },
        [&](const ApplyConst& k, float x) { return apply_one<ACT>(x, k, a.act); });
  }
};

template <typename T>
int fwd_impl(const tfpn_problem& pr, const void* x, const float* gamma, const float* beta,
             const float* proxy_mean, const float* proxy_inv_std, void* y, float* mean,
             float* inv_std, void* workspace, tfpn_stream_t stream) {
  FwdArgs<T> a;
  const Workspace ws = init_args<Forward>(a, pr, aligned16({x, y}), x, gamma, beta, proxy_mean,
                                          proxy_inv_std, workspace);
  a.y = static_cast<T*>(y);
  a.mean = mean, a.inv_std = inv_std;
  a.mean_lo = static_cast<float*>(ws.tail);
  a.part = static_cast<float2*>(ws.part);
  a.eps = pr.epsilon;
  return launch_chunks<Forward, T>(a, pr, stream);
}

}  // namespace
}  // namespace tfpn

extern "C" {

int tfpn_group_norm_act_fwd(const tfpn_problem* p, const void* x, const float* gamma,
                            const float* beta, const float* proxy_mean,
                            const float* proxy_inv_std, void* y, float* mean, float* inv_std,
                            void* workspace, size_t workspace_bytes, tfpn_stream_t stream) {
  int rc = tfpn::check_call(p);
  if (rc != TFPN_OK) return rc;
  const tfpn_problem& pr = *p;
  const int64_t ng = pr.n * pr.groups;
  if ((ng > 0 && (mean == nullptr || inv_std == nullptr)))
    return tfpn::set_error(TFPN_ERR_INVALID_ARGUMENT, "mean/inv_std are NULL");
  if (tfpn::is_degenerate(pr)) {
    // Empty groups (or no examples): var = 0, mean = 0; y has no elements.
    rc = tfpn::fill_async(mean, ng, 0.0f, stream);
    if (rc == TFPN_OK) rc = tfpn::fill_async(inv_std, ng, 1.0f / std::sqrt(pr.epsilon), stream);
    return rc;
  }
  rc = tfpn::check_tensors(pr, {x, y}, gamma, beta, proxy_mean, proxy_inv_std);
  if (rc == TFPN_OK) rc = tfpn::check_workspace<tfpn::Forward>(pr, workspace, workspace_bytes);
  if (rc != TFPN_OK) return rc;
  return tfpn::with_dtype(pr.dtype, [&](auto type) {
    return tfpn::fwd_impl<typename decltype(type)::type>(pr, x, gamma, beta, proxy_mean,
                                                         proxy_inv_std, y, mean, inv_std,
                                                         workspace, stream);
  });
}

size_t tfpn_group_norm_act_fwd_workspace_size(const tfpn_problem* p) {
  return tfpn::workspace_size<tfpn::Forward>(p);
}

}  // extern "C"
