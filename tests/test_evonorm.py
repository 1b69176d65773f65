"""EvoNorm-B0 / EvoNorm-S0 against the float64 references of spec section 1."""


import numpy as np
import pytest
import tensorflow as tf

import reference_other as RO
import tf_proxynorm as tfpn
from conftest import set_params

SHAPES = {2: (6, 48), 3: (3, 7, 48), 4: (2, 5, 3, 48)}


def _input(rng, rank, axis, scale=2.0, offset=0.5):
    x = rng.standard_normal(SHAPES[rank]) * scale + offset
    return (np.moveaxis(x, -1, 1) if axis == 1 else x).astype("float32")


def _params(rng, c, v=True):
    p = {"gamma": 1.0 + 0.3 * rng.standard_normal(c), "beta": 0.3 * rng.standard_normal(c)}
    if v:
        p["v"] = 1.0 + 0.5 * rng.standard_normal(c)
    return {k: val.astype("float32") for k, val in p.items()}


# ---- S0 --------------------------------------------------------------------------------
@pytest.mark.parametrize("rank, axis", [(2, -1), (3, -1), (3, 1), (4, -1), (4, 1)])
@pytest.mark.parametrize("kwargs, groups", [
    ({}, 24),                    # default 32 lowered to 24 for 48 channels (official rule)
    (dict(groups=1), 1), (dict(groups=16), 16), (dict(groups=48), 48),
    (dict(groups=5), 4),         # lowered from 5 to 4
    (dict(group_size=8), 6),
])
def test_s0_matches_reference(rng, rank, axis, kwargs, groups):
    x = _input(rng, rank, axis)
    layer = tfpn.EvoNormS0(axis=axis, **kwargs)
    layer.build(x.shape)
    assert layer._groups == groups == (RO.official_groups(48, kwargs.get("groups", 32))
                                       if "group_size" not in kwargs else 6)
    params = _params(rng, 48)
    set_params(layer, params)
    ref = RO.evonorm_s0(x, groups, axis, **params)
    for training in (True, False):  # batch-independent: same function in both modes
        np.testing.assert_allclose(layer(x, training=training).numpy(), ref, atol=2e-5, rtol=1e-5)


def test_s0_is_batch_independent(rng):
    x = _input(rng, 4, -1)
    layer = tfpn.EvoNormS0(groups=8)
    layer.build(x.shape)
    set_params(layer, _params(rng, 48))
    batch = layer(x, training=True).numpy()
    alone = np.concatenate([layer(x[i:i + 1], training=True).numpy() for i in range(len(x))])
    np.testing.assert_allclose(alone, batch, atol=1e-6)


def test_s0_spec_values_at_init(rng):
    """Spec 1: S0 at init on N(0,1) with large groups ~ swish(x): mean 0.2066, var 0.3131."""
    x = rng.standard_normal((2, 128, 128, 4)).astype("float32")
    y = tfpn.EvoNormS0(groups=1)(x).numpy()
    # 131072 values: sampling std of the mean ~ 0.0016, of the variance ~ 0.002.
    assert y.mean() == pytest.approx(0.2066, abs=0.006)
    assert y.var() == pytest.approx(0.3131, abs=0.008)


# ---- B0 --------------------------------------------------------------------------------
@pytest.mark.parametrize("rank, axis", [(3, -1), (3, 1), (4, -1), (4, 1)])
def test_b0_training_inference_and_moving_variance(rng, rank, axis):
    x = _input(rng, rank, axis)
    layer = tfpn.EvoNormB0(axis=axis)
    layer.build(x.shape)
    params = _params(rng, 48)
    set_params(layer, params)
    expected_mv = np.ones(48)
    for step in range(2):
        xs = x * (1 + step)
        y = layer(xs, training=True).numpy()
        ref, batch_var = RO.evonorm_b0(xs, axis, **params)
        np.testing.assert_allclose(y, ref, atol=2e-5, rtol=1e-5)
        expected_mv = expected_mv - (expected_mv - batch_var) * 0.1   # decay 0.9
        np.testing.assert_allclose(layer.moving_variance.numpy(), expected_mv, rtol=1e-5)
    # Inference: moving variance, unchanged by the call.
    y = layer(x, training=False).numpy()
    ref, _ = RO.evonorm_b0(x, axis, batch_var=expected_mv, **params)
    np.testing.assert_allclose(y, ref, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), expected_mv, rtol=1e-5)


def test_b0_trainable_false_is_inference(rng):
    x = _input(rng, 4, -1)
    layer = tfpn.EvoNormB0()
    layer.build(x.shape)
    ref, _ = RO.evonorm_b0(x, batch_var=np.ones(48))
    np.testing.assert_allclose(layer(x).numpy(), ref, atol=2e-5)   # no `training`: inference
    layer.trainable = False
    y = layer(x, training=True).numpy()
    np.testing.assert_allclose(y, ref, atol=2e-5)
    np.testing.assert_array_equal(layer.moving_variance.numpy(), np.ones(48))


def test_b0_spec_values_at_init(rng):
    """Spec 1: B0 at init on N(0,1): mean -0.2064, variance 0.5489."""
    x = rng.standard_normal((8, 128, 128, 2)).astype("float32")
    y = tfpn.EvoNormB0()(x, training=True).numpy()
    assert y.mean() == pytest.approx(-0.2064, abs=0.006)
    assert y.var() == pytest.approx(0.5489, abs=0.01)


def test_scaling_the_input_changes_s0_not_b0(rng):
    """Spec 1 says scaling x by 4 changes both outputs. True for S0 (the gate sigmoid(v x)
    sees the scale). B0 is homogeneous of degree 0 up to epsilon: numerator, both stds and
    v * x all scale with x, so only inputs whose variance is comparable to epsilon change."""
    x = rng.standard_normal((4, 8, 8, 32)).astype("float32")
    s0, b0 = tfpn.EvoNormS0(), tfpn.EvoNormB0()
    for layer, ref in ((s0, lambda t: RO.evonorm_s0(t, 32)), (b0, lambda t: RO.evonorm_b0(t)[0])):
        for scale in (1.0, 4.0, 1e-3, 4e-3):
            np.testing.assert_allclose(layer(scale * x, training=True).numpy(),
                                       ref(scale * x), atol=2e-5, rtol=1e-4)
    change = lambda layer, s: np.abs(layer(4 * s * x, training=True).numpy()  # noqa: E731
                                     - layer(s * x, training=True).numpy()).mean()
    assert change(s0, 1.0) > 0.1
    assert change(b0, 1.0) < 1e-4
    assert change(b0, 1e-3) > 0.05


# ---- activation argument -----------------------------------------------------------------
@pytest.mark.parametrize("cls", [tfpn.EvoNormS0, tfpn.EvoNormB0])
def test_linear_form_is_the_affine_only(rng, cls):
    """Official `nonlinearity=False`: x * gamma + beta, no v and no moving variance."""
    x = _input(rng, 4, -1)
    layer = cls(activation=None)
    layer.build(x.shape)
    assert [w.name for w in layer.weights] == ["gamma", "beta"]
    params = _params(rng, 48, v=False)
    set_params(layer, params)
    np.testing.assert_allclose(layer(x, training=True).numpy(),
                               x * params["gamma"] + params["beta"], atol=1e-5)


@pytest.mark.parametrize("name", ["evonorm_s0", "evonorm_b0"])
def test_builder_activation_selects_the_evonorm_form(rng, name):
    x = _input(rng, 4, -1)
    ours = tfpn.get_norm_act_layer(name, activation="relu")
    default = tfpn.get_norm_act_layer(name)
    assert ours.nonlinear and default.activation == "evonorm"
    np.testing.assert_array_equal(ours(x, training=True).numpy(),
                                  default(x, training=True).numpy())


# ---- gradients ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["s0", "b0"])
def test_gradients_match_reference_finite_differences(rng, name):
    c = 4
    x = rng.standard_normal((2, 3, 3, c)) + 0.3
    params = {k: v.astype(np.float64) for k, v in _params(rng, c).items()}
    layer = (tfpn.EvoNormS0(groups=2, dtype="float64") if name == "s0"
             else tfpn.EvoNormB0(dtype="float64"))
    layer.build(x.shape)
    set_params(layer, params)
    r = rng.standard_normal(x.shape)

    def ref_loss(x_, p):
        y = (RO.evonorm_s0(x_, 2, -1, **p) if name == "s0" else RO.evonorm_b0(x_, -1, **p)[0])
        return float((y * r).sum())

    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        loss = tf.reduce_sum(layer(xt, training=True) * r)
    names = ["gamma", "beta", "v"]
    grads = tape.gradient(loss, [xt] + [getattr(layer, n) for n in names])
    RO.assert_matches_finite_differences(grads, names, x, params, ref_loss)


# ---- modes, dtypes, serialization --------------------------------------------------------
@pytest.mark.parametrize("name", ["evonorm_s0", "evonorm_b0"])
def test_xla_compiles_and_matches_eager(rng, name):
    x = _input(rng, 4, -1)
    eager, compiled = (tfpn.get_norm_act_layer(name) for _ in range(2))
    jit = tf.function(lambda t, training: compiled(t, training=training), jit_compile=True)
    for training in (True, False):
        np.testing.assert_allclose(jit(tf.constant(x), training).numpy(),
                                   eager(x, training=training).numpy(), atol=1e-5)
    if name == "evonorm_b0":
        np.testing.assert_allclose(compiled.moving_variance.numpy(),
                                   eager.moving_variance.numpy(), rtol=1e-6)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"], indirect=True)
@pytest.mark.parametrize("name", ["evonorm_s0", "evonorm_b0"])
def test_mixed_precision(rng, policy, name):
    compute = "float16" if policy == "mixed_float16" else "bfloat16"
    x = tf.cast(_input(rng, 4, -1, scale=300.0), compute)
    layer = tfpn.get_norm_act_layer(name)
    y = layer(x, training=True)   # dtypes: tests/test_layer_contract.py
    x64 = tf.cast(x, "float64").numpy()
    ref = (RO.evonorm_s0(x64, 24) if name == "evonorm_s0" else RO.evonorm_b0(x64)[0])
    tol = 3e-2 if compute == "bfloat16" else 4e-3
    np.testing.assert_allclose(tf.cast(y, "float32").numpy(), ref, atol=tol, rtol=tol)


@pytest.mark.parametrize("make, shape, match", [
    (lambda: tfpn.EvoNormS0(group_size=5), (2, 4, 4, 12), "Received: group_size=5"),
    (lambda: tfpn.EvoNormS0(axis=2), (2, 4, 4, 12), "Received: axis=2"),
    (lambda: tfpn.EvoNormB0(), (2, 12), "rank >= 3"),
    (lambda: tfpn.EvoNormB0(axis=4), (2, 4, 4, 12), "Received: axis=4"),
])
def test_build_errors(make, shape, match):
    with pytest.raises(ValueError, match=match):
        make().build(shape)


@pytest.mark.parametrize("make, match", [
    (lambda: tfpn.EvoNormS0(groups=8, group_size=4), "Received: groups=8, group_size=4"),
    (lambda: tfpn.EvoNormS0(groups=0), "Received: groups=0"),
    (lambda: tfpn.EvoNormS0(activation="nope"), "Received: activation='nope'"),
    (lambda: tfpn.EvoNormB0(momentum=1.5), "Received: momentum=1.5"),
    (lambda: tfpn.EvoNormB0(epsilon=0.0), "Received: epsilon=0.0"),
    (lambda: tfpn.get_norm_act_layer("evonorm_b0", proxy_norm=True), "Received: proxy_norm=True"),
    (lambda: tfpn.get_norm_act_layer("evonorm_s0", group=4), "Received: group=4"),
])
def test_constructor_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()
