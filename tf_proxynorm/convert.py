"""Convert BatchNorm models to a batch-independent norm (GN+PN by default).

`convert_model` rebuilds a functional or Sequential Keras model with every
`keras.layers.BatchNormalization` (and `tf_proxynorm.BatchNormAct`) replaced by a norm +
activation layer from `get_norm_act_layer`. The activation that directly follows a BN (an
`Activation` or `ReLU` layer that is its only consumer) moves into the new layer, which
is where Proxy Normalization needs it. Every other layer is cloned with its weights.
"""

import collections

import keras

from tf_proxynorm import _backend, _graph
from tf_proxynorm.absorb import absorbing_branches
from tf_proxynorm.layers._args import check_int
from tf_proxynorm.layers.factory import resolve_norm_act
from tf_proxynorm.layers.norm_act import BatchNormAct, GroupNormAct
from tf_proxynorm.layers.proxy_norm_act import is_proxy_layer
from tf_proxynorm.ops import activations
from tf_proxynorm.ops.stats import largest_divisor_at_most

ConversionStep = collections.namedtuple("ConversionStep", ["old", "new", "action", "error"],
                                        defaults=(None,))
ConversionStep.__doc__ = """One line of `convert_model`'s report: layer names and what happened.

`error`: with `calibration_data`, the relative error `||f' - f|| / ||f||` of the layer's
output against the BN model's on the calibration data (None otherwise)."""

# Overrides for a BN that no activation follows (e.g. before a residual addition): the
# spec's "norm with scale and no shift" (Graphcore's choice for projection convs).
LINEAR_NORM_DEFAULTS = {"activation": None, "center": False, "proxy_norm": False}


def _is_batch_norm(layer):
    return isinstance(layer, (keras.layers.BatchNormalization, BatchNormAct))


def _relu_layer_activation(layer):
    """The activation a `ReLU` layer computes, as a norm layer takes it, or None."""
    cfg = layer.get_config()
    max_value, slope, threshold = cfg["max_value"], cfg["negative_slope"], cfg["threshold"]
    if threshold:
        return None
    if max_value is None and not slope:
        return "relu"
    if max_value is None and slope == activations.LEAKY_RELU_SLOPE:
        return "leaky_relu"
    if max_value == 6.0 and not slope:
        return keras.activations.relu6
    return None


def _following_activation(layer):
    """The activation of an `Activation`/`ReLU` layer as a norm layer takes it, or None."""
    if type(layer) is keras.layers.ReLU:
        return _relu_layer_activation(layer)
    if type(layer) is keras.layers.Activation:
        name = layer.get_config()["activation"]
        if isinstance(name, str) and activations.fused_name(name) is not None:
            return activations.fused_name(name)
        return layer.activation
    return None


_ACTIVATION_LAYERS = (keras.layers.Activation, keras.layers.ReLU, keras.layers.LeakyReLU,
                      keras.layers.ELU, keras.layers.PReLU, keras.layers.Softmax)


def _is_identity(activation):
    return activations.fused_name(activation) == "identity"


class _Converter:
    def __init__(self, norm, norm_kwargs, copy_affine, linear_kwargs, prefix="",
                 calibrating=False):
        self.norm, self.norm_kwargs, self.copy_affine = norm, norm_kwargs, copy_affine
        self.linear_kwargs = linear_kwargs
        self.calibrating = calibrating
        self.make = resolve_norm_act(norm, **norm_kwargs)
        probe = self.make()
        if calibrating and not isinstance(probe, GroupNormAct):
            raise ValueError(
                "convert_model calibrates GroupNorm, LayerNorm and InstanceNorm (+PN) layers "
                "(`GroupNormAct` and its subclasses), whose per-channel affine it fits; "
                f"{norm!r} makes a {type(probe).__name__}. Received: norm={norm!r} with "
                "calibration_data")
        self.has_proxy = bool(getattr(probe, "proxy_norm", False))
        self.groups = probe.groups if "groups" in probe.get_config() else None
        self.prefix = prefix
        self.report = []
        self.pairs = []       # calibrate.Pair per replaced BN, in topological order
        self._targets = {}    # id(node absorbing PN's affine) -> (Pair, bias exact)
        self._nested = {}

    def _note(self, old, new, action):
        self.report.append(ConversionStep(self.prefix + old, self.prefix + new, action))

    def convert(self, model):
        graph = _graph.Graph(model, "convert_model")
        self.graph = graph
        self.folded = {}   # id(activation node) -> new norm output
        new_model = graph.rebuild(self._call_node)
        if not model.trainable:        # a frozen (nested) model stays frozen
            new_model.trainable = False
        return new_model

    def _call_node(self, node, args, kwargs, rewriter):
        layer = node.operation
        if id(node) in self.folded:
            return self.folded[id(node)]
        if id(node) in self._targets:
            return self._absorbing_clone(node, args, kwargs, rewriter)
        if _is_batch_norm(layer):
            return self._replace_bn(node, args, kwargs, rewriter)
        if isinstance(layer, keras.layers.Layer) and any(
                map(_is_batch_norm, _backend.all_layers(layer))):
            if _graph.is_graph_model(layer):
                return self._nested_model(layer, args, kwargs, rewriter)
            kind = "nested subclassed model" if isinstance(layer, keras.Model) else "layer"
            raise ValueError(
                f"convert_model cannot convert the BatchNormalization layers inside the {kind} "
                f"{layer.name!r} (class {type(layer).__name__}): only the layers of functional "
                "and Sequential models are rewritten. "
                f"Received: model with nested layer {layer.name!r}")
        return rewriter.call_clone(layer, args, kwargs)[1]

    def _nested_model(self, layer, args, kwargs, rewriter):
        converted = self._nested.get(id(layer))
        if converted is None:
            if self.calibrating and self.graph.num_calls(layer) > 1:
                raise ValueError(
                    f"convert_model cannot calibrate the nested model {layer.name!r}: it is "
                    f"called {self.graph.num_calls(layer)} times, and each call sees other "
                    "inputs. Convert without `calibration_data`, or give each call its own "
                    f"model. Received: model with shared nested model {layer.name!r}")
            sub = _Converter(self.norm, self.norm_kwargs, self.copy_affine, self.linear_kwargs,
                             prefix=f"{self.prefix}{layer.name}/", calibrating=self.calibrating)
            converted = sub.convert(layer)
            for pair in sub.pairs:
                pair.chain.insert(0, (layer, converted))
                pair.step += len(self.report)
            self.report.extend(sub.report)
            self.pairs.extend(sub.pairs)
            self._nested[id(layer)] = converted
        return rewriter.call_clone(layer, args, kwargs, clone=converted)[1]

    def _replace_bn(self, node, args, kwargs, rewriter):
        bn = node.operation
        if self.graph.num_calls(bn) > 1:
            raise ValueError(
                f"convert_model cannot convert the BatchNormalization layer {bn.name!r}: it is "
                f"shared between {self.graph.num_calls(bn)} calls in the model, and each call "
                "may need a different replacement. Give each call its own layer. "
                f"Received: model with shared layer {bn.name!r}")
        x = node.input_tensors[0]
        axis = bn.axis if isinstance(bn.axis, int) else bn.axis[0]
        channels = x.shape[axis]
        activation = bn.activation if isinstance(bn, BatchNormAct) else None
        follower = None
        if activation is None or _is_identity(activation):
            consumer = self.graph.only_consumer(node.outputs[0])
            if consumer is not None and self.graph.num_calls(consumer.operation) == 1:
                found = _following_activation(consumer.operation)
                if found is not None:
                    activation, follower = found, consumer
        linear = activation is None or _is_identity(activation)
        kwargs_new = {"axis": axis, "activation": activation, "center": bn.center,
                      "scale": bn.scale, "name": bn.name, "dtype": bn.dtype_policy,
                      "trainable": bn.trainable}
        kwargs_new = {k: v for k, v in kwargs_new.items() if k not in self.norm_kwargs}
        unmerged = []
        if linear:
            overrides = dict(LINEAR_NORM_DEFAULTS, **self.linear_kwargs)
            if not self.has_proxy and "proxy_norm" not in self.linear_kwargs:
                overrides.pop("proxy_norm")
            # An activation that stays a separate layer needs the BN's shift in front of it.
            consumers = self.graph.consumers_of(node.outputs[0])
            unmerged = [] if "center" in self.linear_kwargs else [
                c.operation.name for c in consumers if isinstance(c.operation, _ACTIVATION_LAYERS)]
            if unmerged or (self.calibrating and "center" not in self.linear_kwargs):
                # Calibration reproduces the BN's output, shift included.
                overrides.pop("center")
            kwargs_new.update(overrides)
        note = ""
        if self.groups not in (None, -1) and channels % self.groups:
            groups = largest_divisor_at_most(channels, self.groups)
            kwargs_new["groups"] = groups
            note = f"; groups={groups} (largest divisor of {channels} channels <= {self.groups})"
        new = self.make(**kwargs_new)
        # BatchNormalization's call also takes `mask`, which a norm layer only propagates.
        outputs = new(args[0], **{k: v for k, v in kwargs.items() if k == "training"})
        if self.copy_affine:
            for name in ("gamma", "beta"):
                old_w, new_w = getattr(bn, name, None), getattr(new, name, None)
                if old_w is not None and new_w is not None:
                    new_w.assign(old_w)
        role = "norm+act"
        if linear:
            role = ("linear norm (no activation follows)" if not unmerged else
                    f"linear norm with its shift (the activation {', '.join(unmerged)} "
                    "stays a separate layer)")
        self._note(bn.name, new.name,
                   f"{type(bn).__name__} -> {type(new).__name__} as {role}: {_describe(new)}{note}")
        if follower is not None:
            act = follower.operation
            self._note(act.name, new.name,
                       f"{type(act).__name__} folded into {new.name!r} (removed)")
        if self.calibrating:
            outputs = self._plan_calibration(node, follower, bn, new, outputs, rewriter)
        if follower is not None:
            self.folded[id(follower)] = outputs
        return outputs

    # -- calibration: where PN's output affine will be undone -----------------------------
    def _plan_calibration(self, node, follower, bn, new, outputs, rewriter):
        """Records the BN/new pair; for a PN layer, builds the graph that lets calibration
        undo PN's output affine `z = (act - m) / s` where the BN model had `act`."""
        from tf_proxynorm.calibrate import Pair
        from tf_proxynorm.layers.channel_affine import ChannelAffine
        from tf_proxynorm.ops.stats import channel_axis

        pair = Pair(bn, new, self.prefix + new.name, len(self.report) - 1 - (follower is not None))
        self.pairs.append(pair)
        if not is_proxy_layer(new):
            return outputs
        tensor = (follower or node).outputs[0]      # what the next layers consume
        rank = len(tensor.shape)
        # The consumers fold_for_inference would fold PN's affine into (its rules).
        branches = absorbing_branches(self.graph, tensor, rank, channel_axis(rank, new.axis))
        if branches is None:
            pair.inverse = ChannelAffine(axis=new.axis, name=f"{new.name}_calibration_affine",
                                         dtype=new.dtype_policy)
            self._note(new.name, pair.inverse.name,
                       "calibration: PN's output affine undone by this ChannelAffine (no "
                       "single linear layer takes it)")
            return pair.inverse(outputs)
        shifted = None
        for first, targets, exact in branches:
            if not exact:
                if shifted is None:
                    pair.shift = ChannelAffine(axis=new.axis, scale=False,
                                               name=f"{new.name}_calibration_shift",
                                               dtype=new.dtype_policy)
                    shifted = pair.shift(outputs)
                rewriter.route(first, tensor, shifted)
            for target in targets:
                self._targets[id(target)] = (pair, exact)
                how = ("scale into kernel, shift into bias" if exact else "scale into kernel, "
                       f"shift in {pair.shift.name!r} (zero padding on the way)")
                self._note(new.name, target.operation.name,
                           f"calibration: PN's output affine undone in {how}")
        return outputs

    def _absorbing_clone(self, node, args, kwargs, rewriter):
        """The clone of a layer that will take PN's output affine (with a bias if needed)."""
        pair, exact = self._targets[id(node)]
        layer = node.operation
        use_bias = layer.use_bias or exact
        new = type(layer).from_config({**layer.get_config(), "use_bias": use_bias})
        outputs = rewriter.call_clone(layer, args, kwargs, clone=new)[1]
        new.kernel.assign(layer.kernel)
        if layer.use_bias:
            new.bias.assign(layer.bias)
        pair.targets.append((layer, new, exact))
        return outputs


def _describe(layer):
    cfg = layer.get_config()
    keys = ("groups", "activation", "proxy_norm", "center", "scale")
    return ", ".join(f"{k}={cfg[k]!r}" for k in keys if k in cfg)


def convert_model(model, norm="gn+pn", *, copy_affine=True, calibration_data=None,
                  calibration_steps=0, linear_kwargs=None, **norm_kwargs):
    """Rebuilds a BatchNorm model with a batch-independent norm + activation (GN+PN default).

    Every `keras.layers.BatchNormalization` and `tf_proxynorm.BatchNormAct` layer becomes
    `get_norm_act_layer(norm, **norm_kwargs)`:

    - BN -> `Activation`/`ReLU` (the activation is the BN's only consumer and is not
      shared): one norm + activation layer, e.g. GN -> affine -> ReLU -> Proxy Norm. Fused
      activations go by name; other `Activation` functions and `ReLU(max_value=6)`
      (`relu6`) are passed as callables (reference path only); a `ReLU` with a
      threshold or other slopes stays a separate layer.
    - BN with no such activation after it (before a residual addition, a projection conv,
      pooling, the output): a "linear" norm with scale and no shift, i.e.
      `activation=None, center=False, proxy_norm=False` (spec section 5), overridable with
      `linear_kwargs`. When an activation layer that cannot move into the norm consumes
      the BN's output (it is not the only consumer, or a `ReLU` with a threshold), the
      linear norm keeps the BN's shift (`center`): the activation needs it.

    The new layer keeps the BN's name, axis, dtype policy and trainable flag, and takes
    the BN's `center`/`scale` unless `norm_kwargs` sets them. The norm's own `epsilon`
    default applies (1e-3; BN epsilons are tuned for batch statistics). Every other layer
    is cloned with a copy of its weights: the new model shares nothing with the old one
    and is not compiled. Nested functional/Sequential models are converted recursively.

    Group count rule: when `groups` (default 32 for GroupNorm) does not divide a layer's
    channel count C, that layer uses the largest divisor of C that is <= `groups` (as the
    official EvoNorm code); e.g. MobileNetV2's 24 channels with 32 groups get 24 groups,
    144 channels get 24, EfficientNet's 40 get 20. Each adjustment is in the report.

    Args:
        model: a functional or built Sequential `keras.Model`.
        norm: a registered norm name (`"gn+pn"`, `"ln+pn"`, `"gn"`, ...), a layer class or
            a callable returning a layer (see `tf_proxynorm.resolve_norm_act`).
        copy_affine: copy each BN's trained `gamma`/`beta` into the new layer's (the
            default: useful to fine-tune a trained BN model, and a no-op for an untrained
            one since both initialize to 1/0). `False` keeps the new layer's initializers
            (defensible since GN and BN statistics differ).
        calibration_data: inputs of `model` (a few hundred: a NumPy array, a
            `tf.data.Dataset` or any iterable of batches, `x` or `(x, y, ...)` tuples) to
            calibrate on: layer by layer in topological order, each new norm's per-channel
            `gamma`/`beta` become the least-squares fit of the BN model's pre-activation on
            the norm's normalized output (its input taken from the converted model, whose
            earlier layers are already calibrated); PN's proxy takes the observed
            per-channel mean/std of that output, and PN's output affine is undone where
            `fold_for_inference` could fold it (next Conv/DepthwiseConv/Dense kernel and
            bias; the shift in a `ChannelAffine` in front of a zero-padded conv; a
            `ChannelAffine` inverse where no linear layer takes it). Linear norms keep
            the BN's shift. GroupNorm/LayerNorm/InstanceNorm (+PN) norms only; see
            `tf_proxynorm/calibrate.py` and docs/finetune.md.
        calibration_steps: after that layer-wise fit, train the parameters it set (the new
            norms' `gamma`/`beta`/proxy parameters and the `ChannelAffine` layers; every
            other weight frozen) for this many steps so that the converted model's outputs
            match the BN model's on `calibration_data` (mean squared error, Adam, cosine
            learning rate from 3e-3, batch 64, inference mode; no labels needed). `0`
            (default) skips it. The layer-wise fit leaves what a per-layer affine cannot
            represent; on the CIFAR ResNet-20 of docs/finetune.md, 800 steps on 256 images
            took task-A accuracy from 85.4% to 89.4%, the BN models' own (3 seeds). Costs
            `calibration_steps` training steps of the model. The distilled model also
            fine-tunes like the BN model; to fine-tune at batch 2, the layer-wise fit alone
            did better there.
        linear_kwargs: overrides of `LINEAR_NORM_DEFAULTS` for BNs no activation follows
            (e.g. `{"center": True}` keeps the shift).
        **norm_kwargs: arguments of the norm layers (`groups=16`, `epsilon=1e-5`, ...).

    Returns:
        `(new_model, report)`: the report is a list of `ConversionStep(old, new, action)`,
        one per replaced BN and per activation folded into it (names in nested models
        are prefixed `"submodel/"`). With `calibration_data`, each BN's line has `error`,
        the relative error `||f' - f|| / ||f||` of the layer's output (after its
        activation, PN's affine undone) against the BN model's on the calibration data;
        lines say where PN's affine went; the last line is the model's outputs' error
        (after distillation with `calibration_steps`, and a line before it gives the
        error of the layer-wise fit alone).

    Raises:
        ValueError: for a subclassed model (also nested, if it holds BN layers), a layer
            wrapping a BN (e.g. `TimeDistributed(BatchNormalization())`), a Sequential model
            without a known input shape, a BN layer called more than once in the model, or
            an unknown norm name / argument; with `calibration_data`: data that is not
            batches of the model's (single) input, a norm other than GN/LN/IN(+PN), a
            nested model called more than once; a `calibration_steps` that is not an
            integer >= 0, or > 0 without `calibration_data`.

    Example:

    >>> base = keras.applications.ResNet50V2(weights=None, input_shape=(64, 64, 3))
    >>> model, report = tfpn.convert_model(base, "gn+pn", groups=32)
    >>> report[0]
    ConversionStep(old='conv2_block1_preact_bn', new='conv2_block1_preact_bn', action=...)
    """
    calibration_steps = check_int("calibration_steps", calibration_steps, lambda n: n >= 0,
                                  "an integer >= 0 (the distillation steps after calibration)")
    if calibration_steps and calibration_data is None:
        raise ValueError("`calibration_steps` distills on `calibration_data`, which is None. "
                         "Pass calibration_data=<a few hundred inputs>. Received: "
                         f"calibration_steps={calibration_steps!r}, calibration_data=None")
    batches = None
    if calibration_data is not None:
        from tf_proxynorm import calibrate

        _graph.check_graph_model(model, "convert_model")
        batches = calibrate.input_batches(model, calibration_data)
    converter = _Converter(norm, norm_kwargs, copy_affine, dict(linear_kwargs or {}),
                           calibrating=batches is not None)
    new_model = converter.convert(model)
    if batches is None:
        return new_model, converter.report
    errors, output_error = calibrate.calibrate(model, new_model, converter.pairs, batches)
    report = list(converter.report)
    for pair, error in zip(converter.pairs, errors):
        report[pair.step] = report[pair.step]._replace(error=error)
    inputs = sum(len(b) for b in batches)
    report.append(ConversionStep(model.name, new_model.name,
                                 f"calibrated on {inputs} inputs: "
                                 "relative error of the model's outputs", output_error))
    if calibration_steps:
        from tf_proxynorm import distill

        distill.distill(model, new_model, converter.pairs, batches, calibration_steps)
        report.append(ConversionStep(
            model.name, new_model.name,
            f"distilled {calibration_steps} steps on {inputs} inputs: relative error of "
            "the model's outputs", calibrate.output_error(model, new_model, batches)))
    return new_model, report
