// The interface between the TensorFlow-facing CPU kernel (group_norm_act_cpu.cc, which
// validates, allocates and schedules work on TF's intra-op thread pool) and the loop code
// compiled once per instruction set (kernels_isa.cc). Plain structs without member
// functions: no TensorFlow, Eigen or standard-library code crosses this boundary, so no
// inline function is shared between differently compiled units.
#ifndef TF_PROXYNORM_CC_KERNELS_CPU_PROBLEM_H_
#define TF_PROXYNORM_CC_KERNELS_CPU_PROBLEM_H_

#include <cstdint>

namespace tf_proxynorm {
namespace cpu {

enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// One call of the forward or backward op. x is viewed as (N, P, C) when channels_last and
// (N, C, P) otherwise; group g holds channels [g * C/G, (g + 1) * C/G).
struct Problem {
  DType dtype;
  int activation;  // tf_proxynorm::Activation
  bool channels_last;
  bool use_proxy;
  float epsilon;
  int64_t N, C, G, P;

  const void* x;
  const float* gamma;
  const float* beta;
  const float* proxy_mean;     // ignored unless use_proxy
  const float* proxy_inv_std;  // ignored unless use_proxy
  float* mean;                 // (N, G): written by the forward, read by the backward
  float* inv_std;              // (N, G)
  // (N, G): the group mean is mean + mean_lo, mean_lo the rounding error of the float32
  // mean (float-float). With it, `(x - mean) - mean_lo` keeps the precision of the
  // deviations for inputs whose mean is large against their std (x - mean is exact for x
  // near the mean; the float32 mean alone is off by up to half an ulp, 5e-4 at 1e4).
  // Scratch of the op: filled by the forward from its float64 moments, and by the backward
  // from x (GroupNormActGrad gets only the float32 mean).
  float* mean_lo;
  void* y;                     // forward only
  const void* dy;              // backward only
  void* dx;                    // backward only
};

// A unit of work: example n, groups [g0, g1), and a sub-range [begin, end) of positions
// (channels_last) or of the group's contiguous values (channels_first, then g1 == g0 + 1
// unless the range is complete).
struct Item {
  int64_t n, g0, g1, begin, end;
};

// Running (count, mean, M2) of one (example, group), merged with Chan's formula.
struct Moments {
  double count, mean, m2;
};

// Per-channel sums of the backward, laid out [kNumGradSums][channels].
enum GradSum : int { kSumDa = 0, kSumDaXhat = 1, kSumDy = 2, kSumDyH = 3, kNumGradSums = 4 };

// The loops of one instruction set. Work on one Item, no threading, no allocation beyond
// small per-call scratch on the stack or heap. `moments` has g1 - g0 entries; `sums` has
// kNumGradSums * (g1 - g0) * C/G entries; m1, m2 have g1 - g0 entries.
struct Kernels {
  const char* isa;
  // Forward, pass 1: moments of the item's values, per group (overwritten, not merged).
  void (*moments)(const Problem& p, const Item& item, Moments* moments);
  // Forward, pass 2: y = act(gamma * (x - mean) * inv_std + beta) [-> proxy], mean/inv_std
  // read from p.mean / p.inv_std.
  void (*forward_apply)(const Problem& p, const Item& item);
  // Backward, pass 1: per-channel sums of da, da * xhat, dy, dy * (h - proxy_mean).
  void (*grad_sums)(const Problem& p, const Item& item, double* sums);
  // Backward, pass 2: dx = inv_std * (gamma da - m1 - xhat m2), m1/m2 per group of the item.
  void (*grad_apply)(const Problem& p, const Item& item, const float* m1, const float* m2);
  // Backward, refinement of the mean: per group of the item, the sum over the item's
  // values of x - p.mean (overwritten). `residual` has g1 - g0 entries.
  void (*mean_residual)(const Problem& p, const Item& item, double* residual);
};

const Kernels* GenericKernels();
#if defined(TFPN_HAVE_AVX2)
const Kernels* Avx2Kernels();
#endif
#if defined(TFPN_HAVE_AVX512)
const Kernels* Avx512Kernels();
#endif

}  // namespace cpu
}  // namespace tf_proxynorm

#endif  // TF_PROXYNORM_CC_KERNELS_CPU_PROBLEM_H_
