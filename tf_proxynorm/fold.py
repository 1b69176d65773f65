"""Fold Proxy Normalization's output affine away for inference.

PN-Act's proxy statistics depend on parameters only, so at inference it is
`a_c * act(gamma_c y + beta_c) + b_c` with `a = (v + eps)^-1/2` and `b = -m a` (spec
section 3). `fold_for_inference` runs the norm + activation without the proxy step and
moves `a` and `b` into the next linear layer's kernel and bias.
"""

import keras
import numpy as np

from tf_proxynorm import _backend, _graph, absorb
from tf_proxynorm.convert import ConversionStep
from tf_proxynorm.layers.channel_affine import ChannelAffine
from tf_proxynorm.layers.inference_norm import (HOMOGENEOUS, InferenceGroupNormAct,
                                                 check_statistics)
from tf_proxynorm.layers.norm_act import GroupNormAct, ShiftedGroupNormAct
from tf_proxynorm.layers.proxy_norm_act import ProxyNormAct, is_proxy_layer
from tf_proxynorm.ops import activations
from tf_proxynorm.ops.stats import channel_axis

# Every GN/LN/IN layer (with or without PN) and the folded ShiftedGroupNormAct.
_GROUP_NORM_LAYERS = (GroupNormAct, ShiftedGroupNormAct)


class _Folder:
    def __init__(self, prefix="", inference=False, statistics="auto"):
        self.prefix = prefix
        self.inference = inference
        self.statistics = statistics
        self._inference_layers = {}   # id(norm layer) -> its inference form (shared layers)
        self.report = []
        self.targets = {}     # id(target node) -> (scale, shift or None)
        self._nested = {}
        self._shared = {}     # id(PN layer called several times) -> (new layer, affine)

    def _note(self, old, new, action):
        self.report.append(ConversionStep(self.prefix + old, self.prefix + new, action))

    def fold(self, model):
        self.graph = _graph.Graph(model, "fold_for_inference")
        return self.graph.rebuild(self._call_node)

    def _call_node(self, node, args, kwargs, rewriter):
        layer = node.operation
        if id(node) in self.targets:
            return self._absorb(node, args, kwargs, rewriter)
        if is_proxy_layer(layer):
            return self._fold_pn(node, args, kwargs, rewriter)
        if self.inference and isinstance(layer, _GROUP_NORM_LAYERS):
            if id(layer) not in self._inference_layers:
                self._inference_layers[id(layer)] = self._inference_form(layer)
                self._note(layer.name, layer.name, "replaced by its inference form "
                           "(InferenceGroupNormAct)")
            return self._inference_layers[id(layer)](args[0])
        if _graph.is_graph_model(layer) and any(map(self._folds, _backend.all_layers(layer))):
            folded = self._nested.get(id(layer))
            if folded is None:
                sub = _Folder(prefix=f"{self.prefix}{layer.name}/", inference=self.inference,
                              statistics=self.statistics)
                folded = self._nested[id(layer)] = sub.fold(layer)
                self.report.extend(sub.report)
            return rewriter.call_clone(layer, args, kwargs, clone=folded)[1]
        return rewriter.call_clone(layer, args, kwargs)[1]

    def _folds(self, layer):
        """Whether folding changes `layer` (a PN layer; with `inference`, any GN/LN/IN)."""
        return is_proxy_layer(layer) or (self.inference and isinstance(layer, _GROUP_NORM_LAYERS))

    def _inference_form(self, layer, scale=None, offset=None):
        return _inference_form(layer, scale, offset, statistics=self.statistics)

    def _without_proxy(self, layer, offset=None):
        if self.inference and isinstance(layer, _GROUP_NORM_LAYERS):
            return self._inference_form(layer, offset=offset)
        return _without_proxy(layer, offset=offset)

    # -- the PN layer ----------------------------------------------------------------------
    def _fold_pn(self, node, args, kwargs, rewriter):
        layer = node.operation
        mean, inv_std = (absorb.to_float64(t) for t in layer.proxy_statistics())
        scale, shift = inv_std, -mean * inv_std
        inference = self.inference and isinstance(layer, _GROUP_NORM_LAYERS)
        if self.graph.num_calls(layer) > 1:
            if inference:
                if id(layer) not in self._shared:
                    self._shared[id(layer)] = self._inference_form(layer, scale, shift)
                    self._note(layer.name, layer.name, "shared layer: inference form with "
                               "the proxy step as its output affine")
                return self._shared[id(layer)](args[0])
            if id(layer) not in self._shared:
                self._shared[id(layer)] = (_without_proxy(layer), _affine_layer(layer, scale, shift,
                                                                          "proxy_affine"))
                self._note(layer.name, layer.name,
                           "shared layer: proxy step kept as a ChannelAffine after each call")
            new, affine = self._shared[id(layer)]
            return affine(new(args[0]))
        if inference:
            # The affine rides in the inference form's own multiply-add (ReLU: maximum(z + b,
            # b); identity, leaky ReLU: in gamma/beta): free, where moving it into the next
            # conv adds a bias pass that XLA:CPU does not fuse (measured 1.24x vs 1.47x BN,
            # ResNet-50 112x112 batch 8, docs/benchmarks.md).
            self._note(layer.name, layer.name, "proxy step removed; its affine is the "
                       "inference form's output affine")
            return self._inference_form(layer, scale, shift)(args[0])
        rank = len(node.input_tensors[0].shape)
        axis = channel_axis(rank, layer.axis)
        branches = absorb.absorbing_branches(self.graph, node.outputs[0], rank, axis)
        if (branches is not None and not any(exact for _, _, exact in branches)
                and isinstance(layer, GroupNormAct)):
            # Every consumer needs the shift: it goes into the norm's own kernel.
            z = self._without_proxy(layer, offset=-mean)(args[0])
            for _, targets, _ in branches:
                for target in targets:
                    self.targets[id(target)] = (scale, None)
                    self._note(layer.name, target.operation.name,
                               "proxy step removed, affine folded: scale into kernel, shift -m "
                               "kept as the norm's output offset (zero padding on the way)")
            return z
        z = self._without_proxy(layer)(args[0])
        if branches is None:
            affine = _affine_layer(layer, scale, shift, "proxy_affine")
            self._note(layer.name, affine.layer.name,
                       "proxy step removed; output affine kept as a ChannelAffine (no single "
                       "linear layer absorbs it)")
            return affine(z)
        shifted = None
        for first, targets, exact in branches:
            if not exact:
                if shifted is None:
                    shifted = _affine_layer(layer, None, -mean, "proxy_shift")(z)
                rewriter.route(first, node.outputs[0], shifted)
            how = ("scale into kernel, shift into bias" if exact else
                   "scale into kernel, shift -m kept in front (zero padding on the way)")
            for target in targets:
                self.targets[id(target)] = (scale, shift if exact else None)
                self._note(layer.name, target.operation.name,
                           f"proxy step removed, affine folded: {how}")
        return z

    # -- the absorbing layer ---------------------------------------------------------------
    def _absorb(self, node, args, kwargs, rewriter):
        layer = node.operation
        scale, shift = self.targets[id(node)]
        # A bias only where the shift goes: a scale-only fold keeps a bias-free layer so.
        use_bias = layer.use_bias or shift is not None
        new = type(layer).from_config({**layer.get_config(), "use_bias": use_bias})
        outputs = new(*args, **kwargs)
        kernel, bias = absorb.fold_weights(layer, scale, shift)
        new.kernel.assign(kernel.astype(new.kernel.dtype))
        if use_bias:
            new.bias.assign(bias.astype(new.bias.dtype))
        return outputs


class _CopyOnFirstCall:
    """Calls `new`; after its first call (which builds it), copies weights into it."""

    def __init__(self, new, values):
        self.layer, self._values = new, values

    def __call__(self, x):
        y = self.layer(x)
        for name, value in self._values.items():
            weight = getattr(self.layer, name)
            weight.assign(np.asarray(value).astype(weight.dtype))
        self._values = {}
        return y


def _without_proxy(layer, offset=None):
    """The layer's norm + affine + activation without the proxy step, same gamma/beta.

    With `offset`, a `ShiftedGroupNormAct` that also adds it to the output.
    """
    if offset is not None:
        config_ = {k: v for k, v in layer.get_config().items()
                   if k != "proxy_norm" and not k.startswith("proxy_")}
        new = ShiftedGroupNormAct.from_config({**config_, "groups": layer.groups})
        pairs = (("gamma", layer.gamma), ("beta", layer.beta), ("offset", offset))
    elif isinstance(layer, ProxyNormAct):
        new = ChannelAffine(axis=layer.axis, scale=layer.scale, center=layer.center,
                            activation=layer.activation, name=layer.name,
                            dtype=layer.dtype_policy)
        pairs = (("gamma", layer.gamma), ("beta", layer.beta))
    else:
        new = type(layer).from_config({**layer.get_config(), "proxy_norm": False})
        pairs = (("gamma", layer.gamma), ("beta", layer.beta))
    return _CopyOnFirstCall(new, {k: keras.ops.convert_to_numpy(v) for k, v in pairs
                                  if v is not None})


def _inference_form(layer, scale=None, offset=None, statistics="auto"):
    """`InferenceGroupNormAct(statistics=statistics)` computing `scale * layer(x) + offset`.

    `layer` is a GN/LN/IN layer (its proxy step, if any, dropped) or a
    `ShiftedGroupNormAct` (its offset added to `offset`). A positive `scale` of a
    positively homogeneous activation (ReLU, leaky ReLU, identity) goes into gamma and beta.
    """
    channels = layer.gamma.shape[0] if layer.gamma is not None else (
        layer.beta.shape[0] if layer.beta is not None else None)
    if channels is None:
        channels = int(layer.input.shape[channel_axis(len(layer.input.shape), layer.axis)])
    gamma = absorb.to_float64(layer.gamma) if layer.gamma is not None else np.ones(channels)
    beta = absorb.to_float64(layer.beta) if layer.beta is not None else np.zeros(channels)
    if isinstance(layer, ShiftedGroupNormAct):
        own = absorb.to_float64(layer.offset)
        offset = own if offset is None else offset + (own if scale is None else scale * own)
    name = activations.fused_name(layer.activation)
    if scale is not None and name in HOMOGENEOUS and np.all(scale > 0):
        gamma, beta, scale = gamma * scale, beta * scale, None
    new = InferenceGroupNormAct(
        groups=layer.groups, activation=layer.activation, axis=layer.axis,
        epsilon=layer.epsilon, use_output_scale=scale is not None,
        use_output_offset=offset is not None, statistics=statistics, name=layer.name,
        dtype=layer.dtype_policy)
    values = {"gamma": gamma, "beta": beta, "output_scale": scale, "output_offset": offset}
    return _CopyOnFirstCall(new, {k: v for k, v in values.items() if v is not None})


def _affine_layer(layer, scale, offset, suffix):
    """A `ChannelAffine` with the given per-channel scale/offset (None: not used)."""
    new = ChannelAffine(axis=layer.axis, scale=scale is not None, center=offset is not None,
                        name=f"{layer.name}_{suffix}", dtype=layer.dtype_policy)
    return _CopyOnFirstCall(new, {k: v for k, v in (("gamma", scale), ("beta", offset))
                                  if v is not None})


def fold_for_inference(model, *, return_report=False, inference_layers=True,
                       statistics="auto"):
    """Returns an inference model with Proxy Normalization's output affine folded away.

    Every layer with `proxy_norm=True` (`GroupNormAct`, `LayerNormAct`, `InstanceNormAct`,
    `ProxyNormAct`) is replaced by the same norm + affine + activation without the proxy
    step (same `gamma`, `beta`; a `ChannelAffine` for `ProxyNormAct`). Its output affine
    `a * z + b`, `a = (v + eps)^-1/2`, `b = -m a`, is then:

    - folded into the next `Conv1D/2D/3D` (groups=1), `DepthwiseConv1D/2D` or `Dense`
      when every consumer leads to such a layer, called once, through only layers that
      commute with it (dropout/noise layers, which are identities at inference, poolings,
      crops, `Identity`, zero padding): kernel scaled per input channel by `a`, and
      `bias += sum(kernel * b)`. The bias fold is exact only when no zero padding
      lies between (a "valid" or 1x1 conv, a Dense, no `ZeroPadding` layer): a padded
      border sees 0 where the original model sees `b`. Otherwise only `a` goes into the
      kernel (exact since `0 * a = 0`) and the shift `b / a = -m` stays in front: as the
      output offset of the norm itself (`ShiftedGroupNormAct`, computed in the same
      kernel) when every consumer needs it, else as a `ChannelAffine` "..._proxy_shift"
      on the branches that need it;
    - otherwise (model output, residual addition, concatenation, shared layers, unknown
      layers) kept as a `ChannelAffine` "..._proxy_affine" after the layer.

    This is the form with `inference_layers=False`. With `inference_layers=True` (the
    default, and what `export_saved_model` uses), every GN/LN/IN layer,
    with or without PN, and every `ShiftedGroupNormAct` becomes an `InferenceGroupNormAct`:
    the same function at inference in few large TensorFlow ops (two sums over the
    positions, one multiply-add and the activation), the PN affine kept as its output
    scale and offset (no `ChannelAffine`, nothing moved into the next layer). It
    serves fastest on TensorFlow's graph executor, XLA and TFLite, but is inference-only
    (no gradient contract, no fused op). There the PN affine always stays in the layer
    (into gamma/beta for ReLU, leaky ReLU and identity; a ReLU's offset as
    `maximum(z + b, b)`): it costs no extra op, whereas a bias moved into the next conv
    costs XLA:CPU a pass.

    Every other layer is cloned with its weights; the original model is untouched. The
    result computes the same function as `model` at inference (training-mode dropout and
    noise are not reproduced). Nested functional/Sequential models are folded recursively.

    Args:
        model: a functional or built Sequential `keras.Model`.
        return_report: also return the list of `ConversionStep(old, new, action)`.
        inference_layers: replace the norm layers by their inference form (above; the
            default). `False` keeps trainable layers of the package (the fold described
            first), e.g. to fine-tune or to run the fused op on the folded model.
        statistics: the inference layers' `statistics` argument (`InferenceGroupNormAct`):
            "auto" (the default: exact at any offset, one scalar `cond` per layer and
            call), "shifted" (the same outputs without control flow: for TFLite) or "raw"
            (fastest, for inputs with group means near zero). Only with `inference_layers`.

    Returns:
        The folded model, or `(model, report)`.

    Raises:
        ValueError: for a subclassed model or an unbuilt Sequential model, an unknown
            `statistics`, or `statistics` other than "auto" without `inference_layers`.

    Example:

    >>> model, _ = tfpn.convert_model(keras.applications.ResNet50V2(weights=None))
    >>> inference_model = tfpn.fold_for_inference(model)
    """
    check_statistics(statistics)
    if statistics != "auto" and not inference_layers:
        raise ValueError("`statistics` chooses how the inference layers compute their "
                         "statistics and needs `inference_layers=True`. Received: "
                         f"statistics={statistics!r}, inference_layers={inference_layers!r}")
    folder = _Folder(inference=inference_layers, statistics=statistics)
    folded = folder.fold(model)
    return (folded, folder.report) if return_report else folded
