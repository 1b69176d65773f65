"""GroupNorm / LayerNorm / InstanceNorm / BatchNorm + activation (+ Proxy Normalization)."""

import keras
from keras import ops

from tf_proxynorm import config, fused
from tf_proxynorm.layers._args import check_bool, check_int
from tf_proxynorm.layers._base import NormActBase
from tf_proxynorm.layers.moving_statistics import MovingStatistics
from tf_proxynorm.layers.proxy_norm_act import ProxyNorm
from tf_proxynorm.ops import masked
from tf_proxynorm.ops import norm_act as norm_act_ops
from tf_proxynorm.ops.group_norm import group_norm_act_reference
from tf_proxynorm.ops.proxy import PROXY_EPSILON

_register = keras.saving.register_keras_serializable(package="tf_proxynorm")

_COMMON_ARGS_DOC = """
        activation: activation name (`"relu"`, `"silu"`/`"swish"`, `"gelu"`,
            `"leaky_relu"`, `"linear"`/None) or any Keras activation or callable (callables
            other than those run in the reference path only). Defaults to `"relu"`.
        proxy_norm: whether to apply Proxy Normalization after the activation ("+PN").
            The layer then owns exactly `gamma`, `beta`, `proxy_beta`, `proxy_gamma`.
        axis: the channel axis (`-1` for channels-last, `1` for channels-first).
        epsilon: added to the variance of the normalization. Defaults to 1e-3.
        proxy_epsilon: added to the proxy variance (0.03 as in the paper; not negligible).
        center: whether to add the per-channel offset `beta` before the activation.
        scale: whether to multiply by the per-channel `gamma` before the activation.
        implementation: `"auto"` (fused kernel when it can run, else reference),
            `"fused"` (raise when the fused kernel cannot run; TensorFlow backend only) or
            `"reference"` (`keras.ops`, XLA-compilable, every backend). See
            `tf_proxynorm.config`.
        {beta,gamma,proxy_beta,proxy_gamma}_initializer: initializers; defaults
            ones for gamma, zeros otherwise.
        {beta,gamma,proxy_beta,proxy_gamma}_regularizer: optional regularizers. The
            paper decays only the proxy parameters.
        {beta,gamma,proxy_beta,proxy_gamma}_constraint: optional constraints.
        **kwargs: base layer arguments (`name`, `dtype`, `trainable`)."""


class _GroupNormAct(NormActBase):
    """GroupNorm + affine + activation, with an optional per-channel output step.

    The output step `(z - step_mean) * step_inv_std` rides in the fused kernel's proxy
    inputs: Proxy Normalization (`GroupNormAct`) or a plain offset
    (`ShiftedGroupNormAct`). Subclasses return it from `_output_step()`.
    """

    def __init__(self, groups=32, activation="relu", axis=-1, epsilon=1e-3,
                 implementation="auto", **kwargs):
        super().__init__(activation=activation, axis=axis, epsilon=epsilon, **kwargs)
        self.groups = check_int("groups", groups, lambda g: g >= 1 or g == -1,
                                "a positive int or -1")
        self.implementation = config.validate_implementation(implementation)

    def build(self, input_shape):
        _, channels = self._channels(input_shape)
        if self.groups != -1 and channels % self.groups:
            raise ValueError(
                f"Number of groups ({self.groups}) must divide the number of channels "
                f"({channels}) of the input. Received: groups={self.groups}, "
                f"input_shape={tuple(input_shape)}")
        if self.implementation == "fused" and keras.backend.backend() != "tensorflow":
            raise ValueError(
                "implementation='fused' needs the TensorFlow backend (the fused op is a "
                f"TensorFlow custom op), but the Keras backend is "
                f"{keras.backend.backend()!r}. Use implementation='auto' or 'reference' (the "
                "keras.ops reference path, which runs on every backend). "
                "Received: implementation='fused'")
        if self.implementation == "fused" and not fused.fused_op_available():
            raise ValueError(
                "implementation='fused' was requested but the fused op is not available: "
                f"{fused.unavailable_reason()}. Received: implementation='fused'")
        # One group per channel; a tensor without channels is one (empty) group.
        self._groups = max(channels, 1) if self.groups == -1 else self.groups
        super().build(input_shape)

    def _output_step(self):
        return None, None

    def _normalize(self, inputs, training, update, mask=None):
        if mask is not None:
            return masked.masked_group_normalize(inputs, mask, groups=self._groups,
                                                 axis=self.axis, epsilon=self.epsilon)
        return group_norm_act_reference(
            inputs, groups=self._groups, axis=self.axis, epsilon=self.epsilon, activation=None)

    def _normalize_act(self, inputs, training, mask=None):
        # One op for the whole layer (the fused kernel when it can run).
        step_mean, step_inv_std = self._output_step()
        gamma, beta = (None if w is None else ops.convert_to_tensor(w)
                       for w in (self.gamma, self.beta))
        return norm_act_ops.group_norm_act(
            inputs, gamma, beta, groups=self._groups, axis=self.axis,
            epsilon=self.epsilon, activation=self.affine.op_activation, proxy_mean=step_mean,
            proxy_inv_std=step_inv_std, implementation=self.implementation, mask=mask)

    def get_config(self):
        return {**super().get_config(), "groups": self.groups,
                "implementation": self.implementation}


@_register
class GroupNormAct(_GroupNormAct):
    """Group Normalization + per-channel affine + activation, with optional Proxy Norm.

    Statistics are computed per example over the positions and the channels of each of
    `groups` contiguous channel groups; nothing depends on the other examples of the
    batch, so training and inference compute the same function.

    ```python
    y = (x - mean_group(x)) / sqrt(var_group(x) + epsilon)
    z = act(gamma * y + beta)
    if proxy_norm:   # PN-Act, Labatie et al. 2021
        m, v = mean, var of act(gamma * (proxy_beta + (1 + proxy_gamma) * Q) + beta)
        z = (z - m) / sqrt(v + proxy_epsilon)       # Q: 200 mid-point N(0,1) quantiles
    ```

    Args:
        groups: number of channel groups; must divide the channels. `-1` means one group
            per channel (InstanceNorm). Defaults to 32.{common}

    Call arguments:
        inputs: a tensor of rank >= 2 (dense `(N, C)`, sequences, images, volumes).
        training: ignored (the layer behaves the same in training and inference).
        mask: optional Keras mask, e.g. `(N, T)` for a `(N, T, C)` sequence from
            `Masking` or `Embedding(mask_zero=True)` (or of the input's rank,
            broadcastable to it). Masked entries are left out of each example's
            statistics and normalized with those of the kept ones (as Keras'
            `BatchNormalization` treats masks); an all-masked example gives finite
            outputs. The mask is passed on unchanged. A masked call runs the reference
            path (`keras.ops`).

    Returns:
        A tensor of the input's shape in the layer's compute dtype.

    Reference:
        - [Wu & He, 2018](https://arxiv.org/abs/1803.08494), Group Normalization.
        - [Labatie et al., 2021](https://arxiv.org/abs/2106.03743), Proxy-Normalizing
          Activations to Match Batch Normalization while Removing Batch Dependence.

    Example:

    >>> layer = GroupNormAct(groups=4, activation="relu", proxy_norm=True)   # "GN+PN"
    >>> layer(np.random.normal(size=(2, 8, 8, 16))).shape
    TensorShape([2, 8, 8, 16])
    """

    def __init__(self, groups=32, activation="relu", proxy_norm=False, axis=-1,
                 proxy_epsilon=PROXY_EPSILON, proxy_beta_initializer="zeros",
                 proxy_gamma_initializer="zeros", proxy_beta_regularizer=None,
                 proxy_gamma_regularizer=None, proxy_beta_constraint=None,
                 proxy_gamma_constraint=None, **kwargs):
        super().__init__(groups=groups, activation=activation, axis=axis, **kwargs)
        self.proxy = ProxyNorm(
            self.affine, enabled=check_bool("proxy_norm", proxy_norm),
            proxy_epsilon=proxy_epsilon, proxy_beta_initializer=proxy_beta_initializer,
            proxy_gamma_initializer=proxy_gamma_initializer,
            proxy_beta_regularizer=proxy_beta_regularizer,
            proxy_gamma_regularizer=proxy_gamma_regularizer,
            proxy_beta_constraint=proxy_beta_constraint,
            proxy_gamma_constraint=proxy_gamma_constraint)

    @property
    def proxy_norm(self):
        return self.proxy.enabled

    @property
    def proxy_epsilon(self):
        return self.proxy.epsilon

    def proxy_statistics(self):
        """Per-channel `(proxy_mean, proxy_inv_std)` of the proxy step, or `(None, None)`."""
        return self.proxy.statistics()

    def build(self, input_shape):
        super().build(input_shape)
        self.proxy.build(self._channels(input_shape)[1])

    def _output_step(self):
        return self.proxy.statistics()

    def get_config(self):
        return {**super().get_config(), "proxy_norm": self.proxy_norm, **self.proxy.config()}


GroupNormAct.__doc__ = GroupNormAct.__doc__.replace("{common}", _COMMON_ARGS_DOC)


class _FixedGroupsNormAct(GroupNormAct):
    """A `GroupNormAct` whose group count is fixed by the class (`fixed_groups`)."""

    fixed_groups = None

    def __init__(self, activation="relu", proxy_norm=False, axis=-1, **kwargs):
        super().__init__(groups=self.fixed_groups, activation=activation,
                         proxy_norm=proxy_norm, axis=axis, **kwargs)

    def get_config(self):
        config_ = super().get_config()
        del config_["groups"]
        return config_


@_register
class LayerNormAct(_FixedGroupsNormAct):
    """Layer Normalization over all non-batch axes + affine + activation (+ Proxy Norm).

    This is `GroupNormAct(groups=1)`: one mean and variance per example over every
    position and channel, then a per-channel affine. It is NOT
    `keras.layers.LayerNormalization(axis=-1)`, which normalizes each position separately
    over its channels. It is the LN of the Proxy Normalization paper ("LN+PN").

    ```python
    y = (x - mean(x[n])) / sqrt(var(x[n]) + epsilon)     # over all non-batch axes
    z = act(gamma * y + beta), then PN-Act's proxy step if proxy_norm
    ```

    Args:{common}

    Call arguments:
        inputs, training, mask: as `GroupNormAct` (masked entries are left out of each
            example's statistics).

    Reference:
        - [Ba et al., 2016](https://arxiv.org/abs/1607.06450), Layer Normalization.
        - [Labatie et al., 2021](https://arxiv.org/abs/2106.03743).
    """

    fixed_groups = 1


@_register
class InstanceNormAct(_FixedGroupsNormAct):
    """Instance Normalization + affine + activation (+ Proxy Norm): one group per channel.

    ```python
    y = (x - mean(x[n, ..., c])) / sqrt(var(x[n, ..., c]) + epsilon)   # over positions
    z = act(gamma * y + beta), then PN-Act's proxy step if proxy_norm
    ```

    Args:{common}

    Call arguments:
        inputs, training, mask: as `GroupNormAct` (masked entries are left out of each
            example's per-channel statistics).

    Reference:
        - [Ulyanov et al., 2016](https://arxiv.org/abs/1607.08022), Instance Normalization.
    """

    fixed_groups = -1


for _cls in (LayerNormAct, InstanceNormAct):
    _cls.__doc__ = _cls.__doc__.replace("{common}", _COMMON_ARGS_DOC)


@_register
class ShiftedGroupNormAct(_GroupNormAct):
    """`GroupNormAct` without proxy step, plus a per-channel output offset, in one kernel.

    What remains of a GN/LN/IN + PN layer whose output scale `fold_for_inference` moved
    into a zero-padded convolution: the offset (`-m`, the proxy mean) rides in the fused
    op's proxy inputs (`proxy_mean=-offset, proxy_inv_std=1`), so it costs no extra pass.

    ```python
    y = act(gamma * group_normalize(x) + beta) + offset
    ```

    Args:
        groups, activation, axis, epsilon, center, scale, implementation, initializers,
            regularizers, constraints: as `GroupNormAct` (no proxy arguments). The
            `offset` weight is initialized to zeros.

    Call arguments:
        inputs, training, mask: as `GroupNormAct`.

    Reference:
        - [Labatie et al., 2021](https://arxiv.org/abs/2106.03743), section 3 (folding).
    """

    # tf_proxynorm 0.x subclassed GroupNormAct and wrote its (unused) proxy arguments.
    _dropped_config_keys = ("proxy_norm", "proxy_epsilon") + tuple(
        f"proxy_{w}_{kind}" for w in ("beta", "gamma")
        for kind in ("initializer", "regularizer", "constraint"))

    def __init__(self, groups=32, activation="relu", axis=-1, **kwargs):
        super().__init__(groups=groups, activation=activation, axis=axis, **kwargs)
        self.offset = None

    def build(self, input_shape):
        super().build(input_shape)
        _, channels = self._channels(input_shape)
        self.offset = self.add_weight(name="offset", shape=(channels,), initializer="zeros",
                                      trainable=True, autocast=False, dtype="float32")

    def _output_step(self):
        offset = ops.convert_to_tensor(self.offset)
        return -offset, ops.ones_like(offset)


@_register
class BatchNormAct(NormActBase):
    """Batch Normalization + activation in one layer (the baseline PN is compared with).

    In training (`training=True` and `trainable`), statistics are the batch's, per channel
    over every other axis, and the moving averages are updated; otherwise the moving
    averages are used. As Keras' `BatchNormalization`, `trainable=False` runs in inference
    mode.

    ```python
    mean, var = batch statistics (training) or moving_mean, moving_variance
    z = act(gamma * (x - mean) / sqrt(var + epsilon) + beta)
    moving = moving * momentum + batch * (1 - momentum)      # in training
    ```

    Args:
        activation, axis, epsilon, center, scale, initializers, regularizers,
            constraints: as `GroupNormAct`.
        momentum: momentum of the moving averages. Defaults to 0.99 (as Keras).
        moving_mean_initializer, moving_variance_initializer: zeros and ones.
        synchronized: compute the batch statistics across replicas of a
            `tf.distribute` strategy (Keras' synchronized BatchNorm; without it each
            replica uses its own batch). On JAX, `keras.distribution.DataParallel` runs
            one program over the global batch: the statistics are global either way.
            An empty batch leaves the moving averages as they are.

    The switch between batch and moving statistics and the update of the moving averages
    are those of every batch-statistics layer of the package: see
    `tf_proxynorm/layers/moving_statistics.py`.

    Call arguments:
        inputs: a tensor of rank >= 2 with channels on `axis`.
        training: whether to use (and update) the batch statistics.
        mask: optional Keras mask, e.g. `(N, T)` for a `(N, T, C)` sequence (or of the
            input's rank, broadcastable to it), as Keras' `BatchNormalization`: masked
            entries are left out of the batch statistics, hence of the moving averages
            (also when `synchronized`); every entry is normalized. The mask is passed
            on unchanged.

    Reference:
        - [Ioffe & Szegedy, 2015](https://arxiv.org/abs/1502.03167).
    """

    def __init__(self, activation="relu", axis=-1, momentum=0.99, epsilon=1e-3,
                 moving_mean_initializer="zeros", moving_variance_initializer="ones",
                 synchronized=False, **kwargs):
        super().__init__(activation=activation, axis=axis, epsilon=epsilon, **kwargs)
        self.moving_statistics = MovingStatistics(self, momentum=momentum, initializers={
            "moving_mean": moving_mean_initializer,
            "moving_variance": moving_variance_initializer})
        self.synchronized = check_bool("synchronized", synchronized)

    @property
    def momentum(self):
        return self.moving_statistics.momentum

    def _statistics_shape(self, input_shape):
        """The shape of the moving statistics: one per channel."""
        return (self._channels(input_shape)[1],)

    def build(self, input_shape):
        super().build(input_shape)
        self.moving_statistics.build(self._statistics_shape(input_shape))

    def _batch_moments(self, inputs, mask=None):
        return norm_act_ops.batch_moments(inputs, self.axis, mask=mask,
                                          synchronized=self.synchronized)

    def _normalize(self, inputs, training, update, mask=None):
        # An empty batch (or all masked) measures nothing: the moving averages then stay.
        count = ops.size(inputs) if mask is None else ops.sum(ops.cast(mask, "int32"))
        mean, var = self.moving_statistics.select(
            training, lambda: self._batch_moments(inputs, mask), update, count=count)
        return norm_act_ops.batch_norm_act(inputs, mean, var, axis=self.axis,
                                           epsilon=self.epsilon, activation=None)

    def get_config(self):
        return {**super().get_config(), **self.moving_statistics.config(),
                "synchronized": self.synchronized}
