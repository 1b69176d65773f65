// Scalar code that compilers vectorize: float exp/erf and float <-> half / bfloat16
// conversions written with selects and integer bit operations only (no libm calls, no
// branches), so every loop of the CPU kernels vectorizes for any target ISA.
//
// Included only by kernels_isa.cc, *inside* its per-ISA namespace (after <cstdint> and
// <cstring>): every function here is then a distinct symbol per ISA, so the linker can never
// merge an AVX2 copy of an inline function into the generic code path (an ODR trap of
// multi-ISA builds).
#ifndef TF_PROXYNORM_CC_KERNELS_CPU_VEC_MATH_H_
#define TF_PROXYNORM_CC_KERNELS_CPU_VEC_MATH_H_

namespace vec_math {

inline uint32_t Bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
}

inline float FromBits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

inline float Min(float a, float b) { return b < a ? b : a; }
inline float Max(float a, float b) { return a < b ? b : a; }

// exp(x) with ~2 ulp error on [-87, 88] (Cephes polynomial); inputs are clamped to that
// range, so the result is finite and normal for any finite or infinite x; NaN stays NaN.
inline float Exp(float x) {
  const float c = Max(Min(x, 88.0f), -87.0f);
  // n = round(c / ln 2) with the 1.5 * 2^23 trick (no floor/round libm call).
  const float shifter = 12582912.0f;
  const float t = c * 1.44269504088896341f + shifter;
  const float n = t - shifter;
  const int32_t ni = static_cast<int32_t>(Bits(t) - Bits(shifter));
  float r = c - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const float scale = FromBits(static_cast<uint32_t>(ni + 127) << 23);
  const float result = p * scale;
  return x != x ? x : result;
}

// erf(x), the 11/10-degree rational approximation Eigen uses (3 ulp).
inline float Erf(float x) {
  const float x2 = Min(16.0f, x * x);
  float p = 2.123732201653183437883853912353515625e-06f;
  p = p * x2 + 2.861979592125862836837768554687500000e-04f;
  p = p * x2 + 3.658048342913389205932617187500000000e-03f;
  p = p * x2 + 5.243302136659622192382812500000000000e-02f;
  p = p * x2 + 1.874160766601562500000000000000000000e-01f;
  p = p * x2 + 1.128379106521606445312500000000000000e+00f;
  p = p * x;
  float q = 3.89185734093189239501953125000e-05f;
  q = q * x2 + 1.14329601638019084930419921875e-03f;
  q = q * x2 + 1.47520881146192550659179687500e-02f;
  q = q * x2 + 1.12945675849914550781250000000e-01f;
  q = q * x2 + 4.99425798654556274414062500000e-01f;
  q = q * x2 + 1.0f;
  return Max(Min(p / q, 1.0f), -1.0f);
}

struct Math {
  static float Exp(float x) { return vec_math::Exp(x); }
  static float Erf(float x) { return vec_math::Erf(x); }
};

// IEEE binary16 -> float, exact for every input (normals, subnormals, inf, NaN).
inline float HalfToFloat(uint16_t h) {
  const uint32_t magnitude = static_cast<uint32_t>(h & 0x7fffu) << 13;
  const uint32_t exponent = magnitude & 0x0f800000u;
  // Normal numbers: rebias the exponent.
  const uint32_t normal = magnitude + 0x38000000u;
  // Inf/NaN: all-ones exponent.
  const uint32_t special = magnitude + 0x70000000u;
  // Subnormals: let the FPU normalize (magic = 2^-14 as a float with mantissa bits added).
  const float sub = FromBits(magnitude + 0x38800000u) - FromBits(0x38800000u);
  uint32_t out = exponent == 0x0f800000u ? special : normal;
  out = exponent == 0 ? Bits(sub) : out;
  return FromBits(out | (static_cast<uint32_t>(h & 0x8000u) << 16));
}

// float -> IEEE binary16 with round-to-nearest-even, inf on overflow, NaN kept quiet.
inline uint16_t FloatToHalf(float f) {
  const uint32_t u = Bits(f);
  const uint32_t sign = (u >> 16) & 0x8000u;
  const uint32_t a = u & 0x7fffffffu;
  // Inf/NaN or too large for half.
  const uint32_t big = a > 0x7f800000u ? 0x7e00u : 0x7c00u;
  // Subnormal or zero half: add a magic float so that the FPU rounds the mantissa (RNE).
  const float magic = FromBits(0x3f000000u);  // 0.5 = 2^(-1); (127-15)+(23-10)+1 = 126
  const uint32_t sub = Bits(FromBits(a) + magic) - Bits(magic);
  // Normal half: rebias and round to nearest even on the 13 dropped bits.
  const uint32_t odd = (a >> 13) & 1u;
  const uint32_t normal = (a + 0xc8000fffu + odd) >> 13;  // 0xc8000000 = (15 - 127) << 23
  uint32_t out = a >= 0x47800000u ? big : normal;        // 0x47800000 = 65536.0f
  out = a < 0x38800000u ? sub : out;                     // below 2^-14
  return static_cast<uint16_t>(out | sign);
}

// bfloat16 -> float is a shift; float -> bfloat16 rounds to nearest even, NaN kept quiet.
inline float BFloat16ToFloat(uint16_t h) { return FromBits(static_cast<uint32_t>(h) << 16); }

inline uint16_t FloatToBFloat16(float f) {
  const uint32_t u = Bits(f);
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const uint32_t nan = (u >> 16) | 0x40u;
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}

// Storage types of the kernels (layout-compatible with Eigen::half / Eigen::bfloat16).
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

inline float Load(const float* p) { return *p; }
inline float Load(const Half* p) { return HalfToFloat(p->bits); }
inline float Load(const BFloat16* p) { return BFloat16ToFloat(p->bits); }
inline void Store(float* p, float v) { *p = v; }
inline void Store(Half* p, float v) { p->bits = FloatToHalf(v); }
inline void Store(BFloat16* p, float v) { p->bits = FloatToBFloat16(v); }

}  // namespace vec_math

#endif  // TF_PROXYNORM_CC_KERNELS_CPU_VEC_MATH_H_
