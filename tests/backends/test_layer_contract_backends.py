"""Keras' layer contract for the core norm + activation layers on the running backend.

`keras.src.testing.TestCase.run_layer_test` (config and serialization round trips, build
and weight counts, symbolic and eager calls, masking, a compiled training step, and under
`mixed_float16` an output in the compute dtype with float32 weights), then the
`get_config` / `from_config` round trip of every class and of every factory name built on
these layers, and a `.keras` save / load round trip: the restored layer or model gives
the same outputs. The numbers themselves are checked against the float64 references in
tests/backends/test_norm_act_backends.py.
"""

import json

import keras
import numpy as np
import pytest

import tf_proxynorm as tfpn
from backend_helpers import BACKEND, to_numpy

SHAPE = (3, 4, 5, 6)    # as the numerics grid of test_norm_act_backends.py
L = tfpn.layers

# name -> (class, init arguments, trainable / non-trainable weight counts)
LAYERS = {
    "BatchNormAct": (L.BatchNormAct, dict(activation="silu"), 2, 2),
    "GroupNormAct": (L.GroupNormAct, dict(groups=2, proxy_norm=True), 4, 0),
    "LayerNormAct": (L.LayerNormAct, dict(activation="gelu", axis=1), 2, 0),
    "InstanceNormAct": (L.InstanceNormAct, dict(proxy_norm=True, center=False), 3, 0),
    "ShiftedGroupNormAct": (L.ShiftedGroupNormAct, dict(groups=3), 3, 0),
    "ProxyNormAct": (L.ProxyNormAct, dict(activation="gelu"), 4, 0),
    "ChannelAffine": (L.ChannelAffine, dict(activation="relu"), 2, 0),
    # What `fold_for_inference` makes of GN/LN/IN(+PN): forward only, weights frozen.
    "InferenceGroupNormAct": (L.InferenceGroupNormAct, dict(groups=3, use_output_offset=True),
                              0, 3),
}
# The factory names built on these layers (the others: tests of their own layers).
FACTORY_NAMES = ["bn", "gn", "gn+pn", "in", "in+pn", "ln", "ln+pn", "pn"]
FACTORY_SHAPE = (2, 3, 3, 32)    # the names' default 32 groups


# ShiftedGroupNormAct (what `fold_for_inference` leaves) shares GroupNormAct's code path:
# the config and file round trips below cover it.
@pytest.mark.parametrize("name", sorted(set(LAYERS) - {"ShiftedGroupNormAct"}))
def test_layer_contract(harness, name):
    cls, init_kwargs, trainable, non_trainable = LAYERS[name]
    harness.run_layer_test(
        cls, init_kwargs, input_shape=SHAPE, call_kwargs={"training": True},
        expected_output_shape=SHAPE, expected_output_dtype="float32",
        expected_num_trainable_weights=trainable,
        expected_num_non_trainable_weights=non_trainable,
        expected_num_seed_generators=0, expected_num_losses=0, supports_masking=True)


def _randomized(layer, shape, rng):
    """Builds `layer` and gives every weight a non-trivial value."""
    layer.build(shape)
    for weight in layer.weights:
        base = 1.0 if weight.name in ("gamma", "scale", "moving_variance") else 0.0
        weight.assign((base + 0.3 * rng.uniform(0.2, 1.0, weight.shape)).astype("float32"))
    return layer


def _assert_same_outputs(a, b, x):
    for training in (False, True):
        np.testing.assert_array_equal(to_numpy(a(x, training=training)),
                                      to_numpy(b(x, training=training)))


CONFIG_CASES = [(name, cls, kwargs, SHAPE) for name, (cls, kwargs, _, _) in LAYERS.items()] + [
    (f"factory-{name}", None, name, FACTORY_SHAPE) for name in FACTORY_NAMES] + [
    ("GroupNormAct-non-default", L.GroupNormAct, dict(
        groups=3, activation="leaky_relu", proxy_norm=True, axis=1, epsilon=1e-4,
        proxy_epsilon=0.1, proxy_beta_regularizer="l2", gamma_constraint="non_neg",
        implementation="reference"), (3, 6, 4, 5)),
    ("BatchNormAct-non-default", L.BatchNormAct, dict(
        momentum=0.5, axis=1, scale=False, synchronized=True,
        moving_variance_initializer="zeros"), (3, 6, 4, 5)),
]


@pytest.mark.parametrize("name, cls, kwargs, shape", CONFIG_CASES,
                         ids=[c[0] for c in CONFIG_CASES])
def test_config_round_trip_gives_the_same_outputs(name, cls, kwargs, shape):
    rng = np.random.default_rng(len(name))
    layer = tfpn.get_norm_act_layer(kwargs) if cls is None else cls(**kwargs)
    cls = type(layer)
    config = layer.get_config()
    json.dumps(config)
    assert keras.saving.get_registered_name(cls) == f"tf_proxynorm>{cls.__name__}"
    clone = cls.from_config(config)
    assert clone.get_config() == config
    _randomized(layer, shape, rng)
    clone.build(shape)
    clone.set_weights(layer.get_weights())
    x = rng.normal(0.5, 2.0, shape).astype("float32")
    _assert_same_outputs(layer, clone, x)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert restored.built      # the serialized build config rebuilds it
    restored.set_weights(layer.get_weights())
    _assert_same_outputs(layer, restored, x)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_keras_file_round_trip(tmp_path, name):
    """A model holding the layer, weights set and one training call made, saved to a
    `.keras` file and loaded back on this backend: the same config and outputs."""
    cls, init_kwargs, _, _ = LAYERS[name]
    rng = np.random.default_rng(0)
    inputs = keras.Input(SHAPE[1:])
    model = keras.Model(inputs, cls(**init_kwargs, name="layer")(inputs))
    layer = model.get_layer("layer")
    for weight in layer.trainable_weights:
        weight.assign(weight + 0.3 * rng.standard_normal(weight.shape).astype("float32"))
    x = rng.normal(0.5, 2.0, SHAPE).astype("float32")
    model(x, training=True)       # moving statistics leave their initial values
    path = str(tmp_path / f"{name}_{BACKEND}.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.get_layer("layer").get_config() == layer.get_config()
    for a, b in zip(loaded.get_layer("layer").weights, layer.weights, strict=True):
        assert a.name == b.name
        np.testing.assert_array_equal(to_numpy(a), to_numpy(b))
    _assert_same_outputs(model, loaded, x)
