"""Per-channel affine + activation: the one place where layers create gamma/beta and apply them.

Every layer of the package that ends in `act(gamma * y + beta)` per channel (the
`AffineActBase` layers, `ChannelAffine`, `CBNConv2D`) owns an `AffineAct`, as the
batch-statistics layers own a `MovingStatistics`. The contract:

- the arguments are Keras': `activation`, `center` (owns `beta`), `scale` (owns `gamma`)
  and each weight's `*_initializer`, `*_regularizer`, `*_constraint` (anything
  `keras.initializers/regularizers/constraints.get` takes);
- `gamma` and `beta` are trainable float32 weights (under mixed precision too), created on
  the layer itself, `gamma` first, so checkpoints and `.keras` files see plain layer
  weights; the layer's `gamma` / `beta` attributes are None when the weight is off;
- the output is cast to the layer's compute dtype (the affine runs in the dtype of `y`,
  float32 at least).

The layer's other per-channel weights (the proxy parameters, EvoNorm's `v`, IEBN's gate)
use `ChannelWeight`, the same option parsing and weight creation.

```python
self.affine = AffineAct(self, activation=activation, center=center, scale=scale, ...)
self.affine.build(channels)                    # in build
return self.affine.apply(y)                    # in call: act(gamma * y + beta)
```
"""

import keras
from keras import ops

from tf_proxynorm.layers._args import check_bool
from tf_proxynorm.ops import activations
from tf_proxynorm.ops.norm_act import affine_act_proxy


class ChannelWeight:
    """A per-channel trainable weight of a layer: its options, creation and config.

    Args:
        name: the weight's name: the layer attribute, the variable name and the prefix
            of the config keys (`<name>_initializer`, `<name>_regularizer`,
            `<name>_constraint`).
        initializer, regularizer, constraint: anything `keras.initializers.get`,
            `keras.regularizers.get`, `keras.constraints.get` take.
    """

    def __init__(self, name, initializer, regularizer=None, constraint=None):
        self.name = name
        self.initializer = keras.initializers.get(initializer)
        self.regularizer = keras.regularizers.get(regularizer)
        self.constraint = keras.constraints.get(constraint)

    def build(self, layer, channels, dtype="float32"):
        """Creates the weight, of shape `(channels,)`, as the attribute `name` of `layer`."""
        variable = layer.add_weight(
            name=self.name, shape=(channels,), initializer=self.initializer,
            regularizer=self.regularizer, constraint=self.constraint, trainable=True,
            autocast=False, dtype=dtype)
        setattr(layer, self.name, variable)
        return variable

    def config(self):
        """The Keras config entries of the options."""
        return {f"{self.name}_initializer": keras.initializers.serialize(self.initializer),
                f"{self.name}_regularizer": keras.regularizers.serialize(self.regularizer),
                f"{self.name}_constraint": keras.constraints.serialize(self.constraint)}


class AffineAct:
    """`act(gamma * y + beta)` per channel for a layer: arguments, weights, math, config.

    Args:
        layer: the Keras layer that owns the weights; its `axis` is the channel axis and
            its `compute_dtype` the output dtype (both read at call time).
        activation: activation name or callable (see `tf_proxynorm.ops.activations`).
        center: whether the layer owns the per-channel offset `beta`.
        scale: whether the layer owns the per-channel multiplier `gamma`.
        {beta,gamma}_initializer: zeros and ones.
        {beta,gamma}_regularizer, {beta,gamma}_constraint: optional.
        dtype: the dtype of `gamma` and `beta`. Defaults to float32 (also under mixed
            precision).
    """

    def __init__(self, layer, activation="relu", center=True, scale=True,
                 beta_initializer="zeros", gamma_initializer="ones",
                 beta_regularizer=None, gamma_regularizer=None,
                 beta_constraint=None, gamma_constraint=None, dtype="float32"):
        self.layer = layer
        self.activation = activation
        self.activation_name, self.activation_fn = activations.get(activation)
        self.center = check_bool("center", center)
        self.scale = check_bool("scale", scale)
        self.weights = (
            ChannelWeight("gamma", gamma_initializer, gamma_regularizer, gamma_constraint),
            ChannelWeight("beta", beta_initializer, beta_regularizer, beta_constraint))
        self.dtype = dtype
        layer.gamma = layer.beta = None

    @property
    def op_activation(self):
        """The activation as the functional ops take it (name when fusable, else callable)."""
        return self.activation_name or self.activation_fn

    def build(self, channels):
        """Creates `gamma` (when `scale`) then `beta` (when `center`), `(channels,)`."""
        for weight, on in zip(self.weights, (self.scale, self.center), strict=True):
            if on:
                weight.build(self.layer, channels, self.dtype)

    def apply(self, y, proxy_mean=None, proxy_inv_std=None):
        """`act(gamma * y + beta)` in the layer's compute dtype.

        Args:
            y: the normalized tensor, channels on the layer's `axis`.
            proxy_mean, proxy_inv_std: optional per-channel proxy step applied after the
                activation (`(z - proxy_mean) * proxy_inv_std`, see `ProxyNorm`).
        """
        layer = self.layer
        outputs = affine_act_proxy(y, layer.gamma, layer.beta, axis=layer.axis,
                                   activation=self.op_activation, proxy_mean=proxy_mean,
                                   proxy_inv_std=proxy_inv_std)
        return ops.cast(outputs, layer.compute_dtype)

    def config(self):
        """The Keras config entries: `activation`, `center`, `scale` and the options."""
        out = {"activation": activations.serialize(self.activation),
               "center": self.center, "scale": self.scale}
        for weight in self.weights:
            out.update(weight.config())
        return out
