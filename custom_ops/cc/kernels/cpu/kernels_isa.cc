// The CPU loops of GroupNormAct and its gradient, compiled once per instruction set:
// tf_proxynorm/fused/build.py compiles this file with -DTFPN_ISA=generic (no -m flags), and on
// x86-64 also with -DTFPN_ISA=avx2 (-mavx2 -mfma -mf16c) and -DTFPN_ISA=avx512; the
// TensorFlow kernel picks one table at run time from the CPU's features. Everything lives
// in a namespace named after the ISA and no header with inline code is shared with other
// units (see problem.h), so differently compiled copies never mix.
//
// Assumptions (all loops): shapes were validated by the op (C % G == 0, gamma etc. of size
// C); the Item lies inside the tensor; statistics are accumulated in float32 inside a tile
// of at most kTileBytes and merged across tiles in float64; the loops have no branches on
// data (selects only), so NaN/Inf flow through and every inner loop vectorizes. x is
// centred as (x - mean) - mean_lo (see Problem::mean_lo), so inputs whose mean is 1e4
// times their std keep the precision of their deviations.
#include <cstdint>
#include <cstring>

#include "../../activations.h"
#include "problem.h"

#if !defined(TFPN_ISA) || !defined(TFPN_ISA_GETTER)
#error "compile with -DTFPN_ISA=<name> -DTFPN_ISA_GETTER=<getter of problem.h>"
#endif

namespace tf_proxynorm {
namespace cpu {
namespace TFPN_ISA {

#include "vec_math.h"

using vec_math::BFloat16;
using vec_math::Half;
using vec_math::Load;
using vec_math::Math;
using vec_math::Store;

// One statistics tile holds at most this many bytes (per channels-first tile) or rows
// (channels-last): its float32 partial sums stay accurate, and the float64 merge across
// tiles is cheap.
constexpr int64_t kTileBytes = 64 * 1024;
constexpr int64_t kMaxTileRows = 256;
// Channels-last statistics loops keep the partial sums of blocks of up to kBlock channels
// (forward) or kGradBlock channels (backward) in registers while walking down the rows of a
// tile: wide blocks read several cache lines of each row, which measured faster than narrow
// blocks (few lines per row) and than whole rows with the sums in L1 (bench_norm.py).
// Channels-first loops use kBlock independent partial sums.
constexpr int kBlock = 128;
constexpr int kGradBlock = 32;
// A tile's single-pass moments around the running group mean are kept when the shift
// costs at most one bit: (tile mean - center)^2 <= variance around the center / 2;
// otherwise the tile is redone in two passes (centered on its own mean).
constexpr double kMaxShiftRatio = 0.5;

inline int64_t MinI(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t MaxI(int64_t a, int64_t b) { return a < b ? b : a; }

// Scratch of a few per-channel arrays, on the stack when small.
template <typename V>
class Scratch {
 public:
  explicit Scratch(int64_t n) : data_(n <= kStack ? stack_ : new V[n]) {}
  ~Scratch() {
    if (data_ != stack_) delete[] data_;
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;
  V* get() { return data_; }

 private:
  static constexpr int64_t kStack = 2048;
  V stack_[kStack];
  V* data_;
};

// Chan et al.: merge (count, mean, m2) of a tile into a running Moments.
inline void Merge(Moments* acc, double count, double mean, double m2) {
  if (count == 0) return;
  const double total = acc->count + count;
  const double delta = mean - acc->mean;
  acc->mean += delta * (count / total);
  acc->m2 += m2 + delta * delta * (acc->count * count / total);
  acc->count = total;
}

// ---------------------------------------------------------------------------------------
// Channels-last: x is (N, P, C); an Item covers rows [begin, end) and channels
// [g0 * Cg, g1 * Cg). Inner loops run over contiguous channels with per-channel arrays.

// s1[c] = sum_r (x[r, c] - center[c]), s2[c] = sum_r (x[r, c] - center[c])^2 for the B
// channels [c0, c0 + B) of `rows` rows, with the sums in registers.
template <typename T, int B>
inline void TileSumsBlock(const T* tile, int64_t rows, int64_t stride, int64_t c0,
                          const float* center, float* s1, float* s2) {
  float a[B] = {}, b[B] = {}, m[B];
  for (int j = 0; j < B; ++j) m[j] = center[c0 + j];
  for (int64_t r = 0; r < rows; ++r) {
    const T* row = tile + r * stride + c0;
#pragma omp simd
    for (int j = 0; j < B; ++j) {
      const float d = Load(&row[j]) - m[j];
      a[j] += d;
      b[j] += d * d;
    }
  }
  for (int j = 0; j < B; ++j) {
    s1[c0 + j] = a[j];
    s2[c0 + j] = b[j];
  }
}

// TileSumsBlock over `width` channels: blocks of kBlock, then 32, then the rest with the
// sums in s1/s2.
template <typename T>
void TileSums(const T* tile, int64_t rows, int64_t stride, int64_t width, const float* center,
              float* s1, float* s2) {
  int64_t c0 = 0;
  for (; c0 + kBlock <= width; c0 += kBlock) {
    TileSumsBlock<T, kBlock>(tile, rows, stride, c0, center, s1, s2);
  }
  for (; c0 + 32 <= width; c0 += 32) TileSumsBlock<T, 32>(tile, rows, stride, c0, center, s1, s2);
  for (int64_t c = c0; c < width; ++c) s1[c] = s2[c] = 0.0f;
  for (int64_t r = 0; c0 < width && r < rows; ++r) {
    const T* row = tile + r * stride;
#pragma omp simd
    for (int64_t c = c0; c < width; ++c) {
      const float d = Load(&row[c]) - center[c];
      s1[c] += d;
      s2[c] += d * d;
    }
  }
}

// Moments of one tile (rows x width) per group, merged into out[]. `center` (per channel,
// constant within a group) is the running group mean, or anything when out[] is empty.
template <typename T>
void TileMoments(const T* tile, int64_t rows, int64_t stride, int64_t cg, int64_t groups,
                 float* center, float* s1, float* s2, Moments* out) {
  const int64_t width = groups * cg;
  const double count = static_cast<double>(rows * cg);
  bool centered = out[0].count > 0;
  if (centered) {
    TileSums(tile, rows, stride, width, center, s1, s2);
    for (int64_t j = 0; j < groups && centered; ++j) {
      double a = 0.0, b = 0.0;
      for (int64_t c = j * cg; c < (j + 1) * cg; ++c) a += s1[c], b += s2[c];
      centered = a * a <= kMaxShiftRatio * count * b;
    }
  }
  if (!centered) {
    // Two passes: the tile mean from sums around the first row, then sums around it.
    for (int64_t c = 0; c < width; ++c) center[c] = Load(&tile[c]);
    TileSums(tile, rows, stride, width, center, s1, s2);
    for (int64_t j = 0; j < groups; ++j) {
      double a = 0.0;
      for (int64_t c = j * cg; c < (j + 1) * cg; ++c)
        a += static_cast<double>(center[c]) * rows + static_cast<double>(s1[c]);
      const float mean = static_cast<float>(a / count);
      for (int64_t c = j * cg; c < (j + 1) * cg; ++c) center[c] = mean;
    }
    TileSums(tile, rows, stride, width, center, s1, s2);
  }
  for (int64_t j = 0; j < groups; ++j) {
    double a = 0.0, b = 0.0;
    for (int64_t c = j * cg; c < (j + 1) * cg; ++c) a += s1[c], b += s2[c];
    const double shift = a / count;
    const double m2 = b - a * shift;
    Merge(&out[j], count, static_cast<double>(center[j * cg]) + shift, m2 > 0.0 ? m2 : 0.0);
    const float mean = static_cast<float>(out[j].mean);
    for (int64_t c = j * cg; c < (j + 1) * cg; ++c) center[c] = mean;
  }
}

template <typename T>
void MomentsChannelsLast(const Problem& p, const Item& it, Moments* out) {
  const int64_t cg = p.C / p.G;
  const int64_t groups = it.g1 - it.g0;
  const int64_t width = groups * cg;
  for (int64_t j = 0; j < groups; ++j) out[j] = Moments{0.0, 0.0, 0.0};
  if (width == 0) return;
  const T* base = static_cast<const T*>(p.x) + (it.n * p.P) * p.C + it.g0 * cg;
  const int64_t tile_rows =
      MaxI(1, MinI(kMaxTileRows, kTileBytes / (width * static_cast<int64_t>(sizeof(T)))));
  Scratch<float> scratch(3 * width);
  float* center = scratch.get();
  for (int64_t r0 = it.begin; r0 < it.end; r0 += tile_rows) {
    TileMoments(base + r0 * p.C, MinI(tile_rows, it.end - r0), p.C, cg, groups, center,
                center + width, center + 2 * width, out);
  }
}

// Per-channel forward constants of an Item: y = act((x - mean) * a + b) * pi + ps.
struct ForwardConstants {
  float *mean, *a, *b, *pi, *ps;
};

inline void FillForwardConstants(const Problem& p, const Item& it, float* buf,
                                 ForwardConstants* k) {
  const int64_t cg = p.C / p.G;
  const int64_t width = (it.g1 - it.g0) * cg;
  k->mean = buf;
  k->a = buf + width;
  k->b = buf + 2 * width;
  k->pi = buf + 3 * width;
  k->ps = buf + 4 * width;
  for (int64_t i = 0; i < width; ++i) {
    const int64_t c = it.g0 * cg + i;
    const int64_t g = c / cg;
    const float inv = p.inv_std[it.n * p.G + g];
    k->mean[i] = p.mean[it.n * p.G + g];
    k->a[i] = p.gamma[c] * inv;
    // (x - mean - mean_lo) * a + beta with mean_lo folded into the offset: no extra work
    // per element.
    k->b[i] = p.beta[c] - p.mean_lo[it.n * p.G + g] * k->a[i];
    k->pi[i] = p.use_proxy ? p.proxy_inv_std[c] : 1.0f;
    k->ps[i] = p.use_proxy ? -p.proxy_mean[c] * p.proxy_inv_std[c] : 0.0f;
  }
}

template <typename T, int ACT>
void ForwardApplyChannelsLast(const Problem& p, const Item& it) {
  const int64_t cg = p.C / p.G;
  const int64_t width = (it.g1 - it.g0) * cg;
  if (width == 0) return;
  Scratch<float> scratch(5 * width);
  ForwardConstants k;
  FillForwardConstants(p, it, scratch.get(), &k);
  const int64_t offset = (it.n * p.P) * p.C + it.g0 * cg;
  const T* x = static_cast<const T*>(p.x) + offset;
  T* y = static_cast<T*>(p.y) + offset;
  const float *mean = k.mean, *a = k.a, *b = k.b, *pi = k.pi, *ps = k.ps;
  for (int64_t r = it.begin; r < it.end; ++r) {
    const T* xr = x + r * p.C;
    T* yr = y + r * p.C;
#pragma omp simd
    for (int64_t c = 0; c < width; ++c) {
      const float h = ActForward<ACT, Math>((Load(&xr[c]) - mean[c]) * a[c] + b[c]);
      Store(&yr[c], h * pi[c] + ps[c]);
    }
  }
}

// Per-channel backward constants.
struct GradConstants {
  float *mean, *lo, *inv, *gamma, *beta, *pi, *pm;
};
constexpr int kNumGradConstants = 7;

inline void FillGradConstants(const Problem& p, const Item& it, float* buf, GradConstants* k) {
  const int64_t cg = p.C / p.G;
  const int64_t width = (it.g1 - it.g0) * cg;
  float** arrays[] = {&k->mean, &k->lo, &k->inv, &k->gamma, &k->beta, &k->pi, &k->pm};
  for (int i = 0; i < kNumGradConstants; ++i) *arrays[i] = buf + i * width;
  for (int64_t i = 0; i < width; ++i) {
    const int64_t c = it.g0 * cg + i;
    const int64_t g = c / cg;
    k->mean[i] = p.mean[it.n * p.G + g];
    k->lo[i] = p.mean_lo[it.n * p.G + g];
    k->inv[i] = p.inv_std[it.n * p.G + g];
    k->gamma[i] = p.gamma[c];
    k->beta[i] = p.beta[c];
    k->pi[i] = p.use_proxy ? p.proxy_inv_std[c] : 1.0f;
    k->pm[i] = p.use_proxy ? p.proxy_mean[c] : 0.0f;
  }
}

// Adds to acc[kNumGradSums][width] the gradient sums of rows [r0, r1) for channels
// [c0, c0 + B) (B > 0: partial sums in registers) or [c0, width) (B == 0).
template <typename T, int ACT, int B>
inline void GradSumsBlock(const T* x, const T* dy, int64_t r0, int64_t r1, int64_t stride,
                          int64_t c0, int64_t width, const GradConstants& k, float* acc) {
  const int64_t n = B > 0 ? B : width - c0;
  float s_da[B > 0 ? B : 1] = {}, s_dax[B > 0 ? B : 1] = {}, s_dy[B > 0 ? B : 1] = {},
        s_dyh[B > 0 ? B : 1] = {};
  float* out_da = B > 0 ? s_da : acc + c0;
  float* out_dax = B > 0 ? s_dax : acc + width + c0;
  float* out_dy = B > 0 ? s_dy : acc + 2 * width + c0;
  float* out_dyh = B > 0 ? s_dyh : acc + 3 * width + c0;
  const float *mean = k.mean + c0, *lo = k.lo + c0, *inv = k.inv + c0, *gamma = k.gamma + c0,
              *beta = k.beta + c0, *pi = k.pi + c0, *pm = k.pm + c0;
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * stride + c0;
    const T* gr = dy + r * stride + c0;
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const float g = Load(&gr[j]);
      const float xhat = ((Load(&xr[j]) - mean[j]) - lo[j]) * inv[j];
      float deriv;
      const float h = ActForwardAndGrad<ACT, Math>(xhat * gamma[j] + beta[j], &deriv);
      const float da = g * pi[j] * deriv;
      out_da[j] += da;
      out_dax[j] += da * xhat;
      out_dy[j] += g;
      out_dyh[j] += g * (h - pm[j]);
    }
  }
  if (B > 0) {
    for (int j = 0; j < B; ++j) {
      acc[c0 + j] += s_da[j];
      acc[width + c0 + j] += s_dax[j];
      acc[2 * width + c0 + j] += s_dy[j];
      acc[3 * width + c0 + j] += s_dyh[j];
    }
  }
}

template <typename T, int ACT>
void GradSumsChannelsLast(const Problem& p, const Item& it, double* sums) {
  const int64_t cg = p.C / p.G;
  const int64_t width = (it.g1 - it.g0) * cg;
  for (int64_t i = 0; i < kNumGradSums * width; ++i) sums[i] = 0.0;
  if (width == 0) return;
  Scratch<float> scratch((kNumGradConstants + kNumGradSums) * width);
  GradConstants k;
  FillGradConstants(p, it, scratch.get(), &k);
  float* acc = scratch.get() + kNumGradConstants * width;
  const int64_t offset = (it.n * p.P) * p.C + it.g0 * cg;
  const T* x = static_cast<const T*>(p.x) + offset;
  const T* dy = static_cast<const T*>(p.dy) + offset;
  const int64_t tile_rows =
      MaxI(1, MinI(kMaxTileRows, kTileBytes / (width * static_cast<int64_t>(sizeof(T)))));
  for (int64_t r0 = it.begin; r0 < it.end; r0 += tile_rows) {
    const int64_t r1 = MinI(r0 + tile_rows, it.end);
    for (int64_t i = 0; i < kNumGradSums * width; ++i) acc[i] = 0.0f;
    int64_t c0 = 0;
    for (; c0 + kGradBlock <= width; c0 += kGradBlock) {
      GradSumsBlock<T, ACT, kGradBlock>(x, dy, r0, r1, p.C, c0, width, k, acc);
    }
    for (; c0 + 16 <= width; c0 += 16) GradSumsBlock<T, ACT, 16>(x, dy, r0, r1, p.C, c0, width, k, acc);
    if (c0 < width) GradSumsBlock<T, ACT, 0>(x, dy, r0, r1, p.C, c0, width, k, acc);
    for (int64_t i = 0; i < kNumGradSums * width; ++i) sums[i] += acc[i];
  }
}

template <typename T, int ACT>
void GradApplyChannelsLast(const Problem& p, const Item& it, const float* m1, const float* m2) {
  const int64_t cg = p.C / p.G;
  const int64_t width = (it.g1 - it.g0) * cg;
  if (width == 0) return;
  Scratch<float> scratch((kNumGradConstants + 3) * width);
  GradConstants k;
  FillGradConstants(p, it, scratch.get(), &k);
  // dx = k1 * dy * act'(a) + xhat * k2 + k3
  float *k1 = scratch.get() + kNumGradConstants * width, *k2 = k1 + width, *k3 = k2 + width;
  for (int64_t i = 0; i < width; ++i) {
    const int64_t j = i / cg;
    k1[i] = k.inv[i] * k.gamma[i] * k.pi[i];
    k2[i] = -k.inv[i] * m2[j];
    k3[i] = -k.inv[i] * m1[j];
  }
  const int64_t offset = (it.n * p.P) * p.C + it.g0 * cg;
  const T* x = static_cast<const T*>(p.x) + offset;
  const T* dy = static_cast<const T*>(p.dy) + offset;
  T* dx = static_cast<T*>(p.dx) + offset;
  const float *mean = k.mean, *lo = k.lo, *inv = k.inv, *gamma = k.gamma, *beta = k.beta;
  for (int64_t r = it.begin; r < it.end; ++r) {
    const T* xr = x + r * p.C;
    const T* gr = dy + r * p.C;
    T* dr = dx + r * p.C;
#pragma omp simd
    for (int64_t c = 0; c < width; ++c) {
      const float xhat = ((Load(&xr[c]) - mean[c]) - lo[c]) * inv[c];
      float deriv;
      ActForwardAndGrad<ACT, Math>(xhat * gamma[c] + beta[c], &deriv);
      Store(&dr[c], k1[c] * Load(&gr[c]) * deriv + xhat * k2[c] + k3[c]);
    }
  }
}

// ---------------------------------------------------------------------------------------
// Channels-first: x is (N, C, P); group g of example n is the contiguous block of Cg * P
// values at (n * C + g * Cg) * P. An Item covers values [begin, end) of each of its groups.
// Inner loops run over positions of one channel with scalar constants.

// s1 = sum (v[i] - center), s2 = sum (v[i] - center)^2 over a contiguous segment, with
// kBlock independent partial sums (several vector registers, so the adds pipeline).
template <typename T>
inline void SegmentSums(const T* v, int64_t len, float center, float* s1, float* s2) {
  float a[kBlock] = {}, b[kBlock] = {};
  int64_t i0 = 0;
  for (; i0 + kBlock <= len; i0 += kBlock) {
#pragma omp simd
    for (int j = 0; j < kBlock; ++j) {
      const float d = Load(&v[i0 + j]) - center;
      a[j] += d;
      b[j] += d * d;
    }
  }
  for (int64_t i = i0; i < len; ++i) {
    const float d = Load(&v[i]) - center;
    a[i - i0] += d;
    b[i - i0] += d * d;
  }
  float sa = 0.0f, sb = 0.0f;
  for (int j = 0; j < kBlock; ++j) sa += a[j], sb += b[j];
  *s1 = sa;
  *s2 = sb;
}

template <typename T>
void MomentsChannelsFirst(const Problem& p, const Item& it, Moments* out) {
  const int64_t cg = p.C / p.G;
  const int64_t tile = MaxI(1, kTileBytes / static_cast<int64_t>(sizeof(T)));
  for (int64_t g = it.g0; g < it.g1; ++g) {
    Moments* acc = &out[g - it.g0];
    *acc = Moments{0.0, 0.0, 0.0};
    const T* block = static_cast<const T*>(p.x) + (it.n * p.C + g * cg) * p.P;
    for (int64_t t0 = it.begin; t0 < it.end; t0 += tile) {
      const int64_t len = MinI(tile, it.end - t0);
      const T* v = block + t0;
      // Single pass around the running mean; two passes for the first tile or when the
      // running mean is too far from this tile's (see kMaxShiftRatio).
      float center = static_cast<float>(acc->mean);
      float s1 = 0.0f, s2 = 0.0f;
      SegmentSums(v, len, center, &s1, &s2);
      if (acc->count == 0 || !(static_cast<double>(s1) * s1 <= kMaxShiftRatio * len * s2)) {
        float s0 = 0.0f, unused = 0.0f;
        SegmentSums(v, len, Load(&v[0]), &s0, &unused);
        center = static_cast<float>(static_cast<double>(Load(&v[0])) +
                                    static_cast<double>(s0) / len);
        SegmentSums(v, len, center, &s1, &s2);
      }
      const double shift = static_cast<double>(s1) / len;
      const double m2 = static_cast<double>(s2) - s1 * shift;
      Merge(acc, static_cast<double>(len), center + shift, m2 > 0.0 ? m2 : 0.0);
    }
  }
}

template <typename T, int ACT>
void ForwardApplyChannelsFirst(const Problem& p, const Item& it) {
  const int64_t cg = p.C / p.G;
  for (int64_t g = it.g0; g < it.g1; ++g) {
    const float mean = p.mean[it.n * p.G + g];
    const float mean_lo = p.mean_lo[it.n * p.G + g];
    const float inv = p.inv_std[it.n * p.G + g];
    const int64_t offset = (it.n * p.C + g * cg) * p.P;
    const T* x = static_cast<const T*>(p.x) + offset;
    T* y = static_cast<T*>(p.y) + offset;
    for (int64_t ci = it.begin / MaxI(p.P, 1); p.P > 0 && ci * p.P < it.end; ++ci) {
      const int64_t lo = MaxI(it.begin, ci * p.P), hi = MinI(it.end, (ci + 1) * p.P);
      const int64_t c = g * cg + ci;
      // mean_lo folded into the offset, as in FillForwardConstants.
      const float a = p.gamma[c] * inv, b = p.beta[c] - mean_lo * a;
      const float pi = p.use_proxy ? p.proxy_inv_std[c] : 1.0f;
      const float ps = p.use_proxy ? -p.proxy_mean[c] * p.proxy_inv_std[c] : 0.0f;
#pragma omp simd
      for (int64_t i = lo; i < hi; ++i) {
        const float h = ActForward<ACT, Math>((Load(&x[i]) - mean) * a + b);
        Store(&y[i], h * pi + ps);
      }
    }
  }
}

template <typename T, int ACT>
void GradSumsChannelsFirst(const Problem& p, const Item& it, double* sums) {
  const int64_t cg = p.C / p.G;
  const int64_t width = (it.g1 - it.g0) * cg;
  for (int64_t i = 0; i < kNumGradSums * width; ++i) sums[i] = 0.0;
  const int64_t tile = MaxI(1, kTileBytes / static_cast<int64_t>(sizeof(T)));
  for (int64_t g = it.g0; g < it.g1; ++g) {
    const float mean = p.mean[it.n * p.G + g];
    const float mean_lo = p.mean_lo[it.n * p.G + g];
    const float inv = p.inv_std[it.n * p.G + g];
    const int64_t offset = (it.n * p.C + g * cg) * p.P;
    const T* x = static_cast<const T*>(p.x) + offset;
    const T* dy = static_cast<const T*>(p.dy) + offset;
    for (int64_t ci = it.begin / MaxI(p.P, 1); p.P > 0 && ci * p.P < it.end; ++ci) {
      const int64_t c = g * cg + ci;
      const int64_t slot = (g - it.g0) * cg + ci;
      const float gamma = p.gamma[c], beta = p.beta[c];
      const float pi = p.use_proxy ? p.proxy_inv_std[c] : 1.0f;
      const float pm = p.use_proxy ? p.proxy_mean[c] : 0.0f;
      const int64_t lo = MaxI(it.begin, ci * p.P), hi = MinI(it.end, (ci + 1) * p.P);
      for (int64_t t0 = lo; t0 < hi; t0 += tile) {
        const int64_t t1 = MinI(t0 + tile, hi);
        float s_da = 0.0f, s_dax = 0.0f, s_dy = 0.0f, s_dyh = 0.0f;
#pragma omp simd reduction(+ : s_da, s_dax, s_dy, s_dyh)
        for (int64_t i = t0; i < t1; ++i) {
          const float gv = Load(&dy[i]);
          const float xhat = ((Load(&x[i]) - mean) - mean_lo) * inv;
          float deriv;
          const float h = ActForwardAndGrad<ACT, Math>(xhat * gamma + beta, &deriv);
          const float da = gv * pi * deriv;
          s_da += da;
          s_dax += da * xhat;
          s_dy += gv;
          s_dyh += gv * (h - pm);
        }
        sums[kSumDa * width + slot] += s_da;
        sums[kSumDaXhat * width + slot] += s_dax;
        sums[kSumDy * width + slot] += s_dy;
        sums[kSumDyH * width + slot] += s_dyh;
      }
    }
  }
}

template <typename T, int ACT>
void GradApplyChannelsFirst(const Problem& p, const Item& it, const float* m1, const float* m2) {
  const int64_t cg = p.C / p.G;
  for (int64_t g = it.g0; g < it.g1; ++g) {
    const float mean = p.mean[it.n * p.G + g];
    const float mean_lo = p.mean_lo[it.n * p.G + g];
    const float inv = p.inv_std[it.n * p.G + g];
    const float k2 = -inv * m2[g - it.g0], k3 = -inv * m1[g - it.g0];
    const int64_t offset = (it.n * p.C + g * cg) * p.P;
    const T* x = static_cast<const T*>(p.x) + offset;
    const T* dy = static_cast<const T*>(p.dy) + offset;
    T* dx = static_cast<T*>(p.dx) + offset;
    for (int64_t ci = it.begin / MaxI(p.P, 1); p.P > 0 && ci * p.P < it.end; ++ci) {
      const int64_t c = g * cg + ci;
      const float gamma = p.gamma[c], beta = p.beta[c];
      const float k1 = inv * gamma * (p.use_proxy ? p.proxy_inv_std[c] : 1.0f);
      const int64_t lo = MaxI(it.begin, ci * p.P), hi = MinI(it.end, (ci + 1) * p.P);
#pragma omp simd
      for (int64_t i = lo; i < hi; ++i) {
        const float xhat = ((Load(&x[i]) - mean) - mean_lo) * inv;
        float deriv;
        ActForwardAndGrad<ACT, Math>(xhat * gamma + beta, &deriv);
        Store(&dx[i], k1 * Load(&dy[i]) * deriv + xhat * k2 + k3);
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// The backward's refinement of a float32 mean: per group, sum (x - mean) over the item, in
// float32 inside a tile (x - mean is exact and small for x near the mean) merged in float64.
// The backward runs it only for groups whose mean is large against their std.

template <typename T>
void MeanResidualChannelsLast(const Problem& p, const Item& it, double* out) {
  const int64_t cg = p.C / p.G;
  const int64_t groups = it.g1 - it.g0;
  const int64_t width = groups * cg;
  for (int64_t j = 0; j < groups; ++j) out[j] = 0.0;
  if (width == 0) return;
  const T* base = static_cast<const T*>(p.x) + (it.n * p.P) * p.C + it.g0 * cg;
  const int64_t tile_rows =
      MaxI(1, MinI(kMaxTileRows, kTileBytes / (width * static_cast<int64_t>(sizeof(T)))));
  Scratch<float> scratch(3 * width);
  float *center = scratch.get(), *s1 = center + width, *s2 = s1 + width;
  for (int64_t c = 0; c < width; ++c) center[c] = p.mean[it.n * p.G + it.g0 + c / cg];
  for (int64_t r0 = it.begin; r0 < it.end; r0 += tile_rows) {
    TileSums(base + r0 * p.C, MinI(tile_rows, it.end - r0), p.C, width, center, s1, s2);
    for (int64_t c = 0; c < width; ++c) out[c / cg] += s1[c];
  }
}

template <typename T>
void MeanResidualChannelsFirst(const Problem& p, const Item& it, double* out) {
  const int64_t cg = p.C / p.G;
  const int64_t tile = MaxI(1, kTileBytes / static_cast<int64_t>(sizeof(T)));
  for (int64_t g = it.g0; g < it.g1; ++g) {
    const float mean = p.mean[it.n * p.G + g];
    const T* block = static_cast<const T*>(p.x) + (it.n * p.C + g * cg) * p.P;
    double sum = 0.0;
    for (int64_t t0 = it.begin; t0 < it.end; t0 += tile) {
      float s1 = 0.0f, unused = 0.0f;
      SegmentSums(block + t0, MinI(tile, it.end - t0), mean, &s1, &unused);
      sum += s1;
    }
    out[g - it.g0] = sum;
  }
}

// ---------------------------------------------------------------------------------------
// Dispatch on (layout, dtype, activation).

using MomentsFn = void (*)(const Problem&, const Item&, Moments*);
using ApplyFn = void (*)(const Problem&, const Item&);
using SumsFn = void (*)(const Problem&, const Item&, double*);
using GradApplyFn = void (*)(const Problem&, const Item&, const float*, const float*);

#define TFPN_BY_ACT(F, T) {&F<T, 0>, &F<T, 1>, &F<T, 2>, &F<T, 3>, &F<T, 4>}
#define TFPN_BY_TYPE_ACT(F) {TFPN_BY_ACT(F, float), TFPN_BY_ACT(F, Half), TFPN_BY_ACT(F, BFloat16)}

constexpr MomentsFn kMomentsLast[3] = {&MomentsChannelsLast<float>, &MomentsChannelsLast<Half>,
                                       &MomentsChannelsLast<BFloat16>};
constexpr MomentsFn kMomentsFirst[3] = {
    &MomentsChannelsFirst<float>, &MomentsChannelsFirst<Half>, &MomentsChannelsFirst<BFloat16>};
constexpr ApplyFn kApplyLast[3][kNumActivations] = TFPN_BY_TYPE_ACT(ForwardApplyChannelsLast);
constexpr ApplyFn kApplyFirst[3][kNumActivations] = TFPN_BY_TYPE_ACT(ForwardApplyChannelsFirst);
constexpr SumsFn kSumsLast[3][kNumActivations] = TFPN_BY_TYPE_ACT(GradSumsChannelsLast);
constexpr SumsFn kSumsFirst[3][kNumActivations] = TFPN_BY_TYPE_ACT(GradSumsChannelsFirst);
constexpr GradApplyFn kGradApplyLast[3][kNumActivations] = TFPN_BY_TYPE_ACT(GradApplyChannelsLast);
constexpr GradApplyFn kGradApplyFirst[3][kNumActivations] =
    TFPN_BY_TYPE_ACT(GradApplyChannelsFirst);
constexpr SumsFn kResidualLast[3] = {&MeanResidualChannelsLast<float>,
                                     &MeanResidualChannelsLast<Half>,
                                     &MeanResidualChannelsLast<BFloat16>};
constexpr SumsFn kResidualFirst[3] = {&MeanResidualChannelsFirst<float>,
                                      &MeanResidualChannelsFirst<Half>,
                                      &MeanResidualChannelsFirst<BFloat16>};

void MomentsDispatch(const Problem& p, const Item& it, Moments* out) {
  (p.channels_last ? kMomentsLast : kMomentsFirst)[p.dtype](p, it, out);
}

void ForwardApplyDispatch(const Problem& p, const Item& it) {
  (p.channels_last ? kApplyLast : kApplyFirst)[p.dtype][p.activation](p, it);
}

void GradSumsDispatch(const Problem& p, const Item& it, double* sums) {
  (p.channels_last ? kSumsLast : kSumsFirst)[p.dtype][p.activation](p, it, sums);
}

void GradApplyDispatch(const Problem& p, const Item& it, const float* m1, const float* m2) {
  (p.channels_last ? kGradApplyLast : kGradApplyFirst)[p.dtype][p.activation](p, it, m1, m2);
}

void MeanResidualDispatch(const Problem& p, const Item& it, double* residual) {
  (p.channels_last ? kResidualLast : kResidualFirst)[p.dtype](p, it, residual);
}

#undef TFPN_BY_TYPE_ACT
#undef TFPN_BY_ACT

#define TFPN_STR2(s) #s
#define TFPN_STR(s) TFPN_STR2(s)

const Kernels kKernels = {TFPN_STR(TFPN_ISA), &MomentsDispatch, &ForwardApplyDispatch,
                          &GradSumsDispatch, &GradApplyDispatch, &MeanResidualDispatch};

}  // namespace TFPN_ISA

// The one external symbol of this unit (GenericKernels, Avx2Kernels, ... see problem.h).
const Kernels* TFPN_ISA_GETTER() { return &TFPN_ISA::kKernels; }

}  // namespace cpu
}  // namespace tf_proxynorm
