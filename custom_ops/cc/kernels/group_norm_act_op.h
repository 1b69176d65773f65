// Device-agnostic OpKernels of TfProxyNorm>GroupNormAct and TfProxyNorm>GroupNormActGrad:
// validate inputs (InvalidArgument naming the input and its shape), allocate outputs, call
// the device functor of group_norm_act.h. A device registers them with
//
//   REGISTER_KERNEL_BUILDER(Name("TfProxyNorm>GroupNormAct").Device(DEVICE_GPU)
//                               .TypeConstraint<Eigen::half>("T"),
//                           tf_proxynorm::GroupNormActOp<Eigen::GpuDevice, Eigen::half>);
//
// (see group_norm_act_cpu.cc for the CPU registrations).
#ifndef TF_PROXYNORM_CC_KERNELS_GROUP_NORM_ACT_OP_H_
#define TF_PROXYNORM_CC_KERNELS_GROUP_NORM_ACT_OP_H_

#include <cmath>
#include <string>

#include "../activations.h"
#include "group_norm_act.h"
#include "tensorflow/core/framework/op_kernel.h"
#include "tensorflow/core/framework/tensor.h"
#include "tensorflow/core/framework/tensor_shape.h"

namespace tf_proxynorm {

// Reads and validates the attributes (InvalidArgument naming the attribute on error).
inline absl::Status ParseAttrs(tensorflow::OpKernelConstruction* context,
                               GroupNormActAttrs* attrs) {
  std::string activation;
  TF_RETURN_IF_ERROR(context->GetAttr("groups", &attrs->groups));
  TF_RETURN_IF_ERROR(context->GetAttr("epsilon", &attrs->epsilon));
  TF_RETURN_IF_ERROR(context->GetAttr("activation", &activation));
  TF_RETURN_IF_ERROR(context->GetAttr("channels_last", &attrs->channels_last));
  TF_RETURN_IF_ERROR(context->GetAttr("use_proxy", &attrs->use_proxy));
  attrs->activation = ActivationFromName(activation.c_str());
  if (attrs->activation < 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "`activation` must be one of identity, relu, silu, gelu, leaky_relu. Received: "
        "activation=",
        activation));
  }
  if (attrs->groups < 1) {
    return absl::InvalidArgumentError(
        absl::StrCat("`groups` must be >= 1. Received: groups=", attrs->groups));
  }
  if (!(attrs->epsilon >= 0.0f) || std::isinf(attrs->epsilon)) {
    return absl::InvalidArgumentError(absl::StrCat(
        "`epsilon` must be a finite number >= 0. Received: epsilon=", attrs->epsilon));
  }
  return absl::OkStatus();
}

// Derives the (N, P, C) / (N, C, P) view of x; checks rank >= 2 and C % groups == 0.
inline absl::Status ShapeOf(const tensorflow::TensorShape& x, const GroupNormActAttrs& attrs,
                            GroupNormActShape* shape) {
  if (x.dims() < 2) {
    return absl::InvalidArgumentError(absl::StrCat(
        "`x` must have rank >= 2 (batch, ..., channels). Received: x.shape=", x.DebugString()));
  }
  const int channel_axis = attrs.channels_last ? x.dims() - 1 : 1;
  shape->channels_last = attrs.channels_last;
  shape->N = x.dim_size(0);
  shape->C = x.dim_size(channel_axis);
  shape->G = attrs.groups;
  shape->P = 1;
  for (int i = 1; i < x.dims(); ++i) {
    if (i != channel_axis) shape->P *= x.dim_size(i);
  }
  if (shape->C % shape->G != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "`groups` must divide the number of channels (axis ", channel_axis,
        " of x). Received: groups=", shape->G, ", channels=", shape->C,
        ", x.shape=", x.DebugString()));
  }
  return absl::OkStatus();
}

// Checks that the inputs gamma, beta, proxy_mean, proxy_inv_std (starting at input
// `first_input`) are vectors of `channels` values.
inline absl::Status CheckPerChannel(tensorflow::OpKernelContext* context, int first_input,
                                    int64_t channels) {
  static const char* const kNames[] = {"gamma", "beta", "proxy_mean", "proxy_inv_std"};
  for (int i = 0; i < 4; ++i) {
    const tensorflow::Tensor& t = context->input(first_input + i);
    if (t.dims() != 1 || t.dim_size(0) != channels) {
      return absl::InvalidArgumentError(absl::StrCat(
          context->op_kernel().type_string(), ": `", kNames[i], "` must have shape (", channels,
          ",), one value per channel of x. Received: ", kNames[i], ".shape=",
          t.shape().DebugString()));
    }
  }
  return absl::OkStatus();
}

template <typename Device, typename T>
class GroupNormActOp : public tensorflow::OpKernel {
 public:
  explicit GroupNormActOp(tensorflow::OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, ParseAttrs(context, &attrs_));
  }

  void Compute(tensorflow::OpKernelContext* context) override {
    const tensorflow::Tensor& x = context->input(0);
    GroupNormActShape shape;
    OP_REQUIRES_OK(context, ShapeOf(x.shape(), attrs_, &shape));
    OP_REQUIRES_OK(context, CheckPerChannel(context, 1, shape.C));

    tensorflow::Tensor* y = nullptr;
    tensorflow::Tensor* mean = nullptr;
    tensorflow::Tensor* inv_std = nullptr;
    const tensorflow::TensorShape stats_shape({shape.N, shape.G});
    OP_REQUIRES_OK(context, context->forward_input_or_allocate_output({0}, 0, x.shape(), &y));
    OP_REQUIRES_OK(context, context->allocate_output(1, stats_shape, &mean));
    OP_REQUIRES_OK(context, context->allocate_output(2, stats_shape, &inv_std));
    GroupNormActForward<Device, T>()(
        context, attrs_, shape, x.flat<T>().data(), context->input(1).flat<float>().data(),
        context->input(2).flat<float>().data(), context->input(3).flat<float>().data(),
        context->input(4).flat<float>().data(), y->flat<T>().data(),
        mean->flat<float>().data(), inv_std->flat<float>().data());
  }

 private:
  GroupNormActAttrs attrs_;
};

template <typename Device, typename T>
class GroupNormActGradOp : public tensorflow::OpKernel {
 public:
  explicit GroupNormActGradOp(tensorflow::OpKernelConstruction* context) : OpKernel(context) {
    OP_REQUIRES_OK(context, ParseAttrs(context, &attrs_));
  }

  void Compute(tensorflow::OpKernelContext* context) override {
    const tensorflow::Tensor& dy = context->input(0);
    const tensorflow::Tensor& x = context->input(1);
    OP_REQUIRES(context, dy.shape() == x.shape(),
                absl::InvalidArgumentError(absl::StrCat(
                    type_string(), ": `dy` must have the shape of `x`. Received: dy.shape=",
                    dy.shape().DebugString(), ", x.shape=", x.shape().DebugString())));
    GroupNormActShape shape;
    OP_REQUIRES_OK(context, ShapeOf(x.shape(), attrs_, &shape));
    OP_REQUIRES_OK(context, CheckPerChannel(context, 2, shape.C));
    const tensorflow::TensorShape stats_shape({shape.N, shape.G});
    static const char* const kStatNames[] = {"mean", "inv_std"};
    for (int i = 0; i < 2; ++i) {
      const tensorflow::Tensor& t = context->input(6 + i);
      OP_REQUIRES(context, t.shape() == stats_shape,
                  absl::InvalidArgumentError(absl::StrCat(
                      type_string(), ": `", kStatNames[i], "` must have shape (N, groups) = ",
                      stats_shape.DebugString(), ". Received: ", kStatNames[i],
                      ".shape=", t.shape().DebugString())));
    }

    tensorflow::Tensor* dx = nullptr;
    OP_REQUIRES_OK(context, context->forward_input_or_allocate_output({0}, 0, x.shape(), &dx));
    float* per_channel[4];
    for (int i = 0; i < 4; ++i) {
      tensorflow::Tensor* out = nullptr;
      OP_REQUIRES_OK(context, context->allocate_output(
                                  1 + i, tensorflow::TensorShape({shape.C}), &out));
      per_channel[i] = out->flat<float>().data();
    }
    GroupNormActBackward<Device, T>()(
        context, attrs_, shape, dy.flat<T>().data(), x.flat<T>().data(),
        context->input(2).flat<float>().data(), context->input(3).flat<float>().data(),
        context->input(4).flat<float>().data(), context->input(5).flat<float>().data(),
        context->input(6).flat<float>().data(), context->input(7).flat<float>().data(),
        dx->flat<T>().data(), per_channel[0], per_channel[1], per_channel[2], per_channel[3]);
  }

 private:
  GroupNormActAttrs attrs_;
};

}  // namespace tf_proxynorm

#endif  // TF_PROXYNORM_CC_KERNELS_GROUP_NORM_ACT_OP_H_
