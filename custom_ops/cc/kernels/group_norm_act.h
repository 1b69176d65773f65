// GroupNormAct and its gradient: attributes, shapes and the device functors that the
// OpKernels of group_norm_act_op.h call. The CPU functors are in group_norm_act_cpu.cc;
// a GPU build specializes the same templates for Eigen::GpuDevice (custom_ops/cuda/) and
// registers the kernels in custom_ops/cc/gpu/.
//
// Math: docs/fused_op_contract.md.
#ifndef TF_PROXYNORM_CC_KERNELS_GROUP_NORM_ACT_H_
#define TF_PROXYNORM_CC_KERNELS_GROUP_NORM_ACT_H_

#include <cstdint>

#include "tensorflow/core/framework/op_kernel.h"

namespace tf_proxynorm {

// The attributes shared by both ops (parsed and validated by ParseAttrs in
// group_norm_act_op.h, once per kernel instance).
struct GroupNormActAttrs {
  int groups = 1;
  float epsilon = 0.0f;
  int activation = 0;  // tf_proxynorm::Activation (custom_ops/cc/activations.h)
  bool channels_last = true;
  bool use_proxy = false;
};

// x viewed as (N, P, C) (channels_last) or (N, C, P): P is the product of the spatial axes
// (GroupNormActShapeOf in group_norm_act_op.h).
struct GroupNormActShape {
  int64_t N = 0, C = 0, G = 0, P = 0;
  bool channels_last = true;
};

// Forward. Assumptions: shapes validated (gamma, beta, proxy_* of shape (C,)); y, mean and
// inv_std allocated with shapes x, (N, G), (N, G). Tensors may be empty.
template <typename Device, typename T>
struct GroupNormActForward {
  void operator()(tensorflow::OpKernelContext* context, const GroupNormActAttrs& attrs,
                  const GroupNormActShape& shape, const T* x, const float* gamma,
                  const float* beta, const float* proxy_mean, const float* proxy_inv_std,
                  T* y, float* mean, float* inv_std);
};

// Backward. Assumptions: as the forward; mean and inv_std are (N, G) from the forward;
// dx, dgamma, dbeta, dproxy_mean, dproxy_inv_std allocated (the last two are written with
// zeros when !use_proxy).
template <typename Device, typename T>
struct GroupNormActBackward {
  void operator()(tensorflow::OpKernelContext* context, const GroupNormActAttrs& attrs,
                  const GroupNormActShape& shape, const T* dy, const T* x, const float* gamma,
                  const float* beta, const float* proxy_mean, const float* proxy_inv_std,
                  const float* mean, const float* inv_std, T* dx, float* dgamma, float* dbeta,
                  float* dproxy_mean, float* dproxy_inv_std);
};

}  // namespace tf_proxynorm

#endif  // TF_PROXYNORM_CC_KERNELS_GROUP_NORM_ACT_H_
