"""Masks (Keras' `mask=` call argument) for the normalizations: shape rules and the masked
GroupNorm of the reference path.

A Keras mask marks the valid steps of a sequence (`Masking`, `Embedding(mask_zero=True)`):
for an input `(N, T, C)` it is `(N, T)`, one dimension less than the input, with no channel
axis. The normalizations leave the masked entries out of their statistics and normalize
every entry, masked or not, with the statistics of the kept ones, as Keras'
`BatchNormalization` does (its `_moments(inputs, mask)`); the mask itself is passed on
unchanged (`compute_mask`).

The masked GroupNorm here is plain `keras.ops` with automatic differentiation: simpler
than the hand-derived backward of `tf_proxynorm.ops.group_norm` (which the unmasked
reference path keeps), exact in float32 (two passes), and it runs on every backend.
"""

from keras import ops

from tf_proxynorm.ops.stats import channel_axis, group_moments, group_view, stats_dtype


def expand_mask(mask, inputs_shape, axis):
    """A Keras mask as a bool tensor of the input's rank (channel axis of size 1).

    Args:
        mask: bool or numeric (nonzero is kept) tensor, either of rank `rank - 1` (every
            input axis but the channels, as Keras passes it: `(N, T)` for `(N, T, C)`),
            or of the input's rank and broadcastable to it.
        inputs_shape: the input's shape (a tuple; dimensions may be None).
        axis: the channel axis.

    Returns:
        A bool tensor that broadcasts against the input.

    Raises:
        ValueError: for a mask of another rank.
    """
    rank = len(inputs_shape)
    axis = channel_axis(rank, axis)
    mask = ops.cast(ops.convert_to_tensor(mask), "bool")
    mask_rank = len(mask.shape)
    if mask_rank == rank - 1:
        return ops.expand_dims(mask, axis)
    if mask_rank == rank:
        return mask
    raise ValueError(
        "The mask provided should be one dimension less than the inputs (every axis but "
        "the channels), or of the inputs' rank and broadcastable to them. Received: "
        f"mask.shape={tuple(mask.shape)}, inputs.shape={tuple(inputs_shape)}")


def masked_group_normalize(x, mask, *, groups, axis=-1, epsilon=1e-3):
    """GroupNorm of `x` with the statistics of the entries `mask` keeps.

    ```python
    kept = broadcast(mask)            # per (example, position), the same for every channel
    mean = sum(x * kept) / count      # per (example, group); count = number kept (>= 1)
                                      # (computed as shift + mean(x - shift), see below)
    var = sum((x - mean)^2 * kept) / count
    y = (x - mean) / sqrt(var + epsilon)        # at every entry, masked ones included
    ```

    An example (group) whose entries are all masked has mean and variance 0: its output
    is `x / sqrt(epsilon)`, finite (Keras' `BatchNormalization` gives the same).

    Args:
        x: tensor of rank >= 2 with channels on `axis`.
        mask: Keras mask, as `expand_mask` takes it.
        groups: number of contiguous channel groups; must divide the channels.
        axis: the channel axis.
        epsilon: added to the group variance.

    Returns:
        `y`, float32 (float64 for float64 input), of the shape of `x`.
    """
    x = ops.convert_to_tensor(x)
    rank = len(x.shape)
    axis = channel_axis(rank, axis)
    x = ops.cast(x, stats_dtype(x.dtype))
    kept = ops.broadcast_to(expand_mask(mask, tuple(x.shape), axis), ops.shape(x))
    # Shift by a first estimate of the mean (a constant for autodiff: GroupNorm does not
    # change when its input is shifted), then take the moments of the deviations: for
    # inputs of mean 1e4 and std 1, `x - mean` then keeps float32 precision, where the
    # float32 mean alone would be off by up to half an ulp of 1e4 (5e-4).
    view, reduce_axes, to_channels = group_view(x, axis, groups)
    kept_view = group_view(kept, axis, groups)[0]
    count = ops.maximum(ops.sum(ops.cast(kept_view, x.dtype), axis=reduce_axes), 1.0)
    shift = ops.sum(ops.where(kept_view, view, ops.zeros_like(view)), axis=reduce_axes) / count
    d = x - to_channels(ops.stop_gradient(shift))
    mean, var, _ = group_moments(d, axis, groups, mask=kept)
    return (d - to_channels(mean)) * to_channels(ops.rsqrt(var + epsilon))
