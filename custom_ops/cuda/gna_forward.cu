// Forward CUDA kernels of TfProxyNorm>GroupNormAct (docs/fused_op_contract.md):
//   mean, var = moments of x over (example, group); inv_std = 1 / sqrt(var + eps)
//   y = act(gamma * (x - mean) * inv_std + beta), then (y - proxy_mean) * proxy_inv_std
// See gna_common.cuh for the decomposition (pass 1 statistics with a last-block merge,
// pass 2 elementwise, chunks of examples for L2 reuse).
#include "gna_common.cuh"

namespace tfpn {
namespace {

template <typename T>
struct FwdArgs {
  Geometry g;
  const T* __restrict__ x;
  T* __restrict__ y;
  const float* __restrict__ gamma;
  const float* __restrict__ beta;
  const float* __restrict__ proxy_mean;
  const float* __restrict__ proxy_inv_std;
  float* mean;     // (N, G) output, read back by pass 2 of a later launch
  float* inv_std;  // (N, G)
  float2* part;    // (n, split, channel) partial (mean, M2), strides g.ps_*
  unsigned* counters;  // (N,) tickets, zero on entry
  float eps;
  int use_proxy;
  int act;  // activation id, used when ACT == kActRuntime
  int64_t red_n0, red_blocks;  // pass-1 role: examples red_n0.. in blocks [0, red_blocks)
  int64_t ew_n0;               // pass-2 role: examples ew_n0.. in the remaining blocks
};

// Merges the (split, channel) partials of example n into mean/inv_std of its groups.
// Run by the last pass-1 block of the example; all threads of the block call it.
// Assumptions: all partials of example n are written and visible; split s holds
// min(split_len, p - s * split_len) positions; smem has >= 3 * kWarps floats.
__device__ void finalize_stats(const Geometry& g, const float2* part, int64_t n, float eps,
                               float* mean_out, float* inv_out, float* smem) {
  const int64_t G = g.groups, D = g.d, S = g.splits, K = D * S;
  const int team = team_size(G, K);
  const int teams = kThreads / team;
  const int t = threadIdx.x / team, l = threadIdx.x & (team - 1);
  for (int64_t g0 = 0; g0 < G; g0 += teams) {
    const int64_t grp = g0 + t;
    Welford w = {0.0f, 0.0f, 0.0f};
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
        const float2 v = __ldcg(part + n * g.ps_n + ss * g.ps_s + (grp * D + dd) * g.ps_c);
        const int64_t left = g.p - ss * g.split_len;
        const float cnt = static_cast<float>(left < g.split_len ? left : g.split_len);
        w = welford_merge(w, Welford{v.x, v.y, cnt});
      }
    }
    w = team_reduce_welford(w, team, smem);
    if (grp < G && l == 0) {
      float var = w.count > 0.0f ? w.m2 / w.count : 0.0f;
      var = var < 0.0f ? 0.0f : var;  // keeps NaN
      mean_out[n * G + grp] = w.mean;
      inv_out[n * G + grp] = rsqrtf(var + eps);
    }
  }
}

// Pass 1, channels-last. Block = (example n, tile of tx*V channels, split of positions).
// Assumptions: x is (N, P, C); V divides C and x is 16-byte aligned when V > 1; tx is a
// power of two, tx * ty == kThreads; per-thread Welford over its rows (one count for its V
// channels), then a shared-memory tree over the ty rows with the exact row counts.
template <typename T, int V>
__device__ __forceinline__ void stats_cl(const FwdArgs<T>& a, int64_t bid, float2* s_w,
                                         int* s_flag) {
  const Geometry& g = a.g;
  const int64_t n = a.red_n0 + bid / g.red_blocks_per_ex;
  const int64_t r = bid % g.red_blocks_per_ex;
  const int64_t ct = r % g.ctiles, s = r / g.ctiles;
  const int tid = threadIdx.x;
  const int tx = tid & (g.tx - 1), ty = tid >> g.tx_log2;
  const int64_t cv = ct * g.tx + tx;
  const bool active = cv * V < g.c;
  const int64_t p0 = s * g.split_len;
  const int64_t p1 = (p0 + g.split_len < g.p) ? p0 + g.split_len : g.p;

  float mean[V], m2[V];
#pragma unroll
  for (int i = 0; i < V; ++i) mean[i] = 0.0f, m2[i] = 0.0f;
  if (active) {
    const T* base = a.x + n * g.p * g.c + cv * V;
    const int64_t step = g.ty;
    float cnt = 0.0f;
    int64_t pp = p0 + ty;
    for (; pp + (kUnroll - 1) * step < p1; pp += kUnroll * step) {
      float v[kUnroll][V];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u)
        load_vec<T, V, kCacheDefault>(base + (pp + u * step) * g.c, v[u]);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        cnt += 1.0f;
        const float rc = __frcp_rn(cnt);
#pragma unroll
        for (int i = 0; i < V; ++i) welford_step(mean[i], m2[i], v[u][i], rc);
      }
    }
    for (; pp < p1; pp += step) {
      float v[V];
      load_vec<T, V, kCacheDefault>(base + pp * g.c, v);
      cnt += 1.0f;
      const float rc = __frcp_rn(cnt);
#pragma unroll
      for (int i = 0; i < V; ++i) welford_step(mean[i], m2[i], v[i], rc);
    }
  }
#pragma unroll
  for (int i = 0; i < V; ++i) s_w[tid * V + i] = make_float2(mean[i], m2[i]);
  __syncthreads();
  // Before the step with stride st, thread-row r holds the rows = r (mod 2 st).
  const int64_t len = p1 - p0;
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
  if (ty == 0 && active) {
#pragma unroll
    for (int i = 0; i < V; ++i) a.part[n * g.ps_n + s * g.ps_s + cv * V + i] = s_w[tid * V + i];
  }
  if (last_block_of_example(a.counters + n, static_cast<unsigned>(g.red_blocks_per_ex), s_flag))
    finalize_stats(g, a.part, n, a.eps, a.mean, a.inv_std, reinterpret_cast<float*>(s_w));
}

// Pass 1, channels-first. One warp per item (channel c, split s of the row (n, c)).
// Assumptions: x is (N, C, P); V divides P and split_len, x 16-byte aligned when V > 1;
// items are warp-uniform, so the shuffles run with full warps.
template <typename T, int V>
__device__ __forceinline__ void stats_cf(const FwdArgs<T>& a, int64_t bid, float* smem,
                                         int* s_flag) {
  const Geometry& g = a.g;
  const int64_t n = a.red_n0 + bid / g.red_blocks_per_ex;
  const int64_t item = (bid % g.red_blocks_per_ex) * kWarps + (threadIdx.x >> 5);
  const int lane = threadIdx.x & 31;
  if (item < g.c * g.splits) {
    const int64_t c = item / g.splits, s = item % g.splits;
    const int64_t e0 = s * g.split_len;
    const int64_t e1 = (e0 + g.split_len < g.p) ? e0 + g.split_len : g.p;
    const T* row = a.x + (n * g.c + c) * g.p;
    float mean[V], m2[V], cnt = 0.0f;
#pragma unroll
    for (int i = 0; i < V; ++i) mean[i] = 0.0f, m2[i] = 0.0f;
    constexpr int64_t kStep = 32 * V;
    int64_t e = e0 + lane * V;
    for (; e + (kUnroll - 1) * kStep < e1; e += kUnroll * kStep) {
      float v[kUnroll][V];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) load_vec<T, V, kCacheDefault>(row + e + u * kStep, v[u]);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        cnt += 1.0f;
        const float rc = __frcp_rn(cnt);
#pragma unroll
        for (int i = 0; i < V; ++i) welford_step(mean[i], m2[i], v[u][i], rc);
      }
    }
    for (; e < e1; e += kStep) {
      float v[V];
      load_vec<T, V, kCacheDefault>(row + e, v);
      cnt += 1.0f;
      const float rc = __frcp_rn(cnt);
#pragma unroll
      for (int i = 0; i < V; ++i) welford_step(mean[i], m2[i], v[i], rc);
    }
    Welford w = {mean[0], m2[0], cnt};
#pragma unroll
    for (int i = 1; i < V; ++i) w = welford_merge(w, Welford{mean[i], m2[i], cnt});
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) w = welford_merge(w, welford_shfl_xor(w, o));
    if (lane == 0) a.part[n * g.ps_n + c * g.ps_c + s] = make_float2(w.mean, w.m2);
  }
  if (last_block_of_example(a.counters + n, static_cast<unsigned>(g.red_blocks_per_ex), s_flag))
    finalize_stats(g, a.part, n, a.eps, a.mean, a.inv_std, smem);
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
  k.bt = __ldg(a.beta + c);
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

// Pass 2, channels-last. Block = (example, tile of channels, range of positions).
// Assumptions: mean/inv_std of the example were written by an earlier launch; x is read
// for the last time and y written once (streaming cache hints, to keep the next chunk in
// L2); V divides C, pointers 16-byte aligned when V > 1.
template <typename T, int V, int ACT>
__device__ __forceinline__ void apply_cl(const FwdArgs<T>& a, int64_t bid) {
  const Geometry& g = a.g;
  const int64_t n = a.ew_n0 + bid / g.ew_blocks_per_ex;
  const int64_t r = bid % g.ew_blocks_per_ex;
  const int64_t ct = r % g.ctiles, s = r / g.ctiles;
  const int tid = threadIdx.x;
  const int tx = tid & (g.tx - 1), ty = tid >> g.tx_log2;
  const int64_t cv = ct * g.tx + tx;
  if (cv * V >= g.c) return;
  ApplyConst k[V];
#pragma unroll
  for (int i = 0; i < V; ++i) k[i] = apply_const(a, n, cv * V + i);
  const int64_t p0 = s * g.ew_len;
  const int64_t p1 = (p0 + g.ew_len < g.p) ? p0 + g.ew_len : g.p;
  const int64_t off = n * g.p * g.c + cv * V;
  const T* xb = a.x + off;
  T* yb = a.y + off;
  const int64_t step = g.ty;
  int64_t pp = p0 + ty;
  for (; pp + (kUnroll - 1) * step < p1; pp += kUnroll * step) {
    float v[kUnroll][V];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u)
      load_vec<T, V, kCacheStream>(xb + (pp + u * step) * g.c, v[u]);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int i = 0; i < V; ++i) v[u][i] = apply_one<ACT>(v[u][i], k[i], a.act);
      store_vec<T, V, kCacheStream>(yb + (pp + u * step) * g.c, v[u]);
    }
  }
  for (; pp < p1; pp += step) {
    float v[V];
    load_vec<T, V, kCacheStream>(xb + pp * g.c, v);
#pragma unroll
    for (int i = 0; i < V; ++i) v[i] = apply_one<ACT>(v[i], k[i], a.act);
    store_vec<T, V, kCacheStream>(yb + pp * g.c, v);
  }
}

// Pass 2, channels-first. One warp per item (channel, range of the row).
// Assumptions: as apply_cl; V divides P and ew_len.
template <typename T, int V, int ACT>
__device__ __forceinline__ void apply_cf(const FwdArgs<T>& a, int64_t bid) {
  const Geometry& g = a.g;
  const int64_t n = a.ew_n0 + bid / g.ew_blocks_per_ex;
  const int64_t item = (bid % g.ew_blocks_per_ex) * kWarps + (threadIdx.x >> 5);
  if (item >= g.c * g.ew_splits) return;
  const int lane = threadIdx.x & 31;
  const int64_t c = item / g.ew_splits, s = item % g.ew_splits;
  const ApplyConst k = apply_const(a, n, c);
  const int64_t e0 = s * g.ew_len;
  const int64_t e1 = (e0 + g.ew_len < g.p) ? e0 + g.ew_len : g.p;
  const int64_t off = (n * g.c + c) * g.p;
  const T* xr = a.x + off;
  T* yr = a.y + off;
  constexpr int64_t kStep = 32 * V;
  int64_t e = e0 + lane * V;
  for (; e + (kUnroll - 1) * kStep < e1; e += kUnroll * kStep) {
    float v[kUnroll][V];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) load_vec<T, V, kCacheStream>(xr + e + u * kStep, v[u]);
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
#pragma unroll
      for (int i = 0; i < V; ++i) v[u][i] = apply_one<ACT>(v[u][i], k, a.act);
      store_vec<T, V, kCacheStream>(yr + e + u * kStep, v[u]);
    }
  }
  for (; e < e1; e += kStep) {
    float v[V];
    load_vec<T, V, kCacheStream>(xr + e, v);
#pragma unroll
    for (int i = 0; i < V; ++i) v[i] = apply_one<ACT>(v[i], k, a.act);
    store_vec<T, V, kCacheStream>(yr + e, v);
  }
}

// One launch of the forward: blocks [0, red_blocks) run pass 1 (statistics) of one chunk
// of examples, the others pass 2 (normalize, affine, activation, proxy) of the previous
// chunk.
// Assumptions: blockDim.x == kThreads, 1-D grid; see the role functions.
template <typename T, int V, int ACT, int CL>
__global__ void __launch_bounds__(kThreads, 3) gna_fwd_kernel(const FwdArgs<T> a) {
  __shared__ float2 s_w[kThreads * V];
  __shared__ int s_flag;
  const int64_t b = blockIdx.x;
  if (b < a.red_blocks) {
    if constexpr (CL) {
      stats_cl<T, V>(a, b, s_w, &s_flag);
    } else {
      stats_cf<T, V>(a, b, reinterpret_cast<float*>(s_w), &s_flag);
    }
  } else {
    if constexpr (CL) {
      apply_cl<T, V, ACT>(a, b - a.red_blocks);
    } else {
      apply_cf<T, V, ACT>(a, b - a.red_blocks);
    }
  }
}

template <typename T>
using FwdKernel = void (*)(FwdArgs<T>);

template <typename T, int CL>
FwdKernel<T> pick_act(int act) {
  switch (act) {
    case TFPN_ACT_RELU: return gna_fwd_kernel<T, kVec, TFPN_ACT_RELU, CL>;
    case TFPN_ACT_SILU: return gna_fwd_kernel<T, kVec, TFPN_ACT_SILU, CL>;
    case TFPN_ACT_GELU: return gna_fwd_kernel<T, kVec, TFPN_ACT_GELU, CL>;
    case TFPN_ACT_LEAKY_RELU: return gna_fwd_kernel<T, kVec, TFPN_ACT_LEAKY_RELU, CL>;
    default: return gna_fwd_kernel<T, kVec, TFPN_ACT_IDENTITY, CL>;
  }
}

template <typename T>
FwdKernel<T> pick_kernel(const Geometry& g, int act) {
  if (g.cl) return g.vec == kVec ? pick_act<T, 1>(act) : gna_fwd_kernel<T, 1, kActRuntime, 1>;
  return g.vec == kVec ? pick_act<T, 0>(act) : gna_fwd_kernel<T, 1, kActRuntime, 0>;
}

struct FwdWorkspace {
  unsigned* counters;
  float2* part;
  size_t bytes;
};

FwdWorkspace fwd_workspace(const tfpn_problem& pr, void* base) {
  FwdWorkspace w;
  char* p = static_cast<char*>(base);
  const size_t counters = align256(static_cast<size_t>(pr.n) * sizeof(unsigned));
  const size_t part =
      align256(static_cast<size_t>(max_partials(pr, elem_bytes_of(pr.dtype))) * sizeof(float2));
  w.counters = reinterpret_cast<unsigned*>(p);
  w.part = reinterpret_cast<float2*>(p + counters);
  w.bytes = counters + part;
  return w;
}

template <typename T>
int fwd_impl(const tfpn_problem& pr, const void* x, const float* gamma, const float* beta,
             const float* proxy_mean, const float* proxy_inv_std, void* y, float* mean,
             float* inv_std, void* workspace, tfpn_stream_t stream) {
  const bool aligned =
      ((reinterpret_cast<uintptr_t>(x) | reinterpret_cast<uintptr_t>(y)) & 15u) == 0;
  FwdArgs<T> a;
  a.g = make_geometry(pr, sizeof(T), aligned);
  a.x = static_cast<const T*>(x);
  a.y = static_cast<T*>(y);
  a.gamma = gamma, a.beta = beta, a.proxy_mean = proxy_mean, a.proxy_inv_std = proxy_inv_std;
  a.mean = mean, a.inv_std = inv_std;
  const FwdWorkspace ws = fwd_workspace(pr, workspace);
  a.part = ws.part;
  a.counters = ws.counters;
  a.eps = pr.epsilon;
  a.use_proxy = pr.use_proxy;
  a.act = pr.activation;
  const FwdKernel<T> kernel = pick_kernel<T>(a.g, pr.activation);

  int rc = memset_async(ws.counters, static_cast<size_t>(pr.n) * sizeof(unsigned), stream);
  if (rc != TFPN_OK) return rc;
  const int64_t chunk = chunk_examples(pr, a.g.p * a.g.c * static_cast<int64_t>(sizeof(T)));
  const int64_t nchunks = ceil_div(pr.n, chunk);
  for (int64_t k = 0; k <= nchunks; ++k) {
    const int64_t red_count = k < nchunks ? (k + 1 < nchunks ? chunk : pr.n - k * chunk) : 0;
    const int64_t ew_count = k > 0 ? (k < nchunks ? chunk : pr.n - (k - 1) * chunk) : 0;
    a.red_n0 = k * chunk;
    a.red_blocks = red_count * a.g.red_blocks_per_ex;
    a.ew_n0 = (k - 1) * chunk;
    const int64_t blocks = a.red_blocks + ew_count * a.g.ew_blocks_per_ex;
    if (blocks > 0x7fffffff)
      return set_error(TFPN_ERR_INVALID_ARGUMENT, "tensor too large (%lld blocks)",
                       static_cast<long long>(blocks));
    launch(kernel, blocks, stream, a);
    rc = check_cuda("GroupNormAct forward kernel launch");
    if (rc != TFPN_OK) return rc;
  }
  return TFPN_OK;
}

}  // namespace
}  // namespace tfpn

extern "C" {

size_t tfpn_group_norm_act_fwd_workspace_size(const tfpn_problem* p) {
  if (tfpn::validate_problem(p) != TFPN_OK) return 0;
  if (tfpn::is_degenerate(*p)) return 0;
  return tfpn::fwd_workspace(*p, nullptr).bytes;
}

int tfpn_group_norm_act_fwd(const tfpn_problem* p, const void* x, const float* gamma,
                            const float* beta, const float* proxy_mean,
                            const float* proxy_inv_std, void* y, float* mean, float* inv_std,
                            void* workspace, size_t workspace_bytes, tfpn_stream_t stream) {
  int rc = tfpn::validate_problem(p);
  if (rc != TFPN_OK) return rc;
  rc = tfpn_cuda_check(nullptr, nullptr);
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
  if (x == nullptr || y == nullptr || gamma == nullptr || beta == nullptr ||
      (pr.use_proxy && (proxy_mean == nullptr || proxy_inv_std == nullptr)))
    return tfpn::set_error(TFPN_ERR_INVALID_ARGUMENT, "NULL tensor pointer");
  const size_t need = tfpn::fwd_workspace(pr, nullptr).bytes;
  if (workspace == nullptr || workspace_bytes < need ||
      (reinterpret_cast<uintptr_t>(workspace) & 15u) != 0)
    return tfpn::set_error(TFPN_ERR_WORKSPACE,
                           "workspace of %zu bytes at %p: need %zu bytes, 16-byte aligned",
                           workspace_bytes, workspace, need);
  switch (pr.dtype) {
    case TFPN_FLOAT16:
      return tfpn::fwd_impl<__half>(pr, x, gamma, beta, proxy_mean, proxy_inv_std, y, mean,
                                    inv_std, workspace, stream);
    case TFPN_BFLOAT16:
      return tfpn::fwd_impl<__nv_bfloat16>(pr, x, gamma, beta, proxy_mean, proxy_inv_std, y,
                                           mean, inv_std, workspace, stream);
    default:
      return tfpn::fwd_impl<float>(pr, x, gamma, beta, proxy_mean, proxy_inv_std, y, mean,
                                   inv_std, workspace, stream);
  }
}

}  // extern "C"
