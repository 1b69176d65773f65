// GPU kernels of TfProxyNorm>GroupNormAct and TfProxyNorm>GroupNormActGrad: a thin wrapper
// of the TensorFlow-independent CUDA kernel core (custom_ops/cuda/group_norm_act_cuda.h).
//
// Validation, output allocation and the InvalidArgument messages are the shared OpKernels
// of ../kernels/group_norm_act_op.h (the CPU kernels use the same ones); this file only
// specializes their device functors: it builds the C API's problem, takes TensorFlow's
// CUDA stream, allocates the kernels' workspace as a temporary tensor and launches.
//
// Compiled by the host C++ compiler with TensorFlow's flags and -DTFPN_WITH_CUDA=1; it needs
// no CUDA or Eigen-GPU header (the stream is an opaque pointer), and the op library links the
// nvcc objects of custom_ops/cuda/ and a static cudart (tf_proxynorm/fused/cuda.py).
#if TFPN_WITH_CUDA

#include <cstdint>

#include "../../cuda/group_norm_act_cuda.h"
#include "../kernels/group_norm_act.h"
#include "../kernels/group_norm_act_op.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/register_types.h"
#include "tensorflow/core/framework/tensor.h"

#if __has_include("xla/stream_executor/stream.h")
#include "xla/stream_executor/stream.h"
#else
#include "tensorflow/compiler/xla/stream_executor/stream.h"
#endif

namespace tf_proxynorm {

// Device tag of the GPU functors (the OpKernels only use it to select them).
struct CudaDevice {};

namespace {

template <typename T>
struct DTypeId;
template <>
struct DTypeId<float> {
  static constexpr int value = TFPN_FLOAT32;
};
template <>
struct DTypeId<Eigen::half> {
  static constexpr int value = TFPN_FLOAT16;
};
template <>
struct DTypeId<Eigen::bfloat16> {
  static constexpr int value = TFPN_BFLOAT16;
};

tfpn_problem MakeProblem(const GroupNormActAttrs& attrs, const GroupNormActShape& shape,
                         int dtype) {
  tfpn_problem p;
  p.n = shape.N;
  p.c = shape.C;
  p.positions = shape.P;
  p.groups = static_cast<int32_t>(shape.G);
  p.channels_last = shape.channels_last ? 1 : 0;
  p.activation = attrs.activation;
  p.use_proxy = attrs.use_proxy ? 1 : 0;
  p.dtype = dtype;
  p.epsilon = attrs.epsilon;
  p.chunk_bytes = 0;  // automatic (L2-sized chunks, or TFPN_CUDA_CHUNK_BYTES)
  return p;
}

// TensorFlow's CUDA stream of this kernel (a CUstream, i.e. a cudaStream_t).
absl::Status GetStream(tensorflow::OpKernelContext* context, tfpn_stream_t* stream) {
  tensorflow::DeviceContext* device_context = context->op_device_context();
  if (device_context == nullptr || device_context->stream() == nullptr) {
    return absl::InternalError(absl::StrCat(context->op_kernel().type_string(),
                                            ": no GPU stream in the op's device context"));
  }
  *stream = static_cast<tfpn_stream_t>(
      device_context->stream()->platform_specific_handle().stream);
  if (*stream == nullptr) {
    return absl::InternalError(
        absl::StrCat(context->op_kernel().type_string(), ": the GPU stream has no handle"));
  }
  return absl::OkStatus();
}

absl::Status StatusOf(tensorflow::OpKernelContext* context, int rc) {
  if (rc == TFPN_OK) return absl::OkStatus();
  const std::string message =
      absl::StrCat(context->op_kernel().type_string(), " (CUDA kernels): ", tfpn_last_error());
  switch (rc) {
    case TFPN_ERR_INVALID_ARGUMENT:
      return absl::InvalidArgumentError(message);
    case TFPN_ERR_DRIVER:
      return absl::FailedPreconditionError(message);
    default:
      return absl::InternalError(message);
  }
}

// What a launch needs besides its pointers: the C API's problem, TensorFlow's stream and the
// kernels' scratch memory as a temporary tensor (device memory, stream-ordered reuse by
// TensorFlow's allocator; `data` is nullptr when no workspace is needed).
struct Launch {
  tfpn_problem problem;
  tfpn_stream_t stream = nullptr;
  tensorflow::Tensor workspace;
  void* data = nullptr;
  size_t bytes = 0;
};

template <typename T>
absl::Status PrepareLaunch(tensorflow::OpKernelContext* context, const GroupNormActAttrs& attrs,
                           const GroupNormActShape& shape,
                           size_t (*workspace_size)(const tfpn_problem*), Launch* launch) {
  TF_RETURN_IF_ERROR(StatusOf(context, tfpn_cuda_check(nullptr, nullptr)));
  TF_RETURN_IF_ERROR(GetStream(context, &launch->stream));
  launch->problem = MakeProblem(attrs, shape, DTypeId<T>::value);
  launch->bytes = workspace_size(&launch->problem);
  if (launch->bytes == 0) return absl::OkStatus();
  TF_RETURN_IF_ERROR(context->allocate_temp(
      tensorflow::DT_UINT8, tensorflow::TensorShape({static_cast<int64_t>(launch->bytes)}),
      &launch->workspace));
  launch->data = launch->workspace.flat<uint8_t>().data();
  return absl::OkStatus();
}

}  // namespace

template <typename T>
struct GroupNormActForward<CudaDevice, T> {
  void operator()(tensorflow::OpKernelContext* context, const GroupNormActAttrs& attrs,
                  const GroupNormActShape& shape, const T* x, const float* gamma,
                  const float* beta, const float* proxy_mean, const float* proxy_inv_std,
                  T* y, float* mean, float* inv_std) {
    Launch l;
    OP_REQUIRES_OK(context, PrepareLaunch<T>(context, attrs, shape,
                                             tfpn_group_norm_act_fwd_workspace_size, &l));
    OP_REQUIRES_OK(context, StatusOf(context, tfpn_group_norm_act_fwd(
                                                  &l.problem, x, gamma, beta, proxy_mean,
                                                  proxy_inv_std, y, mean, inv_std, l.data,
                                                  l.bytes, l.stream)));
  }
};

template <typename T>
struct GroupNormActBackward<CudaDevice, T> {
  void operator()(tensorflow::OpKernelContext* context, const GroupNormActAttrs& attrs,
                  const GroupNormActShape& shape, const T* dy, const T* x, const float* gamma,
                  const float* beta, const float* proxy_mean, const float* proxy_inv_std,
                  const float* mean, const float* inv_std, T* dx, float* dgamma, float* dbeta,
                  float* dproxy_mean, float* dproxy_inv_std) {
    Launch l;
    OP_REQUIRES_OK(context, PrepareLaunch<T>(context, attrs, shape,
                                             tfpn_group_norm_act_bwd_workspace_size, &l));
    OP_REQUIRES_OK(context,
                   StatusOf(context, tfpn_group_norm_act_bwd(
                                         &l.problem, dy, x, gamma, beta, proxy_mean,
                                         proxy_inv_std, mean, inv_std, dx, dgamma, dbeta,
                                         dproxy_mean, dproxy_inv_std, l.data, l.bytes,
                                         l.stream)));
  }
};

#define TFPN_REGISTER_GPU(T)                                                          \
  REGISTER_KERNEL_BUILDER(Name("TfProxyNorm>GroupNormAct")                            \
                              .Device(tensorflow::DEVICE_GPU)                         \
                              .TypeConstraint<T>("T"),                                \
                          GroupNormActOp<CudaDevice, T>);                             \
  REGISTER_KERNEL_BUILDER(Name("TfProxyNorm>GroupNormActGrad")                        \
                              .Device(tensorflow::DEVICE_GPU)                         \
                              .TypeConstraint<T>("T"),                                \
                          GroupNormActGradOp<CudaDevice, T>)

TFPN_REGISTER_GPU(float);
TFPN_REGISTER_GPU(Eigen::half);
TFPN_REGISTER_GPU(Eigen::bfloat16);

#undef TFPN_REGISTER_GPU

}  // namespace tf_proxynorm

#endif  // TFPN_WITH_CUDA
