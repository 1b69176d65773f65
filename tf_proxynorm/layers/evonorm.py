"""EvoNorm-B0 and EvoNorm-S0: normalization and activation found together by search.

Both layers replace a BatchNorm + ReLU pair. Their nonlinearity is part of the method, so
the `activation` argument only chooses between the EvoNorm form (the default `"evonorm"`;
any other activation name a model builder passes, e.g. `"relu"`, also selects it) and the
official linear form (`None` / `"linear"`: `x * gamma + beta`, which does NOT normalize,
as `nonlinearity=False` in the official code and `apply_act=False` in timm). The official
models use EvoNorms only in pre-activation ResNets, where every norm is followed by an
activation.
"""

import keras
from keras import ops

from tf_proxynorm.layers._args import check_int
from tf_proxynorm.layers._base import NormActBase
from tf_proxynorm.layers.affine import ChannelWeight
from tf_proxynorm.layers.moving_statistics import MovingStatistics
from tf_proxynorm.ops import activations
from tf_proxynorm.ops import norm_act as norm_act_ops
from tf_proxynorm.ops.masked import expand_mask
from tf_proxynorm.ops.stats import group_moments, largest_divisor_at_most, moments, stats_dtype

_register = keras.saving.register_keras_serializable(package="tf_proxynorm")

EVONORM_EPSILON = 1e-5
DEFAULT_GROUPS = 32


def _is_nonlinear(activation):
    if isinstance(activation, str) and activation.lower() == "evonorm":
        return True
    name, _ = activations.get(activation)  # raises a ValueError naming an unknown activation
    return name != "identity"


class _EvoNorm(NormActBase):
    """Arguments, weights (gamma, beta, v) and config shared by EvoNorm-B0 and -S0.

    Subclasses implement `_evonorm(x, training, update, mask)`: the
    normalization-activation before gamma and beta, which is also the layer's
    `normalized_output`; `mask` is None or a bool tensor of the input's rank (channel
    axis of size 1) whose masked entries are left out of the statistics.
    """

    _min_rank = 2

    def __init__(self, activation="evonorm", axis=-1, epsilon=EVONORM_EPSILON,
                 v_initializer="ones", v_regularizer=None, v_constraint=None, **kwargs):
        nonlinear = _is_nonlinear(activation)
        # The EvoNorm nonlinearity is the method's own: the affine has no activation.
        super().__init__(activation=None, axis=axis, epsilon=epsilon, **kwargs)
        self._evonorm_activation = activation
        self.nonlinear = nonlinear
        self._v = ChannelWeight("v", v_initializer, v_regularizer, v_constraint)
        self.v = None

    @property
    def activation(self):
        """The `activation` argument (the EvoNorm or the linear form), not the affine's."""
        return self._evonorm_activation

    def build(self, input_shape):
        if len(input_shape) < self._min_rank:
            raise ValueError(
                f"{type(self).__name__} expects an input of rank >= {self._min_rank} "
                f"(batch, positions..., channels). Received: input_shape={tuple(input_shape)}")
        super().build(input_shape)
        axis, channels = self._channels(input_shape)
        self._axis = axis
        self._broadcast = [1] * len(input_shape)
        self._broadcast[axis] = channels
        if self.nonlinear:
            self._v.build(self, channels)

    def _per_channel(self, value, dtype):
        return ops.reshape(ops.cast(value, dtype), self._broadcast)

    def _normalize(self, inputs, training, update, mask=None):
        """The EvoNorm normalization-activation before gamma and beta (no mean removed);
        the input itself in the linear form."""
        x = ops.cast(inputs, stats_dtype(inputs.dtype))
        if not self.nonlinear:
            return x
        if mask is not None:
            mask = expand_mask(mask, tuple(x.shape), self._axis)
        return self._evonorm(x, training, update, mask)

    def get_config(self):
        return {**super().get_config(), "activation": activations.serialize(self.activation),
                **self._v.config()}


_ARGS_DOC = """
        activation: `"evonorm"` (default) for the EvoNorm nonlinearity. Model builders
            that pass the activation of the BN-activation pair being replaced (e.g.
            `"relu"`) get the same EvoNorm form: the layer replaces the pair. `None` or
            `"linear"` gives the official linear form `x * gamma + beta`, which does not
            normalize at all.
        axis: the channel axis{axis_note}.
        epsilon: added to every variance. Defaults to 1e-5 (official TF code).
        center, scale: whether the layer owns `beta` / `gamma`.
        {{beta,gamma,v}}_initializer: ones for gamma and v, zeros for beta (the official
            `init_zero=True` is `gamma_initializer="zeros"`).
        {{beta,gamma,v}}_regularizer, {{beta,gamma,v}}_constraint: optional.
        **kwargs: base layer arguments (`name`, `dtype`, `trainable`)."""


@_register
class EvoNormS0(_EvoNorm):
    """EvoNorm-S0: a batch-independent normalization-activation (sample-based).

    Statistics are computed per example over the positions and the channels of each of
    `groups` contiguous channel groups, as GroupNorm, but the mean is not subtracted and
    the activation is a learned swish gate. Training and inference compute the same
    function.

    ```python
    out = x * sigmoid(v * x) / sqrt(var_group(x) + epsilon) * gamma + beta
    # var_group: biased variance over (positions, channels of the group), per example
    ```

    Args:
        groups: number of channel groups. Defaults to 32; when it does not divide the
            channels it is lowered until it does (the official rule, so 48 channels
            use 24 groups and 16 channels use 16). Mutually exclusive with `group_size`.
        group_size: channels per group instead of `groups` (must divide the channels).{common}

    Call arguments:
        inputs: a tensor of rank >= 2 with channels on `axis`.
        training: ignored (the layer is batch-independent).
        mask: optional Keras mask (as `GroupNormAct`): masked entries are left out of
            each example's group variances; every entry is normalized.
{returns}

    Example:

    >>> layer = EvoNormS0(groups=8)
    >>> layer(np.random.normal(size=(2, 8, 8, 16))).shape
    TensorShape([2, 8, 8, 16])
    """

    def __init__(self, groups=None, group_size=None, activation="evonorm", axis=-1, **kwargs):
        super().__init__(activation=activation, axis=axis, **kwargs)
        if groups is not None and group_size is not None:
            raise ValueError(
                "`groups` and `group_size` are mutually exclusive: pass only one of them "
                f"(`groups` defaults to {DEFAULT_GROUPS} when both are None). "
                f"Received: groups={groups}, group_size={group_size}")
        self.groups, self.group_size = (
            check_int(name, value, lambda v: v >= 1, "a positive int or None", allow_none=True)
            for name, value in (("groups", groups), ("group_size", group_size)))

    def build(self, input_shape):
        axis, channels = self._channels(input_shape)
        if axis not in (1, len(input_shape) - 1):
            raise ValueError(
                "EvoNormS0 groups channels on the first or the last non-batch axis only. "
                f"Received: axis={self.axis} for input_shape={tuple(input_shape)}")
        if self.group_size is not None:
            if channels % self.group_size:
                raise ValueError(
                    f"`group_size` ({self.group_size}) must divide the number of channels "
                    f"({channels}). Received: group_size={self.group_size}, "
                    f"input_shape={tuple(input_shape)}")
            self._groups = channels // self.group_size
        else:
            self._groups = largest_divisor_at_most(channels, self.groups or DEFAULT_GROUPS)
        super().build(input_shape)

    def _evonorm(self, x, training, update, mask=None):
        _, var, to_channels = group_moments(x, self._axis, self._groups, mask=mask)
        gate = ops.sigmoid(self._per_channel(self.v, x.dtype) * x)
        return x * gate * to_channels(ops.rsqrt(var + self.epsilon))

    def get_config(self):
        return {**super().get_config(), "groups": self.groups, "group_size": self.group_size}


@_register
class EvoNormB0(_EvoNorm):
    """EvoNorm-B0: a normalization-activation that mixes batch and instance statistics.

    The denominator is the larger of the per-channel batch std (a moving variance in
    inference) and a per-example, per-channel term `v * x + instance std`. The mean is
    never subtracted. Like Keras' `BatchNormalization`, it uses the batch statistics and
    updates the moving variance only when `training=True` and the layer is `trainable`.

    ```python
    batch_var = var over (batch, positions) per channel    (training)
              = moving_variance                            (inference)
    out = x / max(sqrt(batch_var + epsilon), v * x + sqrt(var_positions(x) + epsilon))
              * gamma + beta
    moving_variance <- moving_variance * momentum + batch_var * (1 - momentum)
    ```

    Variances are biased. The moving variance is kept only in the EvoNorm form.

    Args:
        momentum: decay of the moving variance. Defaults to 0.9 (official).
        moving_variance_initializer: defaults to ones.{common}

    Call arguments:
        inputs: a tensor of rank >= 3 (batch, positions..., channels).
        training: whether to use (and update) the batch variance.
        mask: optional Keras mask (as `BatchNormAct`): masked entries are left out of
            the batch variance (hence the moving variance) and of each example's
            instance variance; every entry is normalized.
{returns}

    Example:

    >>> layer = EvoNormB0()
    >>> layer(np.random.normal(size=(2, 8, 8, 16)), training=True).shape
    TensorShape([2, 8, 8, 16])
    """

    _min_rank = 3

    def __init__(self, activation="evonorm", axis=-1, momentum=0.9,
                 moving_variance_initializer="ones", **kwargs):
        super().__init__(activation=activation, axis=axis, **kwargs)
        self.moving_statistics = MovingStatistics(
            self, names=("moving_variance",), momentum=momentum,
            initializers={"moving_variance": moving_variance_initializer})
        self.moving_variance = None

    @property
    def momentum(self):
        return self.moving_statistics.momentum

    def build(self, input_shape):
        super().build(input_shape)
        if self.nonlinear:
            self.moving_statistics.build((self._broadcast[self._axis],))

    def _evonorm(self, x, training, update, mask=None):
        (batch_var,) = self.moving_statistics.select(
            training, lambda: norm_act_ops.batch_moments(x, self._axis, mask=mask)[1:], update)
        positions = [a for a in range(1, len(x.shape)) if a != self._axis]
        _, instance_var = moments(x, positions, keepdims=True, mask=mask)
        left = self._per_channel(ops.sqrt(ops.cast(batch_var, x.dtype) + self.epsilon), x.dtype)
        right = self._per_channel(self.v, x.dtype) * x + ops.sqrt(instance_var + self.epsilon)
        return x / ops.maximum(left, right)

    def get_config(self):
        return {**super().get_config(), **self.moving_statistics.config()}


_RETURNS_DOC = """
    Returns:
        A tensor of the input's shape in the layer's compute dtype.

    Reference:
        - [Liu et al., 2020](https://arxiv.org/abs/2004.02967), Evolving
          Normalization-Activation Layers."""

for _cls, _axis_note in ((EvoNormS0, " (`-1` channels-last or `1` channels-first)"),
                         (EvoNormB0, "")):
    _cls.__doc__ = _cls.__doc__.replace("{common}", _ARGS_DOC.format(axis_note=_axis_note))
    _cls.__doc__ = _cls.__doc__.replace("{returns}", _RETURNS_DOC)
