// Activation ids shared by the Python dispatch (tf_proxynorm/ops/activations.py:
// FUSED_ACTIVATIONS), the op attribute and the CPU/CUDA kernels. Never renumber.
//
// This header has no TensorFlow or libm dependency so that it can be included from the
// ISA-specific CPU translation units and from CUDA code. The elementwise functions are
// templated on a `Math` policy giving `exp` and `erf`, so each backend plugs in its own
// (vectorizable polynomials on CPU, intrinsics on GPU).
#ifndef TF_PROXYNORM_CC_ACTIVATIONS_H_
#define TF_PROXYNORM_CC_ACTIVATIONS_H_

#if defined(__CUDACC__)
#define TFPN_HOST_DEVICE __host__ __device__
#else
#define TFPN_HOST_DEVICE
#endif

namespace tf_proxynorm {

enum Activation : int {
  kIdentity = 0,
  kRelu = 1,
  kSilu = 2,       // a * sigmoid(a)
  kGelu = 3,       // exact GELU: 0.5 a (1 + erf(a / sqrt 2))
  kLeakyRelu = 4,  // slope kLeakyReluSlope for a < 0
};

constexpr int kNumActivations = 5;
constexpr float kLeakyReluSlope = 0.2f;

// The attribute strings of the op, indexed by id.
constexpr const char* kActivationNames[kNumActivations] = {"identity", "relu", "silu", "gelu",
                                                           "leaky_relu"};

// A new activation takes the next id, bumps kNumActivations and adds its name; the other
// copies of the ids are checked against these: enum tfpn_activation of the CUDA kernels' C
// API by static_asserts (custom_ops/cuda/gna_common.cuh), FUSED_ACTIVATIONS of Python by
// tests/test_activation_ids.py.
static_assert(kLeakyRelu + 1 == kNumActivations, "kNumActivations: one past the last id");

constexpr bool AllActivationsNamed() {
  for (int i = 0; i < kNumActivations; ++i)
    if (kActivationNames[i] == nullptr) return false;
  return true;
}
static_assert(AllActivationsNamed(), "kActivationNames: one name per id");

// Returns the id of an attribute string, or -1.
inline int ActivationFromName(const char* name) {
  for (int i = 0; i < kNumActivations; ++i) {
    const char* a = kActivationNames[i];
    const char* b = name;
    while (*a != '\0' && *a == *b) ++a, ++b;
    if (*a == '\0' && *b == '\0') return i;
  }
  return -1;
}

// h = act(a) and, when `deriv` is non-null, *deriv = act'(a). Branch-free (selects only) so
// that loops calling it vectorize. NaN propagates through h (the comparisons are written so
// that a NaN `a` is returned as is).
template <int ACT, typename Math>
TFPN_HOST_DEVICE inline float ActForward(float a) {
  if (ACT == kRelu) return a < 0.0f ? 0.0f : a;
  if (ACT == kLeakyRelu) return a < 0.0f ? kLeakyReluSlope * a : a;
  if (ACT == kSilu) return a / (1.0f + Math::Exp(-a));
  if (ACT == kGelu) return 0.5f * a * (1.0f + Math::Erf(a * 0.70710678118654752f));
  return a;
}

template <int ACT, typename Math>
TFPN_HOST_DEVICE inline float ActForwardAndGrad(float a, float* deriv) {
  if (ACT == kRelu) {
    *deriv = a > 0.0f ? 1.0f : 0.0f;
    return a < 0.0f ? 0.0f : a;
  }
  if (ACT == kLeakyRelu) {
    *deriv = a > 0.0f ? 1.0f : kLeakyReluSlope;
    return a < 0.0f ? kLeakyReluSlope * a : a;
  }
  if (ACT == kSilu) {
    const float s = 1.0f / (1.0f + Math::Exp(-a));
    *deriv = s * (1.0f + a * (1.0f - s));
    return a * s;
  }
  if (ACT == kGelu) {
    // Phi(a) + a phi(a), phi the standard normal density.
    const float cdf = 0.5f * (1.0f + Math::Erf(a * 0.70710678118654752f));
    *deriv = cdf + a * 0.39894228040143268f * Math::Exp(-0.5f * a * a);
    return a * cdf;
  }
  *deriv = 1.0f;
  return a;
}

}  // namespace tf_proxynorm

#endif  // TF_PROXYNORM_CC_ACTIVATIONS_H_
