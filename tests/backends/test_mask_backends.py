"""Keras masks on the norm layers on the running Keras backend (issue 21), against float64
references: masked entries are left out of the statistics (per (example, group) for
GN/LN/IN, per channel over the batch for BN and so out of its moving averages), every
entry is normalized with the statistics of the kept ones, as Keras' `BatchNormalization`.

- GN+PN, LN, IN, ShiftedGroupNormAct and BN (training) on `(N, T, C)` with an `(N, T)`
  mask (one all-masked example): output and the gradients of x and of every trainable
  weight with the backend's own autodiff, against float64 TensorFlow autodiff of the
  masked formulas written here;
- `Masking -> BatchNormAct` in `model.fit(jit_compile=JIT_COMPILE)` (XLA; eager on
  PyTorch): Keras' `test_bachnorm_ignore_masked_values` numbers;
- `Embedding(mask_zero=True) -> LayerNormAct` in a compiled predict.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf  # the float64 references only (independent of the package)

import reference as R
import tf_proxynorm as tfpn
from backend_helpers import JIT_COMPILE, layer_gradients, to_numpy

TOL = 5e-5
EPS = 1e-3
F64 = tf.float64


def assert_close(actual, expected, tol, what):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    assert np.all(np.isfinite(actual)), what
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale, err_msg=what)


class _WithMask(keras.layers.Layer):
    """Calls `layer` with a fixed mask (so `layer_gradients` differentiates a masked call)."""

    def __init__(self, layer, mask):
        super().__init__()
        self.layer = layer
        self.mask = mask
        self.built = layer.built   # for JAX's stateless_call: the variables are the layer's

    def call(self, inputs, training=None):
        return self.layer(inputs, training=training, mask=keras.ops.convert_to_tensor(self.mask))


def _masked_moments_tf64(x, kept, axes):
    count = tf.maximum(tf.reduce_sum(kept, axes, keepdims=True), 1.0)
    mean = tf.reduce_sum(x * kept, axes, keepdims=True) / count
    var = tf.reduce_sum(tf.square(x - mean) * kept, axes, keepdims=True) / count
    return mean, var


def _reference_tf64(kind, groups, x, mask, weights):
    """The layer's output in float64 TensorFlow, from the masked formulas."""
    n, t, c = x.shape
    kept = tf.cast(tf.broadcast_to(mask[..., None], x.shape), F64)
    if kind == "bn":
        mean, var = _masked_moments_tf64(x, kept, [0, 1])
        y = (x - mean) / tf.sqrt(var + EPS)
    else:
        g = c if groups == -1 else groups
        xg, kg = tf.reshape(x, (n, t, g, c // g)), tf.reshape(kept, (n, t, g, c // g))
        mean, var = _masked_moments_tf64(xg, kg, [1, 3])
        y = tf.reshape((xg - mean) / tf.sqrt(var + EPS), x.shape)
    a = tf.nn.relu(y * weights["gamma"] + weights["beta"])
    if "proxy_beta" in weights:
        q = tf.constant(R.quantiles(), F64)[:, None]
        u = tf.nn.relu(weights["gamma"] * (weights["proxy_beta"]
                                           + (1.0 + weights["proxy_gamma"]) * q)
                       + weights["beta"])
        m = tf.reduce_mean(u, 0)
        v = tf.reduce_mean(tf.square(u - m), 0)
        a = (a - m) / tf.sqrt(v + R.PROXY_EPSILON)
    if "offset" in weights:
        a = a + weights["offset"]
    return a


CASES = [
    ("gn_pn", "gn", 2, lambda: tfpn.GroupNormAct(groups=2, proxy_norm=True)),
    ("ln", "gn", 1, lambda: tfpn.LayerNormAct()),
    ("in", "gn", -1, lambda: tfpn.InstanceNormAct()),
    ("shifted", "gn", 3, lambda: tfpn.layers.ShiftedGroupNormAct(groups=3)),
    ("bn", "bn", None, lambda: tfpn.BatchNormAct()),
]


@pytest.mark.parametrize("name,kind,groups,make", CASES, ids=[c[0] for c in CASES])
def test_masked_output_and_every_gradient(name, kind, groups, make):
    rng = np.random.default_rng(1)
    x = (rng.standard_normal((4, 6, 6)) * 2.0 + 0.5).astype("float32")
    mask = np.arange(6)[None, :] < np.array([6, 2, 0, 4])[:, None]   # example 2 all masked
    layer = make()
    layer.build(x.shape)
    for w in layer.trainable_weights:
        w.assign((1.0 if w.name == "gamma" else 0.0)
                 + 0.3 * rng.standard_normal(w.shape).astype("float32"))
    dy = rng.standard_normal(x.shape).astype("float32")
    y, dx, dw = layer_gradients(_WithMask(layer, mask), x, dy, training=True)
    weights = {w.name: tf.constant(to_numpy(w.value), F64) for w in layer.trainable_weights}
    x64 = tf.constant(x, F64)
    with tf.GradientTape() as tape:
        tape.watch([x64] + list(weights.values()))
        ref = _reference_tf64(kind, groups, x64, mask, weights)
        loss = tf.reduce_sum(ref * tf.constant(dy, F64))
    grads = tape.gradient(loss, [x64] + list(weights.values()))
    assert_close(y, ref.numpy(), TOL, f"{name} y")
    assert_close(dx, grads[0].numpy(), 2e-4, f"{name} dx")
    for (wname, _), g in zip(weights.items(), grads[1:]):
        assert_close(dw[wname], g.numpy(), 2e-4, f"{name} d{wname}")


def test_fit_masked_batch_norm_moving_statistics():
    """Keras' `test_bachnorm_ignore_masked_values`: the padded steps (value 0) are not
    counted, so the moving mean is [1.5, 5] (0.75 for channel 0 if they were)."""
    padded = np.array([[[1, 5], [2, 5], [0, 0], [0, 0]]] * 10, "float32")
    inputs = keras.Input((None, 2))
    normed = tfpn.BatchNormAct(momentum=0.0, activation=None)(
        keras.layers.Masking(0.0)(inputs))
    model = keras.Model(inputs, normed)
    model.compile("rmsprop", loss="mse", jit_compile=JIT_COMPILE)
    model.fit(padded, padded, batch_size=10, epochs=2, verbose=0)
    bn = model.layers[2]
    np.testing.assert_allclose(to_numpy(bn.moving_mean.value), [1.5, 5.0], rtol=1e-6)
    np.testing.assert_allclose(to_numpy(bn.moving_variance.value), [0.25, 0.0], atol=1e-6)


def test_embedding_mask_zero_layer_norm_predict():
    tokens = np.array([[3, 5, 2, 0], [1, 0, 0, 0], [0, 0, 0, 0]], "int32")
    inputs = keras.Input((None,), dtype="int32")
    emb = keras.layers.Embedding(8, 4, mask_zero=True)
    model = keras.Model(inputs, tfpn.LayerNormAct(activation=None)(emb(inputs)))
    model.compile(jit_compile=JIT_COMPILE)
    y = model.predict(tokens, verbose=0)
    e = to_numpy(emb(tokens)).astype(np.float64)
    kept = np.broadcast_to((tokens != 0)[..., None], e.shape)
    n = np.maximum(kept.sum((1, 2), keepdims=True), 1)
    mean = np.where(kept, e, 0).sum((1, 2), keepdims=True) / n
    var = np.where(kept, (e - mean) ** 2, 0).sum((1, 2), keepdims=True) / n
    assert_close(y, (e - mean) / np.sqrt(var + EPS), TOL, "LN with Embedding mask")
