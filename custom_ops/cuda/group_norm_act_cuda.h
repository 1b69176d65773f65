/* C API of the CUDA kernels of TfProxyNorm>GroupNormAct and TfProxyNorm>GroupNormActGrad.
 *
 * The kernel core is independent of TensorFlow: it takes raw device pointers, sizes, attrs
 * and a CUDA stream. Two callers use it: the TensorFlow op kernels
 * (custom_ops/cc/gpu/group_norm_act_gpu_kernels.cc) and the standalone harness
 * (custom_ops/gpu_test/). The math is docs/fused_op_contract.md.
 *
 * This header is plain C and needs no CUDA header: `tfpn_stream_t` is the same type as
 * `cudaStream_t` (and `CUstream`), so a `cudaStream_t` converts implicitly.
 *
 * Conventions of every entry point:
 *  - x is viewed as (N, P, C) when channels_last, else (N, C, P), P the product of the
 *    non-batch, non-channel dimensions (1 for a rank-2 input). Group g holds channels
 *    [g * C / G, (g + 1) * C / G).
 *  - x, y, dy, dx have the element type `dtype`; all other arrays are float32.
 *  - All pointers are device pointers; arrays of zero elements may be NULL.
 *  - Calls are asynchronous on `stream`; they return TFPN_OK or an error code, and
 *    tfpn_last_error() describes the last error of the calling thread.
 *  - `workspace` must hold at least the bytes given by the matching *_workspace_size()
 *    and be 16-byte aligned (256 recommended); its content on entry does not matter and
 *    it must not be used by anything else until the work on `stream` has completed.
 *  - Results are deterministic: a fixed reduction order, no floating-point atomics.
 */
#ifndef TFPN_GROUP_NORM_ACT_CUDA_H_
#define TFPN_GROUP_NORM_ACT_CUDA_H_

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct CUstream_st;
typedef struct CUstream_st* tfpn_stream_t; /* == cudaStream_t */

enum tfpn_dtype { TFPN_FLOAT32 = 0, TFPN_FLOAT16 = 1, TFPN_BFLOAT16 = 2 };

/* Same ids as custom_ops/cc/activations.h (checked by static_asserts in gna_common.cuh) and
 * tf_proxynorm/ops/activations.py (checked by tests/test_activation_ids.py). */
enum tfpn_activation {
  TFPN_ACT_IDENTITY = 0,
  TFPN_ACT_RELU = 1,
  TFPN_ACT_SILU = 2,
  TFPN_ACT_GELU = 3,
  TFPN_ACT_LEAKY_RELU = 4
};

enum tfpn_status {
  TFPN_OK = 0,
  TFPN_ERR_INVALID_ARGUMENT = 1, /* bad sizes / attrs / NULL pointers */
  TFPN_ERR_WORKSPACE = 2,        /* workspace too small or misaligned */
  TFPN_ERR_CUDA = 3,             /* a CUDA runtime call or a kernel launch failed */
  TFPN_ERR_DRIVER = 4            /* the CUDA driver is older than the runtime linked in */
};

typedef struct tfpn_problem {
  int64_t n;             /* batch */
  int64_t c;             /* channels */
  int64_t positions;     /* product of the other dims (1 for rank 2; may be 0) */
  int32_t groups;        /* >= 1, divides c */
  int32_t channels_last; /* 1: channels on the last axis, 0: on axis 1 */
  int32_t activation;    /* enum tfpn_activation */
  int32_t use_proxy;     /* 0 or 1 */
  int32_t dtype;         /* enum tfpn_dtype */
  float epsilon;
  /* Bytes of x (forward) or of x and dy (backward) processed per step so that the second
   * pass re-reads them from L2: 0 = automatic (a quarter of the device's L2 cache, or the
   * environment variable TFPN_CUDA_CHUNK_BYTES when set), < 0 = one step for the whole
   * batch. Does not change the results. */
  int64_t chunk_bytes;
} tfpn_problem;

/* Forward: y, mean (N, G), inv_std (N, G) = 1 / sqrt(biased var + epsilon). */
size_t tfpn_group_norm_act_fwd_workspace_size(const tfpn_problem* p);
int tfpn_group_norm_act_fwd(const tfpn_problem* p, const void* x, const float* gamma,
                            const float* beta, const float* proxy_mean,
                            const float* proxy_inv_std, void* y, float* mean, float* inv_std,
                            void* workspace, size_t workspace_bytes, tfpn_stream_t stream);

/* Backward: dx and the (C,) gradients; dproxy_* are zeros when !use_proxy. mean and
 * inv_std are the forward's outputs. */
size_t tfpn_group_norm_act_bwd_workspace_size(const tfpn_problem* p);
int tfpn_group_norm_act_bwd(const tfpn_problem* p, const void* dy, const void* x,
                            const float* gamma, const float* beta, const float* proxy_mean,
                            const float* proxy_inv_std, const float* mean,
                            const float* inv_std, void* dx, float* dgamma, float* dbeta,
                            float* dproxy_mean, float* dproxy_inv_std, void* workspace,
                            size_t workspace_bytes, tfpn_stream_t stream);

/* Message of the calling thread's last error ("" when none). */
const char* tfpn_last_error(void);

/* Checks that a CUDA device and a driver new enough for the runtime the kernels were
 * linked with are present (cached after the first call). Fills the versions (as
 * 1000 * major + 10 * minor; 0 when unknown) when the pointers are not NULL. */
int tfpn_cuda_check(int* runtime_version, int* driver_version);

/* Version of this API, bumped on incompatible changes. */
int tfpn_api_version(void);

#ifdef __cplusplus
}
#endif

#endif /* TFPN_GROUP_NORM_ACT_CUDA_H_ */
