"""The one statistics helper shared by every normalization in the package.

Numerical contract (as flax's `_compute_stats`):
- statistics are accumulated in float32 at least (float16/bfloat16 inputs are upcast);
- the variance is computed in two passes, `mean((x - mean)^2)`, so inputs with a large
  offset (mean 1e4, std 1) keep full precision, and it is never negative;
- it works for unknown (None) batch and spatial sizes and compiles under XLA.
"""

import keras
import tensorflow as tf
from keras import ops


def stats_dtype(dtype):
    """float32 for float16/bfloat16/float32 inputs, float64 for float64."""
    return "float64" if keras.backend.standardize_dtype(dtype) == "float64" else "float32"


def _replica_context():
    """The `tf.distribute` replica context of a synchronized reduction, or None (not in a
    replica context with more than one replica, or not the TensorFlow backend)."""
    if keras.backend.backend() != "tensorflow":
        return None
    replica = tf.distribute.get_replica_context()
    return replica if replica is not None and replica.num_replicas_in_sync > 1 else None


def moments(x, axes, keepdims=False, synchronized=False, mask=None):
    """Mean and biased variance of `x` over `axes`, computed in float32 at least.

    Args:
        x: a tensor.
        axes: the axes to reduce.
        keepdims: keep the reduced axes with size 1.
        synchronized: inside a `tf.distribute` replica context (TensorFlow backend), reduce
            over the global batch of every replica (the statistics of Keras' synchronized
            `BatchNormalization`), still in two passes: one all-reduce of the sums and
            counts for the mean, one of the squared deviations for the variance. Outside
            a strategy, and on the other backends, this is the local computation.
        mask: optional tensor broadcastable to `x` (bool, or numbers read as bool like
            Keras' `BatchNormalization`: nonzero is kept). Only the kept entries enter
            the statistics: `mean = sum(x[kept]) / count`,
            `var = sum((x[kept] - mean)^2) / count`, two passes, the per-statistic counts
            all-reduced with the sums when synchronized. A statistic without any kept
            entry is 0 (mean and variance; finite, as Keras' `mean = 0 / (0 + eps)`).
    """
    x = ops.convert_to_tensor(x)
    x = ops.cast(x, stats_dtype(x.dtype))
    axes = list(axes)
    replica = _replica_context() if synchronized else None
    if mask is None and replica is None:
        def mean_of(values):
            return ops.mean(values, axis=axes, keepdims=True)
    else:
        def reduce_sum(values):
            return values if replica is None else replica.all_reduce(
                tf.distribute.ReduceOp.SUM, values)

        if mask is None:
            kept = None
            local_count = ops.prod(ops.stack([ops.shape(x)[a] for a in axes]))
        else:
            kept = ops.broadcast_to(ops.cast(mask, "bool"), ops.shape(x))
            local_count = ops.sum(ops.cast(kept, x.dtype), axis=axes, keepdims=True)
        # An all-masked statistic divides 0 by 1: mean and variance 0.
        count = ops.maximum(reduce_sum(ops.cast(local_count, x.dtype)), 1.0)

        def mean_of(values):
            if kept is not None:
                values = ops.where(kept, values, ops.zeros_like(values))
            return reduce_sum(ops.sum(values, axis=axes, keepdims=True)) / count
    mean = mean_of(x)
    var = mean_of(ops.square(x - ops.stop_gradient(mean)))
    # The stop_gradient above is exact: d var / d mean = -2 mean(x - mean) = 0 (also over
    # the kept entries only).
    if not keepdims:
        mean = ops.squeeze(mean, axes)
        var = ops.squeeze(var, axes)
    return mean, var


def channel_axis(rank, axis):
    """Normalizes a channel axis to a non-negative index, checking its range."""
    if not isinstance(axis, int) or not -rank <= axis < rank:
        raise ValueError(
            f"Invalid value for `axis` argument: expected an int in [{-rank}, {rank}) "
            f"for an input of rank {rank}. Received: axis={axis}"
        )
    return axis % rank


def largest_divisor_at_most(channels, groups):
    """The group-count rule: `groups` lowered until it divides `channels`.

    EvoNorm-S0's official rule (32 groups -> 24 for 48 channels), also used for GroupNorm
    by the model builders and `convert_model`. Returns `groups` for 0 channels.
    """
    if groups < 1:
        raise ValueError(f"`groups` must be a positive int. Received: groups={groups}")
    return next(g for g in range(groups, 0, -1) if channels % g == 0)


def group_view(x, axis, groups):
    """Views `x` so that each (example, channel group) can be reduced.

    Channels on `axis` are split into `groups` contiguous groups. Both common layouts are
    pure reshapes: channels-last gives `(N, positions, G, C/G)` (reduce axes 1 and 3),
    channels-first gives `(N, G, C/G * positions)` (reduce axis 2); channels on any other
    axis are transposed last, then viewed as channels-last.
    Returns the view, its reduction axes, and a function that maps an `(N, G)` tensor
    back to a tensor that broadcasts against `x` per (example, channel).
    """
    rank = len(x.shape)
    axis = channel_axis(rank, axis)
    channels = x.shape[axis]
    per_group = channels // groups
    batch = ops.shape(x)[0]
    if axis == rank - 1:
        view = ops.reshape(x, (batch, -1, groups, per_group))
        reduce_axes = [1, 3]
    elif axis == 1:
        view = ops.reshape(x, (batch, groups, -1))
        reduce_axes = [2]
    else:  # channels on a middle axis: move them last first (a transpose)
        perm = [0] + [a for a in range(1, rank) if a != axis] + [axis]
        view = ops.reshape(ops.transpose(x, perm), (batch, -1, groups, per_group))
        reduce_axes = [1, 3]

    def to_channels(stat):
        """(N, G) -> shape broadcastable to x, repeating each group value per channel."""
        per_channel = ops.repeat(stat, per_group, axis=1) if per_group > 1 else stat
        shape = [-1] + [1] * (rank - 1)
        shape[axis] = channels
        return ops.reshape(per_channel, shape)

    return view, reduce_axes, to_channels


def group_moments(x, axis, groups, mask=None):
    """Per-(example, group) mean and variance, each of shape `(N, G)`, in float32 at least.

    LayerNorm over all non-batch axes is `groups=1`; InstanceNorm is `groups=channels`.
    With `mask` (bool, broadcastable to `x`, see `tf_proxynorm.ops.masked.expand_mask`),
    only the kept entries of each (example, group) enter its statistics (see `moments`).
    Returns `(mean, var, to_channels)`, `to_channels` as in `group_view`.
    """
    view, reduce_axes, to_channels = group_view(x, axis, groups)
    mask_view = None
    if mask is not None:
        mask_view, _, _ = group_view(ops.broadcast_to(mask, ops.shape(x)), axis, groups)
    mean, var = moments(view, reduce_axes, mask=mask_view)
    return mean, var, to_channels
