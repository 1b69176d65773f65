"""The contract of the norm + activation layers: per-channel affine, activation, dtypes.

Two narrow bases, as flax shares `_compute_stats` / `_normalize` rather than a wide parent:

- `AffineActBase`: `act(gamma * y + beta)` per channel on `axis`: the arguments
  `activation`, `axis`, `center`, `scale` and the `gamma`/`beta` initializers,
  regularizers and constraints; the float32 weights; the output in the compute dtype.
- `NormActBase(AffineActBase)`: adds the normalization's `epsilon` and the public
  `normalized_output(inputs, training=False, mask=None)`, the normalized `y` before the
  affine that the statistics callbacks measure.

Proxy Normalization's arguments and weights come from `ProxyNormMixin`
(`proxy_norm_act.py`), moving statistics from `MovingStatistics` (`moving_statistics.py`).
"""

import keras
from keras import ops

from tf_proxynorm.layers._args import check_bool, check_int
from tf_proxynorm.ops import activations
from tf_proxynorm.ops.norm_act import affine_act_proxy
from tf_proxynorm.ops.stats import channel_axis

_AFFINE_DEFAULTS = {"gamma": "ones", "beta": "zeros"}


def per_channel_options(given, names):
    """`(initializers, regularizers, constraints)` dicts for the weights `names`.

    `given` maps `<name>_initializer`, `<name>_regularizer`, `<name>_constraint` to the
    constructor's arguments (e.g. `locals()`).
    """
    return ({n: keras.initializers.get(given[f"{n}_initializer"]) for n in names},
            {n: keras.regularizers.get(given[f"{n}_regularizer"]) for n in names},
            {n: keras.constraints.get(given[f"{n}_constraint"]) for n in names})


def serialize_options(initializers, regularizers, constraints):
    """The Keras config entries of `per_channel_options`' dicts."""
    out = {}
    for name in initializers:
        out[f"{name}_initializer"] = keras.initializers.serialize(initializers[name])
        out[f"{name}_regularizer"] = keras.regularizers.serialize(regularizers[name])
        out[f"{name}_constraint"] = keras.constraints.serialize(constraints[name])
    return out


class AffineActBase(keras.layers.Layer):
    """Base of the layers that end in a per-channel affine and an activation.

    Subclasses implement `_normalize_act(inputs, training, mask)` (float32 at least) and
    may extend `build`/`get_config`. This class owns `activation`, `axis`, `center`,
    `scale` and the `gamma`/`beta` weights (float32, also under mixed precision), and casts
    the output to the compute dtype. Inputs are not autocast: statistics run in float32.
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
        self.activation_name, self._activation_fn = activations.get(activation)
        self.activation = activation
        self.axis = check_int("axis", axis, requirement="an int (the channel axis)")
        self.center = check_bool("center", center)
        self.scale = check_bool("scale", scale)
        self._affine_options = per_channel_options(locals(), _AFFINE_DEFAULTS)
        self.supports_masking = True
        # As Keras' GroupNormalization: inputs are not cast; statistics run in float32.
        self.autocast = False
        self.gamma = self.beta = None

    @classmethod
    def from_config(cls, config):
        config = {k: v for k, v in config.items() if k not in cls._dropped_config_keys}
        return super().from_config(config)

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

    def _add_channel_weights(self, names, channels, options):
        initializers, regularizers, constraints = options
        for name in names:
            setattr(self, name, self.add_weight(
                name=name, shape=(channels,), initializer=initializers[name],
                regularizer=regularizers[name], constraint=constraints[name],
                trainable=True, autocast=False, dtype="float32"))

    def build(self, input_shape):
        axis, channels = self._channels(input_shape)
        names = [n for n, on in (("gamma", self.scale), ("beta", self.center)) if on]
        self._add_channel_weights(names, channels, self._affine_options)
        self.input_spec = keras.layers.InputSpec(ndim=len(input_shape), axes={axis: channels})

    # -- call ------------------------------------------------------------------------------
    def call(self, inputs, training=None, mask=None):
        return ops.cast(self._normalize_act(inputs, training, mask), self.compute_dtype)

    def _act_arg(self):
        """The activation as the functional ops take it (name when fusable, else callable)."""
        return self.activation_name or self._activation_fn

    def _affine_act(self, y, activation=True, **proxy):
        """`act(gamma * y + beta)` per channel (no activation with `activation=False`)."""
        return affine_act_proxy(y, self.gamma, self.beta, axis=self.axis,
                                activation=self._act_arg() if activation else None, **proxy)

    def compute_output_shape(self, input_shape):
        return input_shape

    def compute_mask(self, inputs, mask=None):
        return mask

    # -- config ----------------------------------------------------------------------------
    def get_config(self):
        return {**super().get_config(),
                "activation": activations.serialize(self.activation),
                "axis": self.axis,
                "center": self.center,
                "scale": self.scale,
                **serialize_options(*self._affine_options)}


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
        return self._affine_act(self._normalize(inputs, training, update=True, mask=mask))

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}
