"""Reading intermediate activations of a model without changing it.

`LayerProbe` returns the inputs or outputs of chosen layers for a batch of model inputs:
for functional and Sequential models through one probe `keras.Model` built once from the
model's own graph; for subclassed models (or layers nested inside other layers) by
recording the layers' calls while the model runs. `normalized_output` computes, from a
normalization layer's input, its normalized output `y` before the affine: with the
layer's own `normalized_output` method (every tf_proxynorm norm layer), or for Keras'
normalization layers with the functions registered here.
"""

import keras
from keras import ops

from tf_proxynorm.ops.group_norm import group_norm_act_reference
from tf_proxynorm.ops.norm_act import batch_norm_act
from tf_proxynorm.ops.stats import moments, stats_dtype

# (layer class, function(layer, inputs, training) -> y, function(layer) -> channel axis).
_NORMALIZERS = []


def register_normalized_output(layer_class, fn, axis_fn=lambda layer: layer.axis):
    """Teaches the statistics callbacks how to compute `y` for a normalization layer.

    Args:
        layer_class: a Keras layer class.
        fn: `fn(layer, inputs, training) -> y`, the layer's normalized output before its
            affine, computed from the layer's input.
        axis_fn: `axis_fn(layer) -> int`, the channel axis of `y`.

    A layer may instead define `normalized_output(inputs, training=False)` and an `axis`
    attribute, as every normalization layer of tf_proxynorm does: the callbacks then use
    the layer's own math. The functions below cover Keras' normalization layers.
    """
    _NORMALIZERS.insert(0, (layer_class, fn, axis_fn))


def _group_norm(layer, x, training):
    del training
    axis = layer.axis
    groups = x.shape[axis] if layer.groups == -1 else layer.groups
    return group_norm_act_reference(x, groups=groups, axis=axis, epsilon=layer.epsilon,
                                    activation=None)


def _batch_norm(layer, x, training):
    rank = len(x.shape)
    if training and layer.trainable:
        mean, var = moments(x, [a for a in range(rank) if a != layer.axis % rank])
    else:
        mean, var = layer.moving_mean, layer.moving_variance
    return batch_norm_act(x, mean, var, axis=layer.axis, epsilon=layer.epsilon, activation=None)


def _layer_norm(layer, x, training):
    del training
    axes = [layer.axis] if isinstance(layer.axis, int) else list(layer.axis)
    x = ops.convert_to_tensor(x)
    x = ops.cast(x, stats_dtype(x.dtype))
    if layer.rms_scaling:
        return x * ops.rsqrt(ops.mean(ops.square(x), axis=axes, keepdims=True) + layer.epsilon)
    mean, var = moments(x, axes, keepdims=True)
    return (x - mean) * ops.rsqrt(var + layer.epsilon)


def _layer_norm_axis(layer):
    return layer.axis if isinstance(layer.axis, int) else -1


register_normalized_output(keras.layers.LayerNormalization, _layer_norm, _layer_norm_axis)
register_normalized_output(keras.layers.GroupNormalization, _group_norm)
register_normalized_output(keras.layers.BatchNormalization, _batch_norm)


def _normalizer(layer):
    if callable(getattr(layer, "normalized_output", None)):
        return (lambda lyr, x, training: lyr.normalized_output(x, training=training),
                lambda lyr: lyr.axis)
    for cls, fn, axis_fn in _NORMALIZERS:
        if isinstance(layer, cls):
            return fn, axis_fn
    return None


def is_normalization(layer):
    """Whether the callbacks know how to compute `layer`'s normalized output."""
    return _normalizer(layer) is not None


def normalized_output(layer, inputs, training=False):
    """The normalized output `y` of a normalization layer (before affine/activation).

    Args:
        layer: a tf_proxynorm norm+act layer (BN, GN, LN, IN with or without PN, IEBN:
            its BN part, BGN, EvoNorm-B0/S0: before gamma and beta, `CBNConv2D`: its
            input is the conv's input), a Keras `BatchNormalization`,
            `LayerNormalization` or `GroupNormalization`, or a registered layer.
        inputs: the layer's input.
        training: for batch normalizations, whether to use the batch statistics of
            `inputs` (True, for a `trainable` layer, as its own `call`) or the moving
            statistics. Nothing is updated.

    Returns:
        `(y, axis)`: `y` in float32 at least, `axis` its channel axis.
    """
    found = _normalizer(layer)
    if found is None:
        raise ValueError(
            f"Layer {layer.name!r} ({type(layer).__name__}) is not a known normalization. "
            "Register it with `tf_proxynorm.callbacks.register_normalized_output`. "
            f"Received: layer={layer.name!r}")
    fn, axis_fn = found
    return fn(layer, inputs, training), axis_fn(layer)


def is_kernel_layer(layer):
    """Convolutions and dense layers (layers that own a `kernel` and have no sub-layers)."""
    return isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense)) or (
        hasattr(layer, "kernel") and hasattr(layer, "data_format") and hasattr(layer, "strides"))


def output_axis(layer):
    """Channel axis of a kernel layer's output."""
    return 1 if getattr(layer, "data_format", "channels_last") == "channels_first" else -1


class LayerProbe:
    """Computes, for a batch, the inputs or outputs of chosen layers and the model's output.

    Args:
        model: a built Keras model.
        taps: a list of `(layer, "input" | "output")`, layers of `model` (nested layers
            allowed).

    Calling `probe(x, training=False)` returns `(values, model_output)`, `values` a list
    aligned with `taps`. Nothing of the model is changed; call it inside a compiled
    function for speed (`tf.function`, `jax.jit`: see `tf_proxynorm._backend.compile_model_function`).
    A layer called several times is read at its first call. Works on every backend.
    """

    def __init__(self, model, taps):
        self.model = model
        self.taps = [(layer, what) for layer, what in taps]
        for layer, what in self.taps:
            if what not in ("input", "output"):
                raise ValueError(
                    f"A tap must be 'input' or 'output'. Received: {what!r} for {layer.name!r}")
        self.functional = self._build_functional()

    def _build_functional(self):
        if not getattr(self.model, "inputs", None):
            return None
        try:
            tensors = [getattr(layer, what) for layer, what in self.taps]
            # `model.input`: the inputs' own structure (a tensor, list or dict), as the
            # model is called.
            return keras.Model(self.model.input, [tensors, self.model.outputs])
        except (AttributeError, ValueError, TypeError):
            return None

    def __call__(self, x, training=False):
        if self.functional is not None:
            values, outputs = self.functional(x, training=training)
            return list(values), outputs[0] if len(outputs) == 1 else outputs
        return self._record(x, training)

    def _record(self, x, training):
        recorded = {}
        layers = {}
        for index, (layer, what) in enumerate(self.taps):
            layers.setdefault(id(layer), (layer, []))[1].append((index, what))
        saved = {}
        for key, (layer, wanted) in layers.items():
            saved[key] = layer.__dict__.get("call")
            original = layer.call

            def wrapper(*args, _original=original, _wanted=wanted, **kwargs):
                out = _original(*args, **kwargs)
                for index, what in _wanted:
                    if index not in recorded:
                        recorded[index] = args[0] if what == "input" else out
                return out

            object.__setattr__(layer, "call", wrapper)
        try:
            outputs = self.model(x, training=training)
        finally:
            for key, (layer, _) in layers.items():
                if saved[key] is None:
                    object.__delattr__(layer, "call")
                else:
                    object.__setattr__(layer, "call", saved[key])
        missing = sorted({layer.name for i, (layer, _) in enumerate(self.taps)
                          if i not in recorded})
        if missing:
            raise ValueError(f"These layers were not called by the model: {missing}")
        return [recorded[i] for i in range(len(self.taps))], outputs
