"""WSConv2D against the float64 reference of spec section 5."""


import keras
import numpy as np
import pytest
import tensorflow as tf

import reference_other as RO
import tf_proxynorm as tfpn


def _conv(rng, filters=4, kernel_size=3, c_in=3, **kwargs):
    layer = tfpn.WSConv2D(filters, kernel_size, **kwargs)
    layer.build((None, 7, 7, c_in))
    kernel = rng.standard_normal(layer.kernel.shape) * 0.2 + 0.05
    layer.kernel.assign(kernel.astype("float32"))
    return layer


def test_standardized_filters_have_mean_0_and_std_1(rng):
    layer = _conv(rng, filters=6, c_in=5)
    w = layer.standardized_kernel.numpy().reshape(-1, 6)
    np.testing.assert_allclose(w.mean(0), 0.0, atol=1e-6)
    np.testing.assert_allclose(w.std(0), 1.0, atol=1e-3)   # std / (std + 1e-5)
    np.testing.assert_allclose(w.reshape(layer.kernel.shape),
                               RO.standardize(layer.kernel.numpy()), atol=1e-6)


@pytest.mark.parametrize("strides, padding", [(1, "same"), (2, "same"), (1, "valid"),
                                              (2, "valid")])
def test_output_matches_reference(rng, strides, padding):
    layer = _conv(rng, strides=strides, padding=padding, use_bias=True)
    layer.bias.assign(rng.standard_normal(4).astype("float32"))
    z = rng.standard_normal((2, 7, 7, 3)).astype("float32")
    ref = RO.conv2d(z, RO.standardize(layer.kernel.numpy()), strides, padding,
                    layer.bias.numpy())
    np.testing.assert_allclose(layer(z).numpy(), ref, atol=1e-4, rtol=1e-5)


def test_output_is_invariant_to_per_filter_affine_changes(rng):
    """Spec 5: W_i -> a_i W_i + b_i (a_i > 0) leaves the conv output unchanged."""
    layer = _conv(rng, padding="same")
    z = rng.standard_normal((2, 7, 7, 3)).astype("float32")
    before = layer(z).numpy()
    a, b = rng.uniform(0.1, 10.0, 4), rng.standard_normal(4)
    layer.kernel.assign((layer.kernel.numpy() * a + b).astype("float32"))
    np.testing.assert_allclose(layer(z).numpy(), before, atol=2e-4, rtol=1e-4)
    # A plain Conv2D is not invariant: the check can fail.
    plain = keras.layers.Conv2D(4, 3, padding="same")
    plain.build(z.shape)
    y1 = plain(z).numpy()
    plain.kernel.assign(plain.kernel.numpy() * a + b)
    assert np.abs(plain(z).numpy() - y1).max() > 0.1


def test_gradients_match_reference_finite_differences(rng):
    layer = tfpn.WSConv2D(3, 2, padding="same", dtype="float64")
    layer.build((None, 4, 4, 2))
    kernel = rng.standard_normal(layer.kernel.shape)
    layer.kernel.assign(kernel)
    z = rng.standard_normal((2, 4, 4, 2))
    r = rng.standard_normal((2, 4, 4, 3))
    zt = tf.constant(z)
    with tf.GradientTape() as tape:
        tape.watch(zt)
        loss = tf.reduce_sum(layer(zt) * r)
    grad_z, grad_w = tape.gradient(loss, [zt, layer.kernel])

    def ref_loss(z_, w_):
        return float((RO.conv2d(z_, RO.standardize(w_), 1, "same") * r).sum())

    h = 1e-6
    for base, grad, is_z in ((kernel, grad_w, False), (z, grad_z, True)):
        numeric = np.zeros(base.shape)
        for idx in np.ndindex(*base.shape):
            hi, lo = base.copy(), base.copy()
            hi[idx] += h
            lo[idx] -= h
            numeric[idx] = ((ref_loss(hi, kernel) - ref_loss(lo, kernel)) if is_z else
                            (ref_loss(z, hi) - ref_loss(z, lo))) / (2 * h)
        np.testing.assert_allclose(np.asarray(grad), numeric, atol=1e-6, rtol=1e-5)
    # Each filter's gradient is orthogonal to its mean direction (the output ignores it).
    np.testing.assert_allclose(np.asarray(grad_w).reshape(-1, 3).sum(0), 0.0, atol=1e-9)


def test_constant_filter_has_finite_gradients():
    layer = tfpn.WSConv2D(2, 3, kernel_initializer="zeros")
    z = tf.ones((1, 5, 5, 2))
    with tf.GradientTape() as tape:
        loss = tf.reduce_sum(layer(z))
    grad = tape.gradient(loss, layer.kernel)
    assert np.isfinite(grad.numpy()).all()
    np.testing.assert_array_equal(layer(z).numpy(), 0.0)


def test_ws_then_group_norm_is_batch_independent(rng):
    model = keras.Sequential([
        keras.Input((6, 6, 3)),
        tfpn.WSConv2D(8, 3, padding="same", use_bias=False),
        tfpn.get_norm_act_layer("gn", groups=4, implementation="reference"),
    ])
    x = rng.standard_normal((5, 6, 6, 3)).astype("float32")
    batch = model(x, training=True).numpy()
    alone = np.concatenate([model(x[i:i + 1], training=False).numpy() for i in range(5)])
    np.testing.assert_allclose(alone, batch, atol=1e-5)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"], indirect=True)
def test_mixed_precision_standardizes_the_float32_kernel(rng, policy):
    compute = "float16" if policy == "mixed_float16" else "bfloat16"
    layer = tfpn.WSConv2D(4, 3, padding="same", use_bias=False)
    layer.build((None, 5, 5, 3))
    # A large common offset: a float16 copy of the kernel would lose the filters' spread.
    kernel = 40.0 + 0.01 * rng.standard_normal(layer.kernel.shape)
    layer.kernel.assign(kernel.astype("float32"))
    z = rng.standard_normal((2, 5, 5, 3)).astype("float32")
    y = layer(tf.cast(z, compute))
    assert layer.kernel.dtype == "float32"   # other dtypes: tests/test_layer_contract.py
    ref = RO.conv2d(tf.cast(tf.cast(z, compute), "float64").numpy(),
                    RO.standardize(layer.kernel.numpy()), 1, "same")
    tol = 8e-2 if compute == "bfloat16" else 1e-2
    np.testing.assert_allclose(tf.cast(y, "float32").numpy(), ref, atol=tol, rtol=tol)


def test_xla_compiles_and_matches_eager(rng):
    layer = _conv(rng, padding="same")
    z = rng.standard_normal((2, 7, 7, 3)).astype("float32")
    jit = tf.function(lambda t: layer(t), jit_compile=True)
    np.testing.assert_allclose(jit(tf.constant(z)).numpy(), layer(z).numpy(), atol=1e-5)


def _model():
    return keras.Sequential([
        keras.Input((6, 6, 3)),
        tfpn.WSConv2D(8, 3, padding="same", use_bias=False, epsilon=1e-4),
        tfpn.get_norm_act_layer("ln", implementation="reference"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(3),
    ])


@pytest.mark.slow
def test_model_fit_with_xla(rng):
    model = _model()
    model.compile(optimizer="sgd", jit_compile=True,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = rng.standard_normal((8, 6, 6, 3)).astype("float32")
    kernel = model.layers[0].kernel.numpy()
    history = model.fit(x, rng.integers(0, 3, 8), epochs=1, batch_size=4, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert not np.allclose(model.layers[0].kernel.numpy(), kernel)


def test_epsilon_error():
    with pytest.raises(ValueError, match="Received: epsilon=0"):
        tfpn.WSConv2D(4, 3, epsilon=0)
