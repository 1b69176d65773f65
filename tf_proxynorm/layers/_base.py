"""The contract of the norm + activation layers: per-channel affine, activation, dtypes.

Two narrow bases, as flax shares `_compute_stats` / `_normalize` rather than a wide parent:

- `AffineActBase`: `act(gamma * y + beta)` per channel on `axis`: the layer's `axis`, its
  `AffineAct` (`affine.py`: `activation`, `center`, `scale`, the `gamma`/`beta`
  initializers, regularizers and constraints, the float32 weights), the output in the
  compute dtype, masks passed on.
- `NormActBase(AffineActBase)`: adds the normalization's `epsilon` and the public
  `normalized_output(inputs, training=False, mask=None)`, the normalized `y` before the
  affine that the statistics callbacks measure. A subclass writes its statistics and math
  (`_normalize`), and `build`/`get_config` for its own arguments.

Proxy Normalization's arguments and weights come from `ProxyNorm` (`proxy_norm_act.py`),
moving statistics from `MovingStatistics` (`moving_statistics.py`): components, as the
affine is.
"""

import keras
from keras import ops

from tf_proxynorm.layers._args import check_int
from tf_proxynorm.layers.affine import AffineAct
from tf_proxynorm.ops.stats import channel_axis


class AffineActBase(keras.layers.Layer):
    """Base of the layers that end in a per-channel affine and an activation.

    Subclasses implement `_normalize_act(inputs, training, mask)` (float32 at least; most
    end in `self.affine.apply(y)`) and may extend `build`/`get_config`. This class owns
    `axis` and an `AffineAct` (`self.affine`: `activation`, `center`, `scale`, the
    `gamma`/`beta` weights, float32 also under mixed precision), and casts the output to
    the compute dtype. Inputs are not autocast: statistics run in float32.
    A Keras mask (`Masking`, `Embedding(mask_zero=True)`) reaches `_normalize_act`; layers
    with statistics leave the masked entries out of them (`tf_proxynorm.ops.masked`), and
    `compute_mask` passes the mask on unchanged.
    """

    # Config keys written by tf_proxynorm 0.x that a class no longer takes (they had no
    # effect); `from_config` drops them so old `.keras` files still load.
    _dropped_config_keys = ()

    def __init__(self, activation="relu", axis=-1, center=True, scale=True,
                 beta_initializer="zeros", gamma_initializer="ones",
                 beta_regularizer=None, gamma_regularizer=None,
                 beta_constraint=None, gamma_constraint=None, **kwargs):
        super().__init__(**kwargs)
        self.axis = check_int("axis", axis, requirement="an int (the channel axis)")
        self.affine = AffineAct(
            self, activation=activation, center=center, scale=scale,
            beta_initializer=beta_initializer, gamma_initializer=gamma_initializer,
            beta_regularizer=beta_regularizer, gamma_regularizer=gamma_regularizer,
            beta_constraint=beta_constraint, gamma_constraint=gamma_constraint)
        self.supports_masking = True
        # As Keras' GroupNormalization: inputs are not cast; statistics run in float32.
        self.autocast = False

    @classmethod
    def from_config(cls, config):
        config = {k: v for k, v in config.items() if k not in cls._dropped_config_keys}
        return super().from_config(config)

    # -- the affine's arguments, as every Keras normalization layer exposes them ---------
    @property
    def activation(self):
        return self.affine.activation

    @property
    def activation_name(self):
        """The canonical activation name, or None for a callable the package does not know."""
        return self.affine.activation_name

    @property
    def center(self):
        return self.affine.center

    @property
    def scale(self):
        return self.affine.scale

    # -- weights ---------------------------------------------------------------------------
    def _channels(self, input_shape):
        rank = len(input_shape)
        if rank < 2:
            raise ValueError(
                f"{type(self).__name__} expects an input of rank >= 2 (batch, ..., channels). "
                f"Received: input_shape={tuple(input_shape)}")
        axis = channel_axis(rank, self.axis)
        channels = input_shape[axis]
        if channels is None:
            raise ValueError(
                f"Axis {self.axis} of the input should have a defined dimension (the channels), "
                f"but the layer received an input with shape {tuple(input_shape)}. "
                f"Received: input_shape={tuple(input_shape)}")
        return axis, channels

    def build(self, input_shape):
        axis, channels = self._channels(input_shape)
        self.affine.build(channels)
        self.input_spec = keras.layers.InputSpec(ndim=len(input_shape), axes={axis: channels})

    # -- call ------------------------------------------------------------------------------
    def call(self, inputs, training=None, mask=None):
        return ops.cast(self._normalize_act(inputs, training, mask), self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def compute_mask(self, inputs, mask=None):
        return mask

    # -- config ----------------------------------------------------------------------------
    def get_config(self):
        return {**super().get_config(), "axis": self.axis, **self.affine.config()}


class NormActBase(AffineActBase):
    """Base of the normalization + affine + activation layers.

    Adds to `AffineActBase` the normalization's `epsilon` (added to a variance) and the
    public `normalized_output(inputs, training=False, mask=None)`: the normalized tensor
    `y` the layer feeds to its affine, computed with the layer's own math and without
    changing any state (the statistics callbacks read it).
    """

    def __init__(self, activation="relu", axis=-1, epsilon=1e-3, **kwargs):
        super().__init__(activation=activation, axis=axis, **kwargs)
        if not epsilon > 0:
            raise ValueError(f"`epsilon` must be > 0. Received: epsilon={epsilon}")
        self.epsilon = float(epsilon)

    def normalized_output(self, inputs, training=False, mask=None):
        """The normalized `y` before the affine and activation, float32 at least.

        Args:
            inputs: the layer's input.
            training: as the layer's `call`: batch statistics when `training=True` and
                the layer is `trainable`. Nothing is updated.
            mask: as the layer's `call`: entries left out of the statistics.

        Returns:
            A tensor of the input's shape, channels on `self.axis`.
        """
        return self._normalize(ops.convert_to_tensor(inputs), training, update=False,
                               mask=mask)

    def _normalize(self, inputs, training, update, mask=None):
        """`normalized_output`; with `update`, a training call also updates the layer's
        moving statistics (batch-statistics layers, see `moving_statistics.py`). `mask`
        (a Keras mask or None) leaves entries out of the statistics."""
        raise NotImplementedError

    def _normalize_act(self, inputs, training, mask=None):
        return self.affine.apply(self._normalize(inputs, training, update=True, mask=mask))

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}
