"""Keras masks (`mask=`, `Masking`, `Embedding(mask_zero=True)`) on the norm layers (issue 21).

The semantics are those of Keras' `BatchNormalization` (`_moments(inputs, mask)`): the
masked entries are left out of the statistics (per channel over the batch for BN, per
(example, group) for GN/LN/IN, and thus out of the moving averages), every entry is
normalized with the statistics of the kept ones, and the mask is passed on unchanged.
Every expected value is a float64 NumPy (or float64 TensorFlow autodiff) implementation
written from these formulas here, never the code under test.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

import reference as R
import tf_proxynorm as tfpn
from tf_proxynorm.ops.stats import moments

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPS = 1e-3
TOL = 5e-5


def assert_close(actual, expected, tol=TOL, what=""):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    scale = max(1.0, float(np.max(np.abs(expected))))
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale, err_msg=what)


# -- float64 NumPy references, from the formulas -------------------------------------------

def full_mask(mask, shape, axis):
    """A Keras mask (rank - 1, no channel axis) broadcast to the input's shape."""
    return np.broadcast_to(np.expand_dims(np.asarray(mask, bool), axis % len(shape)), shape)


def masked_moments_np(x, kept, axes):
    """mean = sum(x[kept]) / n, var = sum((x[kept] - mean)^2) / n; 0 where n == 0."""
    x = np.asarray(x, np.float64)
    n = kept.sum(axis=axes, keepdims=True)
    mean = np.where(kept, x, 0.0).sum(axis=axes, keepdims=True) / np.maximum(n, 1)
    var = np.where(kept, (x - mean) ** 2, 0.0).sum(axis=axes, keepdims=True) / np.maximum(n, 1)
    return mean, var


def masked_group_normalize_np(x, mask, groups, axis=-1, epsilon=EPS):
    x = np.asarray(x, np.float64)
    kept = full_mask(mask, x.shape, axis)
    xm, km = np.moveaxis(x, axis, -1), np.moveaxis(kept, axis, -1)
    n, c = xm.shape[0], xm.shape[-1]
    g, kg = xm.reshape(n, -1, groups, c // groups), km.reshape(n, -1, groups, c // groups)
    mean, var = masked_moments_np(g, kg, (1, 3))
    y = ((g - mean) / np.sqrt(var + epsilon)).reshape(xm.shape)
    return np.moveaxis(y, -1, axis)


def masked_batch_moments_np(x, mask, axis=-1):
    x = np.asarray(x, np.float64)
    axis = axis % x.ndim
    red = tuple(a for a in range(x.ndim) if a != axis)
    mean, var = masked_moments_np(x, full_mask(mask, x.shape, axis), red)
    return mean.squeeze(red), var.squeeze(red)


def sequences(rng, n=4, t=7, c=6, offset=0.0):
    """`(N, T, C)` inputs and an `(N, T)` mask with ragged lengths, one all-masked example."""
    x = (offset + rng.standard_normal((n, t, c)) * 2.0 + 0.5).astype("float32")
    lengths = np.array([t, 3, 0, 1, 5, 6, 2, 4])[:n]
    mask = np.arange(t)[None, :] < lengths[:, None]
    return x, mask


def set_params(layer, rng):
    for w in layer.trainable_weights:
        w.assign((1.0 if w.name == "gamma" else 0.0)
                 + 0.3 * rng.standard_normal(w.shape).astype("float32"))


# -- ops.stats.moments(mask=) ----------------------------------------------------------------

@pytest.mark.parametrize("offset", [0.0, 1e4])
def test_masked_moments_match_numpy(rng, offset):
    x = (offset + rng.standard_normal((5, 6, 3))).astype("float32")
    mask = rng.random((5, 6, 1)) < 0.6
    mask[0] = False                                            # an all-masked row
    for axes in ([1], [0, 1]):
        mean, var = moments(x, axes, keepdims=True, mask=mask)
        kept = np.broadcast_to(mask, x.shape)
        ref_mean, ref_var = masked_moments_np(x.astype(np.float64), kept, tuple(axes))
        np.testing.assert_allclose(np.asarray(mean), ref_mean, rtol=1e-7, atol=1e-7)
        np.testing.assert_allclose(np.asarray(var), ref_var, rtol=1e-4, atol=1e-6)
        assert np.all(np.isfinite(np.asarray(var)))


# -- GN / LN / IN (+PN), ShiftedGroupNormAct -------------------------------------------------

GROUP_LAYERS = [
    ("gn", lambda **kw: tfpn.GroupNormAct(groups=3, **kw), 3),
    ("gn_pn", lambda **kw: tfpn.GroupNormAct(groups=2, proxy_norm=True, **kw), 2),
    ("ln_pn", lambda **kw: tfpn.LayerNormAct(proxy_norm=True, **kw), 1),
    ("in", lambda **kw: tfpn.InstanceNormAct(**kw), -1),
    ("shifted", lambda **kw: tfpn.layers.ShiftedGroupNormAct(groups=2, **kw), 2),
]


def group_layer_ref(layer, x, mask, groups, axis, activation):
    """The layer's full output from the masked NumPy GroupNorm and the spec's affine/PN."""
    c = x.shape[axis]
    groups = c if groups == -1 else groups
    y = masked_group_normalize_np(x, mask, groups, axis)
    w = {v.name: np.asarray(v.numpy(), np.float64) for v in layer.weights}
    proxy = (w["proxy_beta"], w["proxy_gamma"]) if "proxy_beta" in w else None
    out = R.affine_act_proxy(y, w.get("gamma"), w.get("beta"), axis, activation, proxy)
    if "offset" in w:
        out = out + w["offset"].reshape(R.channel_shape(x.ndim, axis % x.ndim))
    return out


@pytest.mark.parametrize("name,make,groups", GROUP_LAYERS, ids=[g[0] for g in GROUP_LAYERS])
@pytest.mark.parametrize("implementation", ["auto", "reference"])
@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_group_layers_leave_masked_steps_out(rng, name, make, groups, implementation,
                                             activation):
    x, mask = sequences(rng, offset=1e4 if activation == "silu" else 0.0)
    layer = make(activation=activation, implementation=implementation)
    layer.build(x.shape)
    set_params(layer, rng)
    y = np.asarray(layer(x, mask=mask))
    assert np.all(np.isfinite(y))
    assert_close(y, group_layer_ref(layer, x, mask, groups, -1, activation), what=name)
    # The statistics really ignore masked steps: changing them changes only themselves.
    x2 = np.where(mask[..., None], x, 1e3).astype("float32")
    y2 = np.asarray(layer(x2, mask=mask))
    np.testing.assert_array_equal(y2[mask], y[mask])


@pytest.mark.parametrize("shape,axis", [((3, 4, 5, 6), -1), ((3, 6, 4, 5), 1),
                                        ((3, 4, 6, 5), 2)])
def test_group_layers_images_any_channel_axis(rng, shape, axis):
    x = rng.standard_normal(shape).astype("float32")
    mask_shape = tuple(d for i, d in enumerate(shape) if i != axis % len(shape))
    mask = rng.random(mask_shape) < 0.5
    layer = tfpn.GroupNormAct(groups=2, axis=axis, activation="gelu", proxy_norm=True)
    layer.build(shape)
    set_params(layer, rng)
    assert_close(layer(x, mask=mask), group_layer_ref(layer, x, mask, 2, axis, "gelu"))
    # normalized_output takes the mask as call does.
    assert_close(layer.normalized_output(x, mask=mask),
                 masked_group_normalize_np(x, mask, 2, axis))


@pytest.mark.parametrize("axis", [-1, 1])
def test_large_mean_keeps_float32_precision(rng, axis):
    """Inputs of mean 1e4 and std 1: the output is exact to float32 rounding of the O(1)
    deviations (a float32 mean alone is off by up to 5e-4, half an ulp of 1e4)."""
    shape = (4, 50, 6) if axis == -1 else (4, 6, 50)
    x = (1e4 + rng.standard_normal(shape)).astype("float32")
    mask = rng.random((4, 50)) < 0.6
    layer = tfpn.GroupNormAct(groups=2, axis=axis, activation=None, center=False,
                              scale=False)
    y = np.asarray(layer(x, mask=mask), np.float64)
    np.testing.assert_allclose(y, masked_group_normalize_np(x, mask, 2, axis), atol=3e-6)


def test_full_rank_mask_broadcasts(rng):
    x, mask = sequences(rng)
    layer = tfpn.LayerNormAct(activation=None)
    expected = np.asarray(layer(x, mask=mask))
    assert_close(layer(x, mask=mask[..., None]), expected)


def test_all_true_mask_is_the_unmasked_layer(rng):
    x, _ = sequences(rng)
    layer = tfpn.GroupNormAct(groups=3, proxy_norm=True)
    assert_close(layer(x, mask=np.ones(x.shape[:2], bool)), layer(x))


def _masked_gn_tf64(x, mask, gamma, beta, groups, activation):
    """float64 TensorFlow version of the masked GN + affine + activation (for autodiff)."""
    n, t, c = x.shape
    kept = tf.cast(tf.broadcast_to(mask[..., None], x.shape), tf.float64)
    g = tf.reshape(x, (n, t, groups, c // groups))
    kg = tf.reshape(kept, g.shape)
    count = tf.maximum(tf.reduce_sum(kg, (1, 3), keepdims=True), 1.0)
    mean = tf.reduce_sum(g * kg, (1, 3), keepdims=True) / count
    var = tf.reduce_sum(tf.square(g - mean) * kg, (1, 3), keepdims=True) / count
    y = tf.reshape((g - mean) / tf.sqrt(var + EPS), x.shape)
    a = y * gamma + beta
    return tf.nn.relu(a) if activation == "relu" else tf.nn.silu(a)


@pytest.mark.parametrize("activation", ["relu", "silu"])
def test_gradients_against_float64_autodiff(rng, activation):
    x, mask = sequences(rng)
    layer = tfpn.GroupNormAct(groups=3, activation=activation)
    layer.build(x.shape)
    set_params(layer, rng)
    dy = rng.standard_normal(x.shape).astype("float32")
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = layer(xt, mask=tf.constant(mask))
        loss = tf.reduce_sum(y * dy)
    dx, dgamma, dbeta = tape.gradient(loss, [xt, layer.gamma, layer.beta])
    x64 = tf.constant(x, tf.float64)
    g64, b64 = (tf.constant(w.numpy(), tf.float64) for w in (layer.gamma, layer.beta))
    with tf.GradientTape() as tape:
        tape.watch([x64, g64, b64])
        ref = _masked_gn_tf64(x64, mask, g64, b64, 3, activation)
        loss = tf.reduce_sum(ref * dy.astype(np.float64))
    rdx, rdg, rdb = tape.gradient(loss, [x64, g64, b64])
    for got, want, what in ((dx, rdx, "dx"), (dgamma, rdg, "dgamma"), (dbeta, rdb, "dbeta")):
        assert got.shape == want.shape
        assert np.all(np.isfinite(got.numpy())), what
        assert_close(got, want, tol=2e-4, what=what)
    # Masked entries get a gradient only through their own output (not the statistics):
    # the all-masked example's dx is dy * act'(a) * gamma / sqrt(eps), finite.
    assert np.all(np.isfinite(dx.numpy()[2]))


def test_fused_implementation_with_a_mask_raises(rng):
    x, mask = sequences(rng)
    if not tfpn.fused_op_available():
        pytest.skip("fused op unavailable")
    layer = tfpn.GroupNormAct(groups=3, implementation="fused")
    with pytest.raises(ValueError, match="takes no mask"):
        layer(x, mask=mask)


def test_mask_of_a_wrong_rank_raises(rng):
    x, _ = sequences(rng)
    for layer in (tfpn.GroupNormAct(groups=3), tfpn.BatchNormAct()):
        with pytest.raises(ValueError, match=r"Received: mask.shape=\(4,\)"):
            layer(x, mask=np.ones((4,), bool), training=True)


# -- models: Embedding(mask_zero=True), Masking ----------------------------------------------

@pytest.mark.parametrize("make", [lambda: tfpn.LayerNormAct(activation="relu"),
                                  lambda: tfpn.GroupNormAct(groups=2, proxy_norm=True)])
def test_embedding_mask_zero_model(rng, make):
    tokens = np.array([[3, 5, 2, 0, 0], [1, 1, 0, 0, 0], [4, 2, 6, 7, 1], [0, 0, 0, 0, 0]])
    inputs = keras.Input((None,), dtype="int32")
    emb = keras.layers.Embedding(8, 4, mask_zero=True)
    norm = make()
    h = norm(emb(inputs))
    pooled = keras.layers.GlobalAveragePooling1D()(h)      # uses the propagated mask
    model = keras.Model(inputs, [h, pooled])
    seq, avg = model(tokens)
    e = np.asarray(emb(tokens))
    mask = tokens != 0
    groups = getattr(norm, "_groups")
    expected = group_layer_ref(norm, e, mask, groups, -1, "relu")
    assert_close(seq, expected)
    kept = mask[..., None]
    expected_avg = (expected * kept).sum(1) / np.maximum(kept.sum(1), 1)
    assert_close(avg[:3], expected_avg[:3])
    assert np.all(np.isfinite(np.asarray(seq)))
    np.testing.assert_array_equal(np.asarray(norm.compute_mask(e, mask)), mask)


@pytest.mark.parametrize("inference_layers", [False, True])
def test_fold_for_inference_keeps_masked_outputs(rng, inference_layers):
    """A GN+PN model behind `Embedding(mask_zero=True)`: the folded model (also with the
    serving `InferenceGroupNormAct`) computes the same masked outputs."""
    tokens = np.array([[3, 5, 2, 0, 0], [1, 1, 0, 0, 0], [4, 2, 6, 7, 1], [0, 0, 0, 0, 0]])
    inputs = keras.Input((None,), dtype="int32")
    h = keras.layers.Embedding(8, 4, mask_zero=True)(inputs)
    norm = tfpn.GroupNormAct(groups=2, proxy_norm=True, activation="relu")
    h = norm(h)
    outputs = keras.layers.Dense(3)(h)
    model = keras.Model(inputs, outputs)
    set_params(norm, rng)
    expected = np.asarray(model(tokens))
    folded = tfpn.fold_for_inference(model, inference_layers=inference_layers)
    if inference_layers:
        assert any(type(layer).__name__ == "InferenceGroupNormAct" for layer in folded.layers)
    assert_close(folded(tokens), expected, tol=1e-5)


def test_inference_group_norm_act_mask(rng):
    from tf_proxynorm.layers.inference_norm import InferenceGroupNormAct

    x, mask = sequences(rng)
    layer = InferenceGroupNormAct(groups=3, activation="silu", use_output_scale=True,
                                  use_output_offset=True)
    layer.build(x.shape)
    w = {}
    for v in layer.weights:
        w[v.name] = (1.0 if v.name in ("gamma", "output_scale") else 0.0) + 0.3 * (
            rng.standard_normal(v.shape))
        v.assign(w[v.name].astype("float32"))
    y = masked_group_normalize_np(x, mask, 3)
    expected = (R.act("silu", w["gamma"] * y + w["beta"]) * w["output_scale"]
                + w["output_offset"])
    assert_close(layer(x, mask=mask), expected)


@pytest.mark.parametrize("run_eagerly,mask_value", [(True, 0.0), (False, 0.1), (False, 1.0)])
def test_batchnorm_ignores_masked_values_as_keras(run_eagerly, mask_value):
    """Keras' `test_bachnorm_ignore_masked_values`: moving mean [1.5, 5] (0.75 for the
    first channel if the two padded steps of value 0 were counted) and variance
    [0.25, 0]."""
    padded = np.array([[[1, 5], [2, 5], [mask_value] * 2, [mask_value] * 2]] * 10, "float32")
    for cls in (tfpn.BatchNormAct, keras.layers.BatchNormalization):
        kwargs = {"activation": None} if cls is tfpn.BatchNormAct else {}
        inputs = keras.Input((None, 2))
        normed = cls(momentum=0.0, **kwargs)(keras.layers.Masking(mask_value)(inputs))
        model = keras.Model(inputs, normed)
        model.compile("rmsprop", loss="mse", run_eagerly=run_eagerly)
        model.fit(padded, padded, batch_size=10, epochs=5, verbose=0)
        np.testing.assert_allclose(model.layers[2].moving_mean.numpy(), [1.5, 5.0],
                                   rtol=1e-6, err_msg=cls.__name__)
        np.testing.assert_allclose(model.layers[2].moving_variance.numpy(), [0.25, 0.0],
                                   atol=1e-6, err_msg=cls.__name__)


def test_batchnorm_act_matches_keras_batchnormalization_with_mask(rng):
    x, mask = sequences(rng, n=6)
    ours = tfpn.BatchNormAct(activation=None, momentum=0.5)
    theirs = keras.layers.BatchNormalization(momentum=0.5)
    for layer in (ours, theirs):
        layer.build(x.shape)
    for name in ("gamma", "beta"):
        value = rng.standard_normal(6).astype("float32")
        getattr(ours, name).assign(value)
        getattr(theirs, name).assign(value)
    assert_close(ours(x, mask=mask, training=True), theirs(x, mask=mask, training=True),
                 tol=1e-5)
    for name in ("moving_mean", "moving_variance"):
        assert_close(getattr(ours, name).numpy(), getattr(theirs, name).numpy(), tol=1e-6)


@pytest.mark.parametrize("axis", [-1, 1])
def test_batchnorm_act_against_numpy(rng, axis):
    shape = (5, 7, 3) if axis == -1 else (5, 3, 7)
    x = (1e4 + rng.standard_normal(shape) * 3.0).astype("float32")
    mask = rng.random((5, 7)) < 0.4
    layer = tfpn.BatchNormAct(activation="relu", axis=axis, momentum=0.9)
    layer.build(shape)
    set_params(layer, rng)
    mean, var = masked_batch_moments_np(x, mask, axis)
    g, b = (np.asarray(w.numpy(), np.float64) for w in (layer.gamma, layer.beta))
    expected = R.batch_norm_act(x, axis, EPS, "relu", g, b, mean, var)
    assert_close(layer(x, mask=mask, training=True), expected, tol=2e-4)
    assert_close(layer.moving_mean.numpy(), 0.1 * mean, tol=1e-6)
    assert_close(layer.moving_variance.numpy(), 0.9 + 0.1 * var, tol=1e-5)
    # Inference uses the moving averages whatever the mask (as Keras).
    assert_close(layer(x, mask=mask), layer(x))


def test_batchnorm_all_masked_is_finite():
    """Keras' `test_input_fully_masked`: zeros in, zeros out, no NaN."""
    layer = tfpn.BatchNormAct(activation=None, center=False, scale=False)
    y = layer(np.zeros((4, 5), "float32"), mask=np.zeros((4,), "float32"), training=True)
    np.testing.assert_array_equal(np.asarray(y), np.zeros((4, 5)))


# -- the other statistics layers -------------------------------------------------------------

def test_batch_group_normalization_mask(rng):
    x, mask = sequences(rng, n=5)
    layer = tfpn.BatchGroupNormalization(groups=3, momentum=0.0)
    y = layer(x, mask=mask, training=True)
    # groups=3 of 6 channels: statistics over (batch, steps, 2 channels) of the kept steps.
    kept = full_mask(mask, x.shape, -1).reshape(5, 7, 3, 2)
    mean, var = masked_moments_np(x.reshape(5, 7, 3, 2), kept, (0, 1, 3))
    expected = ((x.reshape(5, 7, 3, 2) - mean) / np.sqrt(var + 1e-5)).reshape(x.shape)
    assert_close(y, expected, tol=2e-4)
    assert_close(layer.moving_mean.numpy(), mean.ravel(), tol=1e-6)


def test_iebn_mask(rng):
    x, mask = sequences(rng, n=5)
    layer = tfpn.InstanceEnhancementBatchNormalization(momentum=0.0)
    layer.build(x.shape)
    layer.gate_weight.assign(rng.standard_normal(6).astype("float32"))
    y = layer(x, mask=mask, training=True)
    mean, var = masked_batch_moments_np(x, mask)
    pooled, _ = masked_moments_np(x, full_mask(mask, x.shape, -1), (1,))
    gate = 1 / (1 + np.exp(-(layer.gate_weight.numpy() * pooled - 1.0)))
    expected = (x - mean) / np.sqrt(var + 1e-5) * gate
    assert_close(y, expected, tol=2e-4)


def test_evonorm_masks(rng):
    x, mask = sequences(rng, n=5)
    kept = full_mask(mask, x.shape, -1)
    x64 = x.astype(np.float64)
    s0 = tfpn.EvoNormS0(groups=2)
    _, var = masked_moments_np(x64.reshape(5, 7, 2, 3), kept.reshape(5, 7, 2, 3), (1, 3))
    var = np.repeat(var.reshape(5, 1, 2), 3, axis=-1)
    expected = x64 / (1 + np.exp(-x64)) / np.sqrt(var + 1e-5)
    assert_close(s0(x, mask=mask), expected, tol=2e-4)
    b0 = tfpn.EvoNormB0(momentum=0.0)
    y = b0(x, mask=mask, training=True)
    _, batch_var = masked_moments_np(x64, kept, (0, 1))
    _, inst_var = masked_moments_np(x64, kept, (1,))
    expected = x64 / np.maximum(np.sqrt(batch_var + 1e-5), x64 + np.sqrt(inst_var + 1e-5))
    assert_close(y, expected, tol=2e-4)
    assert_close(b0.moving_variance.numpy(), batch_var.ravel(), tol=1e-6)


# -- synchronized (tf.distribute) masked statistics -------------------------------------------

SYNC_SCRIPT = textwrap.dedent("""
    import json
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import tf_proxynorm as tfpn

    rng = np.random.default_rng(0)
    x = (1e4 + rng.standard_normal((4, 3, 5)) * np.array([1, 2, 5, 9])[:, None, None]
         ).astype("float32")
    mask = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1]], bool)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    per_replica = strategy.experimental_distribute_values_from_function(
        lambda ctx: (tf.constant(x[2 * ctx.replica_id_in_sync_group:][:2]),
                     tf.constant(mask[2 * ctx.replica_id_in_sync_group:][:2])))
    with strategy.scope():
        bn = tfpn.BatchNormAct(synchronized=True, momentum=0.0, activation=None)
        bn.build((None, 3, 5))
    strategy.run(lambda t: bn(t[0], mask=t[1], training=True), (per_replica,))
    print("RESULT" + json.dumps([bn.moving_mean.numpy().tolist(),
                                 bn.moving_variance.numpy().tolist()]))
""")


@pytest.mark.slow
def test_synchronized_masked_statistics_use_the_global_kept_entries():
    result = subprocess.run([sys.executable, "-c", SYNC_SCRIPT], capture_output=True,
                            text=True, cwd=ROOT, timeout=300,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    line = [s for s in result.stdout.splitlines() if s.startswith("RESULT")]
    assert line, result.stderr[-3000:]
    mean, var = json.loads(line[0][len("RESULT"):])
    x = (1e4 + np.random.default_rng(0).standard_normal((4, 3, 5))
         * np.array([1, 2, 5, 9])[:, None, None]).astype("float32").astype(np.float64)
    mask = np.array([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 1]], bool)
    ref_mean, ref_var = masked_batch_moments_np(x, mask)
    # Replica 1 alone (rows 2, 3) would give other statistics: the counts are global.
    np.testing.assert_allclose(mean, ref_mean, rtol=1e-7)
    np.testing.assert_allclose(var, ref_var, rtol=1e-4)
