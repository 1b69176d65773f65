"""Norm + activation layers by name: `get_norm_act_layer("gn+pn", groups=16)`.

Names are case-insensitive; `-` and `_` are interchangeable. Model builders store the
name in their config and resolve it once with `resolve_norm_act`. Every name builds a
norm followed by ReLU unless told otherwise (`activation=...`): classes named `...Act`
(and EvoNorm, whose nonlinearity is its own) apply an activation by default, classes named
`...Normalization` do not (as Keras'), so their names pass `activation="relu"`.
"""

import importlib
import inspect

from tf_proxynorm.layers.batch_group_norm import BatchGroupNormalization
from tf_proxynorm.layers.cross_iteration_bn import CrossIterationBatchNormalization
from tf_proxynorm.layers.evonorm import EvoNormB0, EvoNormS0
from tf_proxynorm.layers.iebn import InstanceEnhancementBatchNormalization
from tf_proxynorm.layers.norm_act import (BatchNormAct, GroupNormAct, InstanceNormAct,
                                          LayerNormAct)
from tf_proxynorm.layers.proxy_norm_act import ProxyNormAct

# name -> (layer class, default keyword arguments). `register_norm_act` may also add a
# "module:Class" path, imported on first use.
_REGISTRY = {
    "bn": (BatchNormAct, {}),
    "ln": (LayerNormAct, {}),
    "gn": (GroupNormAct, {}),
    "in": (InstanceNormAct, {}),
    "ln+pn": (LayerNormAct, {"proxy_norm": True}),
    "gn+pn": (GroupNormAct, {"proxy_norm": True}),
    "in+pn": (InstanceNormAct, {"proxy_norm": True}),
    "pn": (ProxyNormAct, {}),
    "evonorm_b0": (EvoNormB0, {}),
    "evonorm_s0": (EvoNormS0, {}),
    # `...Normalization` classes default to no activation (Keras' naming); their names
    # here build norm + ReLU, as "bn" does.
    "iebn": (InstanceEnhancementBatchNormalization, {"activation": "relu"}),
    "bgn": (BatchGroupNormalization, {"activation": "relu"}),
    # Needs its conv: model builders apply conv + norm through `conv_norm_layers`.
    "cbn": (CrossIterationBatchNormalization, {"activation": "relu"}),
}


def canonical_name(name):
    """The registry key of a name: case, spaces and "-" vs "_" do not matter."""
    return name.strip().lower().replace("-", "_") if isinstance(name, str) else name


def register_norm_act(name, target, **defaults):
    """Registers `name` for a layer class (or "module:Class" path) with default kwargs."""
    _REGISTRY[canonical_name(name)] = (target, defaults)


def available_norm_acts():
    """The registered names."""
    return sorted(_REGISTRY)


def lookup(name):
    """`(layer class, default kwargs)` registered for `name` (ValueError naming it if none)."""
    entry = _REGISTRY.get(canonical_name(name))
    if entry is None:
        raise ValueError(
            f"Unknown normalization name. Expected one of {available_norm_acts()}. "
            f"Received: norm={name!r}")
    target, defaults = entry
    if isinstance(target, str):   # a "module:Class" path from `register_norm_act`
        module, cls = target.split(":")
        target = getattr(importlib.import_module(module), cls)
    return target, defaults


def _check_kwargs(cls, kwargs, name):
    """Raises on keyword arguments the layer class would not accept."""
    params = {}
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params.update(inspect.signature(init).parameters)
        if klass.__module__.startswith("keras"):
            break
    allowed = {p for p in params if p not in ("self", "kwargs")} | {
        "name", "dtype", "trainable", "autocast", "input_dim", "input_shape"}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(
            f"Unknown keyword arguments for normalization {name!r} ({cls.__name__}). "
            f"Received: {', '.join(f'{k}={kwargs[k]!r}' for k in unknown)}")


def get_norm_act_layer(norm, /, **kwargs):
    """Creates a norm + activation layer from its registered name.

    Args:
        norm: one of `available_norm_acts()`, e.g. `"bn"`, `"ln"`, `"gn"`, `"in"`,
            `"ln+pn"`, `"gn+pn"`, `"in+pn"`.
        **kwargs: arguments of the layer (override the name's defaults).

    Returns:
        A new layer.

    Raises:
        ValueError: for an unknown name or an argument the layer does not take.
    """
    return resolve_norm_act(norm, **kwargs)()


def resolve_norm_act(norm, /, **defaults):
    """Returns a callable `(**overrides) -> Layer` for a name, a layer class or a callable.

    Unknown names and (for names and classes) unknown arguments raise here, once.
    """
    if isinstance(norm, str):
        cls, name_defaults = lookup(norm)
        defaults = {**name_defaults, **defaults}
        _check_kwargs(cls, defaults, norm)
    elif inspect.isclass(norm):
        cls = norm
        _check_kwargs(cls, defaults, norm.__name__)
    elif callable(norm):
        return lambda **overrides: norm(**{**defaults, **overrides})
    else:
        raise ValueError(
            "`norm` must be a registered name, a layer class or a callable returning a layer. "
            f"Received: norm={norm!r}")

    def make(**overrides):
        kwargs = {**defaults, **overrides}
        _check_kwargs(cls, kwargs, getattr(norm, "__name__", norm))
        return cls(**kwargs)

    return make
