"""One layer contract, Keras' own: `keras.src.testing.TestCase.run_layer_test` over every
public layer class of `tf_proxynorm.layers` and every name of `available_norm_acts()`.

The harness checks, per layer: the `get_config` / `from_config` and
`serialize_keras_object` round trips, `build` and the weight counts, a symbolic call and
an eager call with the expected output shape and dtype, masking support, a compiled
(`jit_compile="auto"`) training step, and under `mixed_float16` an output in the compute
dtype with float32 weights. The numbers themselves are checked against the float64
references in the per-layer test files; a `.keras` file round trip of every layer, and
`mixed_bfloat16`, are checked here too.
"""

import inspect
import json

import keras
import numpy as np
import pytest

import tf_proxynorm as tfpn

SHAPE = (2, 6, 6, 8)
FACTORY_SHAPE = (2, 4, 4, 32)    # the names' default 32 groups

# Every public layer class: init arguments (beyond the defaults), input shape, and the
# trainable / non-trainable weight counts the contract expects.
LAYERS = {
    "BatchNormAct": (tfpn.layers.BatchNormAct, {}, SHAPE, 2, 2),
    "GroupNormAct": (tfpn.layers.GroupNormAct, dict(groups=2, proxy_norm=True), SHAPE, 4, 0),
    "LayerNormAct": (tfpn.layers.LayerNormAct, dict(activation="silu"), SHAPE, 2, 0),
    "InstanceNormAct": (tfpn.layers.InstanceNormAct, dict(proxy_norm=True), SHAPE, 4, 0),
    "ShiftedGroupNormAct": (tfpn.layers.ShiftedGroupNormAct, dict(groups=4), SHAPE, 3, 0),
    "ProxyNormAct": (tfpn.layers.ProxyNormAct, dict(activation="gelu"), SHAPE, 4, 0),
    # The serving form: forward only, its weights frozen.
    "InferenceGroupNormAct": (tfpn.layers.InferenceGroupNormAct,
                              dict(groups=4, use_output_offset=True), SHAPE, 0, 3),
    "ChannelAffine": (tfpn.layers.ChannelAffine, dict(activation="relu"), SHAPE, 2, 0),
    "EvoNormB0": (tfpn.layers.EvoNormB0, {}, SHAPE, 3, 1),
    "EvoNormS0": (tfpn.layers.EvoNormS0, dict(groups=4), SHAPE, 3, 0),
    "InstanceEnhancementBatchNormalization": (
        tfpn.layers.InstanceEnhancementBatchNormalization, {}, SHAPE, 4, 2),
    "BatchGroupNormalization": (tfpn.layers.BatchGroupNormalization, dict(groups=4), SHAPE,
                                2, 2),
    # window 3: moving statistics (2), step (1) and 5 buffers of the 2 previous steps.
    "CBNConv2D": (tfpn.layers.CBNConv2D, dict(filters=8, kernel_size=3, padding="same",
                                              window_size=3), SHAPE, 3, 8),
    "WSConv2D": (tfpn.layers.WSConv2D, dict(filters=8, kernel_size=3, padding="same"), SHAPE,
                 2, 0),
}
# Public classes that do not run on their own (tested through what they build).
NOT_RUNNABLE = {"CrossIterationBatchNormalization"}   # needs its conv: CBNConv2D


def _public_layer_classes():
    return sorted(name for name, obj in vars(tfpn.layers).items()
                  if inspect.isclass(obj) and issubclass(obj, keras.layers.Layer)
                  and not name.startswith("_"))


def test_every_public_layer_class_is_covered():
    assert _public_layer_classes() == sorted(set(LAYERS) | NOT_RUNNABLE)


def _run(harness, cls, init_kwargs, shape, trainable, non_trainable, training):
    harness.run_layer_test(
        cls, init_kwargs, input_shape=shape, call_kwargs={"training": training},
        expected_output_shape=(shape[:-1] + (init_kwargs["filters"],)
                               if "filters" in init_kwargs else shape),
        expected_output_dtype="float32",
        expected_num_trainable_weights=trainable,
        expected_num_non_trainable_weights=non_trainable,
        expected_num_seed_generators=0, expected_num_losses=0,
        supports_masking=None if "filters" in init_kwargs else True)


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_layer_class_contract(harness, name):
    cls, init_kwargs, shape, trainable, non_trainable = LAYERS[name]
    _run(harness, cls, init_kwargs, shape, trainable, non_trainable, training=True)


def _factory_layer(name):
    """The class and init arguments of a factory name (a CBN bound to its conv)."""
    layer = tfpn.get_norm_act_layer(name)
    if name == "cbn":
        conv = keras.layers.Conv2D(FACTORY_SHAPE[-1], 3, padding="same", use_bias=False)
        (layer,) = tfpn.layers.conv_norm_layers(conv, layer)
    config = {k: v for k, v in layer.get_config().items() if k not in ("name", "dtype")}
    return type(layer), config


@pytest.mark.parametrize("name", tfpn.available_norm_acts())
def test_factory_name_contract(harness, name):
    cls, config = _factory_layer(name)
    layer = cls(**config)
    layer.build(FACTORY_SHAPE)
    _run(harness, cls, config, FACTORY_SHAPE, len(layer.trainable_weights),
         len(layer.non_trainable_weights), training=True)


def test_factory_names_build_norm_and_relu():
    """Every name is a norm followed by ReLU (EvoNorm: its own nonlinearity instead)."""
    for name in tfpn.available_norm_acts():
        _, config = _factory_layer(name)
        expected = "evonorm" if name.startswith("evonorm") else "relu"
        assert config["activation"] == expected, name


def test_register_norm_act_takes_a_class_or_a_module_path(monkeypatch):
    """Built-in names map to classes; a user's name may also be a "module:Class" path."""
    factory = tfpn.layers.factory
    monkeypatch.setattr(factory, "_REGISTRY", dict(factory._REGISTRY))
    assert factory.lookup("GN+PN") == (tfpn.GroupNormAct, {"proxy_norm": True})
    tfpn.register_norm_act("My-GN", tfpn.GroupNormAct, groups=2)
    tfpn.register_norm_act("my_ln", "tf_proxynorm.layers.norm_act:LayerNormAct",
                           activation="silu")
    assert {"my_gn", "my_ln"} <= set(tfpn.available_norm_acts())
    gn, ln = tfpn.get_norm_act_layer("my_gn"), tfpn.get_norm_act_layer("MY-LN")
    assert type(gn) is tfpn.GroupNormAct and gn.groups == 2
    assert type(ln) is tfpn.LayerNormAct and ln.get_config()["activation"] == "silu"


@pytest.mark.parametrize("cls", [tfpn.InstanceEnhancementBatchNormalization,
                                 tfpn.BatchGroupNormalization,
                                 tfpn.CrossIterationBatchNormalization])
def test_normalization_classes_default_to_no_activation(cls):
    """Keras' naming: a `...Normalization` layer applies no activation unless asked."""
    activation = cls().get_config()["activation"]
    assert tfpn.ops.activations.fused_name(activation) == "identity"


L = tfpn.layers
NON_DEFAULT = [
    (L.GroupNormAct, dict(groups=2, activation="gelu", proxy_norm=True, epsilon=1e-4,
                          proxy_beta_regularizer="l2", implementation="reference")),
    (L.LayerNormAct, dict(activation=keras.activations.silu, center=False)),
    (L.InstanceNormAct, dict(proxy_norm=True, proxy_epsilon=0.1, gamma_constraint="non_neg")),
    (L.ShiftedGroupNormAct, dict(groups=1, activation="leaky_relu")),
    (L.ProxyNormAct, dict(proxy_epsilon=0.1, scale=False, proxy_gamma_initializer="ones")),
    (L.InferenceGroupNormAct, dict(groups=2, activation="silu", axis=1, epsilon=1e-4,
                                   use_output_scale=True)),
    (L.ChannelAffine, dict(scale=False, axis=1)),
    (L.BatchNormAct, dict(momentum=0.9, synchronized=True, moving_variance_initializer="zeros")),
    (L.EvoNormS0, dict(group_size=4, v_regularizer="l2")),
    (L.EvoNormB0, dict(momentum=0.8, gamma_initializer="zeros")),
    (L.EvoNormB0, dict(activation=None)),
    (L.InstanceEnhancementBatchNormalization, dict(activation="relu", gate_bias_initializer=-2.0,
                                                   gate_bias_regularizer="l2")),
    (L.BatchGroupNormalization, dict(groups=16, momentum=0.5, axis=1)),
    (L.CrossIterationBatchNormalization, dict(window_size=3, rho=0.5, burnin_steps=7,
                                              activation="relu")),
    (L.CBNConv2D, dict(filters=4, kernel_size=3, window_size=2, use_bias=True, momentum=0.5)),
    (L.WSConv2D, dict(filters=4, kernel_size=3, epsilon=1e-4)),
]


@pytest.mark.parametrize("cls, kwargs", NON_DEFAULT, ids=lambda v: getattr(v, "__name__", ""))
def test_config_round_trip_with_non_default_arguments(cls, kwargs):
    layer = cls(**kwargs, name="n")
    config = layer.get_config()
    json.dumps(config)
    assert cls.from_config(config).get_config() == config
    assert keras.saving.get_registered_name(cls) == f"tf_proxynorm>{cls.__name__}"
    for key, value in kwargs.items():   # plain numbers and flags are stored as given
        if type(value) in (int, float, bool) and not key.endswith(("_initializer", "_size")):
            assert config[key] == value, key


def _init_arguments(cls):
    """Every argument the constructors of `cls` (and its tf_proxynorm bases) name."""
    names = set()
    for klass in cls.__mro__:
        if klass.__module__.startswith("keras"):
            break
        if "__init__" in vars(klass):
            names |= set(inspect.signature(klass.__init__).parameters) - {"self", "args",
                                                                          "kwargs"}
    return names


@pytest.mark.parametrize("name", _public_layer_classes())
def test_no_layer_carries_arguments_it_does_not_use(name):
    """Proxy-norm arguments only on the layers with PN, `implementation` only where a
    fused kernel exists, and nothing in a config the constructor does not name."""
    cls = getattr(tfpn.layers, name)
    arguments = _init_arguments(cls)
    has_pn = name in ("GroupNormAct", "LayerNormAct", "InstanceNormAct", "ProxyNormAct")
    assert ("proxy_epsilon" in arguments) == has_pn
    assert ("proxy_norm" in arguments) == (has_pn and name != "ProxyNormAct")
    assert ("implementation" in arguments) == (
        name in ("GroupNormAct", "LayerNormAct", "InstanceNormAct", "ShiftedGroupNormAct"))
    if name in LAYERS or name in NOT_RUNNABLE:
        kwargs = LAYERS[name][1] if name in LAYERS else {}
        base = set(keras.layers.Layer(name="x").get_config())
        if issubclass(cls, keras.layers.Conv2D):
            base |= set(keras.layers.Conv2D(1, 1).get_config())
        assert set(cls(**kwargs).get_config()) - base <= arguments


@pytest.mark.parametrize("name", sorted(LAYERS))
def test_keras_file_round_trip(tmp_path, name):
    """A model holding the layer, trained one call, saved and loaded: same outputs."""
    cls, init_kwargs, shape, _, _ = LAYERS[name]
    rng = np.random.default_rng(0)
    x = rng.normal(0.5, 2.0, shape).astype("float32")
    inputs = keras.Input(shape[1:])
    model = keras.Model(inputs, cls(**init_kwargs, name="layer")(inputs))
    for weight in model.get_layer("layer").trainable_weights:
        weight.assign(np.asarray(weight) + 0.3 * rng.standard_normal(weight.shape))
    model(x, training=True)       # moving statistics / buffers leave their initial value
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert loaded.get_layer("layer").get_config() == model.get_layer("layer").get_config()
    for training in (False, True):
        np.testing.assert_allclose(loaded(x, training=training), model(x, training=training),
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("policy", ["mixed_bfloat16"], indirect=True)
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_bfloat16_policy(policy, name):
    """The harness checks `mixed_float16`; bfloat16: same contract."""
    cls, init_kwargs, shape, _, _ = LAYERS[name]
    layer = cls(**init_kwargs)
    x = np.random.default_rng(0).normal(size=shape).astype("bfloat16")
    for training in (False, True):
        y = layer(x, training=training)
        assert y.dtype == "bfloat16"
        assert np.isfinite(np.asarray(y, np.float32)).all()
    assert all(w.dtype in ("float32", "int64") for w in layer.weights)
