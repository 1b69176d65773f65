"""EvoNorm-S0/B0, IEBN, BGN, WSConv2D and CBNConv2D on every Keras backend.

Forward (training and inference), gradients of the input and the weights, the moving
statistics after `model.fit` steps (compiled: `jit_compile=True`), the compiled inference
of `model.predict`, and the config round trip, all against the float64 NumPy references
of `tests/reference_other.py` (spec `other_methods.md`). Gradients are the backend's
autodiff in float32 (JAX has no float64 by default) against central differences of the
float64 reference.
"""

import keras
import numpy as np
import pytest
from backend_helpers import JIT_COMPILE, layer_gradients, to_numpy

import reference_other as RO
import tf_proxynorm as tfpn

SHAPE = (2, 4, 2, 8)          # (N, H, W, C): 8 positions, so BGN can split them in 2
C = SHAPE[-1]
MOMENTUM = 0.9                # the default of every layer here


def _input(rng, shape=SHAPE, axis=-1):
    x = 1.5 * rng.standard_normal(shape) + 0.5
    return (np.moveaxis(x, -1, 1) if axis == 1 else x).astype("float32")


def _vec(rng, c, base, scale):
    return (base + scale * rng.standard_normal(c)).astype("float32")


def _assign(layer, params):
    for name, value in params.items():
        getattr(layer, name).assign(value)


def _read(layer, names):
    return {n: to_numpy(getattr(layer, n)).astype(np.float64) for n in names}


# ---- the cases: layer, weights and the float64 reference ---------------------------------
# A case is (make, params(rng, in_channels), moving names, reference). `reference(x, p,
# moving)` returns (y, batch statistics): with `moving=None` the training output (batch
# statistics), else the inference output with those moving statistics.

def _evonorm_s0(x, p, moving, axis):
    return RO.evonorm_s0(x, 4, axis, **p), ()


def _evonorm_b0(x, p, moving, axis):
    y, batch_var = RO.evonorm_b0(x, axis, **p, batch_var=None if moving is None else moving[0])
    return y, (batch_var,)


def _iebn(x, p, moving, axis):
    stats = {} if moving is None else dict(mean=moving[0], var=moving[1])
    y = RO.iebn(x, axis, w=p["gate_weight"], b=p["gate_bias"], gamma=p["gamma"],
                beta=p["beta"], **stats)
    xl = np.moveaxis(np.asarray(x, np.float64), axis, -1).reshape(-1, x.shape[axis])
    return y, (xl.mean(0), xl.var(0))


def _bgn(groups):
    def reference(x, p, moving, axis):
        stats = {} if moving is None else dict(mean=moving[0], var=moving[1])
        y, mean, var = RO.bgn(x, groups, axis, **p, **stats)
        return y, (mean, var)
    return reference


def _ws(x, p, moving, axis):
    return RO.conv2d(x, RO.standardize(p["kernel"]), 1, "same", p["bias"]), ()


def _affine(rng, c):
    return {"gamma": _vec(rng, c, 1.0, 0.3), "beta": _vec(rng, c, 0.0, 0.3)}


CASES = {
    "evonorm_s0": (lambda axis: tfpn.EvoNormS0(groups=4, axis=axis),
                   lambda rng, c: {**_affine(rng, c), "v": _vec(rng, c, 1.0, 0.5)},
                   (), _evonorm_s0),
    "evonorm_b0": (lambda axis: tfpn.EvoNormB0(axis=axis),
                   lambda rng, c: {**_affine(rng, c), "v": _vec(rng, c, 1.0, 0.5)},
                   ("moving_variance",), _evonorm_b0),
    "iebn": (lambda axis: tfpn.InstanceEnhancementBatchNormalization(axis=axis),
             lambda rng, c: {**_affine(rng, c), "gate_weight": _vec(rng, c, 0.0, 1.0),
                             "gate_bias": _vec(rng, c, -1.0, 0.5)},
             ("moving_mean", "moving_variance"), _iebn),
    "bgn_4": (lambda axis: tfpn.BatchGroupNormalization(groups=4, axis=axis), _affine,
              ("moving_mean", "moving_variance"), _bgn(4)),
    "bgn_16": (lambda axis: tfpn.BatchGroupNormalization(groups=16, axis=axis), _affine,
               ("moving_mean", "moving_variance"), _bgn(16)),
    "ws_conv": (lambda axis: tfpn.WSConv2D(5, 3, padding="same", use_bias=True,
                                           kernel_initializer="zeros"),
                lambda rng, c: {"kernel": (0.3 * rng.standard_normal((3, 3, c, 5)) + 0.1
                                           ).astype("float32"),
                                "bias": _vec(rng, 5, 0.0, 0.3)},
                (), _ws),
}
def _built(name, rng, axis=-1, shape=SHAPE):
    make, params_of, moving, reference = CASES[name]
    x = _input(rng, shape, axis)
    layer = make(axis)
    layer.build(x.shape)
    params = params_of(rng, shape[-1])
    _assign(layer, params)
    ref = lambda x_, p, m: reference(x_, p, m, axis)  # noqa: E731
    return layer, x, params, moving, ref


def _initial(layer, names):
    """The initial moving statistics: zeros for a mean, ones for a variance."""
    return [(np.zeros if n.endswith("mean") else np.ones)(getattr(layer, n).shape)
            for n in names]


def _momentum_update(moving, batch):
    return [MOMENTUM * m + (1 - MOMENTUM) * b for m, b in zip(moving, batch, strict=True)]


# ---- forward, eager ----------------------------------------------------------------------
@pytest.mark.parametrize("name, axis", [(n, -1) for n in CASES] + [
    ("evonorm_s0", 1), ("bgn_4", 1), ("bgn_16", 1), ("iebn", 1)])
def test_forward_training_then_inference(rng, name, axis):
    """A training call (batch statistics, moving averages updated), then an inference call
    (the updated moving averages, nothing changes)."""
    layer, x, params, moving, ref = _built(name, rng, axis)
    moving_now = _initial(layer, moving)   # BGN: (groups,) statistics, not per channel
    expected, batch = ref(x, params, None)
    np.testing.assert_allclose(to_numpy(layer(x, training=True)), expected, atol=3e-5, rtol=1e-5)
    moving_now = _momentum_update(moving_now, batch)
    for n, value in zip(moving, moving_now, strict=True):
        np.testing.assert_allclose(to_numpy(getattr(layer, n)), value, rtol=1e-5, atol=1e-6)
    expected, _ = ref(x, params, moving_now or None)
    np.testing.assert_allclose(to_numpy(layer(x, training=False)), expected, atol=3e-5,
                               rtol=1e-5)
    for n, value in zip(moving, moving_now, strict=True):
        np.testing.assert_allclose(to_numpy(getattr(layer, n)), value, rtol=1e-5, atol=1e-6)


def test_standardize_kernel(rng):
    kernel = (0.3 * rng.standard_normal((3, 3, 4, 6)) + 0.2).astype("float32")
    np.testing.assert_allclose(to_numpy(tfpn.layers.standardize_kernel(kernel)),
                               RO.standardize(kernel), atol=1e-5)


# ---- gradients ---------------------------------------------------------------------------


def _assert_gradients(dx, dweights, numeric):
    """float32 autodiff against float64 central differences."""
    for target, expected in numeric.items():
        got = dx if target == "x" else dweights[target]
        np.testing.assert_allclose(got, expected, rtol=1e-3,
                                   atol=1e-4 * max(1.0, np.abs(expected).max()),
                                   err_msg=target)


@pytest.mark.parametrize("name, training", [(n, True) for n in CASES] + [
    ("evonorm_b0", False), ("iebn", False)])
def test_gradients_match_finite_differences(rng, name, training):
    layer, x, params, moving, ref = _built(name, rng)
    stats = None
    if not training and moving:   # inference: moving statistics away from the init
        stats = [np.abs(_vec(rng, C, 0.5 if n.endswith("mean") else 2.0, 0.3))
                 for n in moving]
        _assign(layer, dict(zip(moving, [s.astype("float32") for s in stats], strict=True)))
    x64, p64 = x.astype(np.float64), {k: v.astype(np.float64) for k, v in params.items()}
    dy = rng.standard_normal(ref(x64, p64, stats)[0].shape)
    # Keras' conv layers take no `training` argument: a Sequential passes it on or not.
    wrapped = layer
    if name == "ws_conv":
        wrapped = keras.Sequential([layer])
        wrapped.build(x.shape)
    y, dx, dweights = layer_gradients(wrapped, x, dy.astype("float32"), training=training)
    assert sorted(dweights) == sorted(params)
    np.testing.assert_allclose(y, ref(x64, p64, stats)[0], atol=3e-5, rtol=1e-5)
    numeric = RO.finite_differences(lambda x_, p: float((ref(x_, p, stats)[0] * dy).sum()),
                                    x64, p64)
    _assert_gradients(dx, dweights, numeric)


# ---- model.fit (compiled) and model.predict ----------------------------------------------
def _fit_once(model, x, target):
    history = model.fit(x, target, batch_size=len(x), epochs=1, shuffle=False, verbose=0)
    return history.history["loss"][0]


@pytest.mark.parametrize("name", ["evonorm_s0", "evonorm_b0", "iebn", "bgn_16", "ws_conv"])
def test_fit_step_updates_moving_statistics_then_predict(rng, name):
    make, params_of, moving, reference = CASES[name]
    x = _input(rng)
    layer = make(-1)
    model = keras.Sequential([keras.Input(x.shape[1:]), layer])
    params = params_of(rng, C)
    _assign(layer, params)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse", jit_compile=JIT_COMPILE)
    expected, batch = reference(x, params, None, -1)
    target = rng.standard_normal(expected.shape).astype("float32")
    loss = _fit_once(model, x, target)
    np.testing.assert_allclose(loss, ((expected - target) ** 2).mean(), rtol=1e-4)
    updated = _momentum_update(_initial(layer, moving), batch)
    for n, value in zip(moving, updated, strict=True):
        np.testing.assert_allclose(to_numpy(getattr(layer, n)), value, rtol=1e-5, atol=1e-6,
                                   err_msg=n)
    # The optimizer moved the weights: predict (compiled, inference) with the new ones.
    new = _read(layer, params)
    assert max(np.abs(new[k] - params[k]).max() for k in params) > 1e-3
    expected, _ = reference(x, new, updated or None, -1)
    np.testing.assert_allclose(model.predict(x, batch_size=len(x), verbose=0), expected,
                               atol=3e-5, rtol=1e-5)


# ---- config ------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(CASES))
def test_config_round_trip(rng, name):
    layer, x, params, moving, ref = _built(name, rng)
    layer(x, training=True)   # moving statistics away from their init
    config = layer.get_config()
    clone = type(layer).from_config(config)
    assert clone.get_config() == config
    clone.build(x.shape)
    clone.set_weights(layer.get_weights())
    stats = [to_numpy(getattr(layer, n)).astype(np.float64) for n in moving]
    for training, moving_stats in ((False, stats or None), (True, None)):
        np.testing.assert_allclose(to_numpy(clone(x, training=training)),
                                   ref(x, params, moving_stats)[0], atol=3e-5, rtol=1e-5)


# ---- CBN ---------------------------------------------------------------------------------
C_IN, C_OUT = 3, 4
Z_SHAPE = (3, 5, 5, C_IN)


def _cbn(**kwargs):
    layer = tfpn.CBNConv2D(C_OUT, 3, kernel_initializer="zeros", **kwargs)
    layer.build((None,) + Z_SHAPE[1:-1] + (kwargs.get("groups", 1) * C_IN,))
    return layer


def _z(rng, channels=C_IN):
    return (rng.standard_normal(Z_SHAPE[:-1] + (channels,)) + 0.5).astype("float32")


def test_cbn_training_sequence_then_inference(rng):
    """Eager training calls with a drifting kernel (compensation at work) through burn-in
    and a growing window, with a grouped, strided conv and a bias; then inference."""
    kwargs = dict(window_size=3, burnin_steps=1, groups=2, strides=2, use_bias=True,
                  padding="same", activation="relu")
    layer = _cbn(**kwargs)
    assert layer.buffer_mean_grad.shape == (2, 3, 3, C_IN, 2)   # one mean patch per group
    ref = RO.CBNReference(C_OUT, 3, 1.0, 1, stride=2, padding="same", groups=2)
    affine = _affine(rng, C_OUT)
    _assign(layer, affine)
    kernel = 0.3 * rng.standard_normal(layer.kernel.shape)
    for _ in range(5):
        kernel = (kernel + 0.1 * rng.standard_normal(kernel.shape)).astype("float32")
        bias = _vec(rng, C_OUT, 0.0, 0.2)
        z = _z(rng, 2 * C_IN)
        _assign(layer, {"kernel": kernel, "bias": bias})
        expected = ref.train_step(z, kernel, bias, activation="relu", **affine)
        np.testing.assert_allclose(to_numpy(layer(z, training=True)), expected,
                                   atol=1e-4, rtol=1e-4)
    assert int(to_numpy(layer.step)) == 5
    np.testing.assert_allclose(to_numpy(layer.moving_mean), ref.moving_mean, atol=1e-5)
    np.testing.assert_allclose(to_numpy(layer.moving_variance), ref.moving_var, rtol=1e-5)
    state = [to_numpy(w).copy() for w in layer.non_trainable_weights]
    np.testing.assert_allclose(to_numpy(layer(z, training=False)),
                               ref.inference(z, kernel, bias, activation="relu", **affine),
                               atol=1e-4, rtol=1e-4)
    for before, w in zip(state, layer.non_trainable_weights, strict=True):
        np.testing.assert_array_equal(to_numpy(w), before, err_msg=w.name)


def test_cbn_gradients_flow_only_through_the_current_step(rng):
    """Autodiff vs central differences of the reference in which the compensated previous
    statistics are constants (computed once at the current kernel)."""
    window = 3
    layer = _cbn(padding="same", window_size=window, use_bias=True)
    ref = RO.CBNReference(C_OUT, window)
    kernel = 0.3 * rng.standard_normal(layer.kernel.shape)
    for _ in range(3):
        kernel = (kernel + 0.1 * rng.standard_normal(kernel.shape)).astype("float32")
        z, bias = _z(rng), _vec(rng, C_OUT, 0.0, 0.2)
        _assign(layer, {"kernel": kernel, "bias": bias})
        layer(z, training=True)
        ref.train_step(z, kernel, bias)
    params = {"kernel": (kernel + 0.1 * rng.standard_normal(kernel.shape)).astype("float32"),
              "bias": _vec(rng, C_OUT, 0.0, 0.2), **_affine(rng, C_OUT)}
    _assign(layer, params)
    z = _z(rng)
    p64 = {k: v.astype(np.float64) for k, v in params.items()}
    previous = [RO.cbn_compensate(e, p64["kernel"], p64["bias"], 1.0)
                for e in ref.buffer[:window - 1]]

    def output(z_, p):
        x, mu, nu, _, _ = ref.statistics(z_, p["kernel"], p["bias"])
        mu_bar, var_bar, _ = RO.cbn_window(mu, nu, previous)
        y = (x - mu_bar) / np.sqrt(var_bar + 1e-5) * p["gamma"] + p["beta"]
        return y.reshape(Z_SHAPE[:-1] + (C_OUT,))

    z64 = z.astype(np.float64)
    dy = rng.standard_normal(output(z64, p64).shape)
    y, dz, dweights = layer_gradients(layer, z, dy.astype("float32"), training=True)
    np.testing.assert_allclose(y, output(z64, p64), atol=1e-4, rtol=1e-4)
    numeric = RO.finite_differences(lambda z_, p: float((output(z_, p) * dy).sum()), z64, p64)
    _assert_gradients(dz, dweights, numeric)


def test_cbn_fit_steps_then_predict(rng):
    """Compiled training steps (burn-in, then a growing window; the optimizer moves the
    kernel, so the compensation matters) against the reference, then compiled inference."""
    kwargs = dict(window_size=3, burnin_steps=1, use_bias=True, padding="valid",
                  activation="relu")
    layer = tfpn.CBNConv2D(C_OUT, 3, kernel_initializer="zeros", **kwargs)
    model = keras.Sequential([keras.Input(Z_SHAPE[1:]), layer])
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss="mse", jit_compile=JIT_COMPILE)
    _assign(layer, {"kernel": (0.3 * rng.standard_normal(layer.kernel.shape)).astype("float32"),
                    **_affine(rng, C_OUT)})
    ref = RO.CBNReference(C_OUT, 3, 1.0, 1, padding="valid")
    names = ("kernel", "bias", "gamma", "beta")
    first_kernel = to_numpy(layer.kernel).copy()
    for _ in range(4):
        z = _z(rng)
        weights = _read(layer, names)
        expected = ref.train_step(z, activation="relu", **weights)
        target = rng.standard_normal(expected.shape).astype("float32")
        np.testing.assert_allclose(_fit_once(model, z, target),
                                   ((expected - target) ** 2).mean(), rtol=1e-4)
    assert np.abs(to_numpy(layer.kernel) - first_kernel).max() > 1e-2   # compensation used
    assert int(to_numpy(layer.step)) == 4
    np.testing.assert_allclose(to_numpy(layer.moving_mean), ref.moving_mean, atol=1e-5)
    np.testing.assert_allclose(to_numpy(layer.moving_variance), ref.moving_var, rtol=1e-5)
    np.testing.assert_allclose(to_numpy(layer.buffer_mean)[0], ref.buffer[0]["mu"], atol=1e-5)
    np.testing.assert_allclose(model.predict(z, batch_size=len(z), verbose=0),
                               ref.inference(z, activation="relu", **_read(layer, names)),
                               atol=1e-4, rtol=1e-4)


def test_cbn_config_round_trip(rng):
    norm = tfpn.CrossIterationBatchNormalization(window_size=3, rho=0.5, activation="relu")
    config = norm.get_config()
    assert tfpn.CrossIterationBatchNormalization.from_config(config).get_config() == config
    layer = norm.bind_conv(keras.layers.Conv2D(C_OUT, 3, padding="same", use_bias=False,
                                               kernel_initializer="zeros"))
    assert (layer.window_size, layer.rho, layer.norm_activation) == (3, 0.5, "relu")
    config = layer.get_config()
    clone = tfpn.CBNConv2D.from_config(config)
    assert clone.get_config() == config
    z = _z(rng)
    layer.build(z.shape)
    layer.kernel.assign((0.3 * rng.standard_normal(layer.kernel.shape)).astype("float32"))
    layer(z, training=True)
    clone.build(z.shape)
    clone.set_weights(layer.get_weights())
    ref = RO.CBNReference(C_OUT, 3, 0.5)
    kernel = to_numpy(layer.kernel)
    ref.train_step(z, kernel)
    np.testing.assert_allclose(to_numpy(clone(z, training=False)),
                               ref.inference(z, kernel, activation="relu"), atol=1e-4)


def test_cbn_window_needs_a_backend_with_autodiff(monkeypatch):
    """Backends without autodiff (Keras' numpy backend here) refuse window_size > 1 at
    construction, naming the backend; window_size=1 (BatchNorm) is accepted."""
    monkeypatch.setattr(keras.backend, "backend", lambda: "numpy")
    with pytest.raises(NotImplementedError, match="Received: backend='numpy', window_size=4"):
        tfpn.CBNConv2D(C_OUT, 3)
    with pytest.raises(NotImplementedError, match="backend='numpy'"):
        tfpn.CrossIterationBatchNormalization(window_size=2)
    assert tfpn.CBNConv2D(C_OUT, 3, window_size=1).window_size == 1
