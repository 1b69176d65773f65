// Registration of TfProxyNorm>GroupNormAct and TfProxyNorm>GroupNormActGrad (names, inputs,
// attributes and strict shape functions). Kernels are registered separately per device
// (custom_ops/cc/kernels/group_norm_act_cpu.cc, custom_ops/cc/gpu/). The contract, including
// the math, is docs/fused_op_contract.md. Never rename these ops once released.
#include "tensorflow/core/framework/common_shape_fns.h"
#include "tensorflow/core/framework/op.h"
#include "tensorflow/core/framework/shape_inference.h"

namespace tf_proxynorm {
namespace {

using tensorflow::shape_inference::DimensionHandle;
using tensorflow::shape_inference::InferenceContext;
using tensorflow::shape_inference::ShapeHandle;

// Checks x (rank >= 2), the four per-channel inputs starting at `first_param` (shape (C,))
// and C % groups; returns the (N, G) shape of the statistics in `stats` and C in `channels`.
absl::Status CheckInputs(InferenceContext* c, int x_index, int first_param, ShapeHandle* x,
                         ShapeHandle* stats, DimensionHandle* channels_out) {
  TF_RETURN_IF_ERROR(c->WithRankAtLeast(c->input(x_index), 2, x));
  int64_t groups;
  bool channels_last;
  TF_RETURN_IF_ERROR(c->GetAttr("groups", &groups));
  TF_RETURN_IF_ERROR(c->GetAttr("channels_last", &channels_last));
  DimensionHandle channels = c->UnknownDim();
  if (c->RankKnown(*x)) {
    channels = c->Dim(*x, channels_last ? -1 : 1);
  }
  static const char* const kNames[] = {"gamma", "beta", "proxy_mean", "proxy_inv_std"};
  for (int i = 0; i < 4; ++i) {
    ShapeHandle param;
    TF_RETURN_IF_ERROR(c->WithRank(c->input(first_param + i), 1, &param));
    DimensionHandle merged;
    absl::Status status = c->Merge(channels, c->Dim(param, 0), &merged);
    if (!status.ok()) {
      return absl::InvalidArgumentError(absl::StrCat(
          "`", kNames[i], "` must have shape (C,) with C = ", c->DebugString(channels),
          " channels of x. Received: ", kNames[i], ".shape=", c->DebugString(param),
          ", x.shape=", c->DebugString(*x)));
    }
    channels = merged;
  }
  if (c->ValueKnown(channels) && c->Value(channels) % groups != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "`groups` must divide the number of channels. Received: groups=", groups,
        ", channels=", c->Value(channels), ", x.shape=", c->DebugString(*x)));
  }
  DimensionHandle batch = c->RankKnown(*x) ? c->Dim(*x, 0) : c->UnknownDim();
  *stats = c->Matrix(batch, groups);
  *channels_out = channels;
  return absl::OkStatus();
}

}  // namespace

REGISTER_OP("TfProxyNorm>GroupNormAct")
    .Input("x: T")
    .Input("gamma: float")
    .Input("beta: float")
    .Input("proxy_mean: float")
    .Input("proxy_inv_std: float")
    .Output("y: T")
    .Output("mean: float")
    .Output("inv_std: float")
    .Attr("T: {float, half, bfloat16}")
    .Attr("groups: int >= 1")
    .Attr("epsilon: float")
    .Attr("activation: {'identity', 'relu', 'silu', 'gelu', 'leaky_relu'}")
    .Attr("channels_last: bool = true")
    .Attr("use_proxy: bool = false")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle x, stats;
      DimensionHandle channels;
      TF_RETURN_IF_ERROR(CheckInputs(c, 0, 1, &x, &stats, &channels));
      c->set_output(0, x);
      c->set_output(1, stats);
      c->set_output(2, stats);
      return absl::OkStatus();
    })
    .Doc(R"doc(
GroupNorm over contiguous channel groups (per example), per-channel affine, activation and
optional proxy normalization: y = (act(gamma * xhat + beta) - proxy_mean) * proxy_inv_std.
Also returns the per-(example, group) mean and inverse standard deviation for the gradient.
)doc");

REGISTER_OP("TfProxyNorm>GroupNormActGrad")
    .Input("dy: T")
    .Input("x: T")
    .Input("gamma: float")
    .Input("beta: float")
    .Input("proxy_mean: float")
    .Input("proxy_inv_std: float")
    .Input("mean: float")
    .Input("inv_std: float")
    .Output("dx: T")
    .Output("dgamma: float")
    .Output("dbeta: float")
    .Output("dproxy_mean: float")
    .Output("dproxy_inv_std: float")
    .Attr("T: {float, half, bfloat16}")
    .Attr("groups: int >= 1")
    .Attr("epsilon: float")
    .Attr("activation: {'identity', 'relu', 'silu', 'gelu', 'leaky_relu'}")
    .Attr("channels_last: bool = true")
    .Attr("use_proxy: bool = false")
    .SetShapeFn([](InferenceContext* c) {
      ShapeHandle x, stats, merged;
      DimensionHandle channels;
      TF_RETURN_IF_ERROR(CheckInputs(c, 1, 2, &x, &stats, &channels));
      TF_RETURN_IF_ERROR(c->Merge(c->input(0), x, &merged));
      for (int i = 6; i < 8; ++i) {
        ShapeHandle stat;
        TF_RETURN_IF_ERROR(c->Merge(c->input(i), stats, &stat));
      }
      c->set_output(0, merged);
      for (int i = 1; i < 5; ++i) c->set_output(i, c->Vector(channels));
      return absl::OkStatus();
    })
    .Doc(R"doc(
Gradient of TfProxyNorm>GroupNormAct with respect to x, gamma, beta, proxy_mean and
proxy_inv_std (the last two are zeros when use_proxy is false).
)doc");

}  // namespace tf_proxynorm
