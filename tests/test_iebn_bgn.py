"""IEBN (spec section 3) and BGN (spec section 4) against the float64 references."""


import keras
import numpy as np
import pytest
import tensorflow as tf

import reference as R
import reference_other as RO
import tf_proxynorm as tfpn
from conftest import set_params

C = 8


def _input(rng, shape, axis=-1, scale=2.0, offset=0.5):
    x = rng.standard_normal(shape) * scale + offset
    return (np.moveaxis(x, -1, 1) if axis == 1 else x).astype("float32")


def _params(rng, names, c=C):
    base = {"gamma": (1.0, 0.3), "beta": (0.0, 0.3), "gate_weight": (0.0, 0.5),
            "gate_bias": (-1.0, 0.5)}
    return {n: (base[n][0] + base[n][1] * rng.standard_normal(c)).astype("float32") for n in names}


# ---- IEBN ------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, axis", [((4, 5, C), -1), ((4, C, 5), 1), ((3, 4, 5, C), -1),
                                         ((3, C, 4, 5), 1), ((2, 3, 2, 3, C), -1)])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_iebn_matches_reference(rng, shape, axis, activation):
    x = _input(rng, shape)
    layer = tfpn.InstanceEnhancementBatchNormalization(activation=activation, axis=axis)
    layer.build(x.shape)
    params = _params(rng, ["gamma", "beta", "gate_weight", "gate_bias"])
    set_params(layer, params)
    p = dict(w=params["gate_weight"], b=params["gate_bias"], gamma=params["gamma"],
             beta=params["beta"], activation=activation)
    np.testing.assert_allclose(layer(x, training=True).numpy(), RO.iebn(x, axis, **p),
                               atol=3e-5, rtol=1e-5)
    red = tuple(a for a in range(x.ndim) if a != axis % x.ndim)
    mm, mv = 0.1 * x.mean(red), 0.9 + 0.1 * x.var(red)   # momentum 0.9 from (0, 1)
    np.testing.assert_allclose(layer.moving_mean.numpy(), mm, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), mv, rtol=1e-5)
    np.testing.assert_allclose(layer(x, training=False).numpy(),
                               RO.iebn(x, axis, mean=mm, var=mv, **p), atol=3e-5, rtol=1e-5)
    np.testing.assert_allclose(layer.moving_mean.numpy(), mm, atol=1e-6)  # unchanged


def test_iebn_spec_initial_gate(rng):
    """Spec 3: with w = 0 (init), out == 0.2689414 * BN(x) + beta."""
    x = _input(rng, (4, 6, 6, C))
    layer = tfpn.InstanceEnhancementBatchNormalization(activation=None)
    layer.build(x.shape)
    beta = _params(rng, ["beta"])["beta"]
    layer.beta.assign(beta)
    np.testing.assert_allclose(layer.gate_weight.numpy(), 0.0)
    np.testing.assert_allclose(layer.gate_bias.numpy(), -1.0)
    bn = R.batch_norm_act(x, epsilon=1e-5, activation=None)
    np.testing.assert_allclose(layer(x, training=True).numpy(), 0.2689414 * bn + beta, atol=2e-6)


def test_iebn_trainable_false_is_inference(rng):
    x = _input(rng, (4, 6, 6, C))
    layer = tfpn.InstanceEnhancementBatchNormalization(activation=None)
    layer.build(x.shape)
    ref = RO.iebn(x, mean=np.zeros(C), var=np.ones(C))
    np.testing.assert_allclose(layer(x).numpy(), ref, atol=2e-5)   # no `training`: inference
    layer.trainable = False
    np.testing.assert_allclose(layer(x, training=True).numpy(), ref, atol=2e-5)
    np.testing.assert_array_equal(layer.moving_variance.numpy(), np.ones(C))


# ---- BGN -------------------------------------------------------------------------------
# G = k * C needs k to divide the positions: rank 2 (one position) only takes G <= C.
@pytest.mark.parametrize("shape, axis, groups", [
    (shape, axis, groups)
    for shape, axis in [((6, C), -1), ((4, 6, C), -1), ((4, C, 6), 1), ((3, 4, 6, C), -1),
                        ((3, C, 4, 6), 1)]
    for groups in [1, 2, C, 2 * C, 3 * C] if len(shape) > 2 or groups <= C])
def test_bgn_matches_reference(rng, shape, axis, groups):
    x = _input(rng, shape)
    layer = tfpn.BatchGroupNormalization(groups=groups, activation="relu", axis=axis)
    layer.build(x.shape)
    params = _params(rng, ["gamma", "beta"])
    set_params(layer, params)
    ref, mean, var = RO.bgn(x, groups, axis, activation="relu", **params)
    np.testing.assert_allclose(layer(x, training=True).numpy(), ref, atol=3e-5, rtol=1e-5)
    np.testing.assert_allclose(layer.moving_mean.numpy(), 0.1 * mean, atol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), 0.9 + 0.1 * var, rtol=1e-5)
    mm, mv = layer.moving_mean.numpy(), layer.moving_variance.numpy()
    ref_inf, _, _ = RO.bgn(x, groups, axis, mean=mm, var=mv, activation="relu", **params)
    np.testing.assert_allclose(layer(x, training=False).numpy(), ref_inf, atol=3e-5, rtol=1e-5)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), mm)


@pytest.mark.parametrize("axis", [-1, 1])
def test_bgn_with_groups_equal_channels_is_batch_norm(rng, axis):
    """Spec 4: G = C reproduces BN exactly."""
    x = _input(rng, (3, 5, 4, C), axis)
    layer = tfpn.BatchGroupNormalization(groups=C, activation=None, axis=axis)
    layer.build(x.shape)
    params = _params(rng, ["gamma", "beta"])
    set_params(layer, params)
    np.testing.assert_allclose(layer(x, training=True).numpy(),
                               R.batch_norm_act(x, axis, 1e-5, None, **params), atol=2e-5)


def test_bgn_groups_follow_the_channel_major_order(rng):
    """NHWC with G = 2C: group 2c + j is channel c's j-th half of the (row-major) positions,
    so an offset on the bottom half of channel 0 only moves group 1's statistics."""
    x = rng.standard_normal((2, 4, 4, C)).astype("float32")
    x[:, 2:, :, 0] += 10.0
    layer = tfpn.BatchGroupNormalization(groups=2 * C, activation=None)
    layer(x, training=True)
    mean = layer.moving_mean.numpy() / 0.1
    np.testing.assert_allclose(mean[1] - 10.0, x[:, 2:, :, 0].mean() - 10.0, atol=1e-5)
    assert abs(mean[0]) < 1.0 and np.abs(mean[2:]).max() < 1.0


def test_bgn_trainable_false_is_inference(rng):
    x = _input(rng, (4, 6, 6, C))
    layer = tfpn.BatchGroupNormalization(groups=2, activation=None)
    layer.build(x.shape)
    ref, _, _ = RO.bgn(x, 2, mean=np.zeros(2), var=np.ones(2))
    np.testing.assert_allclose(layer(x).numpy(), ref, atol=2e-5)   # no `training`: inference
    layer.trainable = False
    np.testing.assert_allclose(layer(x, training=True).numpy(), ref, atol=2e-5)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), np.zeros(2))


# ---- both: gradients, modes, dtypes, serialization, errors --------------------------------
@pytest.mark.parametrize("name", ["iebn", "bgn"])
def test_gradients_match_reference_finite_differences(rng, name):
    x = rng.standard_normal((2, 3, 2, 4)) + 0.3
    names = ["gamma", "beta"] + (["gate_weight", "gate_bias"] if name == "iebn" else [])
    params = {k: v.astype(np.float64) for k, v in _params(rng, names, 4).items()}
    kwargs = dict(groups=8) if name == "bgn" else {}   # G = 2C: split positions
    layer = tfpn.get_norm_act_layer(name, activation="silu", dtype="float64", **kwargs)
    layer.build(x.shape)
    set_params(layer, params)
    r = rng.standard_normal(x.shape)

    def ref_loss(x_, p):
        if name == "iebn":
            y = RO.iebn(x_, w=p["gate_weight"], b=p["gate_bias"], gamma=p["gamma"],
                        beta=p["beta"], activation="silu")
        else:
            y = RO.bgn(x_, 8, activation="silu", **p)[0]
        return float((y * r).sum())

    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        loss = tf.reduce_sum(layer(xt, training=True) * r)
    grads = tape.gradient(loss, [xt] + [getattr(layer, n) for n in names])
    RO.assert_matches_finite_differences(grads, names, x, params, ref_loss)


@pytest.mark.parametrize("name, kwargs", [("iebn", {}), ("bgn", dict(groups=2)),
                                          ("bgn", dict(groups=16))])
def test_xla_compiles_and_matches_eager(rng, name, kwargs):
    x = _input(rng, (4, 6, 6, C))
    eager, compiled = (tfpn.get_norm_act_layer(name, **kwargs) for _ in range(2))
    jit = tf.function(lambda t, training: compiled(t, training=training), jit_compile=True)
    for training in (True, False):
        np.testing.assert_allclose(jit(tf.constant(x), training).numpy(),
                                   eager(x, training=training).numpy(), atol=2e-5)
    np.testing.assert_allclose(compiled.moving_variance.numpy(), eager.moving_variance.numpy(),
                               rtol=1e-6)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"], indirect=True)
@pytest.mark.parametrize("name", ["iebn", "bgn"])
def test_mixed_precision(rng, policy, name):
    compute = "float16" if policy == "mixed_float16" else "bfloat16"
    x = tf.cast(_input(rng, (4, 6, 6, C), scale=1e3, offset=5e3), compute)
    kwargs = dict(groups=2) if name == "bgn" else {}
    layer = tfpn.get_norm_act_layer(name, activation=None, **kwargs)
    y = layer(x, training=True)   # dtypes: tests/test_layer_contract.py
    x64 = tf.cast(x, "float64").numpy()
    ref = RO.iebn(x64) if name == "iebn" else RO.bgn(x64, 2)[0]
    tol = 3e-2 if compute == "bfloat16" else 4e-3
    np.testing.assert_allclose(tf.cast(y, "float32").numpy(), ref, atol=tol, rtol=tol)


def test_model_fit_trains_the_gate_and_the_statistics(rng):
    model = keras.Sequential([
        keras.Input((6, 6, 3)),
        keras.layers.Conv2D(C, 3, padding="same", use_bias=False),
        tfpn.get_norm_act_layer("iebn", gate_bias_regularizer="l2"),
        keras.layers.Conv2D(C, 3, padding="same", use_bias=False),
        tfpn.get_norm_act_layer("bgn", groups=2 * C),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(3),
    ])
    model.compile(optimizer="sgd", jit_compile=False,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = rng.standard_normal((8, 6, 6, 3)).astype("float32")
    history = model.fit(x, rng.integers(0, 3, 8), epochs=1, batch_size=4, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    iebn, bgn = model.layers[1], model.layers[3]
    assert not np.allclose(iebn.gate_weight.numpy(), 0.0)   # the gate learns
    assert not np.allclose(bgn.moving_mean.numpy(), 0.0)
    assert iebn.get_config()["gate_bias_initializer"]["config"]["value"] == -1.0


@pytest.mark.parametrize("make, shape, match", [
    (lambda: tfpn.BatchGroupNormalization(groups=3), (2, 4, 4, C), "Received: groups=3"),
    (lambda: tfpn.BatchGroupNormalization(groups=12), (2, 4, 4, C), "Received: groups=12"),
    (lambda: tfpn.BatchGroupNormalization(groups=3 * C), (2, 4, 4, C), "Received: groups=24"),
    (lambda: tfpn.BatchGroupNormalization(groups=2 * C), (2, C), "Received: groups=16"),
    (lambda: tfpn.BatchGroupNormalization(groups=2, axis=2), (2, 4, 4, C), "Received: axis=2"),
    (lambda: tfpn.InstanceEnhancementBatchNormalization(), (2, C), "rank >= 3"),
])
def test_build_errors(make, shape, match):
    with pytest.raises(ValueError, match=match):
        make().build(shape)


@pytest.mark.parametrize("make, match", [
    (lambda: tfpn.BatchGroupNormalization(groups=0), "Received: groups=0"),
    (lambda: tfpn.get_norm_act_layer("bgn", momentum=-0.1), "Received: momentum=-0.1"),
    (lambda: tfpn.get_norm_act_layer("iebn", proxy_norm=True), "Received: proxy_norm=True"),
    (lambda: tfpn.get_norm_act_layer("iebn", gate=1), "Received: gate=1"),
])
def test_constructor_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


@pytest.mark.parametrize("name, kwargs", [("iebn", {}), ("bgn", dict(groups=4)),
                                          ("bgn", dict(groups=16))])
def test_synchronized_statistics_match_outside_a_strategy(rng, name, kwargs):
    x = _input(rng, (4, 6, 6, C))
    plain = tfpn.get_norm_act_layer(name, **kwargs)
    synced = tfpn.get_norm_act_layer(name, synchronized=True, **kwargs)
    np.testing.assert_allclose(synced(x, training=True).numpy(),
                               plain(x, training=True).numpy(), atol=1e-5)
    np.testing.assert_allclose(synced.moving_variance.numpy(), plain.moving_variance.numpy(),
                               rtol=1e-5)


def test_factory_names():
    assert {"evonorm_b0", "evonorm_s0", "iebn", "bgn", "cbn"} <= set(tfpn.available_norm_acts())
    assert isinstance(tfpn.get_norm_act_layer("IEBN"), tfpn.InstanceEnhancementBatchNormalization)
    layer = tfpn.get_norm_act_layer("bgn", groups=4)
    assert isinstance(layer, tfpn.BatchGroupNormalization) and layer.groups == 4
    assert (layer.epsilon, layer.momentum) == (1e-5, 0.9)
