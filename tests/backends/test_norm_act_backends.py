"""The core norm + activation layers on the running Keras backend, against float64
references: `GroupNormAct` (PN on/off), `LayerNormAct`, `InstanceNormAct`, `BatchNormAct`,
`ProxyNormAct`, `ShiftedGroupNormAct`, `ChannelAffine` and the factory names built on them.

- a grid of 37 cases (groups 1/2/3/C, 1 to 16 channels per group, ranks 3 and 4, channels
  first/last, activations relu/silu/gelu/leaky_relu/identity, PN on/off, center/scale
  on/off, BN in training and inference, float32 and mixed float16/bfloat16 policies;
  eager, and compiled for a few): the output and the gradients of x and of every trainable
  weight, taken with the backend's own autodiff (`layer_gradients`), against float64
  TensorFlow autodiff of implementations written from the specs
  (`reference_fused.layer_tf64`, and `_affine_tf64` / `_bn_tf64` below), whose outputs are
  themselves checked against the NumPy references of `tests/reference.py`;
- inputs of mean 1e4 and std 1 (the reference path is exact to float32 rounding);
- a gradient penalty (second order, compiled) against float64 nested autodiff;
- `model.fit(jit_compile=JIT_COMPILE)` (XLA; eager on PyTorch): BatchNormAct's moving statistics after one step against
  the NumPy momentum update, and a GN+PN step equal to `w - lr * dL/dw` of the float64
  reference, which lowers the loss;
- `implementation="fused"` off TensorFlow: a clear error naming the backend.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf  # the float64 references only (independent of the package)

import reference as R
import reference_fused as RF
import tf_proxynorm as tfpn
from backend_helpers import BACKEND, JIT_COMPILE, layer_gradients, to_numpy
from helpers import assert_close

# As tests/test_fused_op.py: relative tolerance of an output rounded to the dtype; the
# absolute tolerance is this times max(1, max |reference|).
TOL = {"float32": 5e-5, "float16": 3e-3, "bfloat16": 2e-2}
POLICY = {"float32": "float32", "float16": "mixed_float16", "bfloat16": "mixed_bfloat16"}
CHANNELS = 6
EPSILON = 1e-3
F64 = tf.float64


# -- float64 references written from the specs (TensorFlow autodiff, no tf_proxynorm) ------

def _per_channel(v, rank, axis):
    return tf.reshape(v, R.channel_shape(rank, axis))


def _affine_tf64(y, gamma, beta, proxy_beta, proxy_gamma, *, axis, activation):
    """`act(gamma * y + beta)` per channel, then PN-Act's proxy step (spec section 3) when
    `proxy_beta` is given; gamma / beta None mean 1 / 0."""
    rank = len(y.shape)
    channels = y.shape[axis]
    gamma = tf.ones([channels], F64) if gamma is None else gamma
    beta = tf.zeros([channels], F64) if beta is None else beta
    h = RF._act_tf(activation, _per_channel(gamma, rank, axis) * y
                   + _per_channel(beta, rank, axis))
    if proxy_beta is None:
        return h
    q = tf.constant(R.quantiles(), F64)[:, None]
    u = RF._act_tf(activation, gamma * (proxy_beta + (1.0 + proxy_gamma) * q) + beta)
    m = tf.reduce_mean(u, axis=0)
    v = tf.reduce_mean(tf.square(u - m), axis=0)
    return (h - _per_channel(m, rank, axis)) / tf.sqrt(
        _per_channel(v, rank, axis) + R.PROXY_EPSILON)


def _bn_tf64(x, gamma, beta, mean, var, *, axis, activation):
    """Batch statistics (biased variance) when `mean` is None, else the given ones."""
    rank = len(x.shape)
    if mean is None:
        red = [a for a in range(rank) if a != axis]
        mean = tf.reduce_mean(x, red, keepdims=True)
        var = tf.reduce_mean(tf.square(x - mean), red, keepdims=True)
    else:
        mean, var = _per_channel(mean, rank, axis), _per_channel(var, rank, axis)
    y = (x - mean) / tf.sqrt(var + EPSILON)
    return _affine_tf64(y, gamma, beta, None, None, axis=axis, activation=activation)


def reference_forward(case, x, p, groups):
    """The float64 output of `case` for tensors `x` and `p` (weight name -> tensor)."""
    kind, axis, act = case["kind"], case["axis"] % len(x.shape), case["activation"]
    if kind in ("gn", "ln", "in", "shifted"):
        y = RF.layer_tf64(x, p.get("gamma"), p.get("beta"), p.get("proxy_beta"),
                          p.get("proxy_gamma"), groups=groups, axis=axis, epsilon=EPSILON,
                          activation=act)
        return y + _per_channel(p["offset"], len(x.shape), axis) if kind == "shifted" else y
    if kind == "bn":
        return _bn_tf64(x, p.get("gamma"), p.get("beta"), p.get("moving_mean"),
                        p.get("moving_variance"), axis=axis, activation=act)
    if kind == "pn":
        return _affine_tf64(x, p.get("gamma"), p.get("beta"), p["proxy_beta"],
                            p["proxy_gamma"], axis=axis, activation=act)
    return _affine_tf64(x, p.get("gamma"), p.get("beta"), None, None, axis=axis,
                        activation=act)


def numpy_forward(case, x, values, groups):
    """The same output from tests/reference.py (NumPy), to anchor the TF references."""
    kind, axis, act = case["kind"], case["axis"], case["activation"]
    values = {k: np.asarray(v, np.float64) for k, v in values.items()}
    g, b = values.get("gamma"), values.get("beta")
    proxy = (values["proxy_beta"], values["proxy_gamma"]) if "proxy_beta" in values else None
    if kind in ("gn", "ln", "in", "shifted"):
        y = R.group_norm_act(x, groups, axis, EPSILON, act, g, b, proxy)
        if kind == "shifted":
            y = y + np.reshape(values["offset"], R.channel_shape(x.ndim, axis % x.ndim))
        return y
    if kind == "bn":
        return R.batch_norm_act(x, axis, EPSILON, act, g, b, values.get("moving_mean"),
                                values.get("moving_variance"))
    if kind == "pn":
        return R.affine_act_proxy(x, g, b, axis, act, proxy)
    return R.affine_act_proxy(x, g, b, axis, act)


def reference_gradients(case, x_q, dy_q, values, names, groups):
    """float64 `(y, {"x": dx, weight name: gradient})` of `sum(y * dy)`."""
    x = tf.constant(x_q, F64)
    p = {k: tf.constant(v, F64) for k, v in values.items()}
    watched = [x] + [p[n] for n in names]
    with tf.GradientTape() as tape:
        tape.watch(watched)
        y = reference_forward(case, x, p, groups)
        loss = tf.reduce_sum(y * tf.constant(dy_q, F64))
    grads = tape.gradient(loss, watched, unconnected_gradients="zero")
    return y.numpy(), dict(zip(["x"] + names, (g.numpy() for g in grads)))


# -- the cases -------------------------------------------------------------------------------

def case(kind, groups=2, rank=4, axis=-1, activation="relu", proxy=False, center=True,
         scale=True, training=False, dtype="float32", jit=False, channels=CHANNELS):
    return dict(kind=kind, groups=groups, rank=rank, axis=axis, activation=activation,
                proxy=proxy, center=center, scale=scale, training=training, dtype=dtype,
                jit=jit, channels=channels)


CASES = [
    # GroupNormAct: groups 2, 1 and C (-1), every activation, PN on/off, affine on/off.
    case("gn", proxy=True),
    case("gn", axis=1, activation="silu", proxy=True),
    case("gn", rank=3, axis=1, activation="identity", proxy=True),
    case("gn", groups=1, activation="silu", center=False, scale=False),
    case("gn", groups=-1, rank=3, proxy=True, scale=False),
    case("gn", groups=-1, axis=1, activation="gelu", proxy=True, center=False),
    case("gn", activation="leaky_relu", proxy=True, training=True),
    # 8+ channels per group (the groups are formed by reshape and repeat, not a matmul).
    case("gn", groups=3, channels=24, proxy=True),
    case("gn", axis=1, activation="silu", channels=32, proxy=True, jit=True),
    # LayerNormAct / InstanceNormAct (GroupNormAct with 1 / C groups).
    case("ln", proxy=True),
    case("ln", rank=3, axis=1, activation="gelu", center=False),
    case("ln", axis=1, activation="identity", proxy=True, scale=False),
    case("in", activation="silu", proxy=True),
    case("in", rank=3, axis=1),
    case("in", axis=1, activation="identity", center=False, scale=False),
    case("shifted", rank=3, activation="silu"),
    # BatchNormAct in training (batch statistics) and inference (moving statistics).
    case("bn", training=True),
    case("bn", axis=1, activation="silu", training=True),
    case("bn", rank=3, activation="gelu"),
    case("bn", rank=3, axis=1, activation="identity", center=False, scale=False,
         training=True),
    case("bn", axis=1, scale=False),
    # ProxyNormAct (PN-Act alone) and ChannelAffine.
    case("pn"),
    case("pn", rank=3, axis=1, activation="silu"),
    case("pn", axis=1, activation="gelu", center=False),
    case("affine"),
    case("affine", rank=3, axis=1, activation="identity", scale=False),
    case("affine", axis=1, activation="silu", center=False),
    # Mixed precision: float16 / bfloat16 inputs and compute dtype, float32 weights.
    case("gn", activation="silu", proxy=True, dtype="float16"),
    case("gn", rank=3, axis=1, proxy=True, dtype="bfloat16"),
    case("ln", axis=1, activation="gelu", dtype="bfloat16"),
    case("in", rank=3, proxy=True, dtype="float16"),
    case("bn", training=True, dtype="float16"),
    case("pn", dtype="bfloat16"),
    # Compiled (jax.jit / tf.function(jit_compile=True)).
    case("gn", proxy=True, jit=True),
    case("in", axis=1, activation="gelu", proxy=True, center=False, jit=True),
    case("bn", axis=1, activation="silu", training=True, jit=True),
    case("gn", activation="silu", proxy=True, dtype="bfloat16", jit=True),
]


def _case_id(c):
    return "-".join([c["kind"], f"g{c['groups']}", f"r{c['rank']}", f"ax{c['axis']}",
                     c["activation"], "pn" if c["proxy"] else "nopn",
                     f"c{int(c['center'])}s{int(c['scale'])}",
                     "train" if c["training"] else "infer", c["dtype"]]
                    + ([f"ch{c['channels']}"] if c["channels"] != CHANNELS else [])
                    + (["jit"] if c["jit"] else []))


def _shape(rank, axis, channels=CHANNELS):
    spatial = {3: (7,), 4: (4, 5)}[rank]
    return (3, *spatial, channels) if axis == -1 else (3, channels, *spatial)


def make_layer(c):
    """The layer of a case (not built)."""
    common = dict(activation=c["activation"], axis=c["axis"], dtype=POLICY[c["dtype"]])
    affine = dict(center=c["center"], scale=c["scale"])
    L = tfpn.layers
    if c["kind"] == "gn":
        return L.GroupNormAct(groups=c["groups"], proxy_norm=c["proxy"], **affine, **common)
    if c["kind"] == "ln":
        return L.LayerNormAct(proxy_norm=c["proxy"], **affine, **common)
    if c["kind"] == "in":
        return L.InstanceNormAct(proxy_norm=c["proxy"], **affine, **common)
    if c["kind"] == "shifted":
        return L.ShiftedGroupNormAct(groups=c["groups"], **affine, **common)
    if c["kind"] == "bn":
        return L.BatchNormAct(**affine, **common)
    if c["kind"] == "pn":
        return L.ProxyNormAct(**affine, **common)
    return L.ChannelAffine(scale=c["scale"], center=c["center"], **common)


def _reference_groups(c, channels):
    return {"ln": 1, "in": channels}.get(c["kind"], channels if c["groups"] == -1
                                          else c["groups"])


def randomize(layer, rng):
    """Non-trivial values for every weight of a built layer: `{name: float32 value}`."""
    values = {}
    for weight in layer.weights:
        if weight.name == "gamma":
            value = 1.0 + 0.3 * rng.standard_normal(weight.shape)
        elif weight.name == "moving_variance":
            value = rng.uniform(0.5, 2.0, weight.shape)
        else:
            value = 0.3 * rng.standard_normal(weight.shape)
        values[weight.name] = value.astype("float32")
        weight.assign(values[weight.name])
    return values


def quantize(values, dtype):
    """`values` as a backend tensor of `dtype`, and the rounded values as float64 NumPy."""
    t = keras.ops.cast(keras.ops.convert_to_tensor(np.asarray(values, np.float32)), dtype)
    return t, to_numpy(keras.ops.cast(t, "float32")).astype(np.float64)


def jit_layer_gradients(layer, x, dy, training=False):
    """`layer_gradients` of tests/backends/conftest.py, compiled by the backend."""
    x = keras.ops.convert_to_tensor(x)
    dy = keras.ops.convert_to_tensor(dy, "float32")
    names = [w.name for w in layer.trainable_weights]
    if BACKEND == "tensorflow":
        @tf.function(jit_compile=True)
        def step(x, dy):
            with tf.GradientTape() as tape:
                tape.watch(x)
                y = layer(x, training=training)
                loss = tf.reduce_sum(tf.cast(y, tf.float32) * dy)
            return y, tape.gradient(loss, [x] + list(layer.trainable_weights))

        y, grads = step(x, dy)
    elif BACKEND == "jax":
        import jax

        fixed = [w.value for w in layer.non_trainable_variables]

        def loss_fn(x, trainable):
            y, _ = layer.stateless_call(trainable, fixed, x, training=training)
            return (y.astype("float32") * dy).sum(), y

        step = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True))
        (_, y), (dx, dw) = step(x, [w.value for w in layer.trainable_variables])
        grads = [dx] + list(dw)
    else:
        pytest.skip(f"no compiled gradient helper for the {BACKEND} backend")
    grads = [to_numpy(g) for g in grads]
    return to_numpy(y), grads[0], dict(zip(names, grads[1:]))


@pytest.mark.parametrize("c", CASES, ids=_case_id)
def test_layer_output_and_every_gradient(c):
    rng = np.random.default_rng(len(_case_id(c)))
    shape = _shape(c["rank"], c["axis"], c["channels"])
    layer = make_layer(c)
    layer.build(shape)
    values = randomize(layer, rng)
    names = [w.name for w in layer.trainable_weights]
    expected = {"gamma": c["scale"], "beta": c["center"], "proxy_beta": c["proxy"],
                "proxy_gamma": c["proxy"]}
    assert {n for n, on in expected.items() if on} <= set(names)
    assert all(w.dtype == "float32" for w in layer.weights)

    dtype = c["dtype"]
    x_t, x_q = quantize(1.5 + 2.0 * rng.standard_normal(shape), dtype)
    dy = rng.standard_normal(shape).astype("float32")
    _, dy_q = quantize(dy, dtype)     # the gradient reaching y is dy rounded to y's dtype
    gradients = jit_layer_gradients if c["jit"] else layer_gradients
    y, dx, dweights = gradients(layer, x_t, dy, training=c["training"])

    groups = _reference_groups(c, c["channels"])
    uses_batch = c["kind"] == "bn" and c["training"]
    ref_values = {k: v for k, v in values.items()
                  if not (uses_batch and k.startswith("moving_"))}
    ref_y, ref_grads = reference_gradients(c, x_q, dy_q, ref_values, names, groups)
    np.testing.assert_allclose(ref_y, numpy_forward(c, x_q, ref_values, groups),
                               rtol=1e-10, atol=1e-10)

    tol = TOL[dtype]
    assert keras.backend.standardize_dtype(y.dtype) == dtype
    assert_close(y, ref_y, tol, "y")
    assert_close(dx, ref_grads["x"], tol, "dx")
    for name in names:
        assert dweights[name] is not None, name
        # Parameter gradients are float32 sums of rounded products: scale by the dtype.
        assert_close(dweights[name], ref_grads[name], max(tol, 1e-4), f"d{name}")


@pytest.mark.parametrize("name", ["bn", "gn", "gn+pn", "in", "in+pn", "ln", "ln+pn", "pn"])
def test_factory_names(name):
    """Every registered name built on these layers, with its defaults (ReLU, 32 groups),
    in training mode, against tests/reference.py."""
    rng = np.random.default_rng(1)
    layer = tfpn.get_norm_act_layer(name)
    x = rng.normal(0.5, 2.0, (2, 3, 3, 32)).astype("float32")
    y = to_numpy(layer(x, training=True))
    proxy = (np.zeros(32), np.zeros(32)) if name.endswith("pn") else None
    kind = name.split("+")[0]
    if kind == "bn":
        expected = R.batch_norm_act(x, activation="relu")
    elif kind == "pn":
        expected = R.affine_act_proxy(x, None, None, -1, "relu", proxy)
    else:
        groups = {"ln": 1, "gn": 32, "in": 32}[kind]
        expected = R.group_norm_act(x, groups, activation="relu", proxy=proxy)
    assert_close(y, expected, TOL["float32"], name)


# -- numerics ---------------------------------------------------------------------------------

@pytest.mark.parametrize("axis, jit", [(-1, False), (1, True)])
def test_large_mean_is_exact_to_float32_rounding(axis, jit):
    """Mean 1e4, std 1 (ulp of 1e4: 1e-3): GN+PN's reference path computes `x - mean` from
    a per-group shift, so the output and every gradient are exact to float32 rounding of
    the O(1) deviations, even at relu's kink."""
    rng = np.random.default_rng(6)
    shape = _shape(4, axis)
    layer = tfpn.GroupNormAct(groups=2, proxy_norm=True, axis=axis,
                              implementation="reference")
    layer.build(shape)
    values = randomize(layer, rng)
    x = (1e4 + rng.standard_normal(shape)).astype("float32")
    dy = rng.standard_normal(shape).astype("float32")
    gradients = jit_layer_gradients if jit else layer_gradients
    y, dx, dweights = gradients(layer, x, dy)
    c = case("gn", axis=axis, proxy=True)
    names = [w.name for w in layer.trainable_weights]
    ref_y, ref_grads = reference_gradients(c, x.astype(np.float64), dy, values, names, 2)
    assert_close(y, ref_y, 3e-6, "y")
    assert_close(dx, ref_grads["x"], 3e-6, "dx")
    for name in names:
        assert_close(dweights[name], ref_grads[name], 3e-6, f"d{name}")


def penalty_gradients(layer, x, w, w2):
    """Gradient penalty `P = sum(w2 * (dL/dx)^2)`, `L = sum(layer(x) * w)`, and its
    gradients with respect to x and every trainable weight (second order), compiled where
    the backend can."""
    names = [v.name for v in layer.trainable_weights]
    if BACKEND == "tensorflow":
        x = tf.constant(x)
        with tf.GradientTape() as outer:
            outer.watch(x)
            with tf.GradientTape() as inner:
                inner.watch(x)
                loss = tf.reduce_sum(layer(x) * w)
            penalty = tf.reduce_sum(w2 * tf.square(inner.gradient(loss, x)))
        grads = outer.gradient(penalty, [x] + list(layer.trainable_weights))
    elif BACKEND == "jax":
        import jax

        def penalty_fn(x, trainable):
            def loss_fn(x):
                return (layer.stateless_call(trainable, [], x)[0] * w).sum()
            return (w2 * jax.grad(loss_fn)(x) ** 2).sum()

        penalty, (dx, dw) = jax.jit(jax.value_and_grad(penalty_fn, argnums=(0, 1)))(
            x, [v.value for v in layer.trainable_variables])
        grads = [dx] + list(dw)
    elif BACKEND == "torch":
        import torch

        x = torch.tensor(x, requires_grad=True)
        loss = (layer(x) * torch.tensor(w)).sum()
        (dx,) = torch.autograd.grad(loss, x, create_graph=True)
        penalty = (torch.tensor(w2) * dx ** 2).sum()
        weights = [v.value for v in layer.trainable_weights]
        grads = torch.autograd.grad(penalty, [x] + weights)
    else:
        raise NotImplementedError(BACKEND)
    grads = [to_numpy(g) for g in grads]
    return float(to_numpy(penalty)), grads[0], dict(zip(names, grads[1:]))


def test_second_order_gradient_penalty():
    """The hand-written backward (`keras.ops.custom_gradient`) is itself differentiable:
    d penalty / d (x, gamma, beta, proxy_beta, proxy_gamma) against nested float64
    autodiff of `layer_tf64`."""
    rng = np.random.default_rng(7)
    shape = (2, 3, 4, 6)
    layer = tfpn.GroupNormAct(groups=2, activation="gelu", proxy_norm=True)
    layer.build(shape)
    values = randomize(layer, rng)
    x, w, w2 = (rng.standard_normal(shape).astype("float32") for _ in range(3))
    penalty, dx, dweights = penalty_gradients(layer, x, w, w2)

    names = [v.name for v in layer.trainable_weights]
    x64 = tf.constant(x, F64)
    p = {k: tf.constant(v, F64) for k, v in values.items()}
    watched = [x64] + [p[n] for n in names]
    with tf.GradientTape() as outer:
        outer.watch(watched)
        with tf.GradientTape() as inner:
            inner.watch(x64)
            y = RF.layer_tf64(x64, p["gamma"], p["beta"], p["proxy_beta"], p["proxy_gamma"],
                              groups=2, axis=-1, epsilon=EPSILON, activation="gelu")
            loss = tf.reduce_sum(y * tf.constant(w, F64))
        ref_penalty = tf.reduce_sum(tf.constant(w2, F64) * tf.square(inner.gradient(loss, x64)))
    ref = outer.gradient(ref_penalty, watched)
    assert np.isfinite(penalty) and penalty == pytest.approx(ref_penalty.numpy(), rel=1e-4)
    assert_close(dx, ref[0].numpy(), 1e-4, "d penalty / dx")
    for name, r in zip(names, ref[1:]):
        assert np.isfinite(dweights[name]).all(), name
        assert_close(dweights[name], r.numpy(), 1e-4, f"d penalty / d{name}")


# -- model.fit(jit_compile=JIT_COMPILE) ------------------------------------------------

@pytest.mark.parametrize("axis", [1])
def test_fit_updates_batch_norm_moving_statistics(axis):
    """One compiled `fit` step on the whole batch: `moving = moving * momentum + batch *
    (1 - momentum)` with the batch's mean and biased variance (float64 NumPy)."""
    rng = np.random.default_rng(8)
    shape = (8, 5, 6) if axis == -1 else (8, 6, 5)
    inputs = keras.Input(shape[1:])
    norm = tfpn.BatchNormAct(momentum=0.9, axis=axis, activation="silu", name="bn")
    outputs = keras.layers.Dense(1)(keras.layers.Flatten()(norm(inputs)))
    model = keras.Model(inputs, outputs)
    initial = randomize(norm, rng)
    model.compile(keras.optimizers.SGD(0.1), "mse", jit_compile=JIT_COMPILE)
    x = rng.normal(1.0, 2.0, shape).astype("float32")
    model.fit(x, rng.standard_normal((8, 1)).astype("float32"), batch_size=8, epochs=1,
              shuffle=False, verbose=0)
    red = tuple(a for a in range(3) if a != axis % 3)
    x64 = x.astype(np.float64)
    expected = {"moving_mean": x64.mean(red), "moving_variance": x64.var(red)}
    for name, batch in expected.items():
        np.testing.assert_allclose(to_numpy(getattr(norm, name)),
                                   0.9 * initial[name] + 0.1 * batch, rtol=1e-6, atol=1e-6,
                                   err_msg=name)


@pytest.mark.parametrize("jit_compile", sorted({JIT_COMPILE, True}))
def test_fit_step_of_gn_pn_is_the_reference_sgd_step(jit_compile):
    """One SGD step of a GN+PN model (compiled; on PyTorch eager, and torch.compile): the loss it reports is the float64
    reference loss, every weight moves by `-lr * dL/dw` of the reference (gradients through
    the proxy statistics included), and the reference loss at the new weights is lower."""
    rng = np.random.default_rng(9)
    shape, lr = _shape(4, -1), 0.5
    inputs = keras.Input(shape[1:])
    norm = tfpn.GroupNormAct(groups=2, activation="silu", proxy_norm=True, name="gnpn")
    model = keras.Model(inputs, norm(inputs))
    before = randomize(norm, rng)
    model.compile(keras.optimizers.SGD(lr), "mse", jit_compile=jit_compile)
    x = rng.standard_normal(shape).astype("float32")
    target = rng.standard_normal(shape).astype("float32")
    names = [w.name for w in norm.trainable_weights]

    def reference_loss(values):
        p = {k: tf.constant(v, F64) for k, v in values.items()}
        with tf.GradientTape() as tape:
            tape.watch(list(p.values()))
            y = RF.layer_tf64(tf.constant(x, F64), p["gamma"], p["beta"], p["proxy_beta"],
                              p["proxy_gamma"], groups=2, axis=-1, epsilon=EPSILON,
                              activation="silu")
            loss = tf.reduce_mean(tf.square(y - tf.constant(target, F64)))
        return loss.numpy(), dict(zip(names, tape.gradient(loss, [p[n] for n in names])))

    loss_before, ref_grads = reference_loss(before)
    history = model.fit(x, target, batch_size=shape[0], epochs=1, shuffle=False, verbose=0)
    assert history.history["loss"][0] == pytest.approx(loss_before, rel=1e-5)
    after = {name: to_numpy(getattr(norm, name)) for name in names}
    for name in names:
        step = before[name] - after[name]
        assert_close(step, lr * ref_grads[name].numpy(), 1e-5, name)
        assert np.abs(step).max() > 1e-3, name
    assert reference_loss(after)[0] < loss_before


# -- errors -----------------------------------------------------------------------------------

def test_fused_implementation_needs_the_tensorflow_backend():
    """`implementation="fused"` off TensorFlow raises at build, naming the backend; on
    TensorFlow it builds (where the op library loads) and matches the reference."""
    layer = tfpn.GroupNormAct(groups=2, implementation="fused")
    x = np.random.default_rng(10).normal(size=(2, 3, 3, 4)).astype("float32")
    if BACKEND != "tensorflow":
        with pytest.raises(ValueError, match=f"backend is '{BACKEND}'.*implementation='fused'"):
            layer.build(x.shape)
        with tfpn.config.use_implementation("fused"), pytest.raises(
                ValueError, match=f"backend is '{BACKEND}'"):
            tfpn.GroupNormAct(groups=2)(x)
    elif tfpn.fused_op_available():
        assert_close(to_numpy(layer(x)), R.group_norm_act(x, 2), TOL["float32"], "y")
    else:
        with pytest.raises(ValueError, match="fused op is not available"):
            layer.build(x.shape)
