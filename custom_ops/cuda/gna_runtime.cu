// Host-side helpers of the CUDA kernel core: errors, validation, the runtime/driver check,
// chunk sizes from the device's L2 cache, and the fill kernel of degenerate problems.
#include <stdarg.h>
#include <stdio.h>

#include <atomic>

#include "gna_common.cuh"

namespace tfpn {
namespace {

thread_local char g_error[1024] = "";

// Assumptions: 1-D grid of kThreads-thread blocks covering `count` (grid-stride loop).
__global__ void __launch_bounds__(kThreads) fill_kernel(float* p, int64_t count, float value) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < count;
       i += stride)
    p[i] = value;
}

#if defined(TFPN_CUDA_EMULATION)
int64_t device_l2_bytes() {
  const char* e = std::getenv("TFPN_EMU_L2_BYTES");
  return e != nullptr ? std::strtoll(e, nullptr, 10) : 50ll << 20;
}
#else
constexpr int kMaxDevices = 64;
std::atomic<int64_t> g_l2_bytes[kMaxDevices];  // 0: not queried yet, < 0: unknown

int64_t device_l2_bytes() {
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) {
    cudaGetLastError();
    return -1;
  }
  if (dev < 0 || dev >= kMaxDevices) return -1;
  int64_t v = g_l2_bytes[dev].load(std::memory_order_relaxed);
  if (v == 0) {
    int l2 = 0;
    if (cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, dev) != cudaSuccess || l2 <= 0) {
      cudaGetLastError();
      v = -1;
    } else {
      v = l2;
    }
    g_l2_bytes[dev].store(v, std::memory_order_relaxed);
  }
  return v;
}
#endif

// TFPN_CUDA_CHUNK_BYTES, read once: 0 when unset.
int64_t env_chunk_bytes() {
  static const int64_t v = [] {
    const char* e = std::getenv("TFPN_CUDA_CHUNK_BYTES");
    return e != nullptr && *e != '\0' ? static_cast<int64_t>(std::strtoll(e, nullptr, 10))
                                      : static_cast<int64_t>(0);
  }();
  return v;
}

}  // namespace

int set_error(int code, const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(g_error, sizeof(g_error), fmt, ap);
  va_end(ap);
  return code;
}

int validate_problem(const tfpn_problem* p) {
  if (p == nullptr) return set_error(TFPN_ERR_INVALID_ARGUMENT, "problem is NULL");
  if (p->n < 0 || p->c < 0 || p->positions < 0)
    return set_error(TFPN_ERR_INVALID_ARGUMENT,
                     "sizes must be >= 0, got n=%lld c=%lld positions=%lld",
                     static_cast<long long>(p->n), static_cast<long long>(p->c),
                     static_cast<long long>(p->positions));
  // 32-bit index math in the finalization and parameter-gradient loops: n * 64 and
  // c * 64 must stay below 2^32.
  if (p->n > (int64_t{1} << 25) || p->c > (int64_t{1} << 25))
    return set_error(TFPN_ERR_INVALID_ARGUMENT, "n and c must be <= 2^25");
  if (p->groups < 1)
    return set_error(TFPN_ERR_INVALID_ARGUMENT, "groups must be >= 1, got %d", p->groups);
  if (p->c % p->groups != 0)
    return set_error(TFPN_ERR_INVALID_ARGUMENT,
                     "channels (%lld) must be divisible by groups (%d)",
                     static_cast<long long>(p->c), p->groups);
  if (p->activation < TFPN_ACT_IDENTITY || p->activation > TFPN_ACT_LEAKY_RELU)
    return set_error(TFPN_ERR_INVALID_ARGUMENT, "unknown activation id %d", p->activation);
  if (p->dtype != TFPN_FLOAT32 && p->dtype != TFPN_FLOAT16 && p->dtype != TFPN_BFLOAT16)
    return set_error(TFPN_ERR_INVALID_ARGUMENT, "unknown dtype id %d", p->dtype);
  if (p->use_proxy != 0 && p->use_proxy != 1)
    return set_error(TFPN_ERR_INVALID_ARGUMENT, "use_proxy must be 0 or 1");
  if (p->channels_last != 0 && p->channels_last != 1)
    return set_error(TFPN_ERR_INVALID_ARGUMENT, "channels_last must be 0 or 1");
  return TFPN_OK;
}

int64_t chunk_examples(const tfpn_problem& pr, int64_t bytes_per_example) {
  int64_t budget = pr.chunk_bytes;
  if (budget == 0) budget = env_chunk_bytes();
  if (budget == 0) {
    const int64_t l2 = device_l2_bytes();
    budget = l2 > 0 ? l2 / 4 : -1;
  }
  if (budget < 0 || bytes_per_example <= 0) return pr.n > 0 ? pr.n : 1;
  return clamp64(budget / bytes_per_example, 1, pr.n > 0 ? pr.n : 1);
}

#if defined(TFPN_CUDA_EMULATION)
int check_cuda(const char*) { return TFPN_OK; }
int memset_async(void* p, size_t bytes, tfpn_stream_t) {
  if (bytes > 0) std::memset(p, 0, bytes);
  return TFPN_OK;
}
#else
int check_cuda(const char* what) {
  const cudaError_t e = cudaGetLastError();
  if (e == cudaSuccess) return TFPN_OK;
  return set_error(TFPN_ERR_CUDA, "%s: %s (%s)", what, cudaGetErrorString(e),
                   cudaGetErrorName(e));
}
int memset_async(void* p, size_t bytes, tfpn_stream_t stream) {
  if (bytes == 0) return TFPN_OK;
  cudaMemsetAsync(p, 0, bytes, reinterpret_cast<cudaStream_t>(stream));
  return check_cuda("cudaMemsetAsync");
}
#endif

int fill_async(float* p, int64_t count, float value, tfpn_stream_t stream) {
  if (count <= 0) return TFPN_OK;
  const int64_t blocks = clamp64(ceil_div(count, kThreads), 1, 1024);
  launch(fill_kernel, blocks, stream, p, count, value);
  return check_cuda("fill kernel launch");
}

}  // namespace tfpn

extern "C" {

const char* tfpn_last_error(void) { return tfpn::g_error; }

int tfpn_api_version(void) { return 1; }

int tfpn_cuda_check(int* runtime_version, int* driver_version) {
#if defined(TFPN_CUDA_EMULATION)
  if (runtime_version) *runtime_version = 0;
  if (driver_version) *driver_version = 0;
  return TFPN_OK;
#else
  static std::atomic<int> cached{-1};
  static int rt = 0, drv = 0;
  static char msg[512] = "";
  int status = cached.load(std::memory_order_acquire);
  if (status < 0) {
    int r = 0, d = 0;
    cudaRuntimeGetVersion(&r);
    cudaDriverGetVersion(&d);
    int count = 0;
    int s = TFPN_OK;
    if (d == 0) {
      s = TFPN_ERR_DRIVER;
      snprintf(msg, sizeof(msg), "no CUDA driver found");
    } else if (d / 1000 < r / 1000) {
      // Minor-version compatibility covers the same major version only.
      s = TFPN_ERR_DRIVER;
      snprintf(msg, sizeof(msg),
               "the CUDA driver supports CUDA %d.%d but the tf_proxynorm kernels were built "
               "with CUDA %d.%d; rebuild them with an nvcc whose major version the driver "
               "supports (see docs/gpu.md)",
               d / 1000, (d % 1000) / 10, r / 1000, (r % 1000) / 10);
    } else if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
      s = TFPN_ERR_DRIVER;
      snprintf(msg, sizeof(msg), "no CUDA device visible to the CUDA runtime");
    }
    cudaGetLastError();
    rt = r, drv = d;
    cached.store(s, std::memory_order_release);
    status = s;
  }
  if (runtime_version) *runtime_version = rt;
  if (driver_version) *driver_version = drv;
  if (status != TFPN_OK) return tfpn::set_error(status, "%s", msg);
  return TFPN_OK;
#endif
}

}  // extern "C"
