"""Where a per-channel affine `scale * z + shift` can be moved into the next linear layer.

The rules that `fold_for_inference` (PN-Act's affine at inference) and calibrated
conversion (undoing PN's affine, `convert_model(calibration_data=...)`) share, so that both
act on exactly the same layers:

- `absorbing_branches(graph, tensor, rank, axis)`: for each consumer of `tensor`, the
  Conv/DepthwiseConv/Dense layers at the end of every path through layers that commute
  with the affine (dropouts, poolings, crops; zero padding commutes with the scale only),
  or None when some path ends elsewhere (an addition, a multiply, the model's output);
- `fold_weights(layer, scale, shift)`: that layer's kernel and bias applied to
  `scale * x + shift`.
"""

import keras
import numpy as np

_L = keras.layers
# Layers between the affine and the layer that absorbs it. "both": commutes with a
# positive per-channel scale and a per-channel shift (inference identities, poolings,
# crops); "scale": commutes with the scale only (zero padding: the border sees 0, not b).
TRANSPARENT = {
    **{cls: "both" for cls in (
        _L.Dropout, _L.SpatialDropout1D, _L.SpatialDropout2D, _L.SpatialDropout3D,
        _L.GaussianNoise, _L.GaussianDropout, _L.AlphaDropout, _L.Identity,
        _L.GlobalAveragePooling1D, _L.GlobalAveragePooling2D, _L.GlobalAveragePooling3D,
        _L.GlobalMaxPooling1D, _L.GlobalMaxPooling2D, _L.GlobalMaxPooling3D,
        _L.AveragePooling1D, _L.AveragePooling2D, _L.AveragePooling3D,
        _L.MaxPooling1D, _L.MaxPooling2D, _L.MaxPooling3D,
        _L.Cropping1D, _L.Cropping2D, _L.Cropping3D)},
    **{cls: "scale" for cls in (_L.ZeroPadding1D, _L.ZeroPadding2D, _L.ZeroPadding3D)},
}
CONVS = (_L.Conv1D, _L.Conv2D, _L.Conv3D)
DEPTHWISE = (_L.DepthwiseConv1D, _L.DepthwiseConv2D)


def format_agrees(layer, rank, axis):
    """Whether `layer`'s `data_format` (if any) puts the channels on `axis`."""
    data_format = getattr(layer, "data_format", None)
    if data_format is None:
        return True
    return axis == (rank - 1 if data_format == "channels_last" else 1)


def _can_absorb(layer, rank, axis):
    """Whether `layer` can take a per-input-channel affine on `axis` into its weights."""
    if getattr(layer, "lora_enabled", False) or getattr(layer.dtype_policy,
                                                        "quantization_mode", None):
        return False
    if type(layer) in CONVS:
        return layer.groups == 1 and format_agrees(layer, rank, axis)
    if type(layer) in DEPTHWISE:
        return format_agrees(layer, rank, axis)
    return type(layer) is _L.Dense and axis == rank - 1


def _bias_is_exact(layer):
    """Folding the shift into the bias is exact unless the layer zero-pads its input."""
    if type(layer) is _L.Dense:
        return True
    return layer.padding == "valid" or all(k == 1 for k in layer.kernel_size)


def absorbing_branches(graph, tensor, rank, axis):
    """Per consumer of `tensor` in `graph` (a `tf_proxynorm._graph` view):
    `(consumer node, absorbing nodes, bias exact)`; None when some path does not end in
    a layer that can absorb a per-channel affine on `axis`."""
    per_consumer = _leaves_per_consumer(graph, tensor, rank, axis)
    if per_consumer is None:
        return None
    return [(node, [t for t, _ in leaves], all(e for _, e in leaves))
            for node, leaves in per_consumer]


def _leaves_per_consumer(graph, tensor, rank, axis):
    """`[(consumer node, its leaves)]` for every consumer of `tensor`; None when `tensor`
    is a model output, has no consumer, or some path does not end in an absorbing layer."""
    consumers = graph.consumers_of(tensor)
    if not consumers or graph.is_output(tensor):
        return None
    per_consumer = []
    for node in consumers:
        leaves = _leaves(graph, node, rank, axis)
        if leaves is None:
            return None
        per_consumer.append((node, leaves))
    return per_consumer


def _leaves(graph, node, rank, axis):
    """(absorbing node, bias exact) at the end of every path from `node`, or None."""
    layer = node.operation
    if len(node.input_tensors) != 1 or node.arguments.kwargs.get("training"):
        return None
    if _can_absorb(layer, rank, axis):
        return [(node, _bias_is_exact(layer))] if graph.num_calls(layer) == 1 else None
    kind = TRANSPARENT.get(type(layer))
    if kind is None or not format_agrees(layer, rank, axis):
        return None
    out_rank = len(node.outputs[0].shape)
    out_axis = axis if out_rank == rank else out_rank - 1
    per_consumer = _leaves_per_consumer(graph, node.outputs[0], out_rank, out_axis)
    if per_consumer is None:
        return None
    return [(target, exact and kind == "both") for _, sub in per_consumer
            for target, exact in sub]


def to_float64(value):
    """A variable or tensor of any backend as a float64 NumPy array."""
    return np.asarray(keras.ops.convert_to_numpy(value), dtype=np.float64)


def fold_weights(layer, scale, shift):
    """Kernel and bias (float64) of the Conv/DepthwiseConv/Dense `layer` applied to
    `scale * x + shift` (`shift` may be None: the bias is then unchanged)."""
    kernel = to_float64(layer.kernel)
    depthwise = type(layer) in DEPTHWISE
    bias = (to_float64(layer.bias) if layer.use_bias
            else np.zeros(kernel.shape[-1] * (kernel.shape[-2] if depthwise else 1)))
    if shift is not None:
        # depthwise: kernel (*k, C, multiplier), bias (C * multiplier,);
        # otherwise: kernel (*k, C_in, C_out), bias (C_out,).
        flat = kernel.reshape((-1,) + kernel.shape[-2:])
        bias = bias + (np.einsum("kcm,c->cm", flat, shift).reshape(-1) if depthwise
                       else np.einsum("kco,c->o", flat, shift))
    return kernel * np.asarray(scale, np.float64)[:, None], bias
