"""A `.keras` file saved by tf_proxynorm before the layer reorganization still loads and
computes the same outputs (fixture made by tests/fixtures/make_legacy_model.py)."""

import os

import keras
import numpy as np
import pytest

import tf_proxynorm as tfpn

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")


@pytest.fixture(scope="module")
def expected():
    with np.load(os.path.join(FIXTURES, "legacy_model.npz")) as data:
        return dict(data)


def _load():
    return keras.saving.load_model(os.path.join(FIXTURES, "legacy_model.keras"))


def _assert_close(actual, wanted, what):
    actual = np.asarray(actual, np.float64)
    scale = max(1.0, float(np.abs(wanted).max()))
    np.testing.assert_allclose(actual, wanted, rtol=1e-4, atol=1e-5 * scale, err_msg=what)


def test_legacy_model_loads_with_the_same_layers():
    model = _load()
    types = {layer.name: type(layer) for layer in model.layers}
    assert types["cbn_conv"] is tfpn.CBNConv2D
    assert types["iebn"] is tfpn.InstanceEnhancementBatchNormalization
    assert types["channel_affine"] is tfpn.layers.ChannelAffine
    assert types["shifted_gn"] is tfpn.layers.ShiftedGroupNormAct
    # The files spelled the activation of the `...Normalization` layers out: they keep
    # ReLU although the classes now default to none.
    for name in ("cbn_conv", "iebn", "bgn"):
        assert tfpn.ops.activations.canonical_name(
            model.get_layer(name).get_config()["activation"]) == "relu", name


def test_legacy_model_inference_outputs_match(expected):
    model = _load()
    outputs = model(expected["x"], training=False)
    for i, (layer, y) in enumerate(zip(model.output_names, outputs)):
        _assert_close(y, expected[f"inference/{i}"], f"output {i} ({layer})")


def test_legacy_model_training_outputs_and_state_match(expected):
    model = _load()
    outputs = model(expected["x"], training=True)
    for i, (layer, y) in enumerate(zip(model.output_names, outputs)):
        _assert_close(y, expected[f"training/{i}"], f"output {i} ({layer})")
    # Moving statistics, CBN buffers and step counter after one training call.
    stored = {k.split("/", 1)[1]: v for k, v in expected.items()
              if k.startswith("after_training/")}
    assert sorted(v.path for v in model.variables) == sorted(stored)
    for variable in model.variables:
        _assert_close(variable, stored[variable.path], variable.path)
