"""fold_for_inference: the folded model against float64 NumPy references and the original."""

import keras
import numpy as np
import pytest

import reference as R
import reference_other as RO
import tf_proxynorm as tfpn
from tf_proxynorm._backend import all_layers
from conftest import random_params, set_params
from helpers import randomize_norm_weights
from tf_proxynorm.fold import ChannelAffine, ShiftedGroupNormAct
from tf_proxynorm.layers._base import NormActBase

L = keras.layers


# ---- float64 NumPy pieces of the test model ----------------------------------------------
def _conv(x, kernel, bias=None, padding="same"):
    return RO.conv2d(x, kernel, 1, padding, bias)


def _depthwise(x, kernel, bias):
    kh, kw, c, m = kernel.shape
    h, w = x.shape[1] - kh + 1, x.shape[2] - kw + 1
    out = sum(x[:, a:a + h, b:b + w, :, None] * kernel[a, b] for a in range(kh) for b in range(kw))
    return out.reshape(out.shape[:3] + (c * m,)) + bias


def _weights(model, name):
    return [w.numpy().astype(np.float64) for w in model.get_layer(name).weights]


def _pn(model, name, y, groups, act):
    params = {w.name: w.numpy() for w in model.get_layer(name).weights}
    return R.group_norm_act(y, groups, activation=act, gamma=params["gamma"],
                            beta=params["beta"],
                            proxy=(params["proxy_beta"], params["proxy_gamma"]))


def _mixed_model():
    """Every folding situation: exact bias fold, shift kept, zero padding, fan-out, GAP."""
    x = inputs = keras.Input((6, 6, 4))
    x = L.Conv2D(8, 3, padding="same", use_bias=False, name="c0")(x)
    x = tfpn.GroupNormAct(groups=2, proxy_norm=True, name="n0")(x)               # -> 1x1
    x = L.Conv2D(8, 1, name="c1")(x)
    x = tfpn.LayerNormAct(activation="silu", proxy_norm=True, name="n1")(x)      # -> 3x3 same
    x = L.Conv2D(8, 3, padding="same", use_bias=False, name="c2")(x)
    x = tfpn.InstanceNormAct(activation="gelu", proxy_norm=True, name="n2")(x)   # -> pad
    x = L.ZeroPadding2D(1, name="pad")(x)
    d = L.DepthwiseConv2D(3, depth_multiplier=2, name="dw")(x)
    x = tfpn.GroupNormAct(groups=4, proxy_norm=True, name="n3")(d)              # -> add
    x = L.Add(name="add")([x, d])
    x = tfpn.GroupNormAct(groups=4, proxy_norm=True, name="n4")(x)              # -> GAP, Dense
    x = L.GlobalAveragePooling2D(name="gap")(x)
    x = L.Dropout(0.5, name="drop")(x)
    return keras.Model(inputs, L.Dense(3, name="fc")(x))


def _mixed_reference(model, x):
    y = _conv(x, *_weights(model, "c0"))
    y = _conv(_pn(model, "n0", y, 2, "relu"), *_weights(model, "c1"), padding="valid")
    y = _conv(_pn(model, "n1", y, 1, "silu"), *_weights(model, "c2"))
    y = np.pad(_pn(model, "n2", y, 8, "gelu"), ((0, 0), (1, 1), (1, 1), (0, 0)))
    d = _depthwise(y, *_weights(model, "dw"))
    y = _pn(model, "n3", d, 4, "relu") + d
    y = _pn(model, "n4", y, 4, "relu").mean(axis=(1, 2))
    kernel, bias = _weights(model, "fc")
    return y @ kernel + bias


def test_mixed_model_matches_numpy_reference(rng, implementation):
    model = _mixed_model()
    randomize_norm_weights(model, rng, bias_std=0.2)
    x = rng.standard_normal((3, 6, 6, 4)).astype("float32")
    ref = _mixed_reference(model, x)
    folded, report = tfpn.fold_for_inference(model, return_report=True, inference_layers=False)
    with tfpn.use_implementation(implementation):
        np.testing.assert_allclose(model(x).numpy(), ref, atol=1e-5)
        np.testing.assert_allclose(folded(x).numpy(), ref, atol=1e-5)
        np.testing.assert_allclose(folded(x[:1]).numpy(), ref[:1], atol=1e-5)
    names = {l.name: l for l in folded.layers}
    assert not any(getattr(l, "proxy_norm", False) for l in folded.layers)
    assert [n for n, l in names.items() if isinstance(l, ChannelAffine)] == ["n3_proxy_affine"]
    assert [n for n, l in names.items() if isinstance(l, ShiftedGroupNormAct)] == ["n1", "n2"]
    assert (names["n1"].groups, names["n2"].groups) == (1, -1)
    assert [(s.old, s.new) for s in report] == [
        ("n0", "c1"), ("n1", "c2"), ("n2", "dw"), ("n3", "n3_proxy_affine"), ("n4", "fc")]
    # Proxy mean from the float64 reference: the output offset of n1 (before c2) is -m.
    p = {w.name: w.numpy() for w in model.get_layer("n1").weights}
    m, _ = R.proxy_moments(p["gamma"], p["beta"], p["proxy_beta"], p["proxy_gamma"], "silu")
    np.testing.assert_allclose(names["n1"].offset.numpy(), -m, atol=1e-6)
    assert (names["c2"].use_bias, names["dw"].use_bias) == (False, True)   # scale-only: no bias
    # The original model is untouched.
    assert model.get_layer("n0").proxy_norm
    np.testing.assert_allclose(model(x).numpy(), ref, atol=1e-5)


def test_sequential_proxy_norm_act_and_dense(rng):
    model = keras.Sequential([keras.Input((5,)), L.Dense(6, name="d1"),
                              tfpn.ProxyNormAct(activation="silu", name="pn"),
                              L.Dense(2, name="d2")], name="seq")
    set_params(model.get_layer("pn"), random_params(rng, 6))
    folded = tfpn.fold_for_inference(model, inference_layers=False)
    assert isinstance(folded, keras.Sequential)
    assert [type(l).__name__ for l in folded.layers] == ["Dense", "ChannelAffine", "Dense"]
    x = rng.standard_normal((4, 5)).astype("float32")
    p = {w.name: w.numpy() for w in model.get_layer("pn").weights}
    k1, b1 = _weights(model, "d1")
    k2, b2 = _weights(model, "d2")
    h = R.affine_act_proxy(x @ k1 + b1, p["gamma"], p["beta"], -1, "silu",
                           (p["proxy_beta"], p["proxy_gamma"]))
    np.testing.assert_allclose(folded(x).numpy(), h @ k2 + b2, atol=1e-5)


def test_shared_pn_layer_keeps_an_affine_per_call(rng):
    inputs = keras.Input((4, 4, 8))
    norm = tfpn.GroupNormAct(groups=2, proxy_norm=True, name="shared")
    a = L.Conv2D(8, 1, name="ca")(norm(inputs))
    b = L.Conv2D(8, 1, name="cb")(norm(inputs * 2.0))
    model = keras.Model(inputs, L.Add()([a, b]))
    set_params(norm, random_params(rng, 8))
    folded, report = tfpn.fold_for_inference(model, return_report=True, inference_layers=False)
    assert "shared layer" in report[0].action
    x = rng.standard_normal((2, 4, 4, 8)).astype("float32")
    p = {w.name: w.numpy() for w in norm.weights}
    pn = lambda v: R.group_norm_act(v, 2, gamma=p["gamma"], beta=p["beta"],  # noqa: E731
                                    proxy=(p["proxy_beta"], p["proxy_gamma"]))
    ref = _conv(pn(x), *_weights(model, "ca")) + _conv(pn(2 * x), *_weights(model, "cb"))
    np.testing.assert_allclose(folded(x).numpy(), ref, atol=1e-5)


def test_branches_with_and_without_padding(rng):
    """One consumer folds exactly (1x1), the other needs the shift (3x3 'same')."""
    inputs = keras.Input((5, 5, 8))
    x = tfpn.GroupNormAct(groups=4, proxy_norm=True, activation="leaky_relu", name="n")(inputs)
    y = L.Add()([L.Conv2D(4, 1, name="c1")(x), L.Conv2D(4, 3, padding="same", name="c3")(x)])
    model = keras.Model(inputs, y)
    randomize_norm_weights(model, rng, bias_std=0.2)
    folded = tfpn.fold_for_inference(model, inference_layers=False)
    assert isinstance(folded.get_layer("n"), tfpn.GroupNormAct)
    assert isinstance(folded.get_layer("n_proxy_shift"), ChannelAffine)
    x = rng.standard_normal((2, 5, 5, 8)).astype("float32")
    z = _pn(model, "n", x, 4, "leaky_relu")
    ref = (_conv(z, *_weights(model, "c1"), padding="valid") + _conv(z, *_weights(model, "c3")))
    np.testing.assert_allclose(folded(x).numpy(), ref, atol=1e-5)


def test_folded_model_keras_round_trip(rng, tmp_path):
    model = _mixed_model()
    randomize_norm_weights(model, rng, bias_std=0.2)
    folded = tfpn.fold_for_inference(model, inference_layers=False)
    path = str(tmp_path / "folded.keras")
    folded.save(path)
    loaded = keras.saving.load_model(path)
    x = rng.standard_normal((2, 6, 6, 4)).astype("float32")
    np.testing.assert_allclose(loaded(x).numpy(), folded(x).numpy(), atol=1e-6)


def test_subclassed_model_raises():
    class Sub(keras.Model):
        def call(self, x):
            return x

    with pytest.raises(ValueError, match="subclassed"):
        tfpn.fold_for_inference(Sub())


def _randomize_all(model, rng):
    for layer in all_layers(model):
        if isinstance(layer, NormActBase):
            for w in layer.trainable_weights:
                base = 1.0 if w.name == "gamma" else 0.0
                w.assign(base + 0.3 * rng.standard_normal(w.shape))
        elif getattr(layer, "bias", None) is not None:
            layer.bias.assign(0.1 * rng.standard_normal(layer.bias.shape))


def _check_fold(model, rng, shape, atol):
    _randomize_all(model, rng)
    folded = tfpn.fold_for_inference(model, inference_layers=False)
    assert not any(getattr(l, "proxy_norm", False) for l in all_layers(folded))
    x = rng.standard_normal((2,) + shape).astype(model.inputs[0].dtype)
    expected = model(x, training=False).numpy()
    np.testing.assert_allclose(folded(x, training=False).numpy(), expected, atol=atol)
    return folded


def _check_float32_noise(build, rng, shape):
    """Folded float32 vs the float64 model: no further from it than the float32 original.

    Deep float32 ResNets differ from their float64 selves by ~1e-5 relative (batch size 1
    vs 2 changes outputs as much), so "equal within 1e-5" holds at that noise floor.
    """
    model = build()
    _randomize_all(model, rng)
    folded = tfpn.fold_for_inference(model, inference_layers=False)
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("float64")
    try:
        model64 = build()
    finally:
        keras.config.set_dtype_policy(previous)
    model64.set_weights(model.get_weights())
    x = rng.standard_normal((2,) + shape)
    truth = model64(x).numpy()
    original_error = np.abs(model(x.astype("float32")).numpy() - truth).max()
    folded_error = np.abs(folded(x.astype("float32")).numpy() - truth).max()
    scale = np.abs(truth).max()
    assert folded_error <= 2 * original_error + 1e-6 * scale, (folded_error, original_error)
    assert folded_error <= 1e-4 * scale


@pytest.mark.parametrize("version", ["v1.5", "v2"])
def test_package_resnet18_float32(rng, version):
    _check_float32_noise(lambda: tfpn.models.resnet18(
        version=version, norm="gn+pn", norm_kwargs={"groups": 8}, num_classes=10,
        input_shape=(32, 32, 3), classifier_activation=None), rng, (32, 32, 3))


@pytest.mark.slow
def test_package_resnet50_v2_float32(rng):
    _check_float32_noise(lambda: tfpn.models.resnet50(
        version="v2", norm="gn+pn", num_classes=10, input_shape=(64, 64, 3),
        classifier_activation=None), rng, (64, 64, 3))


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["float64"], indirect=True)
@pytest.mark.parametrize("version", ["v1.5", "v2"])
def test_package_resnet50_exact_in_float64(rng, policy, version):
    model = tfpn.models.resnet50(version=version, norm="gn+pn", num_classes=10,
                                 input_shape=(32, 32, 3), classifier_activation=None)
    folded = _check_fold(model, rng, (32, 32, 3), atol=1e-10)
    assert not any(isinstance(l, ChannelAffine) for l in folded.layers)
    assert sum(isinstance(l, ShiftedGroupNormAct) for l in folded.layers) == 16   # before 3x3


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["float64"], indirect=True)
@pytest.mark.parametrize("name", ["ResNet50", "ResNet50V2", "MobileNetV2", "EfficientNetB0"])
def test_converted_keras_applications_exact_in_float64(rng, policy, name):
    base = getattr(keras.applications, name)(weights=None, input_shape=(32, 32, 3), classes=10,
                                              classifier_activation=None)
    model, _ = tfpn.convert_model(base, "gn+pn")
    _check_fold(model, rng, (32, 32, 3), atol=1e-10)
