"""Bool and int constructor arguments of every layer reject values of another type (issue 25).

`proxy_norm="no"` used to turn Proxy Norm on (`bool("no")` is True) and `groups=2.5` could
pass as a count. Every flag now takes Python or NumPy bools only, every count Python or
NumPy integers only (not bools, not floats such as `2.0`, not strings), with a Keras-style
error that names the argument and the value received:
``ValueError: `proxy_norm` must be a bool. Received: proxy_norm='no'``.
"""

import inspect
import re

import keras
import numpy as np
import pytest

import tf_proxynorm as tfpn
from tf_proxynorm import layers as L
from tf_proxynorm.layers.inference_norm import InferenceGroupNormAct

# Every layer class of tf_proxynorm.layers: (required arguments, bool args, int args
# with a valid value).
LAYERS = {
    L.GroupNormAct: ({"groups": 2}, ("proxy_norm", "center", "scale"),
                     {"groups": 2, "axis": -1}),
    L.LayerNormAct: ({}, ("proxy_norm", "center", "scale"), {"axis": -1}),
    L.InstanceNormAct: ({}, ("proxy_norm", "center", "scale"), {"axis": -1}),
    L.ShiftedGroupNormAct: ({"groups": 2}, ("center", "scale"), {"groups": 2, "axis": -1}),
    L.BatchNormAct: ({}, ("synchronized", "center", "scale"), {"axis": -1}),
    L.ProxyNormAct: ({}, ("center", "scale"), {"axis": -1}),
    L.ChannelAffine: ({}, ("center", "scale"), {"axis": -1}),
    L.EvoNormS0: ({}, ("center", "scale"), {"groups": 2, "group_size": 2, "axis": -1}),
    L.EvoNormB0: ({}, ("center", "scale"), {"axis": -1}),
    L.BatchGroupNormalization: ({}, ("synchronized", "center", "scale"),
                                {"groups": 2, "axis": -1}),
    L.InstanceEnhancementBatchNormalization: ({}, ("synchronized", "center", "scale"),
                                              {"axis": -1}),
    L.CrossIterationBatchNormalization: ({}, ("center", "scale"),
                                         {"window_size": 2, "burnin_steps": 3, "axis": -1}),
    L.CBNConv2D: ({"filters": 4, "kernel_size": 3}, ("center", "scale", "use_bias"),
                  {"window_size": 2, "burnin_steps": 3, "groups": 1}),
    L.WSConv2D: ({"filters": 4, "kernel_size": 3}, (), {}),
    InferenceGroupNormAct: ({}, ("use_output_scale", "use_output_offset"),
                            {"groups": 2, "axis": -1}),
}

BAD_BOOLS = ["no", "false", "", 1, 0, 1.0, None]
BAD_INTS = [2.0, 2.5, "2", True, None]

BOOL_CASES = [(cls, arg) for cls, (_, bools, _) in LAYERS.items() for arg in bools]
INT_CASES = [(cls, arg) for cls, (_, _, ints) in LAYERS.items() for arg in ints]


def _id(case):
    return f"{case[0].__name__}-{case[1]}"


def _make(cls, **kwargs):
    required, _, _ = LAYERS[cls]
    return cls(**{**required, **kwargs})


def _message(name, value):
    return rf"`{name}` must be .*Received: {re.escape(f'{name}={value!r}')}$"


@pytest.mark.parametrize("value", BAD_BOOLS, ids=repr)
@pytest.mark.parametrize("case", BOOL_CASES, ids=_id)
def test_bool_arguments_reject_non_bools(case, value):
    cls, name = case
    with pytest.raises(ValueError, match=_message(name, value)) as info:
        _make(cls, **{name: value})
    assert "must be a bool" in str(info.value)


@pytest.mark.parametrize("case", BOOL_CASES, ids=_id)
@pytest.mark.parametrize("value", [False, np.bool_(False), True, np.True_], ids=repr)
def test_bool_arguments_take_python_and_numpy_bools(case, value):
    cls, name = case
    layer = _make(cls, **{name: value})
    stored = getattr(layer, name, None)
    if stored is None:   # CrossIterationBatchNormalization keeps its arguments for the conv
        stored = layer.get_config()[name]
    assert stored is bool(value)


@pytest.mark.parametrize("value", BAD_INTS, ids=repr)
@pytest.mark.parametrize("case", INT_CASES, ids=_id)
def test_int_arguments_reject_non_ints(case, value):
    cls, name = case
    if value is None and name in ("groups", "group_size") and cls is L.EvoNormS0:
        pytest.skip("None is EvoNormS0's default (the official grouping rule)")
    with pytest.raises(ValueError, match=_message(name, value)):
        _make(cls, **{name: value})


@pytest.mark.parametrize("case", INT_CASES, ids=_id)
def test_int_arguments_take_numpy_ints(case):
    cls, name = case
    good = LAYERS[cls][2][name]
    layer = _make(cls, **{name: np.int64(good)})
    config = layer.get_config()
    value = config[name] if name in config else getattr(layer, name)
    assert type(value) is int and value == good   # JSON-serializable


def test_every_layer_class_and_flag_is_covered():
    """Every layer class of `tf_proxynorm.layers`, and every argument of its constructor
    chain with a bool default, is in `LAYERS` (a new flag gets a test)."""
    classes = {obj for module in (L, L.inference_norm) for obj in vars(module).values()
               if isinstance(obj, type) and issubclass(obj, keras.layers.Layer)
               and obj.__module__.startswith("tf_proxynorm")}
    assert classes == set(LAYERS), classes ^ set(LAYERS)
    for cls, (_, bools, _) in LAYERS.items():
        flags = set()
        for klass in cls.__mro__:
            if not klass.__module__.startswith("tf_proxynorm"):
                continue
            for p in inspect.signature(klass.__init__).parameters.values():
                if isinstance(p.default, bool):
                    flags.add(p.name)
        assert flags <= set(bools), (cls.__name__, flags - set(bools))


def test_the_issue_example():
    with pytest.raises(ValueError) as info:
        tfpn.GroupNormAct(groups=4, proxy_norm="no")
    assert str(info.value) == "`proxy_norm` must be a bool. Received: proxy_norm='no'"
