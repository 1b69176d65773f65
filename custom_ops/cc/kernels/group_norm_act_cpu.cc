// CPU functors of GroupNormAct / GroupNormActGrad and their kernel registrations.
//
// Work is cut into cpu::Items and run on TensorFlow's intra-op thread pool (so
// tf.config.threading.set_intra_op_parallelism_threads applies):
// - slab mode: one item = (example, block of whole groups), sized to stay in the L2/L3
//   cache; one task computes the block's statistics and then normalizes it (forward), or
//   computes its gradient sums and then dx (backward), so x (and dy) come from DRAM once.
// - tile mode, when there are too few slabs to keep every thread busy (small N * G):
//   items are position ranges; a first parallel pass computes partial statistics (or
//   sums), they are merged in a fixed order, and a second parallel pass writes y (or dx).
// Per-channel parameter gradients are reduced in two stages: each item writes float64
// partial sums per (example, channel), summed over examples at the end in a fixed order,
// so results do not depend on the number of threads.
// Large offsets: the kernels centre x as (x - mean) - mean_lo (cpu::Problem::mean_lo). The
// forward has mean_lo from its float64 moments; the backward, which gets only the float32
// mean, recomputes it from x for the groups whose mean is large against their std (one
// more read of x for those groups only).
#define EIGEN_USE_THREADS

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "cpu/problem.h"
#include "group_norm_act.h"
#include "group_norm_act_op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"
#include "unsupported/Eigen/CXX11/Tensor"

namespace tf_proxynorm {
namespace {

using CPUDevice = Eigen::ThreadPoolDevice;
using tensorflow::register_kernel::Name;
using tsl::thread::ThreadPool;

// Channels-first slabs are blocks of whole groups of about this many bytes per tensor read,
// so that the second pass over a slab hits L2. (Overridable for tuning with
// TF_PROXYNORM_CPU_SLAB_BYTES.) Channels-last slabs are whole examples: a channel block of
// an NHWC example is strided, and measured 3-4x slower than whole rows from L3.
constexpr int64_t kDefaultSlabBytes = 1 << 20;
// Bytes of one tile-mode item.
constexpr int64_t kChunkBytes = 256 << 10;

int64_t EnvInt(const char* name, int64_t fallback) {
  const char* value = std::getenv(name);
  if (value == nullptr || *value == '\0') return fallback;
  char* end = nullptr;
  const long long parsed = std::strtoll(value, &end, 10);
  return (end != value && parsed > 0) ? parsed : fallback;
}

// The loops for this CPU: the best instruction set it supports among those compiled in,
// unless TF_PROXYNORM_CPU_ISA=generic|avx2|avx512 asks for a lower one.
const cpu::Kernels* SelectKernels() {
  const char* env = std::getenv("TF_PROXYNORM_CPU_ISA");
  const std::string want = env == nullptr ? "auto" : env;
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
#if defined(TFPN_HAVE_AVX512)
  if ((want == "auto" || want == "avx512") && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("fma")) {
    return cpu::Avx512Kernels();
  }
#endif
#if defined(TFPN_HAVE_AVX2)
  if ((want == "auto" || want == "avx512" || want == "avx2") &&
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
      __builtin_cpu_supports("f16c")) {
    return cpu::Avx2Kernels();
  }
#endif
#endif
  return cpu::GenericKernels();
}

template <typename T>
constexpr cpu::DType DTypeOf();
template <>
constexpr cpu::DType DTypeOf<float>() { return cpu::kFloat32; }
template <>
constexpr cpu::DType DTypeOf<Eigen::half>() { return cpu::kFloat16; }
template <>
constexpr cpu::DType DTypeOf<Eigen::bfloat16>() { return cpu::kBFloat16; }

// The items of one call and whether each completes its groups (slab mode).
struct Schedule {
  bool slabs = false;
  std::vector<cpu::Item> items;
};

// `bytes_per_value`: bytes read per value of x in one pass (x, or x and dy).
Schedule MakeSchedule(const cpu::Problem& p, int threads, int64_t bytes_per_value) {
  Schedule s;
  const int64_t cg = p.C / p.G;
  const int64_t extent = p.channels_last ? p.P : cg * p.P;  // an item's range per group
  const int64_t group_bytes = std::max<int64_t>(1, cg * p.P * bytes_per_value);
  const int64_t slab_bytes = EnvInt("TF_PROXYNORM_CPU_SLAB_BYTES", kDefaultSlabBytes);
  const int64_t per_slab =
      p.channels_last ? p.G
                      : std::min<int64_t>(p.G, std::max<int64_t>(1, slab_bytes / group_bytes));
  const int64_t blocks = (p.G + per_slab - 1) / per_slab;
  const int64_t units = p.N * blocks;
  if (threads <= 1 || (units >= threads && (units % threads == 0 || units >= 4 * threads))) {
    s.slabs = true;
    s.items.reserve(units);
    for (int64_t n = 0; n < p.N; ++n) {
      for (int64_t g0 = 0; g0 < p.G; g0 += per_slab) {
        s.items.push_back({n, g0, std::min(p.G, g0 + per_slab), 0, extent});
      }
    }
    return s;
  }
  // Tile mode: cut each example (channels_last) or group (channels_first) into ranges so
  // that there are at least 4 items per thread.
  const int64_t lines = p.channels_last ? p.N : p.N * p.G;
  const int64_t line_bytes_per_step = std::max<int64_t>(
      1, (p.channels_last ? p.C : 1) * bytes_per_value);
  int64_t step = std::max<int64_t>(1, kChunkBytes / line_bytes_per_step);
  const int64_t wanted = 4 * threads;
  const int64_t per_line = (wanted + lines - 1) / lines;
  step = std::max<int64_t>(1, std::min(step, (extent + per_line - 1) / per_line));
  for (int64_t line = 0; line < lines; ++line) {
    const int64_t n = p.channels_last ? line : line / p.G;
    const int64_t g0 = p.channels_last ? 0 : line % p.G;
    const int64_t g1 = p.channels_last ? p.G : g0 + 1;
    for (int64_t b = 0; b < extent; b += step) {
      s.items.push_back({n, g0, g1, b, std::min(extent, b + step)});
    }
  }
  return s;
}

void RunItems(ThreadPool* workers, int64_t count, const std::function<void(int64_t)>& fn) {
  workers->ParallelFor(count, ThreadPool::SchedulingParams::Fixed(1),
                       [&fn](int64_t begin, int64_t end) {
                         for (int64_t i = begin; i < end; ++i) fn(i);
                       });
}

// mean / mean_lo / inv_std of groups [g0, g0 + count) of example n from their moments.
void Finalize(const cpu::Problem& p, int64_t n, int64_t g0, int64_t count,
              const cpu::Moments* moments) {
  for (int64_t j = 0; j < count; ++j) {
    const cpu::Moments& m = moments[j];
    const double var = m.count > 0 ? m.m2 / m.count : 0.0;
    const double mean = m.count > 0 ? m.mean : 0.0;
    const float mean_hi = static_cast<float>(mean);
    p.mean[n * p.G + g0 + j] = mean_hi;
    p.mean_lo[n * p.G + g0 + j] = static_cast<float>(mean - mean_hi);
    p.inv_std[n * p.G + g0 + j] = static_cast<float>(1.0 / std::sqrt(var + p.epsilon));
  }
}

// The backward refines the float32 mean of a group from x only where its rounding matters:
// half an ulp of the mean, at most |mean| 2^-24, is an error of |mean| * inv_std * 2^-24 in
// xhat, below 2^-21 (5e-7) when |mean| * inv_std <= 8.
constexpr float kRefineMinMeanOverStd = 8.0f;

bool NeedsRefinement(const cpu::Problem& p, int64_t ng) {
  return std::fabs(p.mean[ng]) * p.inv_std[ng] > kRefineMinMeanOverStd;
}

// mean_lo of group `ng` from the sum of x - mean over its values. Only a correction of at
// most one ulp of the float32 mean is kept: that is the forward's rounding of x's group mean
// (a mean input that is not, e.g. a caller's own, is used as given; NaN gives 0).
void SetMeanLo(const cpu::Problem& p, int64_t ng, double residual_sum) {
  const double values = static_cast<double>(p.C / p.G) * p.P;
  const float mean = std::fabs(p.mean[ng]);
  const double lo = residual_sum / values;
  const double ulp = static_cast<double>(std::nextafter(mean, INFINITY) - mean);
  p.mean_lo[ng] = std::fabs(lo) <= ulp ? static_cast<float>(lo) : 0.0f;
}

void MergeInto(cpu::Moments* acc, const cpu::Moments& m) {
  if (m.count == 0) return;
  const double total = acc->count + m.count;
  const double delta = m.mean - acc->mean;
  acc->mean += delta * (m.count / total);
  acc->m2 += m.m2 + delta * delta * (acc->count * m.count / total);
  acc->count = total;
}

void RunForward(tensorflow::OpKernelContext* context, cpu::Problem p, int64_t value_bytes) {
  if (p.N * p.G == 0) return;
  std::vector<float> mean_lo(p.N * p.G, 0.0f);
  p.mean_lo = mean_lo.data();
  if (p.C * p.P == 0) {  // empty groups: mean 0, var 0
    std::vector<cpu::Moments> zeros(p.G, cpu::Moments{0.0, 0.0, 0.0});
    for (int64_t n = 0; n < p.N; ++n) Finalize(p, n, 0, p.G, zeros.data());
    return;
  }
  const cpu::Kernels* k = SelectKernels();
  ThreadPool* workers = context->device()->tensorflow_cpu_worker_threads()->workers;
  const Schedule s = MakeSchedule(p, workers->NumThreads(), value_bytes);
  const int64_t count = static_cast<int64_t>(s.items.size());
  if (s.slabs) {
    RunItems(workers, count, [&](int64_t i) {
      const cpu::Item& it = s.items[i];
      std::vector<cpu::Moments> moments(it.g1 - it.g0);
      k->moments(p, it, moments.data());
      Finalize(p, it.n, it.g0, it.g1 - it.g0, moments.data());
      k->forward_apply(p, it);
    });
    return;
  }
  std::vector<int64_t> offsets(count + 1, 0);
  for (int64_t i = 0; i < count; ++i) offsets[i + 1] = offsets[i] + s.items[i].g1 - s.items[i].g0;
  std::vector<cpu::Moments> partial(offsets[count]);
  RunItems(workers, count, [&](int64_t i) { k->moments(p, s.items[i], &partial[offsets[i]]); });
  std::vector<cpu::Moments> total(p.N * p.G, cpu::Moments{0.0, 0.0, 0.0});
  for (int64_t i = 0; i < count; ++i) {
    const cpu::Item& it = s.items[i];
    for (int64_t g = it.g0; g < it.g1; ++g) {
      MergeInto(&total[it.n * p.G + g], partial[offsets[i] + g - it.g0]);
    }
  }
  for (int64_t n = 0; n < p.N; ++n) Finalize(p, n, 0, p.G, &total[n * p.G]);
  RunItems(workers, count, [&](int64_t i) { k->forward_apply(p, s.items[i]); });
}

// Tile mode of the backward: mean_lo of the groups that need it (NeedsRefinement), from
// partial residuals of every item merged in a fixed order; nothing when none needs it.
void RefineTiles(ThreadPool* workers, const cpu::Problem& p, const Schedule& s,
                 const cpu::Kernels* k) {
  bool any = false;
  for (int64_t ng = 0; ng < p.N * p.G && !any; ++ng) any = NeedsRefinement(p, ng);
  if (!any) return;
  const int64_t count = static_cast<int64_t>(s.items.size());
  std::vector<int64_t> offsets(count + 1, 0);
  for (int64_t i = 0; i < count; ++i) offsets[i + 1] = offsets[i] + s.items[i].g1 - s.items[i].g0;
  std::vector<double> partial(offsets[count]);
  RunItems(workers, count,
           [&](int64_t i) { k->mean_residual(p, s.items[i], &partial[offsets[i]]); });
  std::vector<double> total(p.N * p.G, 0.0);
  for (int64_t i = 0; i < count; ++i) {
    const cpu::Item& it = s.items[i];
    for (int64_t g = it.g0; g < it.g1; ++g) {
      total[it.n * p.G + g] += partial[offsets[i] + g - it.g0];
    }
  }
  for (int64_t ng = 0; ng < p.N * p.G; ++ng) {
    if (NeedsRefinement(p, ng)) SetMeanLo(p, ng, total[ng]);
  }
}

// m1 = mean over the group of gamma * da, m2 = mean of gamma * da * xhat, for groups
// [g0, g1) from per-channel sums laid out [kNumGradSums][width] with `stride` = width.
void GroupGradMeans(const cpu::Problem& p, int64_t g0, int64_t g1, const double* sums,
                    int64_t stride, float* m1, float* m2) {
  const int64_t cg = p.C / p.G;
  const double values = static_cast<double>(cg) * p.P;
  for (int64_t g = g0; g < g1; ++g) {
    double a = 0.0, b = 0.0;
    for (int64_t c = g * cg; c < (g + 1) * cg; ++c) {
      const int64_t i = c - g0 * cg;
      a += p.gamma[c] * sums[cpu::kSumDa * stride + i];
      b += p.gamma[c] * sums[cpu::kSumDaXhat * stride + i];
    }
    m1[g - g0] = static_cast<float>(values > 0 ? a / values : 0.0);
    m2[g - g0] = static_cast<float>(values > 0 ? b / values : 0.0);
  }
}

void RunBackward(tensorflow::OpKernelContext* context, cpu::Problem p, int64_t value_bytes,
                 float* dgamma, float* dbeta, float* dproxy_mean, float* dproxy_inv_std) {
  std::vector<float> mean_lo(p.N * p.G, 0.0f);
  p.mean_lo = mean_lo.data();
  // per_example[s][n][c]: the sum s over the positions of example n, channel c.
  const int64_t nc = p.N * p.C;
  std::vector<double> per_example(cpu::kNumGradSums * nc, 0.0);
  const cpu::Kernels* k = SelectKernels();
  ThreadPool* workers = context->device()->tensorflow_cpu_worker_threads()->workers;
  const int64_t cg = p.C / p.G;
  if (nc * p.P > 0) {
    const Schedule s = MakeSchedule(p, workers->NumThreads(), 2 * value_bytes);
    const int64_t count = static_cast<int64_t>(s.items.size());
    auto store = [&](const cpu::Item& it, const double* sums) {
      const int64_t width = (it.g1 - it.g0) * cg;
      for (int sum = 0; sum < cpu::kNumGradSums; ++sum) {
        double* out = &per_example[sum * nc + it.n * p.C + it.g0 * cg];
        for (int64_t i = 0; i < width; ++i) out[i] += sums[sum * width + i];
      }
    };
    if (s.slabs) {
      RunItems(workers, count, [&](int64_t i) {
        const cpu::Item& it = s.items[i];
        const int64_t width = (it.g1 - it.g0) * cg;
        bool refine = false;
        for (int64_t g = it.g0; g < it.g1; ++g) refine |= NeedsRefinement(p, it.n * p.G + g);
        if (refine) {  // the slab's groups are whole: their residuals are complete
          std::vector<double> residual(it.g1 - it.g0);
          k->mean_residual(p, it, residual.data());
          for (int64_t g = it.g0; g < it.g1; ++g) {
            const int64_t ng = it.n * p.G + g;
            if (NeedsRefinement(p, ng)) SetMeanLo(p, ng, residual[g - it.g0]);
          }
        }
        std::vector<double> sums(cpu::kNumGradSums * width);
        std::vector<float> m(2 * (it.g1 - it.g0));
        k->grad_sums(p, it, sums.data());
        GroupGradMeans(p, it.g0, it.g1, sums.data(), width, m.data(), m.data() + it.g1 - it.g0);
        k->grad_apply(p, it, m.data(), m.data() + it.g1 - it.g0);
        store(it, sums.data());  // items cover disjoint (n, channel) ranges
      });
    } else {
      std::vector<int64_t> offsets(count + 1, 0);
      for (int64_t i = 0; i < count; ++i) {
        offsets[i + 1] = offsets[i] + cpu::kNumGradSums * (s.items[i].g1 - s.items[i].g0) * cg;
      }
      RefineTiles(workers, p, s, k);
      std::vector<double> partial(offsets[count]);
      RunItems(workers, count,
               [&](int64_t i) { k->grad_sums(p, s.items[i], &partial[offsets[i]]); });
      for (int64_t i = 0; i < count; ++i) store(s.items[i], &partial[offsets[i]]);
      // m[0][n][g] = m1, m[1][n][g] = m2 from the merged per-example sums.
      std::vector<float> m(2 * p.N * p.G);
      std::vector<double> example(cpu::kNumGradSums * p.C);
      for (int64_t n = 0; n < p.N; ++n) {
        for (int sum = 0; sum < cpu::kNumGradSums; ++sum) {
          std::memcpy(&example[sum * p.C], &per_example[sum * nc + n * p.C],
                      p.C * sizeof(double));
        }
        GroupGradMeans(p, 0, p.G, example.data(), p.C, &m[n * p.G], &m[p.N * p.G + n * p.G]);
      }
      RunItems(workers, count, [&](int64_t i) {
        const cpu::Item& it = s.items[i];
        k->grad_apply(p, it, &m[it.n * p.G + it.g0], &m[p.N * p.G + it.n * p.G + it.g0]);
      });
    }
  }
  for (int64_t c = 0; c < p.C; ++c) {
    double total[cpu::kNumGradSums] = {0.0, 0.0, 0.0, 0.0};
    for (int64_t n = 0; n < p.N; ++n) {
      for (int sum = 0; sum < cpu::kNumGradSums; ++sum) {
        total[sum] += per_example[sum * nc + n * p.C + c];
      }
    }
    dgamma[c] = static_cast<float>(total[cpu::kSumDaXhat]);
    dbeta[c] = static_cast<float>(total[cpu::kSumDa]);
    dproxy_mean[c] =
        p.use_proxy ? static_cast<float>(-p.proxy_inv_std[c] * total[cpu::kSumDy]) : 0.0f;
    dproxy_inv_std[c] = p.use_proxy ? static_cast<float>(total[cpu::kSumDyH]) : 0.0f;
  }
}

cpu::Problem MakeProblem(const GroupNormActAttrs& attrs, const GroupNormActShape& shape,
                         cpu::DType dtype, const void* x, const float* gamma, const float* beta,
                         const float* proxy_mean, const float* proxy_inv_std,
                         const float* mean, const float* inv_std) {
  cpu::Problem p;
  std::memset(&p, 0, sizeof(p));
  p.dtype = dtype;
  p.activation = attrs.activation;
  p.channels_last = shape.channels_last;
  p.use_proxy = attrs.use_proxy;
  p.epsilon = attrs.epsilon;
  p.N = shape.N;
  p.C = shape.C;
  p.G = shape.G;
  p.P = shape.P;
  p.x = x;
  p.gamma = gamma;
  p.beta = beta;
  p.proxy_mean = proxy_mean;
  p.proxy_inv_std = proxy_inv_std;
  p.mean = const_cast<float*>(mean);
  p.inv_std = const_cast<float*>(inv_std);
  return p;
}

}  // namespace

template <typename T>
struct GroupNormActForward<CPUDevice, T> {
  void operator()(tensorflow::OpKernelContext* context, const GroupNormActAttrs& attrs,
                  const GroupNormActShape& shape, const T* x, const float* gamma,
                  const float* beta, const float* proxy_mean, const float* proxy_inv_std,
                  T* y, float* mean, float* inv_std) {
    cpu::Problem p = MakeProblem(attrs, shape, DTypeOf<T>(), x, gamma, beta, proxy_mean,
                                 proxy_inv_std, mean, inv_std);
    p.y = y;
    RunForward(context, p, sizeof(T));
  }
};

template <typename T>
struct GroupNormActBackward<CPUDevice, T> {
  void operator()(tensorflow::OpKernelContext* context, const GroupNormActAttrs& attrs,
                  const GroupNormActShape& shape, const T* dy, const T* x, const float* gamma,
                  const float* beta, const float* proxy_mean, const float* proxy_inv_std,
                  const float* mean, const float* inv_std, T* dx, float* dgamma, float* dbeta,
                  float* dproxy_mean, float* dproxy_inv_std) {
    cpu::Problem p = MakeProblem(attrs, shape, DTypeOf<T>(), x, gamma, beta, proxy_mean,
                                 proxy_inv_std, mean, inv_std);
    p.dy = dy;
    p.dx = dx;
    RunBackward(context, p, sizeof(T), dgamma, dbeta, dproxy_mean, dproxy_inv_std);
  }
};

#define TFPN_REGISTER_CPU(T)                                                             \
  REGISTER_KERNEL_BUILDER(                                                               \
      Name("TfProxyNorm>GroupNormAct").Device(tensorflow::DEVICE_CPU).TypeConstraint<T>("T"), \
      GroupNormActOp<CPUDevice, T>);                                                     \
  REGISTER_KERNEL_BUILDER(Name("TfProxyNorm>GroupNormActGrad")                           \
                              .Device(tensorflow::DEVICE_CPU)                            \
                              .TypeConstraint<T>("T"),                                   \
                          GroupNormActGradOp<CPUDevice, T>);

TFPN_REGISTER_CPU(float);
TFPN_REGISTER_CPU(Eigen::half);
TFPN_REGISTER_CPU(Eigen::bfloat16);

#undef TFPN_REGISTER_CPU

}  // namespace tf_proxynorm
