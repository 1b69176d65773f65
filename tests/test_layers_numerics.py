"""Every norm+act layer against the float64 NumPy reference (tests/reference.py)."""

import itertools

import keras
import numpy as np
import pytest
import tensorflow as tf

import reference as R
import tf_proxynorm as tfpn
from conftest import random_params, set_params

SHAPES = {2: (4, 64), 3: (3, 7, 64), 4: (2, 5, 3, 64), 5: (2, 3, 2, 3, 64)}
ACTS = ["relu", "silu", "gelu", "leaky_relu", None]


def _input(rng, rank, axis):
    x = rng.standard_normal(SHAPES[rank]).astype("float32") * 2.0 + 0.5
    return np.moveaxis(x, -1, 1) if axis == 1 else x


def _check(layer, x, params, groups, axis, act, proxy, atol=3e-5):
    layer.build(x.shape)
    set_params(layer, params)
    y = layer(x).numpy()
    ref = R.group_norm_act(
        x, groups, axis, 1e-3, act, params.get("gamma") if layer.scale else None,
        params.get("beta") if layer.center else None,
        (params["proxy_beta"], params["proxy_gamma"]) if proxy else None)
    np.testing.assert_allclose(y, ref, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("rank, axis, groups, proxy", [
    (r, a, g, p) for r, a, g, p in itertools.product([2, 3, 4, 5], [-1, 1], [1, 2, 32, 64],
                                                     [False, True])
    if not (r == 2 and a == 1)])
def test_group_norm_act_grid(rng, implementation, rank, axis, groups, proxy):
    act = ACTS[(rank + groups) % len(ACTS)]
    x = _input(rng, rank, axis)
    layer = tfpn.GroupNormAct(groups=groups, activation=act, proxy_norm=proxy, axis=axis,
                              implementation=implementation)
    _check(layer, x, random_params(rng, 64, proxy), groups, axis, act, proxy)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("center, scale", [(True, True), (False, True), (True, False),
                                           (False, False)])
@pytest.mark.parametrize("proxy", [False, True])
def test_activations_center_scale(rng, implementation, act, center, scale, proxy):
    x = _input(rng, 4, -1)
    layer = tfpn.GroupNormAct(groups=8, activation=act, proxy_norm=proxy, center=center,
                              scale=scale, implementation=implementation)
    _check(layer, x, random_params(rng, 64, proxy), 8, -1, act, proxy)


@pytest.mark.parametrize("cls, groups", [(tfpn.LayerNormAct, 1), (tfpn.InstanceNormAct, 64)])
@pytest.mark.parametrize("proxy", [False, True])
@pytest.mark.parametrize("axis", [-1, 1])
def test_layer_and_instance_norm_act(rng, implementation, cls, groups, proxy, axis):
    x = _input(rng, 4, axis)
    layer = cls(activation="silu", proxy_norm=proxy, axis=axis, implementation=implementation)
    _check(layer, x, random_params(rng, 64, proxy), groups, axis, "silu", proxy)


def test_any_keras_activation_in_reference_path(rng):
    x = _input(rng, 3, -1)
    layer = tfpn.GroupNormAct(groups=4, activation="tanh", proxy_norm=True)
    layer.build(x.shape)
    y = layer(x).numpy()
    yn = R.group_normalize(x, 4)
    q = R.quantiles()[:, None]
    m, v = np.tanh(q).mean(0), np.tanh(q).var(0)
    np.testing.assert_allclose(y, (np.tanh(yn) - m) / np.sqrt(v + 0.03), atol=3e-5)


@pytest.mark.parametrize("axis", [-1, 1])
def test_proxy_norm_act_alone(rng, axis):
    x = _input(rng, 4, axis)
    layer = tfpn.ProxyNormAct(activation="relu", axis=axis)
    layer.build(x.shape)
    params = random_params(rng, 64)
    set_params(layer, params)
    ref = R.affine_act_proxy(x, params["gamma"], params["beta"], axis, "relu",
                             (params["proxy_beta"], params["proxy_gamma"]))
    np.testing.assert_allclose(layer(x).numpy(), ref, atol=3e-5)


def test_ln_pn_output_statistics_spec_6_6(rng):
    """LN+PN at init on N(0,1) data: per-channel mean ~ 0, variance ~ v/(v+0.03) = 0.924."""
    x = rng.standard_normal((256, 8, 8, 32)).astype("float32")
    y = tfpn.LayerNormAct(proxy_norm=True)(x).numpy()
    # 16384 values per channel: sampling std of a channel mean ~ 0.0075, of a variance ~ 0.012.
    assert np.abs(y.mean((0, 1, 2))).max() < 0.035
    np.testing.assert_allclose(y.var((0, 1, 2)), 0.924, atol=0.045)
    # Var(relu(Z)) / (v + eps) = 0.3408 / 0.3680 = 0.926 for exactly Gaussian y; the spec's 0.924.
    assert y.var() == pytest.approx(0.924, abs=0.004)


# ---- equivalences --------------------------------------------------------------------------
@pytest.mark.parametrize("groups, other, activation", [
    (1, "LayerNormAct", "relu"), (64, "InstanceNormAct", "gelu")], ids=["1=LN", "C=IN"])
def test_groups_1_and_c_equal_layer_and_instance_norm_act(rng, implementation, groups, other,
                                                          activation):
    x = _input(rng, 4, -1)
    kw = dict(activation=activation, proxy_norm=True, implementation=implementation)
    a, b = tfpn.GroupNormAct(groups=groups, **kw), getattr(tfpn, other)(**kw)
    a.build(x.shape), b.build(x.shape)
    params = random_params(rng, 64)
    set_params(a, params), set_params(b, params)
    np.testing.assert_allclose(a(x).numpy(), b(x).numpy(), atol=1e-6)


@pytest.mark.parametrize("axis", [-1, 1, 3])
def test_linear_group_norm_act_equals_keras_group_normalization(rng, implementation, axis):
    x = rng.standard_normal((2, 6, 5, 16)).astype("float32") * 3 + 1
    if axis == 1:
        x = np.moveaxis(x, -1, 1)
    ours = tfpn.GroupNormAct(groups=4, activation=None, axis=axis, implementation=implementation)
    keras_gn = keras.layers.GroupNormalization(groups=4, axis=axis, epsilon=1e-3)
    ours.build(x.shape), keras_gn.build(x.shape)
    params = random_params(rng, 16, proxy=False)
    set_params(ours, params), set_params(keras_gn, params)
    np.testing.assert_allclose(ours(x).numpy(), keras_gn(x).numpy(), atol=2e-5)


# ---- BatchNormAct -------------------------------------------------------------------------
@pytest.mark.parametrize("axis", [-1, 1])
def test_batch_norm_act_training_and_moving_averages(rng, axis):
    x = _input(rng, 4, axis)
    layer = tfpn.BatchNormAct(activation="relu", axis=axis, momentum=0.9)
    layer.build(x.shape)
    params = random_params(rng, 64, proxy=False)
    set_params(layer, params)
    y = layer(x, training=True).numpy()
    np.testing.assert_allclose(y, R.batch_norm_act(x, axis, 1e-3, "relu", **params), atol=3e-5)
    red = tuple(a for a in range(4) if a != axis % 4)
    np.testing.assert_allclose(layer.moving_mean.numpy(), 0.1 * x.mean(red), atol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), 0.9 + 0.1 * x.var(red), atol=1e-5)
    # Inference uses the moving statistics and leaves them unchanged.
    mm, mv = layer.moving_mean.numpy(), layer.moving_variance.numpy()
    y_inf = layer(x, training=False).numpy()
    np.testing.assert_allclose(
        y_inf, R.batch_norm_act(x, axis, 1e-3, "relu", mean=mm, var=mv, **params), atol=3e-5)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), mm)


def test_batch_norm_act_trainable_false_is_inference(rng):
    x = _input(rng, 4, -1)
    layer = tfpn.BatchNormAct()
    layer.build(x.shape)
    layer.trainable = False
    y = layer(x, training=True).numpy()
    np.testing.assert_allclose(y, R.batch_norm_act(x, mean=np.zeros(64), var=np.ones(64)),
                               atol=3e-5)
    np.testing.assert_array_equal(layer.moving_mean.numpy(), np.zeros(64))


def test_batch_norm_act_matches_keras_batch_normalization(rng):
    x = _input(rng, 4, -1)
    ours, theirs = tfpn.BatchNormAct(activation=None), keras.layers.BatchNormalization()
    for training in (True, False):
        np.testing.assert_allclose(ours(x, training=training).numpy(),
                                   theirs(x, training=training).numpy(), atol=3e-5)


# ---- gradients ------------------------------------------------------------------------------
@pytest.mark.parametrize("act", ["relu", "silu", "gelu"])
@pytest.mark.parametrize("groups", [1, 2])
def test_gradients_through_the_proxy_statistics(rng, implementation, act, groups):
    """Autodiff of the layer vs float64 central differences of the NumPy reference, for x and
    all four parameters (the proxy statistics depend on gamma, beta, proxy_beta, proxy_gamma)."""
    c = 4
    x = rng.standard_normal((2, 3, 3, c))
    params = {k: v.astype(np.float64) for k, v in random_params(rng, c).items()}
    layer = tfpn.GroupNormAct(groups=groups, activation=act, proxy_norm=True,
                              implementation=implementation)
    layer.build(x.shape)
    w = rng.standard_normal(x.shape)  # a random projection makes the loss a scalar

    def ref_loss(x_, p):
        y = R.group_norm_act(x_, groups, -1, 1e-3, act, p["gamma"], p["beta"],
                             (p["proxy_beta"], p["proxy_gamma"]))
        return float((y * w).sum())

    set_params(layer, params)
    xt = tf.constant(x, tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        loss = tf.reduce_sum(layer(xt) * w)
    names = ["gamma", "beta", "proxy_beta", "proxy_gamma"]
    grads = tape.gradient(loss, [xt] + [getattr(layer, n) for n in names])

    h = 1e-6
    def numeric(target, shape):  # noqa: E306
        g = np.zeros(shape)
        for idx in np.ndindex(*shape):
            hi = {k: v.copy() for k, v in params.items()}
            lo = {k: v.copy() for k, v in params.items()}
            xh, xl = x.copy(), x.copy()
            if target == "x":
                xh[idx] += h
                xl[idx] -= h
            else:
                hi[target][idx] += h
                lo[target][idx] -= h
            g[idx] = (ref_loss(xh, hi) - ref_loss(xl, lo)) / (2 * h)
        return g

    np.testing.assert_allclose(grads[0].numpy(), numeric("x", x.shape), atol=2e-3, rtol=2e-3)
    for name, grad in zip(names, grads[1:]):
        np.testing.assert_allclose(grad.numpy(), numeric(name, (c,)), atol=2e-3, rtol=2e-3,
                                   err_msg=name)
