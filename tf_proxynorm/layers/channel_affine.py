"""`ChannelAffine`: a per-channel affine + activation with no normalization."""

import keras

from tf_proxynorm.layers._args import check_bool, check_int
from tf_proxynorm.ops import activations
from tf_proxynorm.ops.norm_act import affine_act_proxy
from tf_proxynorm.ops.stats import channel_axis


@keras.saving.register_keras_serializable(package="tf_proxynorm")
class ChannelAffine(keras.layers.Layer):
    """Per-channel `act(scale * x + offset)`: what remains of a folded layer.

    `fold_for_inference` uses it for PN's output affine where no linear layer can absorb
    it, for a per-channel shift in front of a zero-padded convolution, and for a
    `ProxyNormAct` without its proxy step.

    ```python
    y = act(scale_c * x + offset_c)
    ```

    Args:
        axis: the channel axis. Defaults to -1.
        use_scale: whether the layer owns a `scale` weight (initialized to ones).
        use_offset: whether the layer owns an `offset` weight (initialized to zeros).
        activation: activation name or callable (see `tf_proxynorm.ops.activations`).
            Defaults to None (identity).
        **kwargs: base layer arguments (`name`, `dtype`, `trainable`).

    Call arguments:
        inputs: a tensor with channels on `axis`.
        training: ignored (the layer has no training-specific behavior).

    Returns:
        A tensor of the input's shape in the layer's compute dtype.

    Example:

    >>> layer = ChannelAffine(use_scale=False)
    >>> layer(np.ones((2, 3), "float32")).shape
    TensorShape([2, 3])
    """

    def __init__(self, axis=-1, use_scale=True, use_offset=True, activation=None, **kwargs):
        super().__init__(**kwargs)
        self.axis = check_int("axis", axis, requirement="an int (the channel axis)")
        self.use_scale = check_bool("use_scale", use_scale)
        self.use_offset = check_bool("use_offset", use_offset)
        self.activation = activation
        self._activation_fn = activations.get(activation)[1]
        self.scale = self.offset = None
        self.supports_masking = True

    def build(self, input_shape):
        axis = channel_axis(len(input_shape), self.axis)
        channels = input_shape[axis]
        for name, on, init in (("scale", self.use_scale, "ones"),
                               ("offset", self.use_offset, "zeros")):
            if on:
                setattr(self, name, self.add_weight(name=name, shape=(channels,),
                                                    initializer=init))

    def call(self, inputs, training=None):
        # `training` is ignored; accepted so that `stateless_call(..., training=...)`
        # works as for the other norm + activation layers.
        return affine_act_proxy(inputs, self.scale, self.offset, axis=self.axis,
                                activation=self._activation_fn)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "axis": self.axis, "use_scale": self.use_scale,
                "use_offset": self.use_offset,
                "activation": activations.serialize(self.activation)}
