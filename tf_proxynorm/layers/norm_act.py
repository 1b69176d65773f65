"""GroupNorm / LayerNorm / InstanceNorm / BatchNorm + activation (+ Proxy Normalization)."""

import keras
import tensorflow as tf

from tf_proxynorm.layers._base import NormActBase
from tf_proxynorm.ops import norm_act as norm_act_ops

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
            `"fused"` (raise when the fused kernel cannot run) or `"reference"`
            (pure TensorFlow, XLA-compilable). See `tf_proxynorm.config`.
        {beta,gamma,proxy_beta,proxy_gamma}_initializer: initializers; defaults
            ones for gamma, zeros otherwise.
        {beta,gamma,proxy_beta,proxy_gamma}_regularizer: optional regularizers. The
            paper decays only the proxy parameters.
        {beta,gamma,proxy_beta,proxy_gamma}_constraint: optional constraints.
        **kwargs: base layer arguments (`name`, `dtype`, `trainable`)."""


@_register
class GroupNormAct(NormActBase):
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

    _fusable = True

    def __init__(self, groups=32, activation="relu", proxy_norm=False, axis=-1, **kwargs):
        super().__init__(activation=activation, proxy_norm=proxy_norm, axis=axis, **kwargs)
        if not isinstance(groups, int) or (groups < 1 and groups != -1):
            raise ValueError(f"`groups` must be a positive int or -1. Received: groups={groups}")
        self.groups = groups

    def build(self, input_shape):
        _, channels = self._channels(input_shape)
        if self.groups != -1 and channels % self.groups:
            raise ValueError(
                f"Number of groups ({self.groups}) must divide the number of channels "
                f"({channels}) of the input. Received: groups={self.groups}, "
                f"input_shape={tuple(input_shape)}")
        self._groups = channels if self.groups == -1 else self.groups
        super().build(input_shape)

    def _normalize_act(self, inputs, training, gamma, beta, proxy_mean, proxy_inv_std):
        return norm_act_ops.group_norm_act(
            inputs, gamma, beta, groups=self._groups, axis=self.axis, epsilon=self.epsilon,
            activation=self._act_arg(), proxy_mean=proxy_mean, proxy_inv_std=proxy_inv_std,
            implementation=self.implementation)

    def get_config(self):
        return {**super().get_config(), "groups": self.groups}


GroupNormAct.__doc__ = GroupNormAct.__doc__.replace("{common}", _COMMON_ARGS_DOC)


@_register
class LayerNormAct(GroupNormAct):
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

    Reference:
        - [Ba et al., 2016](https://arxiv.org/abs/1607.06450), Layer Normalization.
        - [Labatie et al., 2021](https://arxiv.org/abs/2106.03743).
    """

    def __init__(self, activation="relu", proxy_norm=False, axis=-1, **kwargs):
        kwargs.pop("groups", None)
        super().__init__(groups=1, activation=activation, proxy_norm=proxy_norm, axis=axis,
                         **kwargs)

    def get_config(self):
        config_ = super().get_config()
        del config_["groups"]
        return config_


LayerNormAct.__doc__ = LayerNormAct.__doc__.replace("{common}", _COMMON_ARGS_DOC)


@_register
class InstanceNormAct(GroupNormAct):
    """Instance Normalization + affine + activation (+ Proxy Norm): one group per channel.

    ```python
    y = (x - mean(x[n, ..., c])) / sqrt(var(x[n, ..., c]) + epsilon)   # over positions
    z = act(gamma * y + beta), then PN-Act's proxy step if proxy_norm
    ```

    Args:{common}

    Reference:
        - [Ulyanov et al., 2016](https://arxiv.org/abs/1607.08022), Instance Normalization.
    """

    def __init__(self, activation="relu", proxy_norm=False, axis=-1, **kwargs):
        kwargs.pop("groups", None)
        super().__init__(groups=-1, activation=activation, proxy_norm=proxy_norm, axis=axis,
                         **kwargs)

    def get_config(self):
        config_ = super().get_config()
        del config_["groups"]
        return config_


InstanceNormAct.__doc__ = InstanceNormAct.__doc__.replace("{common}", _COMMON_ARGS_DOC)


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
            `tf.distribute` strategy (Keras' synchronized BatchNorm).

    Reference:
        - [Ioffe & Szegedy, 2015](https://arxiv.org/abs/1502.03167).
    """

    def __init__(self, activation="relu", axis=-1, momentum=0.99,
                 moving_mean_initializer="zeros", moving_variance_initializer="ones",
                 synchronized=False, **kwargs):
        if kwargs.get("proxy_norm"):
            raise ValueError("BatchNormAct does not support proxy normalization. "
                             f"Received: proxy_norm={kwargs['proxy_norm']}")
        kwargs.pop("proxy_norm", None)
        super().__init__(activation=activation, axis=axis, **kwargs)
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"`momentum` must be in [0, 1]. Received: momentum={momentum}")
        self.momentum = float(momentum)
        self.moving_mean_initializer = keras.initializers.get(moving_mean_initializer)
        self.moving_variance_initializer = keras.initializers.get(moving_variance_initializer)
        self.synchronized = bool(synchronized)

    def build(self, input_shape):
        super().build(input_shape)
        _, channels = self._channels(input_shape)
        self.moving_mean = self.add_weight(
            name="moving_mean", shape=(channels,), initializer=self.moving_mean_initializer,
            trainable=False, autocast=False, dtype="float32")
        self.moving_variance = self.add_weight(
            name="moving_variance", shape=(channels,),
            initializer=self.moving_variance_initializer, trainable=False, autocast=False,
            dtype="float32")

    def _normalize_act(self, inputs, training, gamma, beta, proxy_mean, proxy_inv_std):
        if training and self.trainable:
            if self.synchronized:
                axes = [a for a in range(inputs.shape.rank) if a != self.axis % inputs.shape.rank]
                mean, var = keras.ops.moments(tf.cast(inputs, "float32"), axes, synchronized=True)
            else:
                mean, var = norm_act_ops.batch_moments(inputs, self.axis)
            for moving, batch in ((self.moving_mean, mean), (self.moving_variance, var)):
                moving.assign(moving * self.momentum + tf.cast(batch, moving.dtype) * (1.0 - self.momentum))
        else:
            mean, var = self.moving_mean, self.moving_variance
        return norm_act_ops.batch_norm_act(inputs, mean, var, gamma, beta, axis=self.axis,
                                           epsilon=self.epsilon, activation=self._act_arg())

    def get_config(self):
        config_ = super().get_config()
        for key in ("proxy_norm", "proxy_epsilon", "implementation") + tuple(
                f"proxy_{w}_{kind}" for w in ("beta", "gamma")
                for kind in ("initializer", "regularizer", "constraint")):
            config_.pop(key)
        config_.update({
            "momentum": self.momentum,
            "moving_mean_initializer": keras.initializers.serialize(self.moving_mean_initializer),
            "moving_variance_initializer": keras.initializers.serialize(
                self.moving_variance_initializer),
            "synchronized": self.synchronized,
        })
        return config_
