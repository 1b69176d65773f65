"""Activations by name.

`FUSED_ACTIVATIONS` is the subset the compiled kernels implement, name -> the kernels' id
(defined in `tf_proxynorm.fused.abi`). Any other Keras activation, or a
callable, runs in the reference path only.
"""

import keras
import tensorflow as tf
from keras import ops

from tf_proxynorm.fused.abi import KERNEL_ACTIVATIONS as FUSED_ACTIVATIONS
from tf_proxynorm.fused.abi import LEAKY_RELU_SLOPE

_ALIASES = {None: "identity", "linear": "identity", "identity": "identity", "swish": "silu"}


_SQRT_HALF = 0.7071067811865476


def normal_cdf(x):
    """The standard normal CDF, `Phi(x) = (1 + erf(x / sqrt(2))) / 2`."""
    return 0.5 * (1.0 + ops.erf(x * _SQRT_HALF))


def gelu(x):
    """The exact (erf) GELU, `x * Phi(x)`. Written out as `0.5 * x * (1 + erf(x / sqrt(2)))`:
    the TFLite converter recognizes that form as its GELU op (`x * normal_cdf(x)` leaves a
    `tf.Erf`, which TFLite's builtin ops lack)."""
    return 0.5 * x * (1.0 + ops.erf(x * _SQRT_HALF))


_FUNCTIONS = {
    "identity": lambda x: x,
    "relu": ops.relu,
    "silu": ops.silu,
    "gelu": gelu,
    "leaky_relu": lambda x: ops.leaky_relu(x, negative_slope=LEAKY_RELU_SLOPE),
}


# Keras/TF functions that compute exactly a fused activation (with default arguments).
_KNOWN_CALLABLES = {
    "identity": (keras.activations.linear,),
    "relu": (keras.activations.relu, ops.relu, tf.nn.relu),
    "silu": (keras.activations.silu, ops.silu, tf.nn.silu),
    "gelu": (keras.activations.gelu,),
    "leaky_relu": (keras.activations.leaky_relu,),
}


def fused_name(activation):
    """Returns the name of the fused activation that `activation` computes ("silu" for
    "swish", "identity" for None), or None when no fused kernel computes it.

    Accepts names ("relu", "swish", "linear", None, ...) and the Keras activation
    functions that correspond to them (`keras.activations.relu`, ...).
    """
    if callable(activation):
        for name, functions in _KNOWN_CALLABLES.items():
            if any(activation is f for f in functions):
                return name
        return None
    name = activation.lower() if isinstance(activation, str) else activation
    name = _ALIASES.get(name, name)
    return name if name in FUSED_ACTIVATIONS else None


def get(activation):
    """Returns `(fused_name_or_None, function)` for an activation argument.

    Raises:
        ValueError: for a name that neither this package nor Keras knows.
    """
    name = fused_name(activation)
    if name is not None:
        return name, _FUNCTIONS[name]
    if callable(activation):
        return None, activation
    try:
        return None, keras.activations.get(activation)
    except (ValueError, TypeError):
        raise ValueError(
            "Unknown activation. Expected a name such as 'relu', 'silu', 'swish', 'gelu', "
            f"'leaky_relu', 'linear', None, or a callable. Received: activation={activation!r}"
        ) from None


def serialize(activation):
    """A JSON-friendly form of an activation argument for `get_config`."""
    name = fused_name(activation)
    if name is not None:
        return "linear" if name == "identity" else name
    if isinstance(activation, str):
        return activation
    return keras.activations.serialize(activation)
