"""Statistics callbacks on every Keras backend, against float64 NumPy references.

- FailureModeMonitor in `model.fit` of a small CNN (GN+PN, BN, Keras' LayerNorm): its logs against the power
  decomposition (other-methods spec, section 6 / Proxy Norm spec, section 8) of each
  layer's normalized output `y`, recomputed in float64 NumPy from the trained weights,
  and the headline (worst layer of each failure mode), the only keys it logs by default.
- power_decomposition in training mode from a tf.data.Dataset: batch statistics, the
  model left bit-identical.
- GradientScaleMonitor (TensorFlow and JAX) on a Dense softmax regression, whose
  per-example gradients are written by hand: dL_b/dW = x_b^T (softmax_b - onehot_b).
"""

import keras
import numpy as np
import pytest
import scipy.stats
import tensorflow as tf

import reference as R
import reference_other as RO
import tf_proxynorm as tfpn
from backend_helpers import BACKEND, to_numpy
from tf_proxynorm.callbacks import (FailureModeMonitor, GradientScaleMonitor, POWER_METRICS,
                                    gradient_scale, power_decomposition)

GRADIENTS = BACKEND in ("tensorflow", "jax")   # the backends of the gradient measurements
# What FailureModeMonitor puts into the Keras logs by default.
FM_HEADLINE = {"fm/collapse_max", "fm/mean_var_min", "fm/scale_var_min"}


def _logits_ce(y, logits):
    return keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)


def _value(variable):
    return to_numpy(variable.value).astype(np.float64)


def decomposition(y):
    """The power decomposition of `y` (N, H, W, C) in float64, written from the spec."""
    y = np.asarray(y, np.float64).reshape(y.shape[0], -1, y.shape[-1])   # (N, positions, C)
    mu_xc, s2_xc = y.mean(axis=1), y.var(axis=1)
    s_xc = np.sqrt(s2_xc)
    power = np.mean(y ** 2)
    constant, instance_mean = np.mean(mu_xc.mean(0) ** 2), np.mean(mu_xc.var(0))
    return {"power": power, "constant": constant, "instance_mean": instance_mean,
            "within": np.mean(s2_xc), "collapse": constant / power,
            "mean_var": instance_mean / power,
            "scale_var": np.mean(s_xc.var(0)) / np.mean(s_xc.mean(0) ** 2)}


def _cnn():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 3))
    h = keras.layers.Conv2D(4, 3, padding="same", name="conv1")(inputs)
    h = tfpn.get_norm_act_layer("gn+pn", groups=2, name="norm1")(h)
    h = keras.layers.Conv2D(4, 3, padding="same", name="conv2")(h)
    h = tfpn.get_norm_act_layer("bn", name="norm2")(h)
    h = keras.layers.LayerNormalization(name="keras_ln")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, keras.layers.Dense(3, name="head")(h))


def _normalized_outputs(model, x, batch_statistics=False):
    """`{layer name: y}` of the three normalizations, in float64 NumPy from the weights:
    conv -> GN(2 groups) -> affine -> ReLU -> PN -> conv -> BN (moving statistics, or the
    statistics of `x` when `batch_statistics`) -> affine -> ReLU -> Keras' LayerNorm."""
    conv1, norm1, conv2, norm2 = (model.get_layer(n) for n in ("conv1", "norm1", "conv2",
                                                                 "norm2"))
    y1 = R.group_normalize(RO.conv2d(x, _value(conv1.kernel), padding="same",
                                     bias=_value(conv1.bias)), 2, epsilon=norm1.epsilon)
    h = R.affine_act_proxy(y1, _value(norm1.gamma), _value(norm1.beta), -1, "relu",
                           proxy=(_value(norm1.proxy_beta), _value(norm1.proxy_gamma)),
                           proxy_epsilon=norm1.proxy_epsilon)
    z2 = RO.conv2d(h, _value(conv2.kernel), padding="same", bias=_value(conv2.bias))
    if batch_statistics:
        mean, var = z2.mean((0, 1, 2)), z2.var((0, 1, 2))
    else:
        mean, var = _value(norm2.moving_mean), _value(norm2.moving_variance)
    y2 = (z2 - mean) / np.sqrt(var + norm2.epsilon)
    h = R.affine_act_proxy(y2, _value(norm2.gamma), _value(norm2.beta), -1, "relu")
    ln = model.get_layer("keras_ln")
    y3 = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + ln.epsilon)
    return {"norm1": y1, "norm2": y2, "keras_ln": y3}


def _assert_decomposition(got, y, err_msg):
    want = decomposition(y)
    for key in POWER_METRICS:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-3, atol=1e-6,
                                   err_msg=f"{err_msg} {key}")


def test_failure_mode_monitor_in_fit_matches_numpy(rng):
    """The logs of the last epoch are the decomposition of the trained model's `y`: the
    monitor read the weights and moving statistics after the epoch's steps."""
    x = rng.standard_normal((16, 6, 6, 3)).astype("float32")
    labels = rng.integers(0, 3, 16).astype("int32")
    x_eval = x[:10]
    model = _cnn()
    model.compile(keras.optimizers.SGD(0.1), _logits_ce)
    monitor = FailureModeMonitor(x_eval, batch_size=4, log_keys="all")
    history = model.fit(x, labels, batch_size=8, epochs=2, shuffle=False, verbose=0,
                        callbacks=[monitor])
    assert set(history.history) == {"loss"} | FM_HEADLINE | {
        f"fm/{name}/{m}" for m in POWER_METRICS for name in ("norm1", "norm2", "keras_ln")}
    assert all(len(v) == 2 and np.all(np.isfinite(v)) for v in history.history.values())
    assert [r["label"] for r in monitor.records] == ["init", "epoch 1", "epoch 2"]
    assert [r["step"] for r in monitor.records] == [0, 2, 4]
    ys = _normalized_outputs(model, x_eval)
    for name, y in ys.items():
        _assert_decomposition({m: history.history[f"fm/{name}/{m}"][-1] for m in POWER_METRICS},
                              y, name)
    want = [decomposition(y) for y in ys.values()]
    np.testing.assert_allclose(history.history["fm/collapse_max"][-1],
                               max(w["collapse"] for w in want), rtol=1e-3, atol=1e-6)
    for metric in ("mean_var", "scale_var"):
        np.testing.assert_allclose(history.history[f"fm/{metric}_min"][-1],
                                   min(w[metric] for w in want), rtol=1e-3, atol=1e-6)


def test_failure_mode_monitor_logs_only_the_headline_by_default(rng):
    """Three keys in the Keras logs (the progress bar) whatever the depth; every layer's
    metrics in the record."""
    x = rng.standard_normal((4, 6, 6, 3)).astype("float32")
    monitor = FailureModeMonitor(x)
    monitor.set_model(_cnn())
    monitor.on_train_begin()
    logs = {}
    monitor.on_epoch_end(0, logs)
    assert set(logs) == FM_HEADLINE
    layers = monitor.records[-1]["layers"]
    assert [layer["name"] for layer in layers] == ["norm1", "norm2", "keras_ln"]
    assert logs["fm/collapse_max"] == max(layer["collapse"] for layer in layers)
    assert logs["fm/mean_var_min"] == min(layer["mean_var"] for layer in layers)


def test_power_decomposition_training_mode_from_a_dataset(rng):
    """Batch statistics for BN (one batch: the whole data set), elements of a tf.data
    pipeline on any backend; weights and moving statistics stay bit-identical."""
    x = (2.0 + rng.standard_normal((10, 6, 6, 3))).astype("float32")
    model = _cnn()
    model.get_layer("norm2").moving_mean.assign(np.full(4, 0.5, "float32"))
    before = [to_numpy(v.value).copy() for v in model.variables]
    data = tf.data.Dataset.from_tensor_slices((x, np.zeros(10, "int32"))).batch(10)
    got = power_decomposition(model, data, training=True)
    assert [g["name"] for g in got] == ["norm1", "norm2", "keras_ln"]
    ys = _normalized_outputs(model, x, batch_statistics=True)
    for layer in got:
        _assert_decomposition(layer, ys[layer["name"]], layer["name"])
    assert got[1]["constant"] < 1e-6 * got[1]["power"]          # batch-centred
    for v, value in zip(model.variables, before):
        np.testing.assert_array_equal(to_numpy(v.value), value, err_msg=v.path)


# -- gradient measurements -------------------------------------------------------------------

def _softmax_regression(rng, d=5, k=3):
    model = keras.Sequential([keras.Input((d,)), keras.layers.Dense(k, name="dense")])
    model.layers[0].kernel.assign(rng.normal(0, 0.7, (d, k)).astype("float32"))
    model.layers[0].bias.assign(rng.normal(0, 0.3, k).astype("float32"))
    return model


def _softmax_reference(model, x, labels, alphas):
    """Every measurement of a Dense softmax regression in float64, by hand."""
    dense = model.get_layer("dense")
    w, b = _value(dense.kernel), _value(dense.bias)
    x = x.astype(np.float64)
    onehot = np.eye(w.shape[1])[labels]

    def loss(w_, b_):
        z = x @ w_ + b_
        z = z - z.max(1, keepdims=True)
        return np.mean(np.log(np.exp(z).sum(1)) - (z * onehot).sum(1))

    logits = x @ w + b
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    gw_b = x[:, :, None] * (p - onehot)[:, None, :]             # x_b^T (softmax_b - onehot_b)
    gb_b = p - onehot
    gw, gb = gw_b.mean(0), gb_b.mean(0)
    align = lambda vs: np.linalg.norm(np.sum(vs, 0)) / sum(np.linalg.norm(v) for v in vs)  # noqa
    var = logits.var(0)
    return {
        "loss": loss(w, b),
        "grad": gw, "grad_norm": np.linalg.norm(gw),
        "grad_ratio": np.linalg.norm(gw) / np.linalg.norm(w), "grad_max": np.abs(gw).max(),
        "kurtosis": scipy.stats.kurtosis(gw.ravel(), fisher=True, bias=True),
        "kernel_alignment": align([g.ravel() for g in gw_b]),
        "alignment": align([np.concatenate([gw_b[i].ravel(), gb_b[i]]) for i in range(len(x))]),
        "relative_loss": {a: loss(w - a * gw, b - a * gb) / loss(w, b) for a in alphas},
        "abs_mean": np.abs(logits.mean(0)).mean(), "var": var.mean(),
        "conditioning": var.max() / var.mean(),
        "concentration": np.bincount(logits.argmax(1), minlength=w.shape[1]).max() / len(x),
    }


def _assert_record(record, want, alphas):
    kernel, = record["kernels"]
    act, = record["activations"]
    assert kernel["name"] == act["name"] == "dense"
    for key in ("grad_norm", "grad_ratio", "grad_max"):
        np.testing.assert_allclose(kernel[key], want[key], rtol=1e-4, err_msg=key)
    np.testing.assert_allclose(kernel["kurtosis"], want["kurtosis"], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(kernel["alignment"], want["kernel_alignment"], rtol=1e-4)
    np.testing.assert_allclose(record["alignment"], want["alignment"], rtol=1e-4)
    np.testing.assert_allclose(record["loss"], want["loss"], rtol=1e-5)
    for alpha in alphas:
        np.testing.assert_allclose(record["relative_loss"][alpha], want["relative_loss"][alpha],
                                   rtol=1e-4, err_msg=alpha)
    for key in ("abs_mean", "var", "conditioning"):
        np.testing.assert_allclose(act[key], want[key], rtol=1e-5, err_msg=key)
    assert record["concentration"] == pytest.approx(want["concentration"])


@pytest.mark.skipif(not GRADIENTS, reason="gradients: TensorFlow and JAX backends")
def test_gradient_scale_matches_hand_written_softmax_gradients(rng):
    model = _softmax_regression(rng)
    x = rng.standard_normal((7, 5)).astype("float32")
    labels = rng.integers(0, 3, 7).astype("int32")
    alphas = (1e-2, 1.0)
    before = [to_numpy(v.value).copy() for v in model.variables]
    record = gradient_scale(model, x, labels, loss=_logits_ce, per_example=7, alphas=alphas)
    _assert_record(record, _softmax_reference(model, x, labels, alphas), alphas)
    assert 0.0 < record["alignment"] < 1.0
    for v, value in zip(model.variables, before):       # M4 is stateless
        np.testing.assert_array_equal(to_numpy(v.value), value)


@pytest.mark.skipif(not GRADIENTS, reason="gradients: TensorFlow and JAX backends")
def test_gradient_scale_monitor_every_n_steps_in_fit(rng):
    """Measured at steps 4 and 8 of two 4-step epochs; the last record (step 8) is that
    of the final weights, against the hand-written gradients; histograms get the
    gradient as NumPy."""
    x = rng.standard_normal((16, 5)).astype("float32")
    labels = rng.integers(0, 3, 16).astype("int32")
    model = _softmax_regression(rng)
    model.compile(keras.optimizers.SGD(0.5), _logits_ce)
    alphas = (0.1,)
    monitor = GradientScaleMonitor((x[:6], labels[:6]), per_example=6, alphas=alphas,
                                   every_n_steps=4, at_train_begin=False, log_keys="all")
    grads = []
    measure = monitor.measure

    def recording_measure():
        record, scalars, histograms = measure()
        grads.append(histograms["gs/dense/grad"])
        return record, scalars, histograms

    monitor.measure = recording_measure
    history = model.fit(x, labels, batch_size=4, epochs=2, shuffle=False, verbose=0,
                        callbacks=[monitor])
    assert [r["step"] for r in monitor.records] == [4, 8]
    want = _softmax_reference(model, x[:6], labels[:6], alphas)
    last = monitor.records[-1]
    _assert_record({**last, "relative_loss": {0.1: last["relative_loss"]["0.1"]}}, want, alphas)
    assert isinstance(grads[-1], np.ndarray)
    np.testing.assert_allclose(grads[-1], want["grad"], rtol=1e-4, atol=1e-7)
    assert history.history["gs/alignment"][-1] == pytest.approx(last["alignment"])
    assert history.history["gs/dense/grad_norm"][-1] == pytest.approx(want["grad_norm"],
                                                                       rel=1e-4)


def test_gradient_monitor_names_the_backends_it_supports(monkeypatch):
    """On a backend without gradient support the constructor says which backends work."""
    from tf_proxynorm import _backend

    if GRADIENTS:   # pretend to be on PyTorch
        monkeypatch.setattr(_backend, "backend", lambda: "torch")
    got = _backend.backend()
    x = np.zeros((4, 5), "float32")
    with pytest.raises(ValueError, match=("GradientScaleMonitor supports the TensorFlow and "
                                          f"JAX backends.*Received: backend='{got}'")):
        GradientScaleMonitor((x, np.zeros(4, "int32")))
    with pytest.raises(ValueError, match=f"Received: backend='{got}'"):
        gradient_scale(_softmax_regression(np.random.default_rng(0)), x, np.zeros(4), loss="mse")
