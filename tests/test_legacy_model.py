"""A `.keras` file saved by tf_proxynorm before the layer reorganization still loads and
computes the same outputs (fixture made by tests/fixtures/make_legacy_model.py)."""

import os

import keras
import numpy as np
import pytest

import tf_proxynorm as tfpn

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures")

# Weights renamed since the fixture was made (issue 24: `ChannelAffine` speaks gamma/beta
# as every other layer). A `.keras` file loads a layer's weights in their order, so the
# old values land in the new names: the recorded value of each old path is checked there.
RENAMED = {"channel_affine/scale": "channel_affine/gamma",
           "channel_affine/offset": "channel_affine/beta"}


@pytest.fixture(scope="module")
def expected():
    with np.load(os.path.join(FIXTURES, "legacy_model.npz")) as data:
        return dict(data)


def _load():
    return keras.saving.load_model(os.path.join(FIXTURES, "legacy_model.keras"))


def _assert_close(actual, wanted, what, slack=0.0):
    """rtol 1e-4, atol 1e-5 of the largest value, plus `slack` (elementwise) where the
    computation amplifies float32 rounding (see `_float32_slack`)."""
    actual = np.asarray(actual, np.float64)
    error = np.abs(actual - wanted)
    allowed = 1e-4 * np.abs(wanted) + 1e-5 * max(1.0, float(np.abs(wanted).max())) + slack
    bad = ~(error <= allowed)
    assert not bad.any(), (f"{what}: {bad.sum()} of {bad.size} elements differ, max "
                           f"{error.max():.3g}, worst {(error / allowed).max():.3g}x allowed")


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
        assert tfpn.ops.activations.fused_name(
            model.get_layer(name).get_config()["activation"]) == "relu", name


def _layer_inputs(model, expected, mode):
    """Each output layer with the input it saw when the fixture was made.

    The model is a chain: the input of output layer `i` is the recorded output `i - 1`
    (the head's, its global average pool). Each layer is checked on its own recorded
    input, so a float32 difference of another CPU's convolution or reductions upstream
    (1e-6) is not amplified through the chain (an InstanceNorm of nearly constant ReLU
    outputs turned it into 2e-4 on an AVX-512 Xeon): one layer is compared at a time.
    """
    previous = expected["x"]
    for i, name in enumerate(model.output_names):
        layer = model.get_layer(name)
        if isinstance(layer, keras.layers.Dense):
            previous = previous.astype(np.float64).mean(axis=(1, 2)).astype(np.float32)
        yield i, layer, previous
        previous = expected[f"{mode}/{i}"]


def _outputs(expected, mode, noise=0.0, seed=0):
    """A freshly loaded model and each output layer's output on its recorded input, each
    input multiplied by `1 + noise * N(0, 1)`."""
    model = _load()
    rng = np.random.default_rng(seed)
    outputs = []
    for _, layer, inputs in _layer_inputs(model, expected, mode):
        inputs = inputs * (1.0 + noise * rng.standard_normal(inputs.shape)).astype(np.float32)
        outputs.append(np.asarray(layer(inputs, training=mode == "training"), np.float64))
    return model, outputs


def _float32_slack(expected, mode, outputs):
    """How far each output moves when its input moves by float32 rounding (8 ulps), four
    times over: the part of a difference that another CPU's rounding order can cause.
    An InstanceNorm of nearly constant channels moves 1e-5 for an input change of 1e-6."""
    probes = [_outputs(expected, mode, noise=1e-6, seed=seed)[1] for seed in (1, 2)]
    return [4.0 * np.maximum(*(np.abs(p[i] - y) for p in probes))
            for i, y in enumerate(outputs)]


@pytest.mark.parametrize("mode", ["inference", "training"])
def test_legacy_model_outputs_and_state_match(expected, mode):
    """Each layer of the reloaded file, on the input it had when the fixture was made,
    computes the recorded output (and, in training, the recorded state update)."""
    model, outputs = _outputs(expected, mode)
    slack = _float32_slack(expected, mode, outputs)
    for i, (name, y) in enumerate(zip(model.output_names, outputs)):
        _assert_close(y, expected[f"{mode}/{i}"], f"output {i} ({name})", slack[i])
    if mode == "inference":
        return
    # Moving statistics, CBN buffers and step counter after one training call.
    stored = {RENAMED.get(k.split("/", 1)[1], k.split("/", 1)[1]): v
              for k, v in expected.items() if k.startswith("after_training/")}
    assert sorted(v.path for v in model.variables) == sorted(stored)
    for variable in model.variables:
        _assert_close(variable, stored[variable.path], variable.path)
