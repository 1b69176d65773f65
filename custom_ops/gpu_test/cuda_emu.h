// A CPU emulator of the small CUDA subset used by custom_ops/cuda/*.cu, so that the very
// kernel source can be compiled by g++ (-x c++ -DTFPN_CUDA_EMULATION) and checked against
// the float64 reference on a machine without a GPU.
//
// Model: the blocks of a launch run one after the other (in forward, reverse or random
// order: TFPN_EMU_BLOCK_ORDER=fwd|rev|rand); the threads of a block are cooperative fibers
// on one OS thread that switch only at __syncthreads, __syncwarp and warp shuffles, resumed
// in the order set by TFPN_EMU_THREAD_ORDER=fwd|rev|rand. A missing barrier therefore shows
// up as a wrong result in at least one order, and a barrier in divergent code as a reported
// deadlock. `__shared__` variables become function statics (blocks never overlap).
//
// Not modelled: the memory model (fences, L1 coherence), timing, occupancy, register or
// shared-memory limits, and the bit-exact results of the GPU's math functions (the host
// libm is used). See docs/gpu.md.
#ifndef TFPN_CUDA_EMU_H_
#define TFPN_CUDA_EMU_H_

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_functions.h>
#include <vector_types.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>

#undef __shared__
#define __shared__ static
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif

typedef struct CUstream_st* cudaStream_t;

namespace emu {

extern uint3 thread_idx;
extern uint3 block_idx;
extern dim3 block_dim;
extern dim3 grid_dim;

void sync_threads();
void sync_warp();
// Exchanges 8-byte payloads within the calling warp: returns the payload of `src_lane`.
uint64_t exchange(uint64_t mine, int src_lane);
void launch(dim3 grid, dim3 block, const std::function<void()>& body);

template <typename U>
inline U shfl_xor(U v, int lane_mask, int width) {
  static_assert(sizeof(U) <= 8, "payload too large");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(U));
  const int lane = static_cast<int>(thread_idx.x & 31u);
  int src = lane ^ lane_mask;
  if ((src / width) > (lane / width)) src = lane;  // CUDA: later groups return own value
  const uint64_t got = exchange(bits, src);
  U r;
  std::memcpy(&r, &got, sizeof(U));
  return r;
}

}  // namespace emu

#define threadIdx (::emu::thread_idx)
#define blockIdx (::emu::block_idx)
#define blockDim (::emu::block_dim)
#define gridDim (::emu::grid_dim)

inline void __syncthreads() { emu::sync_threads(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu::sync_warp(); }
inline void __threadfence() {}
template <typename U>
inline U __shfl_xor_sync(unsigned, U v, int lane_mask, int width = 32) {
  return emu::shfl_xor(v, lane_mask, width);
}
inline unsigned atomicAdd(unsigned* p, unsigned v) {
  const unsigned old = *p;
  *p = old + v;
  return old;
}
template <typename U>
inline U __ldg(const U* p) { return *p; }
template <typename U>
inline U __ldcg(const U* p) { return *p; }
template <typename U>
inline U __ldcs(const U* p) { return *p; }
template <typename U>
inline void __stcs(U* p, U v) { *p = v; }
template <typename U>
inline void __stcg(U* p, U v) { *p = v; }

inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline float __fdividef(float a, float b) { return a / b; }
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline unsigned __float_as_uint(float f) {
  unsigned u;
  std::memcpy(&u, &f, 4);
  return u;
}

#endif  // TFPN_CUDA_EMU_H_
