"""Shared machinery of the norm + activation layers: arguments, weights, config, dtypes."""

import keras
import tensorflow as tf

from tf_proxynorm import _custom_op, config
from tf_proxynorm.ops import activations
from tf_proxynorm.ops.proxy import NUM_PROXY_SAMPLES, PROXY_EPSILON, proxy_moments
from tf_proxynorm.ops.stats import channel_axis

# name -> default initializer of every per-channel weight a norm+act layer may own.
_WEIGHTS = {"gamma": "ones", "beta": "zeros", "proxy_beta": "zeros", "proxy_gamma": "zeros"}


class NormActBase(keras.layers.Layer):
    """Base of the norm + affine + activation (+ proxy normalization) layers.

    Subclasses implement `_normalize_act(inputs, training, gamma, beta, proxy_mean,
    proxy_inv_std)` and may extend `build`/`get_config`. This class owns the Keras
    arguments shared by all of them, creates the per-channel float32 weights, computes
    the proxy statistics and casts the output to the compute dtype.
    """

    # Whether a subclass's normalization can run in the fused kernel.
    _fusable = False

    def __init__(self, activation="relu", proxy_norm=False, axis=-1, epsilon=1e-3,
                 proxy_epsilon=PROXY_EPSILON, center=True, scale=True, implementation="auto",
                 beta_initializer="zeros", gamma_initializer="ones",
                 proxy_beta_initializer="zeros", proxy_gamma_initializer="zeros",
                 beta_regularizer=None, gamma_regularizer=None,
                 proxy_beta_regularizer=None, proxy_gamma_regularizer=None,
                 beta_constraint=None, gamma_constraint=None,
                 proxy_beta_constraint=None, proxy_gamma_constraint=None, **kwargs):
        super().__init__(**kwargs)
        self.activation_name, self._activation_fn = activations.get(activation)
        self.activation = activation
        if not isinstance(axis, int):
            raise ValueError(f"`axis` must be an int (the channel axis). Received: axis={axis}")
        if not epsilon > 0:
            raise ValueError(f"`epsilon` must be > 0. Received: epsilon={epsilon}")
        if proxy_norm and not proxy_epsilon > 0:
            raise ValueError(f"`proxy_epsilon` must be > 0. Received: proxy_epsilon={proxy_epsilon}")
        self.proxy_norm = bool(proxy_norm)
        self.axis = axis
        self.epsilon = float(epsilon)
        self.proxy_epsilon = float(proxy_epsilon)
        self.center = bool(center)
        self.scale = bool(scale)
        self.implementation = config.validate_implementation(implementation)
        given = locals()
        self._initializers = {w: keras.initializers.get(given[f"{w}_initializer"]) for w in _WEIGHTS}
        self._regularizers = {w: keras.regularizers.get(given[f"{w}_regularizer"]) for w in _WEIGHTS}
        self._constraints = {w: keras.constraints.get(given[f"{w}_constraint"]) for w in _WEIGHTS}
        self.supports_masking = True
        # As Keras' GroupNormalization: inputs are not cast; statistics run in float32.
        self.autocast = False
        self.gamma = self.beta = self.proxy_beta = self.proxy_gamma = None

    # -- weights ---------------------------------------------------------------------------
    def _weight_names(self):
        names = [n for n, on in (("gamma", self.scale), ("beta", self.center)) if on]
        return names + (["proxy_beta", "proxy_gamma"] if self.proxy_norm else [])

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
        if self.implementation == "fused" and self._fusable:
            if not _custom_op.fused_op_available():
                raise ValueError(
                    "implementation='fused' was requested but the fused op is not available: "
                    f"{_custom_op.unavailable_reason()}. Received: implementation='fused'")
        for name in self._weight_names():
            setattr(self, name, self.add_weight(
                name=name, shape=(channels,), initializer=self._initializers[name],
                regularizer=self._regularizers[name], constraint=self._constraints[name],
                trainable=True, autocast=False, dtype="float32"))
        self.input_spec = keras.layers.InputSpec(ndim=len(input_shape), axes={axis: channels})

    # -- call ------------------------------------------------------------------------------
    def proxy_statistics(self):
        """Per-channel `(proxy_mean, proxy_inv_std)` of PN-Act, or `(None, None)`."""
        if not self.proxy_norm:
            return None, None
        mean, var = proxy_moments(self.gamma, self.beta, self.proxy_beta, self.proxy_gamma,
                                  self._activation_fn, NUM_PROXY_SAMPLES)
        return mean, tf.math.rsqrt(var + self.proxy_epsilon)

    def call(self, inputs, training=None):
        proxy_mean, proxy_inv_std = self.proxy_statistics()
        gamma = None if self.gamma is None else tf.convert_to_tensor(self.gamma)
        beta = None if self.beta is None else tf.convert_to_tensor(self.beta)
        outputs = self._normalize_act(inputs, training, gamma, beta, proxy_mean, proxy_inv_std)
        return tf.cast(outputs, self.compute_dtype)

    def _act_arg(self):
        """The activation as the functional ops take it (name when fusable, else callable)."""
        return self.activation_name or self._activation_fn

    def compute_output_shape(self, input_shape):
        return input_shape

    def compute_mask(self, inputs, mask=None):
        return mask

    # -- config ----------------------------------------------------------------------------
    def get_config(self):
        config_ = super().get_config()
        config_.update({
            "activation": activations.serialize(self.activation),
            "proxy_norm": self.proxy_norm,
            "axis": self.axis,
            "epsilon": self.epsilon,
            "proxy_epsilon": self.proxy_epsilon,
            "center": self.center,
            "scale": self.scale,
            "implementation": self.implementation,
        })
        for name in _WEIGHTS:
            config_[f"{name}_initializer"] = keras.initializers.serialize(self._initializers[name])
            config_[f"{name}_regularizer"] = keras.regularizers.serialize(self._regularizers[name])
            config_[f"{name}_constraint"] = keras.constraints.serialize(self._constraints[name])
        return config_
