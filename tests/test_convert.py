"""convert_model: BatchNorm models -> GN+PN (and other norms), against NumPy references."""

import keras
import numpy as np
import pytest

import reference as R
import tf_proxynorm as tfpn
from helpers import randomize_norm_weights
from tf_proxynorm._backend import all_layers
from tf_proxynorm.ops.stats import largest_divisor_at_most

CONVERTED = (tfpn.GroupNormAct, tfpn.LayerNormAct, tfpn.InstanceNormAct)


def _residual_model():
    """conv - BN - Activation(relu) - conv - BN - (+ shortcut) - ReLU - GAP - Dense."""
    x = inputs = keras.Input((6, 6, 8))
    y = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="c1")(x)
    y = keras.layers.BatchNormalization(name="bn1")(y)
    y = keras.layers.Activation("relu", name="a1")(y)
    y = keras.layers.Conv2D(8, 1, name="c2")(y)
    y = keras.layers.BatchNormalization(name="bn2")(y)
    y = keras.layers.Add(name="add")([y, x])
    y = keras.layers.ReLU(name="r2")(y)
    y = keras.layers.GlobalAveragePooling2D(name="gap")(y)
    return keras.Model(inputs, keras.layers.Dense(3, name="fc")(y), name="res")


def _output_of(model, name):
    return keras.Model(model.inputs[0], model.get_layer(name).output)


def test_residual_model_numerics_and_report(rng):
    model = _residual_model()
    randomize_norm_weights(model, rng, types=keras.layers.BatchNormalization)
    new, report = tfpn.convert_model(model, "gn+pn", groups=4)
    assert [s.old for s in report] == ["bn1", "a1", "bn2"]
    assert [s.new for s in report] == ["bn1", "bn1", "bn2"]
    assert [type(l).__name__ for l in new.layers] == [
        "InputLayer", "Conv2D", "GroupNormAct", "Conv2D", "GroupNormAct", "Add", "ReLU",
        "GlobalAveragePooling2D", "Dense"]
    bn1, bn2 = new.get_layer("bn1"), new.get_layer("bn2")
    assert (bn1.proxy_norm, bn1.activation_name, bn1.center, bn1.groups) == (True, "relu", True, 4)
    assert (bn2.proxy_norm, bn2.activation_name, bn2.center, bn2.scale) == (
        False, "identity", False, True)
    # Other layers are copies: same values, new variables.
    for name in ("c1", "c2", "fc"):
        for old_w, new_w in zip(model.get_layer(name).weights, new.get_layer(name).weights):
            np.testing.assert_array_equal(old_w.numpy(), new_w.numpy())
            assert old_w is not new_w
    x = rng.standard_normal((3, 6, 6, 8)).astype("float32")
    old_bn1, old_bn2 = model.get_layer("bn1"), model.get_layer("bn2")
    # Layer 1: GN(4 groups) with the BN's gamma/beta, ReLU, PN with proxy params at init.
    h1 = _output_of(new, "c1")(x).numpy()
    ref1 = R.group_norm_act(h1, 4, activation="relu", gamma=old_bn1.gamma.numpy(),
                            beta=old_bn1.beta.numpy(), proxy=(np.zeros(8), np.zeros(8)))
    np.testing.assert_allclose(_output_of(new, "bn1")(x).numpy(), ref1, atol=2e-5)
    # Layer 2 (before the residual addition): scale only, no shift, no activation, no PN.
    h2 = _output_of(new, "c2")(x).numpy()
    ref2 = R.group_norm_act(h2, 4, activation=None, gamma=old_bn2.gamma.numpy())
    np.testing.assert_allclose(_output_of(new, "bn2")(x).numpy(), ref2, atol=2e-5)
    out = np.maximum(ref2 + x, 0).mean(axis=(1, 2)) @ model.get_layer("fc").kernel.numpy()
    np.testing.assert_allclose(new(x).numpy(), out + model.get_layer("fc").bias.numpy(), atol=5e-5)
    # The original model is untouched.
    assert isinstance(model.get_layer("bn1"), keras.layers.BatchNormalization)


def _relu6(a):
    return np.clip(a, 0.0, 6.0)


def test_sequential_relu_variants_and_options(rng):
    model = keras.Sequential([
        keras.Input((4, 4, 6)),
        keras.layers.Conv2D(6, 1, name="c1"), keras.layers.BatchNormalization(name="bn1"),
        keras.layers.ReLU(6.0, name="r6"),
        keras.layers.Conv2D(6, 1, name="c2"), keras.layers.BatchNormalization(name="bn2"),
        keras.layers.ReLU(threshold=0.5, name="rt"),
        keras.layers.Flatten(name="flat"), keras.layers.Dense(2, name="fc")], name="seq")
    randomize_norm_weights(model, rng, types=keras.layers.BatchNormalization)
    new, report = tfpn.convert_model(model, "gn+pn", copy_affine=False, groups=4)
    assert isinstance(new, keras.Sequential) and new.name == "seq"
    assert [l.name for l in new.layers] == ["c1", "bn1", "c2", "bn2", "rt", "flat", "fc"]
    bn1, bn2 = new.get_layer("bn1"), new.get_layer("bn2")
    assert "largest divisor of 6 channels <= 4" in report[0].action and bn1.groups == 3
    np.testing.assert_array_equal(bn1.gamma.numpy(), np.ones(6))   # copy_affine=False
    # ReLU with a threshold stays a layer; the norm before it is linear but keeps its shift.
    assert (bn2.activation_name, bn2.center, bn2.proxy_norm) == ("identity", True, False)
    assert "the activation rt stays a separate layer" in report[-1].action
    x = rng.standard_normal((2, 4, 4, 6)).astype("float32")
    h = _output_of(new, "c1")(x).numpy()
    # PN-ReLU6 from the spec's formula with the relu6 activation (gamma=1, beta=0, init).
    y = R.group_normalize(h, 3)
    q = R.quantiles()[:, None] * np.ones(6)
    m, v = _relu6(q).mean(0), _relu6(q).var(0)
    ref = (_relu6(y) - m) / np.sqrt(v + R.PROXY_EPSILON)
    np.testing.assert_allclose(_output_of(new, "bn1")(x).numpy(), ref, atol=2e-5)


def _fan_out_model():
    """A BN whose output feeds a ReLU and a residual addition: the ReLU cannot merge."""
    x = inputs = keras.Input((4, 4, 8))
    y = keras.layers.Conv2D(8, 1, name="c1")(x)
    y = keras.layers.BatchNormalization(name="bn")(y)
    z = keras.layers.Conv2D(8, 1, name="c2")(keras.layers.ReLU(name="relu")(y))
    return keras.Model(inputs, keras.layers.Add(name="add")([y, z]))


@pytest.mark.parametrize("linear_kwargs, center", [(None, True), ({"center": False}, False)])
def test_activation_that_cannot_merge_keeps_the_shift(rng, linear_kwargs, center):
    model = _fan_out_model()
    randomize_norm_weights(model, rng, types=keras.layers.BatchNormalization)
    new, report = tfpn.convert_model(model, "gn+pn", groups=2, linear_kwargs=linear_kwargs)
    assert [(s.old, s.new) for s in report] == [("bn", "bn")]
    assert ("relu stays a separate layer" in report[0].action) == center
    bn = new.get_layer("bn")
    assert (bn.activation_name, bn.proxy_norm, bn.center, bn.groups) == (
        "identity", False, center, 2)
    assert isinstance(new.get_layer("relu"), keras.layers.ReLU)
    x = rng.standard_normal((2, 4, 4, 8)).astype("float32")
    old_bn = model.get_layer("bn")
    y = R.group_norm_act(_output_of(new, "c1")(x).numpy(), 2, activation=None,
                         gamma=old_bn.gamma.numpy(), beta=old_bn.beta.numpy() if center else None)
    k, b = (w.numpy() for w in model.get_layer("c2").weights)
    np.testing.assert_allclose(new(x).numpy(), y + np.maximum(y, 0) @ k[0, 0] + b, atol=2e-5)


def test_nested_model_is_converted_recursively(rng):
    base = _residual_model()
    outer = keras.Sequential([keras.Input((6, 6, 8)), base, keras.layers.Dense(1, name="head")])
    new, report = tfpn.convert_model(outer, "ln+pn")
    assert [s.old for s in report] == ["res/bn1", "res/a1", "res/bn2"]
    inner = new.layers[0]
    assert isinstance(inner.get_layer("bn1"), tfpn.LayerNormAct)
    assert not any(isinstance(l, keras.layers.BatchNormalization) for l in all_layers(new))
    x = rng.standard_normal((2, 6, 6, 8)).astype("float32")
    np.testing.assert_allclose(new(x).numpy(), new.layers[1](inner(x)).numpy(), atol=1e-6)


def test_frozen_nested_model_stays_frozen():
    base = _residual_model()
    base.trainable = False                  # a frozen backbone under a trainable head
    outer = keras.Sequential([keras.Input((6, 6, 8)), base, keras.layers.Dense(1, name="head")])
    new, _ = tfpn.convert_model(outer, "gn+pn", groups=4)
    inner = new.layers[0]
    assert not inner.trainable and not inner.trainable_weights
    assert new.trainable and len(new.trainable_weights) == 2        # the head's kernel, bias
    frozen, _ = tfpn.convert_model(base, "gn+pn", groups=4)
    assert not frozen.trainable


def test_group_count_rule():
    assert [largest_divisor_at_most(c, 32) for c in (16, 24, 96, 144, 32, 40, 80, 112, 1152)] == [
        16, 24, 32, 24, 32, 20, 20, 28, 32]
    assert largest_divisor_at_most(7, 4) == 1
    assert largest_divisor_at_most(0, 32) == 32   # EvoNormS0 on 0 channels keeps its groups
    with pytest.raises(ValueError, match="groups"):
        largest_divisor_at_most(8, 0)


class _Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.bn = keras.layers.BatchNormalization()

    def call(self, x):
        return self.bn(x)


def _shared_bn_model():
    inputs = keras.Input((4, 4, 3))
    bn = keras.layers.BatchNormalization(name="shared_bn")
    return keras.Model(inputs, keras.layers.Add()([bn(inputs), bn(inputs * 2.0)]))


@pytest.mark.parametrize("make, match", [
    (lambda: _Subclassed(), "subclassed"),
    (_shared_bn_model, "'shared_bn'.*shared between 2 calls"),
    (lambda: keras.Sequential([keras.Input((4, 4, 3)), _Subclassed()]), "nested subclassed"),
    (lambda: keras.Sequential([keras.layers.BatchNormalization()]), "built Sequential"),
    (lambda: keras.Sequential([keras.Input((2, 4, 4, 3)), keras.layers.TimeDistributed(
        keras.layers.BatchNormalization(), name="td")]), "inside the layer 'td'"),
    (lambda: "not a model", "Received: model='not a model'"),
])
def test_errors(make, match):
    with pytest.raises(ValueError, match=match):
        tfpn.convert_model(make())


def test_unknown_norm_raises():
    with pytest.raises(ValueError, match="Received: norm='gn\\+xx'"):
        tfpn.convert_model(_residual_model(), "gn+xx")


# ---- keras.applications and the package's ResNets ------------------------------------------
def _expected_params(model, linear_names, proxy=True):
    """Original count - BN params (4C each) + GN+PN (4C) or scale-only linear norm (C)."""
    total = model.count_params()
    for layer in all_layers(model):
        if isinstance(layer, (keras.layers.BatchNormalization, tfpn.BatchNormAct)):
            c = layer.moving_mean.shape[0]
            bn_params = c * (2 + int(layer.center) + int(layer.scale))
            total += (c if linear_names(layer) else (4 if proxy else 2) * c) - bn_params
    return total


def _train_step(model, rng, shape):
    model.compile(optimizer=keras.optimizers.SGD(0.01),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = rng.standard_normal((2,) + shape).astype("float32")
    norm = next(l for l in model.layers if isinstance(l, CONVERTED) and l.proxy_norm)
    before = norm.proxy_gamma.numpy().copy()
    loss = model.train_on_batch(x, rng.integers(0, 10, 2))
    assert np.isfinite(loss)
    assert not np.array_equal(before, norm.proxy_gamma.numpy())


APPLICATIONS = {
    "ResNet50": (lambda: keras.applications.ResNet50,
                 lambda l: l.name.endswith(("_0_bn", "_3_bn"))),
    "ResNet50V2": (lambda: keras.applications.ResNet50V2, lambda l: False),
    "MobileNetV2": (lambda: keras.applications.MobileNetV2, lambda l: "project_BN" in l.name),
    "EfficientNetB0": (lambda: keras.applications.EfficientNetB0, lambda l: "project_bn" in l.name),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(APPLICATIONS))
def test_keras_applications(rng, name):
    make, linear = APPLICATIONS[name]
    model = make()(weights=None, input_shape=(64, 64, 3), classes=10, classifier_activation=None)
    new, report = tfpn.convert_model(model, "gn+pn")
    assert not any(isinstance(l, keras.layers.BatchNormalization) for l in all_layers(new))
    assert new.count_params() == _expected_params(model, linear)
    n_bn = sum(isinstance(l, keras.layers.BatchNormalization) for l in model.layers)
    assert sum(" -> " in s.action for s in report) == n_bn
    assert len(new.layers) == len(model.layers) - (len(report) - n_bn)
    for layer in new.layers:
        if isinstance(layer, tfpn.GroupNormAct):
            channels = layer.gamma.shape[0]
            assert layer.groups == largest_divisor_at_most(channels, 32)
    y = new(rng.standard_normal((2, 64, 64, 3)).astype("float32"))
    assert y.shape == (2, 10) and np.isfinite(y.numpy()).all()
    _train_step(new, rng, (64, 64, 3))


@pytest.mark.parametrize("version", ["v1.5", "v2"])
def test_package_resnet18_bn(rng, version):
    model = tfpn.models.resnet18(version=version, norm="bn", num_classes=10,
                                 input_shape=(32, 32, 3), classifier_activation=None)
    new, report = tfpn.convert_model(model, "gn+pn", groups=8)
    assert new.count_params() == _expected_params(model, lambda l: l.activation is None)
    assert all(s.action.startswith("BatchNormAct -> GroupNormAct") for s in report)
    assert not any(isinstance(l, tfpn.BatchNormAct) for l in new.layers)
    _train_step(new, rng, (32, 32, 3))


@pytest.mark.slow
def test_package_resnet50_v2_to_plain_gn(rng):
    model = tfpn.models.resnet50(version="v2", norm="bn", num_classes=10, input_shape=(32, 32, 3))
    new, _ = tfpn.convert_model(model, "gn", groups=16)
    assert new.count_params() == _expected_params(model, lambda l: l.activation is None, False)
    assert all(not l.proxy_norm for l in new.layers if isinstance(l, tfpn.GroupNormAct))
