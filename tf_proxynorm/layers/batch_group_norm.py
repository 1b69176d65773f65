"""Batch Group Normalization (BGN): statistics over the batch and groups of features."""

import math

import keras
from keras import ops

from tf_proxynorm.layers._args import check_int
from tf_proxynorm.layers.norm_act import BatchNormAct
from tf_proxynorm.ops.masked import expand_mask
from tf_proxynorm.ops.stats import moments, stats_dtype

BGN_EPSILON = 1e-5
BGN_MOMENTUM = 0.9


@keras.saving.register_keras_serializable(package="tf_proxynorm")
class BatchGroupNormalization(BatchNormAct):
    """BGN: BatchNorm whose statistics pool the batch and a group of features.

    The features of each example are flattened channel-major, `(C, positions)` as in the
    paper's NCHW layout whatever the input layout, and split into `groups` equal groups;
    each group's mean and variance are taken over the batch and the group's features.
    `groups = C` is BatchNorm, `groups < C` pools `C / groups` contiguous channels (more
    values per statistic, for small batches), and `groups = k * C` splits each channel's
    positions, in row-major order, into `k` contiguous chunks (for very large batches).
    As Keras' `BatchNormalization`, batch statistics are used, and the moving averages of
    the `groups` means and variances updated, only when `training=True` and the layer is
    `trainable` (see `moving_statistics.py`). As every `...Normalization` layer (Keras'
    naming), no activation follows by default; the factory name `"bgn"` builds BGN + ReLU.

    ```python
    f = x in channel-major order, reshaped to (N, groups, C * positions / groups)
    mean_g, var_g = moments of f over (batch, group members)   # or the moving averages
    out = act(gamma * (x - mean_g) / sqrt(var_g + epsilon) + beta)   # per-channel affine
    ```

    Args:
        groups: number of groups: a divisor of the channels, or a multiple `k * C` of
            them with `k` dividing the number of positions. Defaults to 32.
        activation: activation applied after the affine. Defaults to None.
        axis: the channel axis: `-1` (channels-last) or `1` (channels-first).
        momentum: momentum of the moving averages. Defaults to 0.9.
        epsilon: added to the variance. Defaults to 1e-5.
        center, scale, initializers, regularizers, constraints, synchronized: as
            `BatchNormAct`; the moving statistics have shape `(groups,)`.
        **kwargs: base layer arguments (`name`, `dtype`, `trainable`).

    Call arguments:
        inputs: a tensor of rank >= 2 with channels on `axis`.
        training: whether to use (and update) the batch statistics.
        mask: optional Keras mask (as `BatchNormAct`): masked entries are left out of
            the batch statistics and the moving averages; every entry is normalized.

    Returns:
        A tensor of the input's shape in the layer's compute dtype.

    Reference:
        - [Zhou et al., 2020](https://arxiv.org/abs/2012.02782), Batch Group
          Normalization.

    Example:

    >>> layer = BatchGroupNormalization(groups=4)
    >>> layer(np.random.normal(size=(2, 8, 8, 16)), training=True).shape
    TensorShape([2, 8, 8, 16])
    """

    def __init__(self, groups=32, activation=None, axis=-1, momentum=BGN_MOMENTUM,
                 epsilon=BGN_EPSILON, **kwargs):
        super().__init__(activation=activation, axis=axis, momentum=momentum, epsilon=epsilon,
                         **kwargs)
        self.groups = check_int("groups", groups, lambda g: g >= 1, "a positive int")

    def build(self, input_shape):
        axis, channels = self._channels(input_shape)
        rank = len(input_shape)
        if axis not in (1, rank - 1):
            raise ValueError(
                "BatchGroupNormalization takes channels on the first or the last non-batch "
                f"axis. Received: axis={self.axis} for input_shape={tuple(input_shape)}")
        positions = [d for i, d in enumerate(input_shape[1:], 1) if i != axis]
        size = None if None in positions else math.prod(positions)
        groups = self.groups
        if groups <= channels and channels % groups:
            raise ValueError(
                f"`groups` ({groups}) must divide the number of channels ({channels}) or be a "
                f"multiple of it. Received: groups={groups}, input_shape={tuple(input_shape)}")
        split = groups > channels and (groups % channels or (
            size is not None and size % (groups // channels)))
        if split:
            raise ValueError(
                f"`groups` ({groups}) larger than the channels ({channels}) must be a multiple "
                "k * channels with k dividing the number of positions "
                f"({size}). Received: groups={groups}, input_shape={tuple(input_shape)}")
        self._axis = axis
        self._channels_last = axis == rank - 1
        self._per_channel_groups = groups <= channels
        super().build(input_shape)

    def _statistics_shape(self, input_shape):
        """The moving statistics are per group, not per channel."""
        return (self.groups,)

    def _group_view(self, x):
        """A reshape of `x` whose axes separate the groups, and how stats map to it.

        Returns `(view, reduce_axes, to_view, to_groups)`: `to_groups` orders the reduced
        statistics as the paper's group index `g`, `to_view` broadcasts `(groups,)` back.
        """
        g, c, n = self.groups, x.shape[self._axis], ops.shape(x)[0]
        identity = lambda s: s  # noqa: E731
        if not self._channels_last:
            # (N, C, positions...) is already channel-major: group g is a contiguous slice.
            view = ops.reshape(x, (n, g, -1))
            return view, [0, 2], lambda s: ops.reshape(s, (1, g, 1)), identity
        if self._per_channel_groups:
            view = ops.reshape(x, (n, -1, g, c // g))
            return view, [0, 1, 3], lambda s: ops.reshape(s, (1, 1, g, 1)), identity
        # g = k * C: channel c, chunk j of its positions is group c * k + j.
        k = g // c
        view = ops.reshape(x, (n, k, -1, c))
        # (k, C) -> (C * k,)
        to_groups = lambda s: ops.reshape(ops.transpose(s), (g,))  # noqa: E731
        to_view = lambda s: ops.reshape(  # noqa: E731
            ops.transpose(ops.reshape(s, (c, k))), (1, k, 1, c))
        return view, [0, 2], to_view, to_groups

    def _normalize(self, inputs, training, update, mask=None):
        x = ops.cast(inputs, stats_dtype(inputs.dtype))
        view, axes, to_view, to_groups = self._group_view(x)

        def batch_moments():
            kept = None
            if mask is not None:
                kept = ops.broadcast_to(expand_mask(mask, tuple(x.shape), self._axis),
                                        ops.shape(x))
                kept = self._group_view(kept)[0]
            mean, var = moments(view, axes, synchronized=self.synchronized, mask=kept)
            return to_groups(mean), to_groups(var)

        mean, var = self.moving_statistics.select(training, batch_moments, update)
        mean, var = ops.cast(mean, x.dtype), ops.cast(var, x.dtype)
        y = (view - to_view(mean)) * to_view(ops.rsqrt(var + self.epsilon))
        return ops.reshape(y, ops.shape(x))

    def get_config(self):
        return {**super().get_config(), "groups": self.groups}
