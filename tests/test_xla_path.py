"""The XLA-designed reference path (`tf_proxynorm.ops.group_norm.group_norm_act_reference`,
behind every `implementation="auto"` call under `jit_compile=True`)
against float64 references: tests/reference.py, tests/reference_fused.py (the contract's
forward/backward formulas and `layer_tf64`, float64 TF autodiff written from the spec).

- the hand-derived backward, in float64, to 1e-10 of autodiff of `layer_tf64` for every
  output and gradient (x, gamma, beta, proxy_beta, proxy_gamma) over groups 1/2/3/C (1 to
  16 channels per group), ranks 2-5, channel axes first/last/middle, activations,
  center/scale, PN on/off;
- the layer under `jit_compile=True` (`implementation="auto"`, so the per-call fallback) over
  the pairwise grid of test_fused_op (dtypes float32/float16/bfloat16, batch 0 and 1);
- inputs of mean 1e4 and std 1 and constant inputs; second order against central
  differences of the float64 formulas; `model.fit(jit_compile=True)`; no custom op in the
  compiled function.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import reference as R
import reference_fused as RF
import tf_proxynorm as tfpn
from test_fused_op import (CASES, TOL, _case_id, assert_close, case_layer_and_inputs,
                           reference_layer_gradients)
from tf_proxynorm.ops.group_norm import group_norm_act_reference

PARAMS = ("gamma", "beta", "proxy_beta", "proxy_gamma")


def _proxy_stats_tf(gamma, beta, proxy_beta, proxy_gamma, activation):
    """float64 proxy mean / inverse std written inline from the spec (not the package)."""
    q = tf.constant(R.quantiles(), tf.float64)[:, None]
    u = RF._act_tf(activation, gamma * (proxy_beta + (1.0 + proxy_gamma) * q) + beta)
    m = tf.reduce_mean(u, axis=0)
    return m, 1.0 / tf.sqrt(tf.reduce_mean(tf.square(u - m), axis=0) + R.PROXY_EPSILON)


def _float64_case(rng, shape, axis, groups, activation, proxy, center, scale, offset=0.5):
    """Output and every gradient of the new path and of layer_tf64, all in float64."""
    channels = shape[axis]
    x = tf.constant(offset + 2.0 * rng.standard_normal(shape))
    values = {"gamma": 1.0 + 0.3 * rng.standard_normal(channels),
              "beta": 0.3 * rng.standard_normal(channels),
              "proxy_beta": 0.2 * rng.standard_normal(channels),
              "proxy_gamma": 0.2 * rng.standard_normal(channels)}
    on = {"gamma": scale, "beta": center, "proxy_beta": proxy, "proxy_gamma": proxy}
    params = {k: tf.constant(v) for k, v in values.items() if on[k]}
    w = tf.constant(rng.standard_normal(shape))
    watched = [x] + list(params.values())

    def run(fn):
        with tf.GradientTape() as tape:
            tape.watch(watched)
            y = fn()
            loss = tf.reduce_sum(y * w)
        return y, tape.gradient(loss, watched, unconnected_gradients="zero")

    def ours():
        pm = pis = None
        if proxy:
            g = params.get("gamma", tf.ones(channels, tf.float64))
            b = params.get("beta", tf.zeros(channels, tf.float64))
            pm, pis = _proxy_stats_tf(g, b, params["proxy_beta"], params["proxy_gamma"],
                                      activation)
        return group_norm_act_reference(
            x, params.get("gamma"), params.get("beta"), groups=groups, axis=axis,
            epsilon=1e-3, activation=activation, proxy_mean=pm, proxy_inv_std=pis)

    def ref():
        return RF.layer_tf64(x, params.get("gamma"), params.get("beta"),
                             params.get("proxy_beta"), params.get("proxy_gamma"),
                             groups=groups, axis=axis, epsilon=1e-3, activation=activation)

    return run(ours), run(ref), ["x"] + list(params)


FLOAT64_GRID = [
    # (shape, axis, groups, activation, proxy, center, scale)
    ((3, 8), -1, 2, "relu", True, True, True),
    ((3, 8), -1, 1, "gelu", False, True, True),
    ((3, 8), -1, 8, "silu", True, False, True),
    ((2, 7, 12), -1, 3, "leaky_relu", True, True, False),
    ((2, 12, 7), 1, 12, "identity", True, True, True),
    ((2, 5, 3, 8), -1, 4, "relu", True, False, False),
    ((2, 8, 5, 3), 1, 2, "silu", False, True, True),
    ((2, 8, 5, 3), 1, 1, "gelu", True, True, True),
    ((2, 5, 8, 3), 2, 4, "relu", True, True, True),        # channels on a middle axis
    ((2, 3, 2, 3, 8), -1, 8, "gelu", True, True, True),
    ((2, 8, 3, 2, 3), 1, 2, "leaky_relu", False, False, True),
    ((1, 4, 4, 6), -1, 3, "silu", True, True, True),       # batch 1
    # 8+ channels per group: groups formed by reshape/repeat (smaller: a one-hot matmul)
    ((2, 3, 24), -1, 3, "relu", True, True, True),
    ((2, 32, 3, 2), 1, 2, "silu", True, True, True),
]


@pytest.mark.parametrize("shape, axis, groups, activation, proxy, center, scale", FLOAT64_GRID,
                         ids=lambda v: str(v).replace(" ", ""))
def test_hand_derived_backward_is_exact_in_float64(rng, shape, axis, groups, activation, proxy,
                                                   center, scale):
    (y, grads), (ref_y, ref_grads), names = _float64_case(
        rng, shape, axis, groups, activation, proxy, center, scale)
    assert y.dtype == tf.float64
    np.testing.assert_allclose(y.numpy(), ref_y.numpy(), rtol=1e-10, atol=1e-10)
    for name, got, expected in zip(names, grads, ref_grads):
        np.testing.assert_allclose(got.numpy(), expected.numpy(), rtol=1e-9, atol=1e-9,
                                   err_msg=f"d{name}")


def test_any_callable_activation_uses_autodiff(rng):
    """A callable without a known derivative: same forward, gradients by autodiff."""
    x = rng.standard_normal((2, 4, 3, 6))
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = group_norm_act_reference(xt, groups=3, activation=tf.math.tanh)
    dx = tape.gradient(y, xt)
    np.testing.assert_allclose(y.numpy(), np.tanh(R.group_normalize(x, 3)), atol=1e-12)
    yn = R.group_normalize(x, 3)
    ref_dx = RF.backward(1.0 - np.tanh(yn) ** 2, x, np.ones(6), np.zeros(6), np.zeros(6),
                         np.ones(6), groups=3, epsilon=1e-3, activation="identity")[0]
    np.testing.assert_allclose(dx.numpy(), ref_dx, atol=1e-10)


@pytest.mark.parametrize("axis", [-1, 1])
def test_unknown_batch_and_spatial_sizes(rng, axis):
    """Positions unknown at trace time (the sums then reduce instead of using a matmul)."""
    spec = tf.TensorSpec([None, None, None, 8] if axis == -1 else [None, 8, None, None])

    @tf.function(input_signature=[spec])
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = group_norm_act_reference(x, groups=4, axis=axis, activation="silu")
        return y, tape.gradient(y, x)

    x = rng.standard_normal((2, 5, 3, 8) if axis == -1 else (2, 8, 5, 3)).astype("float32")
    y, dx = step(tf.constant(x))
    attrs = dict(groups=4, epsilon=1e-3, activation="silu", channels_last=axis == -1)
    ones, zeros = np.ones(8), np.zeros(8)
    assert_close(y, R.group_norm_act(x, 4, axis, 1e-3, "silu"), 5e-5, "y")
    assert_close(dx, RF.backward(np.ones(x.shape), x, ones, zeros, zeros, ones, **attrs)[0],
                 5e-5, "dx")


# -- the layer under jit_compile=True over the pairwise grid of test_fused_op --------------

def _xla_layer_and_reference(case, rng):
    layer, values, groups, x_t, x_q, w, w_q = case_layer_and_inputs(case, rng, "auto")

    @tf.function(jit_compile=True)
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * w)
        return y, tape.gradient(loss, [x] + layer.trainable_weights)

    y, grads = step(x_t)
    return (y, grads) + reference_layer_gradients(case, groups, x_q, w_q, values, layer)


def _check_case(case):
    rng = np.random.default_rng(len(_case_id(case)) + 2)
    y, grads, ref_y, names, ref_grads = _xla_layer_and_reference(case, rng)
    tol = TOL[case["dtype"]]
    assert y.dtype == tf.as_dtype(case["dtype"])
    assert_close(y, ref_y.numpy(), tol, "y")
    for name, grad, ref in zip(names, grads, ref_grads):
        assert grad is not None, name
        assert_close(grad, ref.numpy(), tol if name == "x" else max(tol, 1e-4), f"d{name}")


QUICK = [c for c in CASES if c["dtype"] == "float32" and c["batch"] > 0][:3]


@pytest.mark.parametrize("case", QUICK, ids=_case_id)
def test_layer_under_xla_quick(case):
    _check_case(case)


@pytest.mark.slow
@pytest.mark.parametrize("case", [c for c in CASES if c not in QUICK], ids=_case_id)
def test_layer_under_xla_grid(case):
    _check_case(case)


# -- numerics -------------------------------------------------------------------------------

def _function_grads(x, params, dy, *, groups, axis, activation, jit):
    """y and the gradients of the new path for x and (gamma, beta, pm, pis), float32."""
    def f(x, gamma, beta, pm, pis, dy):
        with tf.GradientTape() as tape:
            tape.watch([x, gamma, beta, pm, pis])
            y = group_norm_act_reference(x, gamma, beta, groups=groups, axis=axis,
                                         activation=activation, proxy_mean=pm,
                                         proxy_inv_std=pis)
        return [y] + tape.gradient(y, [x, gamma, beta, pm, pis], output_gradients=dy)
    return tf.function(f, jit_compile=jit)(
        *(tf.constant(v, tf.float32) for v in (x, *params, dy)))


@pytest.mark.parametrize("jit", [False, True], ids=["function", "xla"])
@pytest.mark.parametrize("axis", [-1, 1])
def test_large_mean_is_exact_to_float32_rounding(rng, jit, axis):
    """Mean 1e4, std 1: x - mean is computed from a per-group shift, so even relu's kink
    (whose side flips with an error of the mean) matches the float64 reference; errors are
    a few float32 ulps of the O(1) outputs, not of 1e4 (whose ulp is 1e-3)."""
    shape = (3, 16, 9, 8) if axis == -1 else (3, 8, 16, 9)
    x = (1e4 + rng.standard_normal(shape)).astype(np.float32)
    channels = shape[axis]
    params = [(1 + 0.3 * rng.standard_normal(channels)), 0.3 * rng.standard_normal(channels),
              0.3 * rng.standard_normal(channels), rng.uniform(0.5, 2, channels)]
    params = [p.astype(np.float32) for p in params]
    dy = rng.standard_normal(shape).astype(np.float32)
    got = _function_grads(x, params, dy, groups=4, axis=axis, activation="relu", jit=jit)
    attrs = dict(groups=4, epsilon=1e-3, activation="relu", channels_last=axis == -1,
                 use_proxy=True)
    x64 = x.astype(np.float64)
    refs = [RF.forward(x64, *params, **attrs)[0]] + list(RF.backward(dy, x64, *params, **attrs))
    for name, out, ref in zip(("y", "dx", "dgamma", "dbeta", "dpm", "dpis"), got, refs):
        assert_close(out, ref, 3e-6, name)


@pytest.mark.parametrize("jit", [False, True], ids=["function", "xla"])
def test_constant_groups(rng, jit):
    """Zero variance: xhat = 0, y = PN(act(beta)), finite gradients equal to the reference."""
    x = np.repeat(rng.uniform(-5, 5, (3, 1, 1, 4)), 3, axis=3) * np.ones((3, 5, 5, 12))
    params = [(1 + 0.3 * rng.standard_normal(12)), 0.3 * rng.standard_normal(12),
              0.3 * rng.standard_normal(12), rng.uniform(0.5, 2, 12)]
    params = [p.astype(np.float32) for p in params]
    dy = rng.standard_normal(x.shape).astype(np.float32)
    got = _function_grads(x, params, dy, groups=4, axis=-1, activation="silu", jit=jit)
    attrs = dict(groups=4, epsilon=1e-3, activation="silu", channels_last=True, use_proxy=True)
    x64 = x.astype(np.float32).astype(np.float64)
    refs = [RF.forward(x64, *params, **attrs)[0]] + list(RF.backward(dy, x64, *params, **attrs))
    for name, out, ref in zip(("y", "dx", "dgamma", "dbeta", "dpm", "dpis"), got, refs):
        assert np.isfinite(out.numpy()).all(), name
        assert_close(out, ref, 5e-5, name)


# -- second order ---------------------------------------------------------------------------

@pytest.mark.parametrize("activation, axis, proxy, jit", [
    ("gelu", -1, True, False), pytest.param("silu", 1, True, True, marks=pytest.mark.slow),
    ("relu", -1, False, False)])
def test_second_order_matches_finite_differences(rng, activation, axis, proxy, jit):
    """Gradient penalty P = sum(w2 * (dL/dx)^2), L = sum(w * y): dP/d(x, gamma, beta, pm, pis)
    of the new path against float64 central differences of RF.backward (the contract's
    first-derivative formulas)."""
    shape = (2, 3, 2, 4) if axis == -1 else (2, 4, 3, 2)
    channels = 4
    x = rng.standard_normal(shape)
    params = [1 + 0.3 * rng.standard_normal(channels), 0.3 * rng.standard_normal(channels),
              0.3 * rng.standard_normal(channels), rng.uniform(0.5, 2, channels)]
    w = rng.standard_normal(shape)
    w2 = rng.standard_normal(shape)
    attrs = dict(groups=2, epsilon=1e-3, activation=activation, channels_last=axis == -1,
                 use_proxy=proxy)

    def penalty_ref(args):
        dx = RF.backward(w, *args, **attrs)[0]
        return float(np.sum(w2 * dx ** 2))

    def penalty_grads(x, gamma, beta, pm, pis):
        inputs = [x, gamma, beta, pm, pis]
        with tf.GradientTape() as outer:
            outer.watch(inputs)
            with tf.GradientTape() as inner:
                inner.watch(x)
                y = group_norm_act_reference(
                    x, gamma, beta, groups=2, axis=axis, activation=activation,
                    proxy_mean=pm if proxy else None, proxy_inv_std=pis if proxy else None)
                loss = tf.reduce_sum(y * w)
            penalty = tf.reduce_sum(w2 * tf.square(inner.gradient(loss, x)))
        return penalty, outer.gradient(penalty, inputs, unconnected_gradients="zero")

    dtype = tf.float32 if jit else tf.float64
    fn = tf.function(penalty_grads, jit_compile=True) if jit else penalty_grads
    penalty, grads = fn(*(tf.constant(v, dtype) for v in [x] + params))
    args = [x] + params
    assert penalty.numpy() == pytest.approx(penalty_ref(args), rel=1e-5 if jit else 1e-10)
    h = 1e-5
    for index, grad in enumerate(grads):
        numeric = np.zeros_like(args[index])
        for pos in np.ndindex(args[index].shape):
            plus = [a.copy() for a in args]
            minus = [a.copy() for a in args]
            plus[index][pos] += h
            minus[index][pos] -= h
            numeric[pos] = (penalty_ref(plus) - penalty_ref(minus)) / (2 * h)
        tol = 2e-3 if jit else 1e-6
        np.testing.assert_allclose(grad.numpy(), numeric, rtol=tol, atol=tol,
                                   err_msg=f"d penalty / d input {index}")


def test_fused_op_second_order_still_matches_reference(rng):
    """The fused op's second derivative differentiates `group_norm_act_reference` (now the
    custom-gradient path) with nested tapes: a penalty through the fused layer."""
    if not tfpn.fused_op_available():
        pytest.skip("fused op unavailable")
    layer = tfpn.GroupNormAct(groups=3, activation="gelu", proxy_norm=True,
                              implementation="fused")
    ref_layer = tfpn.GroupNormAct(groups=3, activation="gelu", proxy_norm=True,
                                  implementation="reference")
    shape = (2, 4, 5, 6)
    layer.build(shape), ref_layer.build(shape)
    for a, b in zip(layer.weights, ref_layer.weights):
        value = (0.3 * rng.standard_normal(6) + (a.name == "gamma")).astype("float32")
        a.assign(value), b.assign(value)
    x = tf.constant(rng.standard_normal(shape).astype("float32"))
    w = tf.constant(rng.standard_normal(shape).astype("float32"))

    def grads(lyr):
        with tf.GradientTape() as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                loss = tf.reduce_sum(lyr(x) * w)
            penalty = tf.reduce_sum(tf.square(inner.gradient(loss, x)))
        return outer.gradient(penalty, [x] + lyr.trainable_weights)

    for got, expected in zip(grads(layer), grads(ref_layer)):
        assert_close(got, expected.numpy(), 1e-4, "penalty gradient")


# -- compiled graphs and training -------------------------------------------------------------

def test_xla_function_contains_no_custom_op(rng):
    """implementation="auto" under jit_compile=True: the dispatcher falls back per call, so
    neither the traced graph nor the compiled HLO contains the fused op."""
    layer = tfpn.GroupNormAct(groups=4, proxy_norm=True)
    x = tf.constant(rng.standard_normal((2, 6, 6, 16)).astype("float32"))
    layer.build(x.shape)

    @tf.function(jit_compile=True)
    def step(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x)
        return y, tape.gradient(y, [x] + layer.trainable_weights)

    graph = step.get_concrete_function(x).graph
    types = {op.type for op in graph.get_operations()}
    for function in graph._functions.values():
        types |= {node.op for node in function.definition.node_def}
    assert not any(t.startswith("TfProxyNorm") for t in types), sorted(types)
    hlo = step.experimental_get_compiler_ir(x)(stage="hlo")
    assert "TfProxyNorm" not in hlo and "custom-call" not in hlo
    y, _ = step(x)
    assert np.isfinite(y.numpy()).all()


def _tiny_model(seed):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(16, 3, padding="same", use_bias=False)(inputs)
    h = tfpn.GroupNormAct(groups=4, proxy_norm=True)(h)
    h = keras.layers.Conv2D(16, 3, padding="same", use_bias=False)(h)
    h = tfpn.LayerNormAct(activation="silu", proxy_norm=True)(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, keras.layers.Dense(4)(h))


@pytest.mark.slow
def test_model_fit_with_jit_compile_matches_without(rng):
    """model.fit(jit_compile=True) trains through the XLA path and follows the same
    trajectory as jit_compile=False (fused op where it can run, else the same path)."""
    x = rng.standard_normal((32, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 4, 32)
    losses = {}
    for jit in (True, False):
        model = _tiny_model(0)
        model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=jit,
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        history = model.fit(x, y, batch_size=8, epochs=2, shuffle=False, verbose=0)
        losses[jit] = history.history["loss"]
        assert np.isfinite(losses[jit]).all()
    np.testing.assert_allclose(losses[True], losses[False], rtol=1e-4)
    assert losses[True][1] < losses[True][0]
