"""Calibrated conversion: fit the new norms so that the converted model computes the BN model.

`convert_model(model, "gn+pn", calibration_data=x)` calls `calibrate` after rebuilding the
graph. Layer by layer, in topological order, on the calibration inputs:

- target: the BN model's pre-activation `t = bn_gamma (x - mm) / sqrt(mv + eps) + bn_beta`,
  with `x` the BN's input *in the BN model* (its own upstream layers);
- regressor: the new norm's normalized output `y` (before its affine), with the norm's
  input taken from the *converted* model, whose earlier layers are already calibrated.

Per channel, `gamma` and `beta` are the least-squares fit of `t` on `y` (float64
sufficient statistics accumulated over the batches). Since the target is the BN model's
own intermediate value, the fit also corrects what the upstream layers got wrong, so
errors do not compound along the depth. Proxy Norm's proxy `Y~ = proxy_beta +
(1 + proxy_gamma) Q` gets the observed per-channel mean and standard deviation of `y`
(so `gamma Y~ + beta` has those of the pre-activation), and PN's output affine
`z = (act - m) / s` is undone where its output goes, as planned by `convert.py`:
into the kernel and bias of the next Conv/DepthwiseConv/Dense where `fold_for_inference`
could fold it (the rules of `tf_proxynorm.absorb`, shared with it), the scale only into
the kernel and the shift into a `ChannelAffine` offset in front where zero padding is on the way, and a
`ChannelAffine` inverse `s * z + m` where no linear layer takes it.
"""

import keras
import numpy as np

from tf_proxynorm import _graph, absorb
from tf_proxynorm.layers.proxy_norm_act import is_proxy_layer
from tf_proxynorm.ops.stats import channel_axis

BATCH_SIZE = 64
# Up to this many bytes, a layer's (target, regressor) arrays are kept between the fit and
# the error pass instead of being computed again.
CACHE_BYTES = 512 * 2**20
# The target of each fit: "model", the BN's output on its input in the BN model (the
# default: the fit also corrects the upstream layers' errors), or "layer", the BN applied
# to the converted model's input of the layer (reproduces each BN locally; errors add up).
# A module setting for the comparison in docs/finetune.md, not an API.
TARGET = "model"
# Epsilon search (a module setting for the study in docs/finetune.md, not an API; off by
# default): each layer's `epsilon` becomes the candidate (its own, or a factor below times
# the median group variance of its input on the first calibration batch) whose
# least-squares fit leaves the smallest residual. A large epsilon keeps part of each
# example's scale, which BN keeps and GN removes: seed 0 of the study, LN+PN 88.6% ->
# 90.6% (BN 91.1%), but the chosen epsilons (10-500x the variance) leave those layers
# barely normalizing, and the model then fine-tunes badly at batch 2 (docs/finetune.md).
EPSILON_FACTORS = ()


class Pair:
    """One replaced BN and what calibration sets: the new norm, the layers undoing PN's
    output affine, and the chain of nested models `[(old, new), ...]` that holds them."""

    def __init__(self, bn, new, name, step):
        self.bn, self.new, self.name = bn, new, name
        self.step = step       # index of the BN's line in its converter's report
        self.chain = []
        self.targets = []      # [(old layer, new layer, bias exact)]
        self.shift = None      # ChannelAffine offset in front of zero-padded targets
        self.inverse = None    # ChannelAffine s * z + m where nothing absorbs PN's affine


# -- calibration data -----------------------------------------------------------------------
def _describe(data):
    if hasattr(data, "shape") and hasattr(data, "dtype"):
        return f"<{type(data).__name__} of shape {tuple(data.shape)} and dtype {data.dtype}>"
    text = repr(data)
    return text if len(text) <= 120 else text[:117] + "..."


def input_batches(model, data, batch_size=BATCH_SIZE):
    """`data` (array, `tf.data.Dataset`, iterable of batches) as NumPy batches of the
    model's input, at most `batch_size` examples each. Raises ValueError on bad data."""
    if len(model.inputs) != 1:
        raise ValueError(
            "convert_model's calibration supports models with one input; this model has "
            f"{len(model.inputs)}. Received: calibration_data={_describe(data)}")
    spec = model.inputs[0]
    expected = tuple(spec.shape)

    def bad(why):
        return ValueError(f"`calibration_data` {why}. Received: calibration_data={_describe(data)}")

    if data is None or isinstance(data, (str, bytes, dict)) or np.isscalar(data):
        raise bad("must be an array of model inputs, a tf.data.Dataset or an iterable of "
                  "input batches (x or (x, y) tuples)")
    if hasattr(data, "shape") and hasattr(data, "dtype"):
        elements = [data]
    else:
        try:
            elements = iter(data)
        except TypeError:
            raise bad("must be an array of model inputs, a tf.data.Dataset or an iterable "
                      "of input batches (x or (x, y) tuples)") from None
    arrays = []
    for element in elements:
        if isinstance(element, (tuple, list)) and element:
            element = element[0]          # (x, y) or (x, y, sample_weight)
        try:
            array = np.asarray(keras.ops.convert_to_numpy(element))
        except Exception:  # noqa: BLE001 - anything that is not an array of numbers
            raise bad(f"holds an element that is not an array: {_describe(element)}") from None
        if not (np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)):
            raise bad(f"must hold numbers; found an element of dtype {array.dtype}")
        if array.ndim != len(expected) or any(
                e is not None and e != a for e, a in zip(expected[1:], array.shape[1:])):
            hint = " (batch a Dataset of single examples with .batch(n))" if (
                array.ndim == len(expected) - 1) else ""
            raise bad(f"must hold batches of the model's input shape {expected}; found an "
                      f"element of shape {array.shape}{hint}")
        if array.shape[0]:
            arrays.append(array)
    if not arrays:
        raise bad("is empty: calibration needs inputs (a few hundred examples)")
    x = np.concatenate(arrays).astype(keras.backend.standardize_dtype(spec.dtype))
    return [x[i:i + batch_size] for i in range(0, len(x), batch_size)]


# -- reading intermediate tensors -------------------------------------------------------------
class _Reader:
    """`reader(layer, chain, x)`: the input of `layer` (called once) in the innermost model
    of `chain` (outer first, `top` first of all) on the top model's input `x`."""

    def __init__(self, top):
        self.top = top
        self._extractors = {}

    def _extractor(self, model, layer):
        key = (id(model), id(layer))
        if key not in self._extractors:
            graph = _graph.Graph(model, "convert_model")
            nodes = [n for n in graph.nodes if n.operation is layer]
            if len(nodes) != 1:
                raise ValueError(
                    f"convert_model cannot calibrate {layer.name!r}: it is called "
                    f"{len(nodes)} times in {model.name!r}; calibration reads the input of "
                    f"each call it fits. Received: model with shared layer {layer.name!r}")
            inputs = graph.functional.inputs
            self._extractors[key] = keras.Model(inputs[0] if len(inputs) == 1 else inputs,
                                                nodes[0].input_tensors[0])
        return self._extractors[key]

    def __call__(self, layer, chain, x):
        models = [self.top] + list(chain)
        for parent, child in zip(models, models[1:]):
            x = self._extractor(parent, child)(x, training=False)
        return self._extractor(models[-1], layer)(x, training=False)


def _channels_last(array, axis):
    axis = channel_axis(array.ndim, axis)
    return np.moveaxis(array, axis, -1).reshape(-1, array.shape[axis])


def _bn_affine(bn):
    """Per-channel `(A, B)` of the BN at inference: `bn(x) = A x + B` (before activation)."""
    var = absorb.to_float64(bn.moving_variance)
    a = 1.0 / np.sqrt(var + bn.epsilon)
    if getattr(bn, "gamma", None) is not None:
        a = a * absorb.to_float64(bn.gamma)
    b = -absorb.to_float64(bn.moving_mean) * a
    if getattr(bn, "beta", None) is not None:
        b = b + absorb.to_float64(bn.beta)
    return a, b


def _bn_axis(bn):
    return bn.axis if isinstance(bn.axis, int) else bn.axis[0]


def _activation(layer, array):
    out = layer.affine.activation_fn(keras.ops.convert_to_tensor(array.astype(np.float32)))
    return absorb.to_float64(out)


# -- the fit ------------------------------------------------------------------------------------
def _fit(new, sums):
    """Least-squares gamma/beta per channel from the sufficient statistics."""
    n, sy, syy, st, sty = sums
    my, mt = sy / n, st / n
    var_y = np.maximum(syy / n - my * my, 0.0)
    cov = sty / n - my * mt
    tiny = 1e-12
    if new.scale and new.center:
        gamma = np.where(var_y > tiny, cov / np.maximum(var_y, tiny), 0.0)
        beta = mt - gamma * my
    elif new.scale:
        gamma = np.where(syy > tiny, sty / np.maximum(syy, tiny), 0.0)
        beta = None
    elif new.center:
        gamma, beta = None, mt - my
    else:
        gamma = beta = None
    return gamma, beta, my, np.sqrt(var_y)


def _assign(weight, value):
    weight.assign(np.asarray(value).astype(keras.backend.standardize_dtype(weight.dtype)))


def _pre_activation(new, y, gamma, beta):
    out = y
    if gamma is not None:
        out = out * gamma
    if beta is not None:
        out = out + beta
    return out


def _sse(sums, gamma, beta):
    """Sum over the channels of the squared residual `t - (gamma y + beta)` of a fit."""
    n, sy, syy, st, sty, stt = sums
    g = 1.0 if gamma is None else gamma
    b = 0.0 if beta is None else beta
    return float(np.sum(stt - 2 * g * sty - 2 * b * st + g * g * syy + 2 * g * b * sy
                        + n * b * b))


def _group_variance(new, x):
    """The median over examples and groups of the group variance of `x` (the norm's input)."""
    x = np.moveaxis(absorb.to_float64(x), channel_axis(x.ndim, new.axis), -1)
    groups = new._groups
    x = x.reshape(len(x), -1, groups, x.shape[-1] // groups)
    return float(np.median(x.var(axis=(1, 3))))


def _calibrate_pair(pair, old_reader, new_reader, batches, epsilon_factors=()):
    bn, new = pair.bn, pair.new
    a_bn, b_bn = _bn_affine(bn)
    axis = _bn_axis(bn)
    old_chain = [old for old, _ in pair.chain]
    new_chain = [nw for _, nw in pair.chain]

    def read(x):
        x_new = new_reader(new, new_chain, x)
        x_bn = old_reader(bn, old_chain, x) if TARGET == "model" else x_new
        return _channels_last(absorb.to_float64(x_bn), axis) * a_bn + b_bn, x_new

    def regressor(x_new, epsilon):
        new.epsilon = epsilon
        return _channels_last(absorb.to_float64(new.normalized_output(x_new)), new.axis)

    candidates, sums, cache, cached = [new.epsilon], {}, [], 0
    for x in batches:
        t, x_new = read(x)
        if epsilon_factors and not sums:          # first batch: the candidates
            variance = _group_variance(new, x_new)
            candidates += [f * variance for f in epsilon_factors if f * variance > new.epsilon]
        ys = {epsilon: regressor(x_new, epsilon) for epsilon in candidates}
        for epsilon, y in ys.items():
            batch = (len(y), y.sum(0), (y * y).sum(0), t.sum(0), (t * y).sum(0),
                     (t * t).sum(0))
            sums[epsilon] = batch if epsilon not in sums else tuple(
                s + b for s, b in zip(sums[epsilon], batch))
        cached += t.nbytes + sum(y.nbytes for y in ys.values())
        cache = cache + [(t, ys)] if cache is not None and cached <= CACHE_BYTES else None
    # The epsilon whose least-squares fit leaves the smallest residual (a larger epsilon
    # keeps part of each example's scale, which BN keeps and GN removes).
    fits = {eps: _fit(new, s[:5]) for eps, s in sums.items()}
    epsilon = min(candidates, key=lambda eps: _sse(sums[eps], *fits[eps][:2]))
    new.epsilon = epsilon
    gamma, beta, mean_y, std_y = fits[epsilon]
    if gamma is not None:
        _assign(new.gamma, gamma)
    if beta is not None:
        _assign(new.beta, beta)
    if is_proxy_layer(new):
        _assign(new.proxy_beta, mean_y)
        _assign(new.proxy_gamma, std_y - 1.0)
        _undo_proxy_affine(pair)
    # The layer's output as the next layers see it (PN's affine undone), against the BN's.
    err2 = ref2 = 0.0
    if cache is not None:
        target_regressor = ((t, ys[epsilon]) for t, ys in cache)
    else:
        target_regressor = ((t, regressor(x_new, epsilon)) for t, x_new in map(read, batches))
    for t, y in target_regressor:
        fitted = _activation(new, _pre_activation(new, y, gamma, beta))
        target = _activation(new, t)
        err2 += float(((fitted - target) ** 2).sum())
        ref2 += float((target ** 2).sum())
    return float(np.sqrt(err2 / max(ref2, 1e-30)))


def _undo_proxy_affine(pair):
    mean, inv_std = (absorb.to_float64(t) for t in pair.new.proxy_statistics())
    std = 1.0 / inv_std
    for old, new, exact in pair.targets:
        kernel, bias = absorb.fold_weights(old, std, mean if exact else None)
        _assign(new.kernel, kernel)
        if new.use_bias:
            _assign(new.bias, bias)
    if pair.shift is not None:          # z + m / s in front of a zero-padded target
        _assign(pair.shift.beta, mean * inv_std)
    if pair.inverse is not None:        # s * z + m
        _assign(pair.inverse.gamma, std)
        _assign(pair.inverse.beta, mean)


def calibrate(old_model, new_model, pairs, batches):
    """Calibrates `pairs` in order; returns each one's relative error and the model's.

    The error of a layer is `||f' - f|| / ||f||` over the calibration data, `f` the BN
    model's output of the BN (after the activation merged into the new layer) and `f'` the
    converted model's, PN's output affine undone (as the next layers see it).
    """
    old_reader, new_reader = _Reader(old_model), _Reader(new_model)
    errors = [_calibrate_pair(pair, old_reader, new_reader, batches, EPSILON_FACTORS)
              for pair in pairs]
    return errors, output_error(old_model, new_model, batches)


def output_error(old_model, new_model, batches):
    """`||f' - f|| / ||f||` of the models' outputs (all of them) over `batches`."""
    err2 = ref2 = 0.0
    for x in batches:
        ref = [absorb.to_float64(t) for t in keras.tree.flatten(old_model(x, training=False))]
        out = [absorb.to_float64(t) for t in keras.tree.flatten(new_model(x, training=False))]
        err2 += sum(float(((o - r) ** 2).sum()) for o, r in zip(out, ref))
        ref2 += sum(float((r ** 2).sum()) for r in ref)
    return float(np.sqrt(err2 / max(ref2, 1e-30)))
