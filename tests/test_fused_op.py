"""The fused op (TfProxyNorm>GroupNormAct, its gradient op and the layers that dispatch to it)
against float64 references (tests/reference.py, tests/reference_fused.py).

The grid covers every pair of values of groups (1, 2, 32, C), rank (2-5), channel axis,
dtype, activation, PN on/off, center/scale and batch size (including 1 and 0): the full
product would be thousands of cases, every pair of factors is covered in a few dozen.
"""

import itertools

import numpy as np
import pytest
import tensorflow as tf

import reference as R
import reference_fused as RF
import tf_proxynorm as tfpn
from conftest import require_fused
from helpers import assert_close

FACTORS = {
    "groups": ["1", "2", "32", "C"],
    "rank": [2, 3, 4, 5],
    "axis": [-1, 1],
    "dtype": ["float32", "float16", "bfloat16"],
    "activation": list(RF.ACTIVATIONS),
    "proxy": [True, False],
    "affine": [(True, True), (False, False), (True, False), (False, True)],  # (center, scale)
    "batch": [3, 4, 1, 0],
}
SPATIAL = {2: (), 3: (7,), 4: (5, 7), 5: (3, 4, 5)}
# Relative tolerance of an output rounded to the dtype (float32: the kernels' float32
# arithmetic and vectorized exp/erf); absolute tolerance is this times max(1, max |ref|).
TOL = {"float32": 5e-5, "float16": 3e-3, "bfloat16": 2e-2}
# Per-channel float32 outputs (statistics, parameter gradients) of a low-precision x are
# computed in float32 from the rounded inputs, as the reference.
STATS_TOL = 5e-5
POLICY = {"float32": "float32", "float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}


def pairwise(factors):
    """A small list of cases (dicts) in which every pair of values of two factors occurs."""
    names = list(factors)
    sizes = [len(factors[n]) for n in names]
    uncovered = {(i, a, j, b) for i, j in itertools.combinations(range(len(names)), 2)
                 for a in range(sizes[i]) for b in range(sizes[j])}
    cases = []
    while uncovered:
        i, a, j, b = min(uncovered)
        chosen = {i: a, j: b}
        for k in range(len(names)):
            if k in chosen:
                continue
            def gain(v, k=k):
                return sum((min(k, m), v if k < m else w, max(k, m), w if k < m else v)
                           in uncovered for m, w in chosen.items())
            chosen[k] = max(range(sizes[k]), key=lambda v: (gain(v), -v))
        uncovered -= {(p, chosen[p], q, chosen[q])
                      for p, q in itertools.combinations(range(len(names)), 2)}
        cases.append({n: factors[n][chosen[k]] for k, n in enumerate(names)})
    return cases


CASES = pairwise(FACTORS)


def _case_id(case):
    center, scale = case["affine"]
    return (f"g{case['groups']}-r{case['rank']}-ax{case['axis']}-{case['dtype']}-"
            f"{case['activation']}-{'pn' if case['proxy'] else 'nopn'}-"
            f"c{int(center)}s{int(scale)}-n{case['batch']}")


def _geometry(case):
    """(shape, groups, channels_last) of a case."""
    channels = 64 if case["groups"] == "32" else 12
    groups = {"1": 1, "2": 2, "32": 32, "C": channels}[case["groups"]]
    spatial = SPATIAL[case["rank"]]
    if case["axis"] == -1:
        shape = (case["batch"], *spatial, channels)
    else:
        shape = (case["batch"], channels, *spatial)
    channels_last = case["axis"] == -1 or case["rank"] == 2
    return shape, groups, channels_last


def quantize(values, dtype):
    """`values` rounded to `dtype` (as a tensor of that dtype) and back as float64 NumPy."""
    t = tf.cast(tf.constant(np.asarray(values, np.float32)), dtype)
    return t, tf.cast(t, tf.float64).numpy()


@pytest.fixture(scope="module")
def raw():
    """(forward, backward) raw op functions; the module fails in CI without the library."""
    require_fused()
    return tfpn.fused.raw_ops()


def _raw_inputs(rng, shape, dtype, offset=1.5, spread=2.0):
    x = offset + spread * rng.standard_normal(shape)
    return quantize(x, dtype)


def _params(rng, channels, use_proxy, center=True, scale=True):
    f32 = lambda v: np.asarray(v, np.float32)  # noqa: E731
    gamma = f32(1.0 + 0.4 * rng.standard_normal(channels)) if scale else f32(np.ones(channels))
    beta = f32(0.3 * rng.standard_normal(channels)) if center else f32(np.zeros(channels))
    # Without PN the proxy inputs must be ignored: pass garbage.
    proxy_mean = f32(0.5 * rng.standard_normal(channels) + (0.0 if use_proxy else 7.0))
    proxy_inv_std = f32(rng.uniform(0.5, 2.0, channels) * (1.0 if use_proxy else -3.0))
    return gamma, beta, proxy_mean, proxy_inv_std


def check_raw(raw, rng, x_t, x_q, groups, channels_last, activation, use_proxy, dtype,
              center=True, scale=True, epsilon=1e-3, finite_stats=True, tol=None):
    """Runs both raw ops on x and compares every output with reference_fused (the side
    outputs mean / inv_std only where `finite_stats`: a group with an Inf has a NaN or Inf
    mean depending on the summation, the contract only asks that it propagates). `tol`
    overrides every tolerance."""
    stats_tol = tol or STATS_TOL
    tol = tol or TOL[dtype]
    forward, backward = raw
    channels = x_q.shape[-1] if channels_last else x_q.shape[1]
    params = _params(rng, channels, use_proxy, center, scale)
    attrs = dict(groups=groups, epsilon=epsilon, activation=activation,
                 channels_last=channels_last, use_proxy=use_proxy)
    y, mean, inv_std = forward(x_t, *params, **attrs)
    assert y.dtype == x_t.dtype and mean.dtype == tf.float32
    ref_y, ref_mean, ref_inv_std = RF.forward(x_q, *params, **attrs)
    assert_close(y, ref_y, tol, "y")
    if finite_stats:
        assert_close(mean, ref_mean, stats_tol, "mean")
        assert_close(inv_std, ref_inv_std, stats_tol, "inv_std")

    dy_t, dy_q = quantize(rng.standard_normal(x_q.shape), dtype)
    outs = backward(dy_t, x_t, *params, mean, inv_std, **attrs)
    refs = RF.backward(dy_q, x_q, *params, **attrs)
    assert outs[0].dtype == x_t.dtype
    for name, out, ref in zip(("dx", "dgamma", "dbeta", "dproxy_mean", "dproxy_inv_std"),
                              outs, refs):
        assert_close(out, ref, tol if name == "dx" else stats_tol, name)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_raw_op_forward_side_outputs_and_gradients(raw, case):
    rng = np.random.default_rng(len(_case_id(case)))
    shape, groups, channels_last = _geometry(case)
    x_t, x_q = _raw_inputs(rng, shape, case["dtype"])
    center, scale = case["affine"]
    check_raw(raw, rng, x_t, x_q, groups, channels_last, case["activation"], case["proxy"],
              case["dtype"], center, scale)


@pytest.mark.parametrize("isa", ["generic", "avx2"])
def test_raw_op_with_each_cpu_kernel_variant(raw, monkeypatch, isa):
    """The pairwise grid with the CPU kernels that TF_PROXYNORM_CPU_ISA asks for (read at
    each call; a variant that the library or the CPU lacks falls back to a lower one), so
    that the variants a machine would not pick by itself are checked too. (The best one
    runs in test_raw_op_forward_side_outputs_and_gradients.)"""
    monkeypatch.setenv("TF_PROXYNORM_CPU_ISA", isa)
    for case in CASES:
        rng = np.random.default_rng(len(_case_id(case)))
        shape, groups, channels_last = _geometry(case)
        x_t, x_q = _raw_inputs(rng, shape, case["dtype"])
        center, scale = case["affine"]
        check_raw(raw, rng, x_t, x_q, groups, channels_last, case["activation"],
                  case["proxy"], case["dtype"], center, scale)


def case_layer_and_inputs(case, rng, implementation):
    """A built GroupNormAct for `case` with random weights, its inputs and a loss weight:
    `(layer, weight values, groups, x, x quantized to float64, w, w quantized)`."""
    shape, groups, _ = _geometry(case)
    center, scale = case["affine"]
    dtype = case["dtype"]
    layer = tfpn.GroupNormAct(
        groups=groups, activation=case["activation"], proxy_norm=case["proxy"],
        axis=case["axis"], center=center, scale=scale, implementation=implementation,
        dtype=POLICY[dtype])
    layer.build(shape)
    values = {}
    for weight in layer.trainable_weights:
        base = 1.0 if weight.name == "gamma" else 0.0
        values[weight.name] = (base + 0.3 * rng.standard_normal(weight.shape)).astype("float32")
        weight.assign(values[weight.name])
    x_t, x_q = _raw_inputs(rng, shape, dtype)
    w = rng.standard_normal(shape).astype("float32")
    _, w_q = quantize(w, dtype)
    return layer, values, groups, x_t, x_q, w, w_q


def _layer_and_reference_gradients(case, rng, implementation):
    layer, values, groups, x_t, x_q, w, w_q = case_layer_and_inputs(case, rng, implementation)

    with tf.GradientTape() as tape:
        tape.watch(x_t)
        y = layer(x_t)
        loss = tf.reduce_sum(tf.cast(y, tf.float32) * w)
    grads = tape.gradient(loss, [x_t] + layer.trainable_weights)
    assert y.dtype == tf.as_dtype(case["dtype"])

    return (y, grads) + reference_layer_gradients(case, groups, x_q, w_q, values, layer)


def reference_layer_gradients(case, groups, x_q, w_q, values, layer):
    """`(ref_y, names, ref_grads)`: the float64 layer and the gradients of
    `sum(y * w_q)` with respect to x and each trainable weight of `layer`, by name."""
    ref_vars = {name: tf.constant(v, tf.float64) for name, v in values.items()}
    x64 = tf.constant(x_q)
    with tf.GradientTape() as tape:
        tape.watch([x64] + list(ref_vars.values()))
        ref_y = RF.layer_tf64(
            x64, ref_vars.get("gamma"), ref_vars.get("beta"), ref_vars.get("proxy_beta"),
            ref_vars.get("proxy_gamma"), groups=groups, axis=case["axis"], epsilon=1e-3,
            activation=case["activation"])
        ref_loss = tf.reduce_sum(ref_y * w_q)
    names = [weight.name for weight in layer.trainable_weights]
    ref_grads = tape.gradient(ref_loss, [x64] + [ref_vars[n] for n in names])
    return ref_y, ["x"] + names, ref_grads


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_layer_forward_and_every_gradient(case, implementation):
    """Both paths (implementation="fused" raises rather than falling back) against float64
    autodiff of reference_fused.layer_tf64, gradients into x and every weight."""
    rng = np.random.default_rng(len(_case_id(case)) + 1)
    y, grads, ref_y, names, ref_grads = _layer_and_reference_gradients(case, rng,
                                                                       implementation)
    tol = TOL[case["dtype"]]
    assert_close(y, ref_y.numpy(), tol, "y")
    expected = {"gamma", "beta"} & {n for n, on in zip(("beta", "gamma"), case["affine"]) if on}
    assert expected <= set(names)
    if case["proxy"]:
        assert {"proxy_beta", "proxy_gamma"} <= set(names)
    for name, grad, ref in zip(names, grads, ref_grads):
        assert grad is not None, name
        # Parameter gradients are float32 sums of rounded products: scale by the dtype.
        assert_close(grad, ref.numpy(), tol if name == "x" else max(tol, 1e-4), f"d{name}")


def test_reference_backward_matches_finite_differences():
    """reference_fused.backward (the contract's formulas) is the derivative of forward."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 6, 3, 2))
    channels = 6
    gamma, beta = 1 + 0.3 * rng.standard_normal(channels), 0.3 * rng.standard_normal(channels)
    pm, pis = rng.standard_normal(channels), rng.uniform(0.5, 2, channels)
    dy = rng.standard_normal(x.shape)
    attrs = dict(groups=3, epsilon=1e-3, activation="gelu", channels_last=False, use_proxy=True)
    grads = RF.backward(dy, x, gamma, beta, pm, pis, **attrs)
    args = [x, gamma, beta, pm, pis]
    for index, grad in enumerate(grads):
        numeric = np.zeros_like(args[index])
        for pos in np.ndindex(args[index].shape):
            plus = [a.copy() for a in args]
            minus = [a.copy() for a in args]
            plus[index][pos] += 1e-6
            minus[index][pos] -= 1e-6
            numeric[pos] = np.sum(dy * (RF.forward(*plus, **attrs)[0]
                                        - RF.forward(*minus, **attrs)[0])) / 2e-6
        np.testing.assert_allclose(grad, numeric, rtol=1e-6, atol=1e-6)


def test_reference_tf64_matches_numpy_reference():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 8, 3, 5))
    p = {k: 0.3 * rng.standard_normal(8) + (1.0 if k == "gamma" else 0.0)
         for k in ("gamma", "beta", "proxy_beta", "proxy_gamma")}
    got = RF.layer_tf64(tf.constant(x), *(tf.constant(p[k]) for k in p), groups=4, axis=1,
                        epsilon=1e-3, activation="silu").numpy()
    expected = R.group_norm_act(x, 4, axis=1, activation="silu", gamma=p["gamma"],
                                beta=p["beta"], proxy=(p["proxy_beta"], p["proxy_gamma"]))
    np.testing.assert_allclose(got, expected, rtol=1e-12, atol=1e-12)


# -- schedules: many slabs, tiles, larger tensors -------------------------------------------

@pytest.mark.parametrize("shape, groups, channels_last, slab_bytes, dtype", [
    ((2, 64, 9, 9), 32, False, "512", "float32"),      # channels-first, one slab per group
    ((3, 48, 17, 5), 4, False, "4096", "bfloat16"),    # channels-first, blocks of groups
    ((1, 40, 40, 64), 8, True, None, "float32"),       # one example: position tiles
    ((1, 12, 7, 13), 1, False, None, "float16"),       # tiles cutting through channels
    ((3, 12, 7, 13), 3, False, None, "float32"),       # (example, group) tiles
    ((8, 6, 6, 96), 96, True, None, "float32"),        # instance norm, whole-example slabs
], ids=["nchw-slab-per-group", "nchw-slab-blocks", "nhwc-tiles", "nchw-tiles-mid-channel",
        "nchw-group-tiles", "nhwc-in"])
def test_raw_op_schedules(raw, monkeypatch, shape, groups, channels_last, slab_bytes, dtype):
    """Shapes that select each work split of the CPU kernels (slabs of whole groups sized to
    the cache, or position tiles merged in a second pass)."""
    if slab_bytes is not None:
        monkeypatch.setenv("TF_PROXYNORM_CPU_SLAB_BYTES", slab_bytes)
    rng = np.random.default_rng(5)
    x_t, x_q = _raw_inputs(rng, shape, dtype)
    check_raw(raw, rng, x_t, x_q, groups, channels_last, "silu", True, dtype)


# -- numerics: huge offsets, constant groups, NaN/Inf ----------------------------------------

@pytest.mark.parametrize("channels_last", [True, False])
def test_large_offset_keeps_precision(raw, channels_last):
    """Inputs of mean 1e4 and std 1: a one-pass E[x^2] - E[x]^2 in float32 would lose the
    variance entirely (1e8 has an ulp of 8), and centring on the float32 mean alone would
    put its rounding, up to half an ulp of 1e4 (5e-4), into xhat. The kernels centre on the
    mean to float32 rounding of the deviations, so the float32 tolerances hold (more
    offsets, norms and both work splits: test_fused_large_offset.py)."""
    rng = np.random.default_rng(6)
    x_t, x_q = _raw_inputs(rng, (3, 16, 9, 8), "float32", offset=1e4, spread=1.0)
    check_raw(raw, rng, x_t, x_q, 4, channels_last, "gelu", True, "float32")
    _, _, inv_std = raw[0](x_t, *_params(rng, 8 if channels_last else 16, False), groups=4,
                           epsilon=1e-3, activation="relu", channels_last=channels_last)
    np.testing.assert_allclose(inv_std.numpy(), 1.0, rtol=0.2)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_constant_groups(raw, dtype):
    """Zero variance: xhat = 0, so y = act(beta) (then PN), inv_std = 1 / sqrt(epsilon)."""
    rng = np.random.default_rng(7)
    x = np.repeat(rng.uniform(-5, 5, (3, 1, 1, 4)), 3, axis=3) * np.ones((3, 5, 5, 12))
    x_t, x_q = quantize(x, dtype)
    check_raw(raw, rng, x_t, x_q, 4, True, "silu", True, dtype)
    params = _params(rng, 12, False)
    y, mean, inv_std = raw[0](x_t, *params, groups=4, epsilon=1e-3, activation="relu")
    np.testing.assert_allclose(inv_std.numpy(), 1 / np.sqrt(1e-3), rtol=1e-6)
    np.testing.assert_allclose(tf.cast(y, tf.float32).numpy(),
                               np.broadcast_to(np.maximum(params[1], 0), x.shape),
                               atol=TOL[dtype])


@pytest.mark.parametrize("activation", ["relu", "identity", "gelu"])
@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_nan_and_inf_propagate(raw, activation, dtype):
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 4, 5, 8))
    x[0, 1, 2, 1] = np.nan   # example 0, group 0
    x[1, 3, 0, 6] = np.inf   # example 1, group 1
    x[2, 0, 0, 5] = -np.inf  # example 2, group 1
    x_t, x_q = quantize(x, dtype)
    with np.errstate(invalid="ignore"):
        check_raw(raw, rng, x_t, x_q, 2, True, activation, True, dtype, finite_stats=False)
    y, mean, inv_std = raw[0](x_t, *_params(rng, 8, False), groups=2, epsilon=1e-3,
                              activation=activation)
    y = tf.cast(y, tf.float32).numpy()
    assert np.isnan(y[0, ..., :4]).all() and np.isnan(y[1, ..., 4:]).all()
    assert np.isnan(y[2, ..., 4:]).all()
    assert np.isfinite(y[0, ..., 4:]).all() and np.isfinite(y[1, ..., :4]).all()
    stats = np.stack([mean.numpy(), inv_std.numpy()])
    assert not np.isfinite(stats[:, [0, 1, 2], [0, 1, 1]]).all(axis=0).any()
    assert np.isfinite(stats[:, [0, 1, 2], [1, 0, 0]]).all()


def test_nan_input_through_layer_gradient_does_not_crash():
    if not tfpn.fused_op_available():
        pytest.skip("fused op unavailable")
    layer = tfpn.GroupNormAct(groups=2, proxy_norm=True, implementation="fused")
    x = np.ones((2, 3, 3, 4), np.float32)
    x[1, 0, 0, 0] = np.nan
    x = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(y)
    dx, *dw = tape.gradient(loss, [x] + layer.trainable_weights)
    assert np.isnan(y.numpy()[1, ..., :2]).all() and np.isfinite(y.numpy()[0]).all()
    assert np.isfinite(dx.numpy()[0]).all() and np.isnan(dx.numpy()[1, ..., :2]).all()
    assert all(np.isnan(g.numpy()).any() for g in dw)


# -- dispatch -----------------------------------------------------------------------------

def _op_types(fn, *args):
    graph = fn.get_concrete_function(*args).graph
    types = {op.type for op in graph.get_operations()}
    for function in graph._functions.values():
        types |= {node.op for node in function.definition.node_def}
    return types


def test_auto_uses_fused_op_in_a_function_and_matches_reference(rng):
    if not tfpn.fused_op_available():
        pytest.skip("fused op unavailable")
    layer = tfpn.GroupNormAct(groups=4, activation="gelu", proxy_norm=True, axis=1)
    x = rng.standard_normal((2, 8, 5, 5)).astype("float32")
    layer.build(x.shape)
    params = {w.name: (0.3 * rng.standard_normal(8) + (w.name == "gamma")).astype("float32")
              for w in layer.weights}
    for w in layer.weights:
        w.assign(params[w.name])
    fn = tf.function(lambda t: layer(t))
    assert "TfProxyNorm>GroupNormAct" in _op_types(fn, tf.TensorSpec(x.shape))
    expected = R.group_norm_act(x, 4, axis=1, activation="gelu", gamma=params["gamma"],
                                beta=params["beta"],
                                proxy=(params["proxy_beta"], params["proxy_gamma"]))
    np.testing.assert_allclose(fn(x).numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation, axis, proxy, mode", [
    ("gelu", -1, True, "eager"), ("silu", 1, False, "function")])
def test_second_order_gradient_matches_reference(rng, activation, axis, proxy, mode):
    """A gradient penalty (double backprop) through the fused layer against float64."""
    if not tfpn.fused_op_available():
        pytest.skip("fused op unavailable")
    shape = (2, 4, 5, 6) if axis == -1 else (2, 6, 4, 5)
    layer = tfpn.GroupNormAct(groups=3, activation=activation, proxy_norm=proxy, axis=axis,
                              implementation="fused")
    layer.build(shape)
    values = {w.name: (0.3 * rng.standard_normal(6) + (w.name == "gamma")).astype("float32")
              for w in layer.weights}
    for w in layer.weights:
        w.assign(values[w.name])
    x = rng.standard_normal(shape).astype("float32")
    w_out = rng.standard_normal(shape).astype("float32")

    def penalty_grads(fn, xt, weights):
        with tf.GradientTape() as outer:
            outer.watch([xt] + [w for w in weights if isinstance(w, tf.Tensor)])
            with tf.GradientTape() as inner:
                inner.watch(xt)
                loss = tf.reduce_sum(fn(xt) * tf.cast(w_out, xt.dtype))
            penalty = tf.reduce_sum(tf.square(inner.gradient(loss, xt)))
        return penalty, outer.gradient(penalty, [xt] + weights)

    names = [w.name for w in layer.trainable_weights]
    run = lambda t: penalty_grads(layer, t, layer.trainable_weights)  # noqa: E731
    if mode == "function":
        run = tf.function(run)
    penalty, grads = run(tf.constant(x))
    ref = {n: tf.constant(values[n], tf.float64) for n in names}
    ref_fn = lambda t: RF.layer_tf64(  # noqa: E731
        t, ref["gamma"], ref["beta"], ref.get("proxy_beta"), ref.get("proxy_gamma"),
        groups=3, axis=axis, epsilon=1e-3, activation=activation)
    ref_penalty, ref_grads = penalty_grads(ref_fn, tf.constant(x, tf.float64),
                                           [ref[n] for n in names])
    assert_close(penalty, ref_penalty.numpy(), 1e-4, "penalty")
    for name, got, expected in zip(["x"] + names, grads, ref_grads):
        assert_close(got, expected.numpy(), 1e-4, f"d penalty / d {name}")
