"""Power decomposition (Proxy Norm spec, section 8) against a float64 NumPy computation."""

import keras
import numpy as np
import pytest
import tensorflow as tf

import reference as R
import reference_other as RO
import tf_proxynorm as tfpn
from conftest import random_params, set_params
from tf_proxynorm.callbacks import PowerAccumulator, instance_statistics, power_decomposition
from tf_proxynorm.layers.cross_iteration_bn import CBNConv2D


def decomposition_reference(y, axis=-1):
    """Spec section 8 written out in float64 on the whole data set at once."""
    y = np.moveaxis(np.asarray(y, np.float64), axis, -1)
    y = y.reshape(y.shape[0], -1, y.shape[-1])              # (N, positions, C)
    mu_xc = y.mean(axis=1)
    s2_xc = y.var(axis=1)
    s_xc = np.sqrt(s2_xc)
    power = np.mean(y ** 2)
    scale_mean_sq = np.mean(s_xc.mean(axis=0) ** 2)
    parts = (np.mean(mu_xc.mean(axis=0) ** 2), np.mean(mu_xc.var(axis=0)), np.mean(s2_xc))
    return {"power": power, "constant": parts[0], "instance_mean": parts[1], "within": parts[2],
            "collapse": parts[0] / power, "mean_var": parts[1] / power,
            "scale_var": np.mean(s_xc.var(axis=0)) / scale_mean_sq if scale_mean_sq else np.nan}


def _assert_matches_reference(got, ys):
    """Every measured layer's decomposition against the float64 one of its reference output."""
    for layer in got:
        want = decomposition_reference(ys[layer["name"]])
        for key in ("power", "constant", "instance_mean", "within", "collapse", "mean_var",
                    "scale_var"):
            np.testing.assert_allclose(layer[key], want[key], rtol=2e-4, atol=1e-7,
                                       err_msg=f"{layer['name']} {key}")


def _stream(y, splits, axis=-1):
    acc = PowerAccumulator()
    for chunk in np.split(y, splits):
        acc.update(*(t.numpy() for t in instance_statistics(tf.constant(chunk), axis)))
    return acc.result()


def _structured(rng, shape, axis=-1):
    """Data with channel offsets, per-instance offsets and per-instance scales."""
    n, c = shape[0], shape[axis]
    bshape = [1] * len(shape)
    bshape[axis] = c
    ishape = list(bshape)
    ishape[0] = n
    channel = rng.normal(0, 1.5, bshape)
    instance = rng.normal(0, 0.7, ishape)
    scale = np.exp(rng.normal(0, 0.4, ishape))
    return (channel + instance + scale * rng.standard_normal(shape)).astype("float32")


@pytest.mark.parametrize("shape, axis, splits", [
    ((23, 5, 6, 7), -1, [4, 11, 19]),      # images, uneven batches
    ((17, 9, 5, 4), 1, [8]),               # channels-first
    ((12, 10, 6), -1, [5, 6]),             # sequences
    ((30, 8), -1, [7, 20]),                # dense: one position, within part 0
])
def test_streamed_decomposition_matches_float64_reference(rng, shape, axis, splits):
    y = _structured(rng, shape, axis)
    got = _stream(y, splits, axis)
    want = decomposition_reference(y, axis)
    for key in ("power", "constant", "instance_mean", "within", "collapse", "mean_var"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-9, err_msg=key)
    if len(shape) > 2:
        np.testing.assert_allclose(got["scale_var"], want["scale_var"], rtol=1e-4)
    # The identity (1) + (2) + (3) = P, with P measured directly as E[y^2].
    np.testing.assert_allclose(got["constant"] + got["instance_mean"] + got["within"],
                               got["power"], rtol=1e-5)


def test_decomposition_is_stable_with_a_large_offset(rng):
    """Chan merging: a large channel mean (collapse near 1) keeps part (2) accurate."""
    y = (1e3 + _structured(rng, (40, 4, 4, 3))).astype("float32")
    got = _stream(y, [10, 20, 30])
    want = decomposition_reference(y)
    np.testing.assert_allclose(got["instance_mean"], want["instance_mean"], rtol=1e-3)
    np.testing.assert_allclose(got["collapse"], want["collapse"], rtol=1e-6)


def _model(rng):
    inputs = keras.Input((6, 6, 8))
    ln = tfpn.get_norm_act_layer("ln", name="ln")
    conv = keras.layers.Conv2D(8, 1, use_bias=False, name="conv")
    gn = tfpn.get_norm_act_layer("gn+pn", groups=2, name="gn_pn")
    inn = tfpn.get_norm_act_layer("in", name="in", activation="linear")
    kbn = keras.layers.BatchNormalization(name="keras_bn")
    kln = keras.layers.LayerNormalization(name="keras_ln")
    h = kln(kbn(inn(gn(conv(ln(inputs))))))
    model = keras.Model(inputs, h)
    params = {name: random_params(rng, 8) for name in ("ln", "gn_pn", "in")}
    for layer in (ln, gn, inn):
        set_params(layer, params[layer.name])
    kernel = rng.normal(0, 0.5, (1, 1, 8, 8)).astype("float32")
    conv.kernel.assign(kernel)
    moving = (rng.normal(0, 0.3, 8).astype("float32"), rng.uniform(0.5, 2, 8).astype("float32"))
    kbn.moving_mean.assign(moving[0])
    kbn.moving_variance.assign(moving[1])
    kbn.gamma.assign(rng.uniform(0.5, 1.5, 8).astype("float32"))
    return model, params, kernel[0, 0], moving, kbn.gamma.numpy()


def _model_reference(x, params, kernel, moving, bn_gamma):
    """Each monitored layer's normalized output y, in float64 NumPy."""
    ys = {}
    ys["ln"] = R.group_normalize(x, 1)
    h = R.act("relu", params["ln"]["gamma"] * ys["ln"] + params["ln"]["beta"])
    z = h @ kernel
    ys["gn_pn"] = R.group_normalize(z, 2)
    p = params["gn_pn"]
    h = R.affine_act_proxy(ys["gn_pn"], p["gamma"], p["beta"], -1, "relu",
                           proxy=(p["proxy_beta"], p["proxy_gamma"]))
    ys["in"] = R.group_normalize(h, 8)
    h = params["in"]["gamma"] * ys["in"] + params["in"]["beta"]
    ys["keras_bn"] = (h - moving[0]) / np.sqrt(moving[1] + 1e-3)
    h = bn_gamma * ys["keras_bn"]
    mean, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    ys["keras_ln"] = (h - mean) / np.sqrt(var + 1e-3)
    return ys


def test_model_decomposition_matches_numpy(rng):
    model, *ref_args = _model(rng)
    x = rng.standard_normal((21, 6, 6, 8)).astype("float32")
    got = power_decomposition(model, x, batch_size=8, include_convs=True)
    ys = _model_reference(x, *ref_args)
    ys["conv"] = R.act("relu", ref_args[0]["ln"]["gamma"] * ys["ln"]
                       + ref_args[0]["ln"]["beta"]) @ ref_args[1]
    assert [g["name"] for g in got] == ["ln", "conv", "gn_pn", "in", "keras_bn", "keras_ln"]
    assert [g["kind"] for g in got] == ["norm", "conv", "norm", "norm", "norm", "norm"]
    _assert_matches_reference(got, ys)
    for layer in got:
        np.testing.assert_allclose(
            layer["constant"] + layer["instance_mean"] + layer["within"], layer["power"],
            rtol=1e-5)


def test_instance_norm_has_no_instance_mean_variability(rng):
    model, *_ = _model(rng)
    x = _structured(rng, (16, 6, 6, 8))
    by_name = {g["name"]: g for g in power_decomposition(model, x, layers=["in"])}
    assert list(by_name) == ["in"]
    assert abs(by_name["in"]["instance_mean"]) < 1e-10
    assert abs(by_name["in"]["constant"]) < 1e-10
    np.testing.assert_allclose(by_name["in"]["within"], by_name["in"]["power"], rtol=1e-6)


def test_batch_norm_in_training_mode_has_no_constant_part_and_model_is_unchanged(rng):
    inputs = keras.Input((5, 5, 6))
    # A seeded kernel: the inference-mode offset below depends on the kernel's draw.
    h = keras.layers.Conv2D(6, 3, padding="same", name="conv",
                            kernel_initializer=keras.initializers.GlorotUniform(seed=0))(inputs)
    h = tfpn.get_norm_act_layer("bn", name="bn_act")(h)
    h = keras.layers.BatchNormalization(name="keras_bn")(h)
    model = keras.Model(inputs, h)
    x = (3.0 + _structured(rng, (24, 5, 5, 6))).astype("float32")
    before = [v.numpy().copy() for v in model.variables]
    parts = power_decomposition(model, x, training=True, batch_size=24)
    for layer in parts:
        assert layer["constant"] < 1e-8 * layer["power"], layer
        np.testing.assert_allclose(layer["power"], 1.0, atol=0.02)
    # In inference mode at initialization (moving mean 0, variance 1) y = x: a large offset.
    inference = power_decomposition(model, x, training=False, layers=["bn_act"])
    assert inference[0]["collapse"] > 0.5, inference[0]["collapse"]
    for v, value in zip(model.variables, before):
        np.testing.assert_array_equal(v.numpy(), value)


def _other_norms_model(rng):
    """The other normalizations of the package side by side on the same input, with
    random moving statistics and parameters; returns the model and each layer's y in
    float64 NumPy (inference mode)."""
    c = 8
    layers = {
        "bgn": tfpn.get_norm_act_layer("bgn", groups=4, name="bgn"),
        "bgn_split": tfpn.get_norm_act_layer("bgn", groups=2 * c, name="bgn_split"),
        "evo_s0": tfpn.get_norm_act_layer("evonorm_s0", groups=2, name="evo_s0"),
        "evo_b0": tfpn.get_norm_act_layer("evonorm_b0", name="evo_b0"),
        "iebn": tfpn.get_norm_act_layer("iebn", name="iebn"),
        "cbn": CBNConv2D(c, 3, padding="same", use_bias=True, name="cbn"),
    }
    inputs = keras.Input((6, 6, c))
    model = keras.Model(inputs, [layer(inputs) for layer in layers.values()])
    for layer in layers.values():
        for v in layer.weights:
            shape = tuple(v.shape)
            if "variance" in v.path:
                v.assign(rng.uniform(0.5, 2.0, shape).astype("float32"))
            else:
                v.assign(rng.normal(0.3, 0.5, shape).astype("float32"))
    get = lambda name, attr: getattr(layers[name], attr).numpy()  # noqa: E731

    def reference(x):
        ys = {name: RO.bgn(x, layers[name].groups, mean=get(name, "moving_mean"),
                           var=get(name, "moving_variance"))[0] for name in ("bgn", "bgn_split")}
        ys["evo_s0"] = RO.evonorm_s0(x, 2, v=get("evo_s0", "v"))
        ys["evo_b0"] = RO.evonorm_b0(x, v=get("evo_b0", "v"),
                                     batch_var=get("evo_b0", "moving_variance"))[0]
        ys["iebn"] = (x - get("iebn", "moving_mean")) / np.sqrt(
            get("iebn", "moving_variance") + 1e-5)
        z = RO.conv2d(x, get("cbn", "kernel"), padding="same", bias=get("cbn", "bias"))
        ys["cbn"] = (z - get("cbn", "moving_mean")) / np.sqrt(
            get("cbn", "moving_variance") + layers["cbn"].epsilon)
        return ys

    return model, reference


def test_other_normalizations_match_numpy(rng):
    """BGN (grouped and split channels), EvoNorm-S0/B0 (before gamma, beta), IEBN (its BN
    part) and CBNConv2D (conv then BN) in inference mode against float64 NumPy."""
    model, reference = _other_norms_model(rng)
    x = _structured(rng, (14, 6, 6, 8))
    got = power_decomposition(model, x, batch_size=5)
    ys = reference(x.astype(np.float64))
    assert [g["name"] for g in got] == list(ys)
    assert all(g["kind"] == "norm" for g in got)
    _assert_matches_reference(got, ys)


class SubclassedNet(keras.Model):
    def __init__(self):
        super().__init__()
        self.conv = keras.layers.Conv2D(8, 3, padding="same")
        self.block = keras.Sequential([tfpn.get_norm_act_layer("ln", name="inner_ln"),
                                       keras.layers.Conv2D(8, 3, padding="same")])
        self.norm = tfpn.get_norm_act_layer("gn", groups=4, name="outer_gn")

    def call(self, x, training=False):
        return self.norm(self.block(self.conv(x), training=training), training=training)


def test_subclassed_model_with_nested_layers_matches_functional_probe(rng):
    model = SubclassedNet()
    x = _structured(rng, (10, 6, 6, 3))
    model(x)
    got = power_decomposition(model, x, batch_size=4)
    assert [g["name"] for g in got] == ["inner_ln", "outer_gn"]
    # Same layers, as a functional graph.
    inputs = keras.Input((6, 6, 3))
    functional = keras.Model(inputs, model.norm(model.block.layers[1](
        model.block.layers[0](model.conv(inputs)))))
    want = power_decomposition(functional, x, batch_size=4)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a["collapse"], b["collapse"], rtol=1e-5)
        np.testing.assert_allclose(a["power"], b["power"], rtol=1e-5)
    # The recording left no trace on the layers.
    assert "call" not in vars(model.norm) and "call" not in vars(model.block.layers[0])


def test_dataset_input_equals_array_input(rng):
    model, *_ = _model(rng)
    x = rng.standard_normal((20, 6, 6, 8)).astype("float32")
    y = np.zeros(20)
    from_array = power_decomposition(model, x, batch_size=20)
    from_dataset = power_decomposition(
        model, tf.data.Dataset.from_tensor_slices((x, y)).batch(6))
    for a, b in zip(from_array, from_dataset):
        for key in ("collapse", "mean_var", "power"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-9)


def test_errors(rng):
    dense = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    with pytest.raises(ValueError, match="no normalization layer"):
        power_decomposition(dense, np.zeros((2, 4), "float32"))
    model, *_ = _model(rng)
    with pytest.raises(ValueError, match="Received: layers=\\['nope'\\]"):
        power_decomposition(model, np.zeros((2, 6, 6, 8), "float32"), layers=["nope"])
    with pytest.raises(ValueError, match="infinite"):
        power_decomposition(model, tf.data.Dataset.from_tensors(np.zeros((1, 6, 6, 8))).repeat())
    acc = PowerAccumulator()
    with pytest.raises(ValueError, match="no example"):
        acc.result()
    acc.update(np.zeros((2, 3)), np.zeros((2, 3)), np.zeros((2, 3)))
    with pytest.raises(ValueError, match="Received: 4 channels"):
        acc.update(np.zeros((2, 4)), np.zeros((2, 4)), np.zeros((2, 4)))
    with pytest.raises(ValueError, match="Received: axis=0"):
        instance_statistics(tf.zeros((2, 3, 4)), axis=0)
