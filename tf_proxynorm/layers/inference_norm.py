"""The serving form of GN / LN / IN (+ PN): few large ops, nothing recomputed from weights.

`InferenceGroupNormAct` computes, per example and channel group,

```python
y = output_scale * act(gamma * (x - mean) / sqrt(var + epsilon) + beta) + output_offset
```

which is what a `GroupNormAct` / `LayerNormAct` / `InstanceNormAct` (with or without Proxy
Norm) or a `ShiftedGroupNormAct` computes at inference once `fold_for_inference` has turned
its proxy statistics into per-channel constants. It is forward-only (no custom gradient,
no implementation switch, no fused op) and written for TensorFlow's graph executor, XLA
and TFLite alike: per call and per layer, on the full-size tensor,

- two reductions over the positions, `sum(x)` and `sum(x * x)` (a batched matmul with a
  row of ones in the graph executor; under XLA a reduction, which with TensorFlow on a
  CPU first adds the 8 slices of the positions, squared for `sum(x * x)`, in one pass
  that writes an 8-times smaller tensor, instead of writing `x * x` in full),
- one multiply-add `x * S + B` and the activation, with the per-(example, channel) `S`,
  `B` computed on `(N, C)` tensors. With ReLU, a PN output offset rides in the same ops:
  `relu(z) + b = maximum(z + b, b)`; a positive output scale of a positively homogeneous
  activation (ReLU, leaky ReLU, identity) is folded into `gamma` and `beta` beforehand.

Numerics: `var = E[x^2] - E[x]^2` from raw sums loses about `log2(1 + mean^2 / var)` bits,
so a call uses it only when every group of every example has `mean^2 <= RAW_MEAN_RATIO *
(var + epsilon)` (|mean| <= 4 std, the case of post-conv activations; one `cond` on a
scalar), and only on maps of at least `RAW_MIN_SIZE` values per example (below, the `cond`
costs more than the pass it saves). Otherwise (inputs such as mean 1e4, std 1, or small
maps) the call takes the shifted form, one pass more
(the shift idea of `tf_proxynorm.ops.group_norm._moments`): each channel's sums are taken
of `d = x - shift_c` with `shift_c` one of its own values; the per-channel variances
`(sum(d^2) - sum(d)^2 / P) / P` are exact up to float32 rounding of the deviations times
`1 + (shift_c - mean_c)^2 / var_c` (a small number unless the first position is an
outlier of its channel), and channels are combined within a group with Chan's formula
on the channel means taken relative to the group's first channel shift. The output is
`d * S + (beta - e * S)` with `e` the group mean relative to `shift_c`: no large number is
multiplied before the offset is removed.

That routing is `statistics="auto"`. `statistics="shifted"` takes the shifted form on every
call (the same outputs, no control flow in the graph: for TFLite, whose delegates leave
`If` to the interpreter, XNNPACK splitting its partitions there), `statistics="raw"`
the raw sums on every call (fastest, but only for inputs whose group means are within a
few standard deviations of zero).
"""

import keras
import numpy as np
from keras import ops

from tf_proxynorm.layers._args import check_bool, check_int
from tf_proxynorm.ops import activations
from tf_proxynorm.ops.masked import masked_group_normalize
from tf_proxynorm.ops.norm_act import affine_act_proxy
from tf_proxynorm.ops.stats import channel_axis, largest_divisor_at_most, stats_dtype

# Activations with act(a * z) = a * act(z) for a > 0.
HOMOGENEOUS = ("identity", "relu", "leaky_relu")

# How the per-(example, channel) sums over the positions are computed: "matmul" (a batched
# matmul with a constant row of ones: TensorFlow's graph executor, oneDNN), "sum" (a
# reduction) or "auto": "sum" under XLA (jit_compile, JAX), where XLA rewrites the matmul
# into a reduction in a slow layout (ResNet-50 224x224 batch 8, XLA: 1.29x BN with "sum",
# 1.95x with "matmul"; graph: 1.30x with "matmul", 1.38x with "sum"), else "matmul".
REDUCTION = "auto"

# The raw sums `sum(x)`, `sum(x * x)` serve a call when every group of every example has
# `mean^2 <= RAW_MEAN_RATIO * (variance + epsilon)` (|mean| <= 4 std: at most ~4 bits of
# `variance + epsilon` lost to the cancellation in `E[x^2] - E[x]^2`, about the shifted
# form's typical loss); otherwise the call takes the shifted form (one more pass).
# Post-conv activations are in the first case (every layer of the benchmarked ResNet-50s);
# the shift is for inputs such as mean 1e4, std 1. benchmarks/bench_serve_layer.py,
# (8, 56, 56, 256), 32 groups: 3.3 relu passes against 4.1 (shifted) in the graph executor,
# 2.6 against 3.8 under XLA.
RAW_MEAN_RATIO = 16.0
# Smaller maps (positions x channels per example, when static) always take the shifted form:
# the pass the raw sums save there costs less than the `cond` (~20 us per call in the graph
# executor and in TFLite, whose `If` also splits the XNNPACK delegate's partitions). CIFAR
# ResNet-20 (at most 16K values per example), batch 1: TFLite 1.70x BN with the `cond`,
# 1.68x shifted only; SavedModel 1.48x and 1.41x.
RAW_MIN_SIZE = 1 << 16
# The `statistics` argument: "auto" (the above), or "shifted" / "raw" on every call.
STATISTICS = ("auto", "shifted", "raw")


def check_statistics(statistics):
    """`statistics` if it is one of `STATISTICS`, else a ValueError naming it."""
    if not isinstance(statistics, str) or statistics not in STATISTICS:
        raise ValueError(f"`statistics` must be one of {', '.join(map(repr, STATISTICS))}. "
                         f"Received: statistics={statistics!r}")
    return statistics


def _under_xla():
    if keras.backend.backend() == "jax":
        return True
    if keras.backend.backend() != "tensorflow":
        return False
    from tf_proxynorm.fused.ops import in_xla_context
    return in_xla_context()


def _view(x, axis, rank):
    """`x` as `(N, P, C)` (channels last) or `(N, C, P)` (channels first), with the
    position count P (static int or None), and a function mapping results back."""
    channels = x.shape[axis]
    red = [a for a in range(1, rank) if a != axis]
    sizes = [x.shape[a] for a in red]
    positions = int(np.prod(sizes)) if all(s is not None for s in sizes) else None
    if axis not in (1, rank - 1):    # channels on a middle axis: moved last
        perm = [0] + red + [axis]
        inverse = list(np.argsort(perm))
        moved = ops.transpose(x, perm)
        view, _, back = _view(moved, rank - 1, rank)
        return view, positions, lambda y: ops.transpose(back(y), inverse)
    if rank == 2:
        return ops.expand_dims(x, 1), 1, lambda y: ops.squeeze(y, 1)
    shape = x.shape
    if positions is not None:
        view_shape = (-1, positions, channels) if axis != 1 else (-1, channels, positions)
    elif axis != 1:
        view_shape = (ops.shape(x)[0], -1, channels)
    else:
        view_shape = (ops.shape(x)[0], channels, -1)

    def back(y):
        if all(s is not None for s in shape[1:]):
            return ops.reshape(y, (-1,) + tuple(shape[1:]))
        return ops.reshape(y, ops.shape(x))
    return ops.reshape(x, view_shape), positions, back


def _sum_positions(t, last, positions, square=False, slices=1):
    """`(N, P, C)` -> `(N, 1, C)` (or `(N, C, P)` -> `(N, C, 1)`): the sum over the positions
    of `t` (of `t * t` if `square`), adding `slices` slices of the positions first (channels
    last, under XLA:CPU: `_slices`)."""
    if slices > 1:
        # XLA:CPU compiles `sum(d * d)` to a loop fusion that writes `d * d` in full, then
        # a reduce-window and a reduce. Adding the squares of k slices of the positions
        # first is one loop fusion that reads `d` once and writes a k-times smaller tensor,
        # which XLA reduces in one call (benchmarks/bench_sum_squares.py, `sliced`).
        t = ops.reshape(t, (-1, positions // slices, slices, t.shape[-1]))
        parts = [t[:, :, j, :] for j in range(slices)]
        if square:
            parts = [u * u for u in parts]
        return ops.sum(sum(parts[1:], parts[0]), axis=1, keepdims=True)
    if square:
        t = t * t
    reduction = REDUCTION if REDUCTION != "auto" else ("sum" if _under_xla() else "matmul")
    if reduction == "matmul" and positions is not None:
        if last:    # ones (1, 1, P) @ t (N, P, C)
            return ops.matmul(ops.ones((1, 1, positions), dtype=t.dtype), t)
        return ops.matmul(t, ops.ones((1, positions, 1), dtype=t.dtype))
    return ops.sum(t, axis=1 if last else 2, keepdims=True)


def _slices(x, positions, last):
    """How many slices of the positions `_sum_positions` adds before its reduce: with
    TensorFlow under XLA on a CPU, channels last, the largest k <= 8 dividing `positions`;
    else 1 (none). Also 1 for a single example of under 256 positions, where XLA merges the
    slices and the reduce into one slow loop (1x14x14x1024: 2.1x slower). JAX keeps the
    plain reduce: its XLA (jaxlib 0.10) fuses the square into it, and ran the sliced form
    1.5-2.1x slower; GPU and TPU were not measured."""
    if (keras.backend.backend() != "tensorflow" or not last or positions is None
            or not _under_xla()):
        return 1
    from tf_proxynorm.fused.ops import call_device_type
    if call_device_type(x) != "CPU" or (positions < 256 and (x.shape[0] or 1) == 1):
        return 1
    return largest_divisor_at_most(positions, 8)


def group_norm_act_inference(x, gamma, beta, *, groups, axis=-1, epsilon=1e-3,
                             activation="relu", output_scale=None, output_offset=None,
                             statistics="auto"):
    """`output_scale * act(gamma * group_normalize(x) + beta) + output_offset`, forward only.

    Args:
        x: tensor of rank >= 2 with a static number of channels on `axis`.
        gamma, beta: per-channel `(C,)` tensors (not None).
        groups: number of contiguous channel groups (dividing C).
        axis: channel axis.
        epsilon: added to the group variance.
        activation: name or callable.
        output_scale, output_offset: per-channel `(C,)` tensors or None.
        statistics: "auto", "shifted" or "raw" (`InferenceGroupNormAct`'s argument).

    Returns:
        A float32 tensor (float64 for float64 input) of the shape of `x`.
    """
    rank = len(x.shape)
    axis = channel_axis(rank, axis)
    channels = x.shape[axis]
    if channels is None or groups < 1 or channels % groups:
        raise ValueError(f"`groups` ({groups}) must divide the static channel count. "
                         f"Received: x.shape={x.shape}")
    per_group = channels // groups
    check_statistics(statistics)
    name, act = activations.get(activation)
    dtype = stats_dtype(x.dtype)
    view, positions, back = _view(ops.cast(x, dtype), axis, rank)
    last = axis != 1 or rank == 2
    slices = _slices(view, positions, last)
    # Per-(example, channel) tensors are (N, 1, C) for channels last, (N, C, 1) first.
    nc = (1, 1, channels) if last else (1, channels, 1)
    if positions is not None:
        count = float(positions)
    else:
        count = ops.cast(ops.shape(view)[1 if last else 2], dtype)
    gamma = ops.cast(gamma, dtype)
    beta = ops.cast(beta, dtype)
    offset = None if output_offset is None else ops.reshape(ops.cast(output_offset, dtype), nc)
    out_scale = None if output_scale is None else ops.reshape(ops.cast(output_scale, dtype), nc)

    def per_channel(mean_g, var_g, rel=None):
        """gamma / sqrt(var_g + eps) and beta - mean_g * that, per (example, channel);
        `mean_g` relative to each channel's `rel`-shifted origin."""
        if per_group == 1:
            scale = ops.reshape(gamma, nc) * ops.rsqrt(var_g + epsilon)
            return scale, ops.reshape(beta, nc) - mean_g * scale
        g3 = (1, groups, per_group)
        scale3 = ops.reshape(gamma, g3) * ops.rsqrt(var_g + epsilon)        # (N, G, Cg)
        bias3 = ops.reshape(beta, g3) - (mean_g if rel is None else mean_g - rel) * scale3
        return (ops.reshape(scale3, (-1,) + nc[1:]), ops.reshape(bias3, (-1,) + nc[1:]))

    def output(d, scale, bias):
        if offset is not None and out_scale is None and name in ("identity", "relu"):
            # act(z) + b: identity: z + b; relu: maximum(z + b, b). Same ops as act(z).
            z = d * scale + (bias + offset)
            return back(z if name == "identity" else ops.maximum(z, offset))
        y = act(d * scale + bias)
        if out_scale is not None:
            y = y * out_scale
        if offset is not None:
            y = y + offset
        return back(y)

    def group_mean(t):          # per-(example, channel) -> per-(example, group)
        if per_group == 1:
            return t
        return ops.mean(ops.reshape(t, (-1, groups, per_group)), axis=2, keepdims=True)

    def raw(mean, var):
        return output(view, *per_channel(mean, ops.maximum(var, 0.0)))

    def shifted(branch=False):
        shift = view[:, :1, :] if last else view[:, :, :1]    # each channel's first value
        if branch and slices > 1:
            # XLA turns a `cond` whose branches hold only elementwise ops, slices and
            # reduces (as the sliced sums leave them) into a select that computes both
            # branches; a barrier in this one keeps the conditional.
            from tf_proxynorm.fused.ops import xla_optimization_barrier
            shift = xla_optimization_barrier(shift)
        d = view - shift
        s1 = _sum_positions(d, last, positions, slices=slices)
        s2 = _sum_positions(d, last, positions, square=True, slices=slices)
        mean_c = s1 / count                                 # channel mean - shift_c
        m2_c = ops.maximum(s2 - s1 * mean_c, 0.0)           # centered sum of squares
        if per_group == 1:
            return output(d, *per_channel(mean_c, m2_c / count))
        g3 = (-1, groups, per_group)
        sh = ops.reshape(shift, g3)
        rel = sh - sh[:, :, :1]                           # shift_c - shift of the group's 1st
        mu = rel + ops.reshape(mean_c, g3)                # channel means, same reference
        mu_g = ops.mean(mu, axis=2, keepdims=True)        # (N, G, 1)
        dev = mu - mu_g
        m2 = ops.sum(ops.reshape(m2_c, g3) + count * (dev * dev), axis=2, keepdims=True)
        # x - mean_g = d - e with e = mu_g - rel (the group mean relative to shift_c).
        return output(d, *per_channel(mu_g, m2 / (count * per_group), rel))

    small = positions is not None and positions * channels < RAW_MIN_SIZE
    if statistics == "shifted" or (statistics == "auto" and small):
        return shifted()        # small maps: the pass raw sums save costs less than the `cond`
    # Raw sums: E[x^2] - E[x]^2 loses about log2(1 + mean^2 / var) bits.
    mean = group_mean(_sum_positions(view, last, positions, slices=slices)) / count
    var = (group_mean(_sum_positions(view, last, positions, square=True, slices=slices))
           / count - mean * mean)
    if statistics == "raw":
        return raw(mean, var)
    # NaN or inf statistics compare False and take the shifted form (which propagates them).
    return ops.cond(ops.all(mean * mean <= RAW_MEAN_RATIO * (var + epsilon)),
                    lambda: raw(mean, var), lambda: shifted(branch=True))


def _per_channel(v, y, axis):
    shape = [1] * len(y.shape)
    shape[channel_axis(len(y.shape), axis)] = -1
    return ops.reshape(ops.cast(v, y.dtype), shape)


@keras.saving.register_keras_serializable(package="tf_proxynorm")
class InferenceGroupNormAct(keras.layers.Layer):
    """Inference-only GroupNorm + affine + activation + output affine (serving form).

    ```python
    y = output_scale * act(gamma * group_normalize(x) + beta) + output_offset
    ```

    `fold_for_inference(model, inference_layers=True)` (and `export_saved_model`) put it
    in place of every `GroupNormAct`, `LayerNormAct`, `InstanceNormAct` and
    `ShiftedGroupNormAct`, with the proxy statistics of a "+PN" layer turned into
    `output_scale`/`output_offset` (or folded into `gamma`/`beta` and the next layer).
    Same function as those layers at inference, computed with few large ops (see the
    module docstring); it has no custom gradient and no fused-op path: use the original
    layers to train.

    Args:
        groups: number of contiguous channel groups (1: LayerNorm; -1: one per channel).
        activation: activation name or callable.
        axis: channel axis.
        epsilon: added to the group variance.
        use_output_scale, use_output_offset: whether the layer owns the per-channel
            `output_scale` (ones) / `output_offset` (zeros) weights.
        statistics: how the group statistics are computed (the module docstring has the
            numerics). "auto" (the default): raw sums `sum(x)`, `sum(x * x)` when every
            group of the call has `|mean| <= 4 std`, else sums shifted by each channel's
            first value (one more pass), picked per call by a `cond` (maps under
            `RAW_MIN_SIZE` values per example: always shifted, no `cond`); exact to
            float32 rounding at any offset. "shifted": the shifted sums on every call:
            the same outputs and no control flow in the graph, for TFLite (whose
            delegates leave `If` to the interpreter: XNNPACK splits its partitions
            there) and other converters; measured on ResNet-50, 0.95-1.0x the time of
            "auto" in TFLite, 1.00-1.02x in TensorFlow's graph executor. "raw": the raw sums
            on every call, the fastest form everywhere, but `E[x^2] - E[x]^2` loses about
            `log2(1 + mean^2 / var)` bits: only for inputs whose group means stay within
            a few standard deviations of zero (an input of mean 1e4, std 1 comes out off
            by more than 1e-2).
        **kwargs: base layer arguments (`name`, `dtype`, `trainable`).

    Call arguments:
        inputs: a tensor of rank >= 2 with channels on `axis`.
        training: ignored.
        mask: optional Keras mask, as `GroupNormAct`'s: masked entries are left out of
            each example's statistics (a masked call computes them with
            `tf_proxynorm.ops.masked`, not in the one-pass form).
    """

    def __init__(self, groups=32, activation="relu", axis=-1, epsilon=1e-3,
                 use_output_scale=False, use_output_offset=False, statistics="auto",
                 **kwargs):
        super().__init__(**kwargs)
        self.groups = check_int("groups", groups, lambda g: g >= 1 or g == -1,
                                "a positive int or -1")
        self.axis = check_int("axis", axis, requirement="an int (the channel axis)")
        self.activation = activation
        self.activation_name, self._activation_fn = activations.get(activation)
        self.epsilon = float(epsilon)
        self.use_output_scale = check_bool("use_output_scale", use_output_scale)
        self.use_output_offset = check_bool("use_output_offset", use_output_offset)
        self.statistics = check_statistics(statistics)
        self.supports_masking = True
        self.autocast = False
        self.gamma = self.beta = self.output_scale = self.output_offset = None

    def build(self, input_shape):
        axis = channel_axis(len(input_shape), self.axis)
        channels = input_shape[axis]
        if channels is None:
            raise ValueError(f"The channel axis {self.axis} must be static. "
                             f"Received: input_shape={tuple(input_shape)}")
        self._groups = channels if self.groups == -1 else self.groups
        if channels % self._groups:
            raise ValueError(f"Number of groups ({self.groups}) must divide the number of "
                             f"channels ({channels}). Received: input_shape={input_shape}")
        for name, on, init in (("gamma", True, "ones"), ("beta", True, "zeros"),
                               ("output_scale", self.use_output_scale, "ones"),
                               ("output_offset", self.use_output_offset, "zeros")):
            if on:
                setattr(self, name, self.add_weight(name=name, shape=(channels,),
                                                    initializer=init, trainable=False,
                                                    autocast=False, dtype="float32"))

    def call(self, inputs, training=None, mask=None):
        if mask is not None:
            # As the training layers: masked entries are left out of the statistics
            # (`tf_proxynorm.ops.masked`; a masked call does not take the one-pass form).
            y = affine_act_proxy(
                masked_group_normalize(inputs, mask, groups=self._groups, axis=self.axis,
                                       epsilon=self.epsilon),
                self.gamma, self.beta, axis=self.axis,
                activation=self.activation_name or self._activation_fn)
            if self.output_scale is not None:
                y = y * _per_channel(self.output_scale, y, self.axis)
            if self.output_offset is not None:
                y = y + _per_channel(self.output_offset, y, self.axis)
            return ops.cast(y, self.compute_dtype)
        y = group_norm_act_inference(
            inputs, self.gamma, self.beta, groups=self._groups, axis=self.axis,
            epsilon=self.epsilon, activation=self.activation_name or self._activation_fn,
            output_scale=self.output_scale, output_offset=self.output_offset,
            statistics=self.statistics)
        return ops.cast(y, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def compute_mask(self, inputs, mask=None):
        return mask

    def get_config(self):
        return {**super().get_config(), "groups": self.groups,
                "activation": activations.serialize(self.activation), "axis": self.axis,
                "epsilon": self.epsilon, "use_output_scale": self.use_output_scale,
                "use_output_offset": self.use_output_offset, "statistics": self.statistics}
