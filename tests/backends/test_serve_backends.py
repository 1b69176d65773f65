"""The serving form `InferenceGroupNormAct` on the running Keras backend against the float64
NumPy reference (`tests/reference.py`), eagerly and compiled (`model.predict` with
`jit_compile=JIT_COMPILE`: XLA on TensorFlow and JAX).

Its statistics come two ways (`tf_proxynorm.layers.inference_norm`): raw sums when every
group's mean is within `RAW_MEAN_RATIO ** 0.5` standard deviations of zero, shifted sums
otherwise (and maps smaller than `RAW_MIN_SIZE` always shifted, without the `cond`). Each
way is tested on its own (the layer's `statistics="raw"` / `"shifted"`) and as routed by the
`cond` (`"auto"`), and an input of mean 1e4 shows that the routing matters: the raw sums
lose it.
"""

import keras
import numpy as np
import pytest

import reference as R
from backend_helpers import JIT_COMPILE, to_numpy
from tf_proxynorm.layers import InferenceGroupNormAct
from tf_proxynorm.layers import inference_norm

CHANNELS = 8


@pytest.fixture(autouse=True)
def _cond_at_every_size(monkeypatch):
    """These maps are below `RAW_MIN_SIZE` (which sends small maps to the shifted form
    without a `cond`): lift it, so that "auto" runs the `cond`."""
    monkeypatch.setattr(inference_norm, "RAW_MIN_SIZE", 0)


def _layer_and_reference(rng, groups, axis, shape, statistics="auto"):
    layer = InferenceGroupNormAct(groups=groups, activation="relu", axis=axis, epsilon=1e-3,
                                  use_output_offset=True, statistics=statistics)
    layer.build(shape)
    values = {"gamma": 1.0 + 0.3 * rng.standard_normal(CHANNELS),
              "beta": 0.3 * rng.standard_normal(CHANNELS),
              "output_offset": 0.3 * rng.standard_normal(CHANNELS)}
    for name, value in values.items():
        getattr(layer, name).assign(value.astype("float32"))
    per_channel = [1] * len(shape)
    per_channel[axis] = CHANNELS

    def reference(x):
        y = R.group_norm_act(x.astype(np.float64), groups, axis=axis, activation="relu",
                             epsilon=1e-3, gamma=values["gamma"], beta=values["beta"])
        return y + values["output_offset"].reshape(per_channel)
    return layer, reference


def _outputs(layer, x):
    """The layer's output eagerly and through a compiled `predict`."""
    inputs = keras.Input(x.shape[1:])
    model = keras.Model(inputs, layer(inputs))
    model.compile(jit_compile=JIT_COMPILE)
    return to_numpy(layer(x)), to_numpy(model.predict_on_batch(x))


@pytest.mark.parametrize("statistics", ["auto", "shifted", "raw"])
@pytest.mark.parametrize("mean", [0.0, 3.5])
@pytest.mark.parametrize("groups,axis", [(1, -1), (2, -1), (8, -1), (2, 1)])
def test_both_statistics_match_float64_reference(rng, statistics, mean, groups, axis):
    shape = (3, 5, 6, CHANNELS) if axis == -1 else (3, CHANNELS, 5, 6)
    layer, reference = _layer_and_reference(rng, groups, axis, shape, statistics)
    x = (mean + rng.standard_normal(shape)).astype("float32")
    want = reference(x)
    for got in _outputs(layer, x):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("statistics", ["auto", "raw"])
def test_epsilon_dominated_variance_takes_the_raw_statistics(rng, statistics):
    """Mean 0.1, std 1e-3, epsilon 1e-3: mean^2 = 1e-2 <= 16 (var + epsilon), so the raw sums
    serve, and they are accurate for `var + epsilon` although not for `var` alone."""
    shape = (3, 5, 6, CHANNELS)
    layer, reference = _layer_and_reference(rng, 2, -1, shape, statistics)
    x = (0.1 + 1e-3 * rng.standard_normal(shape)).astype("float32")
    want = reference(x)
    for got in _outputs(layer, x):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("statistics", ["auto", "shifted"])
@pytest.mark.parametrize("groups", [1, 2, 8])
def test_large_offset_takes_the_shifted_statistics(rng, statistics, groups):
    """Mean 1e4, std 1: exact to float32 rounding as routed ("auto") and shifted; the raw
    sums alone are off by more than 1e-2 (E[x^2] ~ 1e8 has a float32 spacing of 8)."""
    shape = (2, 5, 5, CHANNELS)
    layer, reference = _layer_and_reference(rng, groups, -1, shape, statistics)
    x = (1e4 + rng.standard_normal(shape)).astype("float32")
    want = reference(x)
    for got in _outputs(layer, x):
        np.testing.assert_allclose(got, want, atol=5e-5, rtol=1e-5)
    raw = InferenceGroupNormAct.from_config({**layer.get_config(), "statistics": "raw"})
    raw.build(shape)
    raw.set_weights(layer.get_weights())
    assert np.abs(to_numpy(raw(x)) - want).max() > 1e-2
