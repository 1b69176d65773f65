"""GroupNorm -> affine -> activation (-> proxy step), written for XLA, with a hand-derived
backward.

`group_norm_act_reference` is the reference path of `tf_proxynorm.ops.group_norm_act` (the
dispatcher in `tf_proxynorm.ops.norm_act`): the numerical target of the fused op, and what
runs under `jit_compile=True`, where the custom op cannot. It is written so that XLA
compiles it into few passes over `x`:

- forward: per-(example, channel) sums over the positions of `d = x - shift` and of
  `(d - mean(d))^2` (two reads of `x`); the group statistics on `(N, C)`-sized tensors;
  then one elementwise pass
  `y = (act((x - mean) * s + beta) - proxy_mean) * proxy_inv_std` with the
  per-(example, channel) `mean` and `s = gamma * rsqrt(var + epsilon)`;
- backward (`custom_gradient`): per-(example, channel) sums over the positions of
  `e = dy * act'(a)` and `e * xhat` (and of `dy` with PN), the parameter gradients and the
  group terms on small tensors, then one elementwise pass for `dx`.

No reshape or transpose of `x` is needed for the channel axis first or last: every
big-tensor sum keeps the example and channel axes, and the groups are formed on the small
`(N, C)` tensors (by a reshape and a sum, or a matmul for small groups).

How XLA:CPU (TF 2.21) compiles reductions decided the form, measured side by side (see
docs/benchmarks.md): a reduction fused with the expression that feeds it, or a
matrix-vector product of it, is emitted as a scalar loop, 2-4x slower than writing the
expression once and summing it with a batched matmul against a `(N, 1, P)` block of ones;
a plain reduction of a tensor already in memory (`dy`) is fast; stacking several sums into
one tensor makes XLA write it twice.

Numerics. `shift` is the first value of each (example, group); `x - shift` is exact for
inputs with a large offset, and the mean is kept as `shift + mean(x - shift)`, so inputs of
mean 1e4 and std 1 give outputs and gradients exact to float32 rounding of the O(1)
deviations (the float32 mean itself would be off by up to an ulp of 1e4, 1e-3). Per-channel
two-pass variances are combined over the channels of a group with Chan's parallel formula.
Statistics and arithmetic run in float32 (float64 for float64 inputs); float16 / bfloat16
inputs are upcast inside the fused expressions and `dx` is returned in the input dtype.

The math is written with `keras.ops` and `keras.ops.custom_gradient` (on TensorFlow they
map one to one onto the TF ops, so they cost nothing); the gradient is itself
differentiable (second order, gradient penalties, the fused op's second derivative).
"""

import math

import keras
import numpy as np
from keras import ops

from tf_proxynorm.ops import activations
from tf_proxynorm.ops.activations import LEAKY_RELU_SLOPE
from tf_proxynorm.ops.stats import channel_axis, stats_dtype

_INV_SQRT_2PI = 0.3989422804014327


def _relu_grad(a):
    return ops.cast(ops.greater(a, 0), a.dtype)


def _leaky_relu(a):
    return ops.where(ops.greater(a, 0), a, LEAKY_RELU_SLOPE * a)


def _leaky_relu_grad(a):
    return ops.where(ops.greater(a, 0), ops.ones_like(a), ops.full_like(a, LEAKY_RELU_SLOPE))


def _silu_grad(a):
    s = ops.sigmoid(a)
    return s * (1.0 + a * (1.0 - s))


def _gelu_grad(a):
    return activations.normal_cdf(a) + a * (_INV_SQRT_2PI * ops.exp(-0.5 * a * a))


# canonical name -> (act, act'), both differentiable (second order differentiates act').
_ACTIVATIONS = {
    "identity": (lambda a: a, None),
    "relu": (ops.relu, _relu_grad),
    "leaky_relu": (_leaky_relu, _leaky_relu_grad),
    "silu": (ops.silu, _silu_grad),
    "gelu": (activations.gelu, _gelu_grad),
}


# Activations with act(a) = a * act'(a).
_HOMOGENEOUS = (None, _relu_grad, _leaky_relu_grad)


def group_norm_act_reference(x, gamma=None, beta=None, *, groups, axis=-1, epsilon=1e-3,
                             activation="relu", proxy_mean=None, proxy_inv_std=None):
    """GroupNorm (per example) -> per-channel affine -> activation -> optional proxy step.

    The XLA-compilable reference path in `keras.ops` and the fused op's numerical target
    (`tf_proxynorm.ops.group_norm_act` chooses between the two).

    ```python
    mean, var = moments of x over (positions, channels of the group)   # per example, group
    y = act(gamma * (x - mean) / sqrt(var + epsilon) + beta)
    if proxy_mean is not None:
        y = (y - proxy_mean) * proxy_inv_std                           # PN-Act's proxy step
    ```

    computed as one elementwise expression `act((x - mean) * s + beta)` with the
    per-(example, channel) scale `s = gamma * rsqrt(var + epsilon)`. For the activations
    with a fused kernel (identity, relu, leaky_relu, silu, gelu) the gradient is
    hand-derived (`custom_gradient`): with `a = (x - mean) * s + beta`,
    `da = dy * proxy_inv_std * act'(a)` and `xhat = (x - mean) * rsqrt(var + epsilon)`,

    ```python
    dbeta = sum(da);  dgamma = sum(da * xhat)                   # over examples, positions
    dproxy_mean = -proxy_inv_std * sum(dy);  dproxy_inv_std = sum(dy * (act(a) - proxy_mean))
    dx = rsqrt(var + eps) * (gamma * da - mean_g(gamma * da) - xhat * mean_g(gamma * da * xhat))
    ```

    (`mean_g`: over the positions and channels of the example's group). The gradient is
    itself differentiable (second order, e.g. gradient penalties). Other activations
    (any callable) use the same forward expression with automatic differentiation.
    The second derivative of the fused op differentiates this function.

    Args:
        x: tensor of rank >= 2 with a static number of channels on `axis`.
        gamma, beta: per-channel `(C,)` affine, or None (1 and 0).
        groups: number of contiguous channel groups; must divide C.
        axis: channel axis.
        epsilon: added to the group variance.
        activation: name or callable (see `tf_proxynorm.ops.activations`).
        proxy_mean, proxy_inv_std: per-channel proxy statistics (both or neither).

    Returns:
        A float32 tensor (float64 for float64 input) of the shape of `x`.
    """
    axis = channel_axis(len(x.shape), axis)
    channels = x.shape[axis]
    if channels is None:
        raise ValueError(f"The channel axis {axis} must be static. Received: x.shape={x.shape}")
    if groups < 1 or channels % groups:
        raise ValueError(f"`groups` must divide the channels ({channels}). "
                         f"Received: groups={groups}")
    if (proxy_mean is None) != (proxy_inv_std is None):
        raise ValueError("Pass both `proxy_mean` and `proxy_inv_std`, or neither.")
    name = activations.fused_name(activation)
    if name is not None and keras.backend.backend() != "torch":
        act, act_grad = _ACTIVATIONS[name]
    elif name is not None:
        # Keras' `custom_gradient` on PyTorch is a `torch.autograd.Function` whose backward
        # is not differentiated again: autodiff keeps second-order gradients right there.
        act, act_grad = _ACTIVATIONS[name][0], False
    else:
        _, act = activations.get(activation)
        act_grad = False  # autodiff
    dtype = stats_dtype(x.dtype)
    present = {k: ops.cast(v, dtype) for k, v in (
        ("gamma", gamma), ("beta", beta), ("proxy_mean", proxy_mean),
        ("proxy_inv_std", proxy_inv_std)) if v is not None}
    geometry = _Geometry(x, axis, groups, dtype)
    kernel = _make_kernel(geometry, sorted(present, key=_ORDER.index), float(epsilon), act,
                          act_grad)
    return kernel(x, *(present[k] for k in sorted(present, key=_ORDER.index)))


_ORDER = ("gamma", "beta", "proxy_mean", "proxy_inv_std")


class _Geometry:
    """Axes and sizes of one call: `red` are the position axes (all but batch and channel)."""

    def __init__(self, x, axis, groups, dtype):
        rank = len(x.shape)
        self.rank, self.axis, self.groups, self.dtype = rank, axis, groups, dtype
        self.channels = x.shape[axis]
        self.per_group = self.channels // groups
        self.red = tuple(a for a in range(1, rank) if a != axis)
        sizes = [x.shape[a] for a in self.red]
        # `positions` divides sums over the positions: at least 1, so that an empty
        # tensor (0 positions) gives empty outputs and zero, not NaN, parameter gradients.
        self.positions_int = None
        if all(s is not None for s in sizes):
            self.positions_int = int(math.prod(sizes))
            self.positions = float(max(self.positions_int, 1))
        else:
            shape = ops.shape(x)
            self.positions = ops.maximum(ops.cast(ops.prod(ops.stack(
                [shape[a] for a in self.red])), dtype), 1.0)
        # Per-(example, channel) tensors are kept as (N, C); `bcast` views them against x.
        self.bshape = [1] * rank
        self.bshape[axis] = self.channels
        self.first = tuple(slice(None) if a in (0, axis) else slice(0, 1) for a in range(rank))

    def bcast(self, nc):
        """(N, C) or (C,) -> broadcastable against x."""
        if len(nc.shape) == 1:
            return ops.reshape(nc, self.bshape)
        # (With no channels a -1 would be ambiguous: an empty tensor fits any batch size.)
        batch = -1 if self.channels else ops.shape(nc)[0]
        return ops.reshape(nc, [batch] + self.bshape[1:])

    def _one_hot(self):
        """(G, C) one-hot matrix of the group of each channel. Built at each use, not
        cached: the hand-derived backward runs in a trace of its own (jax2tf traces it
        again for a SavedModel), and a tensor kept from the forward trace leaks into it."""
        return ops.convert_to_tensor(
            np.repeat(np.eye(self.groups, dtype=self.dtype), self.per_group, axis=1))

    # Groups of 8 channels or more are formed by a reshape and a sum and undone by a
    # repeat; smaller groups by matmuls with the one-hot matrix. XLA fuses a repeat into
    # the elementwise pass over `x` that reads it: with 2 or 4 channels per group that pass
    # takes 1.1-1.8x its time after a matmul, with 16 or more 0.8-0.95x (the matmul's
    # N * G * C work is then no longer small). Measured on XLA:CPU, TensorFlow and JAX
    # (docs/benchmarks.md).
    _RESHAPE_MIN_GROUP_SIZE = 8

    def group_sum(self, nc):
        """(N, C) -> (N, G): sum over the channels of each group."""
        if self.per_group == 1:
            return nc
        if self.per_group >= self._RESHAPE_MIN_GROUP_SIZE:
            return ops.sum(ops.reshape(nc, (-1, self.groups, self.per_group)), axis=2)
        return ops.matmul(nc, ops.transpose(self._one_hot()))

    def from_groups(self, ng):
        """(N, G) -> (N, C), each group's value repeated over its channels."""
        if self.per_group == 1:
            return ng
        if self.per_group >= self._RESHAPE_MIN_GROUP_SIZE:
            return ops.repeat(ng, self.per_group, axis=1)
        return ops.matmul(ng, self._one_hot())

    def sum_positions(self, t, product=False):
        """Sum over the position axes -> (N, C).

        `product=True` for an elementwise expression of `x` (and `dy`): it is summed by a
        batched matmul with a `(N, 1, P)` block of ones. XLA:CPU fuses a reduction (or a
        matrix-vector product) into the expression that feeds it and compiles the pair
        to a scalar loop, two to four times slower than writing the expression once and
        reading it in a matmul. (A plain reduction of a tensor that is already in memory,
        such as `dy`, is fast and stays a reduction.)
        """
        if not self.red:
            return t
        if (not product or self.axis not in (1, self.rank - 1) or not self.positions_int
                or not self.channels):
            return ops.sum(t, axis=self.red)
        channels, positions = t.shape[self.axis], self.positions_int
        batch = ops.shape(t)[0]
        if self.axis == self.rank - 1:   # ones (N, 1, P) @ t (N, P, C)
            t = ops.reshape(t, (-1, positions, channels))
            ones = ops.ones((batch, 1, positions), dtype=self.dtype)
            return ops.reshape(ops.matmul(ones, t), (-1, channels))
        t = ops.reshape(t, (-1, channels, positions))   # t (N, C, P) @ ones (N, P, 1)
        ones = ops.ones((batch, positions, 1), dtype=self.dtype)
        return ops.reshape(ops.matmul(t, ones), (-1, channels))


def _moments(xf, g):
    """Per-(example, group) statistics: `(shift, delta, var)`, the first two `(N, C)` (each
    group's value repeated over its channels), `var` `(N, G)`; the mean is
    `shift + delta`.

    `shift` is the group's first value (first position, first channel), so `x - shift` is
    exact and small for inputs with a large offset, and `delta` (the mean of `x - shift`)
    keeps its precision: `(x - shift) - delta` is the centered input to float32 rounding
    of the *deviations*, not of the offset. The variance is two-pass per channel, combined
    over the channels of a group with Chan's parallel formula.
    """
    # The sum over the size-1 position axes of the first position is that position's
    # value, or 0 for an empty tensor (where a reshape of it to (N, C) is ambiguous).
    first_c = ops.sum(xf[g.first], axis=g.red) if g.red else xf               # (N, C)
    if g.per_group:
        first = ops.reshape(first_c, (-1, g.groups, g.per_group))[:, :, 0]   # (N, G)
    else:   # no channels: an empty (N, 0) shift
        first = g.group_sum(first_c)
    shift = ops.stop_gradient(g.from_groups(first))                          # (N, C)
    d = xf - g.bcast(shift)
    delta_c = g.sum_positions(d, product=True) / g.positions                # (N, C)
    dev = d - g.bcast(delta_c)
    m2_c = g.sum_positions(dev * dev, product=True)                         # centered SS
    delta = g.group_sum(delta_c) / g.per_group                              # (N, G)
    spread = delta_c - g.from_groups(delta)
    m2 = g.group_sum(m2_c) + g.positions * g.group_sum(spread * spread)
    var = m2 / (g.positions * g.per_group)
    return shift, g.from_groups(delta), var


def _make_kernel(g, names, epsilon, act, act_grad):
    has = {n: n in names for n in _ORDER}

    def forward(x, *params):
        p = dict(zip(names, params))
        xf = ops.cast(x, g.dtype)
        shift_nc, delta_nc, var = _moments(xf, g)
        inv_nc = g.from_groups(ops.rsqrt(var + epsilon))          # (N, C)
        scale_nc = inv_nc * p["gamma"] if has["gamma"] else inv_nc  # (N, C)
        centered = (xf - g.bcast(shift_nc)) - g.bcast(delta_nc)   # x - mean
        a = centered * g.bcast(scale_nc)
        if has["beta"]:
            a = a + g.bcast(p["beta"])
        h = act(a)
        y = h
        if has["proxy_mean"]:
            y = (h - g.bcast(p["proxy_mean"])) * g.bcast(p["proxy_inv_std"])
        return y, (xf, shift_nc, delta_nc, inv_nc, scale_nc, p)

    if act_grad is False:  # an activation without a known derivative: autodiff
        return lambda x, *params: forward(x, *params)[0]

    @keras.ops.custom_gradient
    def kernel(x, *params):
        y, (xf, shift_nc, delta_nc, inv_nc, scale_nc, p) = forward(x, *params)

        def grad(*args, upstream=None):
            dy = upstream if upstream is not None else args[0]
            dy = ops.cast(dy, g.dtype)
            centered = (xf - g.bcast(shift_nc)) - g.bcast(delta_nc)
            a = centered * g.bcast(scale_nc)
            if has["beta"]:
                a = a + g.bcast(p["beta"])
            xhat = centered * g.bcast(inv_nc)
            e = dy if act_grad is None else dy * act_grad(a)      # dy * act'(a)
            # act(a) = a * act'(a) for relu, leaky_relu and identity: then
            # sum(dy * act(a)) = gamma * sum(e * xhat) + beta * sum(e), no extra term.
            homogeneous = act_grad in _HOMOGENEOUS
            # Two separate sums: stacking them into one tensor makes XLA:CPU write it.
            r1 = g.sum_positions(e, product=act_grad is not None)    # (N, C): sum(e)
            r2 = g.sum_positions(e * xhat, product=True)             # sum(e * xhat)
            out = {}
            if has["proxy_mean"]:
                pis = p["proxy_inv_std"]
                dy_sum = ops.sum(g.sum_positions(dy), axis=0)             # (C,)
                out["proxy_mean"] = -pis * dy_sum
                if homogeneous:
                    dyh = r2 * p["gamma"] if has["gamma"] else r2
                    if has["beta"]:
                        dyh = dyh + r1 * p["beta"]
                    out["proxy_inv_std"] = ops.sum(dyh, axis=0) - p["proxy_mean"] * dy_sum
                else:
                    out["proxy_inv_std"] = ops.sum(g.sum_positions(
                        dy * (act(a) - g.bcast(p["proxy_mean"])), product=True), axis=0)
                r1, r2 = r1 * pis, r2 * pis            # sums of da = e * proxy_inv_std
                e_scale = scale_nc * pis               # da * gamma * rsqrt(var + eps)
            else:
                e_scale = scale_nc
            if has["gamma"]:
                out["gamma"] = ops.sum(r2, axis=0)
            if has["beta"]:
                out["beta"] = ops.sum(r1, axis=0)
            if has["gamma"]:
                r1, r2 = r1 * p["gamma"], r2 * p["gamma"]
            count = g.positions * g.per_group
            c1 = g.group_sum(r1) / count          # (N, G): mean_g(gamma da)
            c2 = g.group_sum(r2) / count          # mean_g(gamma da xhat)
            k_nc = -g.from_groups(c2) * inv_nc * inv_nc            # (x - mean) coefficient
            b_nc = -g.from_groups(c1) * inv_nc
            dx = e * g.bcast(e_scale) + centered * g.bcast(k_nc) + g.bcast(b_nc)
            dx = ops.cast(dx, x.dtype)
            return (dx,) + tuple(out[n] for n in names)

        return y, grad

    return kernel
