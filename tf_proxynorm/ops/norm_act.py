"""Functional norm + affine + activation (+ proxy normalization) ops.

This is the middle tier: layers own the weights and call these functions; the functions
hold the math. `group_norm_act` is the one place that chooses between the fused kernel
(through `tf_proxynorm.fused`, the only code aware of the compiled library) and the
XLA-compilable reference path (`tf_proxynorm.ops.group_norm.group_norm_act_reference`).
"""

from keras import ops

from tf_proxynorm import config, fused
from tf_proxynorm.ops import activations, masked
from tf_proxynorm.ops.group_norm import group_norm_act_reference
from tf_proxynorm.ops.stats import channel_axis, moments, stats_dtype


def _per_channel(v, rank, axis, dtype):
    shape = [1] * rank
    shape[axis] = -1
    return ops.reshape(ops.cast(v, dtype), shape)


def affine_act_proxy(y, gamma=None, beta=None, *, axis=-1, activation="relu",
                     proxy_mean=None, proxy_inv_std=None):
    """`(act(gamma * y + beta) - proxy_mean) * proxy_inv_std`, per channel on `axis`.

    Every per-channel argument may be None (gamma = 1, beta = 0, no proxy step).
    Computes in the dtype of `y`.
    """
    rank = len(y.shape)
    axis = channel_axis(rank, axis)
    _, fn = activations.get(activation)
    if gamma is not None:
        y = y * _per_channel(gamma, rank, axis, y.dtype)
    if beta is not None:
        y = y + _per_channel(beta, rank, axis, y.dtype)
    y = fn(y)
    if proxy_mean is not None:
        y = (y - _per_channel(proxy_mean, rank, axis, y.dtype)) * _per_channel(
            proxy_inv_std, rank, axis, y.dtype)
    return y


def group_norm_act(x, gamma=None, beta=None, *, groups, axis=-1, epsilon=1e-3,
                   activation="relu", proxy_mean=None, proxy_inv_std=None,
                   implementation="auto", mask=None):
    """GroupNorm (per example) -> per-channel affine -> activation -> optional proxy step.

    ```python
    mean, var = moments(x over (positions, channels of the group)), per example and group
    y = act(gamma * (x - mean) / sqrt(var + epsilon) + beta)
    if proxy: y = (y - proxy_mean) * proxy_inv_std
    ```

    LayerNorm over all non-batch axes is `groups=1`, InstanceNorm is `groups=C`.

    Args:
        x: tensor of rank >= 2 with channels on `axis`.
        gamma, beta: per-channel `(C,)` affine, or None.
        groups: number of contiguous channel groups; must divide C.
        axis: channel axis.
        epsilon: added to the group variance.
        activation: name or callable.
        proxy_mean, proxy_inv_std: per-channel proxy statistics (see `proxy_moments`), or
            None for no proxy normalization.
        implementation: "auto", "fused" or "reference" (see `tf_proxynorm.config`).
        mask: optional Keras mask (e.g. `(N, T)` for `(N, T, C)`; see
            `tf_proxynorm.ops.masked.expand_mask`): masked entries are left out of the
            statistics and normalized with those of the kept ones. A mask runs the
            reference path (`masked_group_norm_act`): the fused op takes no mask, and
            `implementation="fused"` raises.

    Returns:
        A float32 tensor (float64 for float64 input) of the shape of `x`.
    """
    implementation = config.resolve(implementation)
    if mask is not None:
        if implementation == "fused":
            raise ValueError(
                "implementation='fused' was requested but the fused op takes no mask. Use "
                "implementation='auto' (a masked call runs the reference path). "
                "Received: implementation='fused' with a mask")
        return masked_group_norm_act(
            x, mask, gamma, beta, groups=groups, axis=axis, epsilon=epsilon,
            activation=activation, proxy_mean=proxy_mean, proxy_inv_std=proxy_inv_std)
    if implementation != "reference":
        name = activations.fused_name(activation)
        if fused.can_use_fused(x, name, axis):
            ones = lambda v, fill: v if v is not None else ops.full([x.shape[axis]], fill)  # noqa: E731
            return fused.fused_group_norm_act(
                x, ones(gamma, 1.0), ones(beta, 0.0), proxy_mean, proxy_inv_std,
                groups=groups, axis=axis, epsilon=epsilon, activation=name)
        if implementation == "fused":
            raise ValueError(
                "implementation='fused' was requested but the fused op cannot run here: "
                f"{fused.why_not_fused(x, name or activation, axis)}. Use "
                "implementation='auto' to fall back to the reference path.")
    return group_norm_act_reference(
        x, gamma, beta, groups=groups, axis=axis, epsilon=epsilon, activation=activation,
        proxy_mean=proxy_mean, proxy_inv_std=proxy_inv_std)


def masked_group_norm_act(x, mask, gamma=None, beta=None, *, groups, axis=-1, epsilon=1e-3,
                          activation="relu", proxy_mean=None, proxy_inv_std=None):
    """`group_norm_act` with the statistics of the entries a Keras `mask` keeps.

    `masked.masked_group_normalize` (plain `keras.ops`, automatic differentiation, every
    backend), then `affine_act_proxy`. Masked entries are normalized with the kept ones'
    statistics; an all-masked example gives finite outputs.
    """
    axis = channel_axis(len(x.shape), axis)
    y = masked.masked_group_normalize(x, mask, groups=groups, axis=axis, epsilon=epsilon)
    return affine_act_proxy(y, gamma, beta, axis=axis, activation=activation,
                            proxy_mean=proxy_mean, proxy_inv_std=proxy_inv_std)


def batch_moments(x, axis=-1, mask=None, synchronized=False):
    """Per-channel mean and variance over every axis but `axis` (float32 at least).

    With a Keras `mask` (see `tf_proxynorm.ops.masked.expand_mask`), only the kept entries
    count, as in Keras' `BatchNormalization`; `synchronized` as `moments`.
    """
    rank = len(x.shape)
    axis = channel_axis(rank, axis)
    if mask is not None:
        mask = masked.expand_mask(mask, tuple(x.shape), axis)
    return moments(x, [a for a in range(rank) if a != axis], mask=mask,
                   synchronized=synchronized)


def batch_norm_act(x, mean, var, gamma=None, beta=None, *, axis=-1, epsilon=1e-3,
                   activation="relu"):
    """`act(gamma * (x - mean) / sqrt(var + epsilon) + beta)` with per-channel statistics."""
    rank = len(x.shape)
    axis = channel_axis(rank, axis)
    dtype = stats_dtype(x.dtype)
    y = (ops.cast(x, dtype) - _per_channel(mean, rank, axis, dtype)) * _per_channel(
        ops.rsqrt(ops.cast(var, dtype) + epsilon), rank, axis, dtype)
    return affine_act_proxy(y, gamma, beta, axis=axis, activation=activation)

