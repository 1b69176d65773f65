"""Cross-Iteration BN (CBNConv2D) against the float64 step-by-step reference of spec section 2."""


import keras
import numpy as np
import pytest
import tensorflow as tf

import reference as R
import reference_other as RO
import tf_proxynorm as tfpn

C_IN, C = 3, 4
Z_SHAPE = (4, 6, 6, C_IN)


def _layer(rng, **kwargs):
    kwargs.setdefault("padding", "same")
    layer = tfpn.CBNConv2D(C, kwargs.pop("kernel_size", 3), **kwargs)
    layer.build((None,) + Z_SHAPE[1:])
    layer.kernel.assign(0.3 * rng.standard_normal(layer.kernel.shape))
    return layer


def _steps(rng, layer, n, drift=0.05, same_input=False, bias=False):
    """n (z, kernel, bias) triples: the kernel drifts as under a small optimizer step."""
    kernel = layer.kernel.numpy().astype(np.float64)
    z = rng.standard_normal(Z_SHAPE) + 0.5
    out = []
    for _ in range(n):
        b = (0.2 * rng.standard_normal(C)).astype("float32") if bias else None
        out.append((z.astype("float32"), kernel.astype("float32"), b))
        kernel = kernel + drift * rng.standard_normal(kernel.shape)
        if not same_input:
            z = rng.standard_normal(Z_SHAPE) + 0.5
    return out


def _train(layer, z, kernel, bias=None):
    layer.kernel.assign(kernel)
    if bias is not None:
        layer.bias.assign(bias)
    return layer(z, training=True).numpy()


def _bn(z, kernel, bias=None, stride=1, padding="same", eps=1e-5):
    x = RO.conv2d(z, kernel, stride, padding, bias)
    return R.batch_norm_act(x, -1, eps, None)


# ---- spec checks -------------------------------------------------------------------------
def test_window_one_and_burn_in_equal_batch_norm(rng):
    """Spec 2: window 1 (or during burn-in) == BN with batch statistics."""
    single, burnin = _layer(rng, window_size=1), _layer(rng, window_size=4, burnin_steps=3)
    assert [w.name for w in single.non_trainable_weights] == ["moving_mean", "moving_variance"]
    steps = _steps(rng, single, 5)
    for t, (z, kernel, _) in enumerate(steps):
        bn = _bn(z, kernel)
        np.testing.assert_allclose(_train(single, z, kernel), bn, atol=5e-5)
        y = _train(burnin, z, kernel)
        if t <= 3:   # 3 burn-in steps, then a window holding the current step only
            np.testing.assert_allclose(y, bn, atol=5e-5)
        else:        # the pooled statistics now differ from the batch's
            assert np.abs(y - bn).max() > 1e-2


@pytest.mark.parametrize("rho, drift", [(0.0, 0.0), (1.0, 0.0), (0.0, 0.1)])
def test_uncompensated_or_frozen_is_the_average_of_the_last_k_batches(rng, rho, drift):
    """Spec 2: rho = 0 with frozen weights == plain average of the last k batch statistics;
    frozen weights need no compensation (any rho), and rho = 0 never compensates."""
    k = 3
    layer = _layer(rng, window_size=k, rho=rho)
    history = []
    for z, kernel, _ in _steps(rng, layer, 5, drift=drift):
        x = RO.conv2d(z, kernel, 1, "same")
        history.insert(0, (x.reshape(-1, C).mean(0), (x.reshape(-1, C) ** 2).mean(0)))
        mus, nus = (np.stack(s) for s in zip(*history[:k]))
        mean, var = mus.mean(0), nus.mean(0) - mus.mean(0) ** 2
        np.testing.assert_allclose(_train(layer, z, kernel),
                                   R.batch_norm_act(x, -1, 1e-5, None, mean=mean, var=var),
                                   atol=5e-5)


def test_mean_compensation_is_exact_when_the_input_is_unchanged(rng):
    """Spec 2 / notes 2.4(c): mu is linear in the kernel, so with the same input the
    compensated previous mean equals the current one: each output channel has mean beta."""
    means = {}
    for rho in (1.0, 0.0):
        layer = _layer(rng, window_size=2, rho=rho)
        layer.beta.assign([0.5, -1.0, 2.0, 0.0])
        z = rng.standard_normal(Z_SHAPE).astype("float32") + 0.5
        kernel = layer.kernel.numpy()
        _train(layer, z, kernel)
        y = _train(layer, z, kernel + 0.5 * rng.standard_normal(kernel.shape).astype("float32"))
        means[rho] = y.reshape(-1, C).mean(0)
    np.testing.assert_allclose(means[1.0], [0.5, -1.0, 2.0, 0.0], atol=2e-5)
    assert np.abs(means[0.0] - [0.5, -1.0, 2.0, 0.0]).max() > 0.05   # stale mean without it


# ---- the reference over training sequences -----------------------------------------------
@pytest.mark.parametrize("window, rho, burnin, bias, stride, padding, activation", [
    (4, 1.0, 0, False, 1, "same", None),
    (4, 1.0, 2, False, 2, "same", "relu"),
    (2, 0.5, 0, True, 1, "valid", None),
    (3, 1.0, 1, True, 2, "valid", "silu"),
])
def test_matches_reference_over_a_training_sequence(rng, window, rho, burnin, bias, stride,
                                                    padding, activation):
    layer = _layer(rng, window_size=window, rho=rho, burnin_steps=burnin, use_bias=bias,
                   strides=stride, padding=padding, activation=activation)
    gamma, beta = 1 + 0.3 * rng.standard_normal(C), 0.3 * rng.standard_normal(C)
    layer.gamma.assign(gamma.astype("float32"))
    layer.beta.assign(beta.astype("float32"))
    gamma, beta = layer.gamma.numpy(), layer.beta.numpy()
    ref = RO.CBNReference(C, window, rho, burnin, stride=stride, padding=padding)
    for z, kernel, b in _steps(rng, layer, 7, bias=bias):
        expected = ref.train_step(z, kernel, b, gamma, beta, activation)
        np.testing.assert_allclose(_train(layer, z, kernel, b), expected, atol=1e-4, rtol=1e-4)
    assert int(layer.step.numpy()) == 7
    np.testing.assert_allclose(layer.moving_mean.numpy(), ref.moving_mean, atol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), ref.moving_var, rtol=1e-5)
    # Inference: moving statistics of the current batches only; no state changes.
    state = [w.numpy().copy() for w in layer.non_trainable_weights]
    np.testing.assert_allclose(layer(z, training=False).numpy(),
                               ref.inference(z, kernel, b, gamma, beta, activation),
                               atol=1e-4, rtol=1e-4)
    for before, w in zip(state, layer.non_trainable_weights):
        np.testing.assert_array_equal(w.numpy(), before, err_msg=w.name)


def test_channels_first_matches_reference(rng):
    layer = tfpn.CBNConv2D(C, 3, padding="same", data_format="channels_first", window_size=3)
    layer.build((None, C_IN, 6, 6))
    ref = RO.CBNReference(C, 3)
    # XLA: TensorFlow's CPU Conv2D has no NCHW kernel without oneDNN (CPUs without AVX-512).
    step = tf.function(lambda t: layer(t, training=True), jit_compile=True)
    kernel = 0.3 * rng.standard_normal(layer.kernel.shape)
    for _ in range(4):
        kernel = (kernel + 0.05 * rng.standard_normal(kernel.shape)).astype("float32")
        z = (rng.standard_normal(Z_SHAPE) + 0.5).astype("float32")
        layer.kernel.assign(kernel)
        y = step(np.moveaxis(z, -1, 1)).numpy()
        np.testing.assert_allclose(np.moveaxis(y, 1, -1), ref.train_step(z, kernel),
                                   atol=1e-4, rtol=1e-4)


def test_grouped_conv_matches_reference(rng):
    """Groups of filters share their mean-patch derivative (stored once per group)."""
    layer = tfpn.CBNConv2D(C, 3, padding="same", groups=2, window_size=3, use_bias=True)
    layer.build((None, 6, 6, 4))
    assert layer.buffer_mean_grad.shape == (2, 3, 3, 2, 2)
    ref = RO.CBNReference(C, 3, groups=2)
    kernel = 0.3 * rng.standard_normal(layer.kernel.shape)
    for _ in range(4):
        kernel = (kernel + 0.05 * rng.standard_normal(kernel.shape)).astype("float32")
        bias = (0.2 * rng.standard_normal(C)).astype("float32")
        z = (rng.standard_normal((4, 6, 6, 4)) + 0.5).astype("float32")
        np.testing.assert_allclose(_train(layer, z, kernel, bias), ref.train_step(z, kernel, bias),
                                   atol=1e-4, rtol=1e-4)


def test_invalid_compensated_statistics_follow_the_max_rule(rng):
    """Flipping the kernel (W -> -W) makes the first-order compensated variance negative
    (var - 4 var - 4 mu^2): the paper's rule nu <- max(nu, mu^2) clamps it to 0."""
    layer = _layer(rng, window_size=2)
    ref = RO.CBNReference(C, 2)
    z = (rng.standard_normal(Z_SHAPE) + 0.5).astype("float32")
    kernel = layer.kernel.numpy()
    for w in (kernel, -kernel):
        np.testing.assert_allclose(_train(layer, z, w), ref.train_step(z, w), atol=1e-4)
    assert ref.clamped == C
    # var_bar = (var + 0) / 2 + spread of the (exactly compensated) means, which is 0.
    x = RO.conv2d(z, -kernel, 1, "same").reshape(-1, C)
    expected = (x - x.mean(0)) / np.sqrt(x.var(0) / 2 + 1e-5)
    np.testing.assert_allclose(_train_output_of_last_step(ref, z, -kernel), expected, atol=1e-5)


def _train_output_of_last_step(ref, z, kernel):
    x, mu, nu, _, _ = ref.statistics(z, kernel)
    previous = [RO.cbn_compensate(ref.buffer[1], kernel, None, 1.0)]
    mu_bar, var_bar, _ = RO.cbn_window(mu, nu, previous)
    return (x - mu_bar) / np.sqrt(var_bar + 1e-5)


def test_gradients_flow_only_through_the_current_step(rng):
    """Autodiff vs central differences of the reference in which the compensated previous
    statistics are constants (computed once at the current kernel)."""
    window = 3
    layer = tfpn.CBNConv2D(C, 3, padding="same", window_size=window, dtype="float64")
    layer.build((None, 5, 5, 2))
    ref = RO.CBNReference(C, window)
    kernel = 0.3 * rng.standard_normal(layer.kernel.shape)
    for _ in range(3):
        kernel = kernel + 0.05 * rng.standard_normal(kernel.shape)
        z = rng.standard_normal((2, 5, 5, 2)) + 0.5
        layer.kernel.assign(kernel)
        layer(z, training=True)
        ref.train_step(z, kernel)
    kernel = kernel + 0.05 * rng.standard_normal(kernel.shape)
    z = rng.standard_normal((2, 5, 5, 2)) + 0.5
    layer.kernel.assign(kernel)
    r = rng.standard_normal((2, 5, 5, C))
    zt = tf.constant(z)
    with tf.GradientTape() as tape:
        tape.watch(zt)
        loss = tf.reduce_sum(layer(zt, training=True) * r)
    grad_z, grad_w, grad_gamma, grad_beta = tape.gradient(
        loss, [zt, layer.kernel, layer.gamma, layer.beta])

    previous = [RO.cbn_compensate(e, kernel, None, 1.0) for e in ref.buffer[:window - 1]]

    def ref_loss(z_, w_, gamma=np.ones(C), beta=np.zeros(C)):
        x, mu, nu, _, _ = ref.statistics(z_, w_)
        mu_bar, var_bar, _ = RO.cbn_window(mu, nu, previous)
        return float((((x - mu_bar) / np.sqrt(var_bar + 1e-5) * gamma + beta)
                      * r.reshape(-1, C)).sum())

    h = 1e-6
    for name, base, grad in (("z", z, grad_z), ("kernel", kernel, grad_w),
                             ("gamma", np.ones(C), grad_gamma), ("beta", np.zeros(C), grad_beta)):
        numeric = np.zeros(base.shape)
        for idx in np.ndindex(*base.shape):
            hi, lo = base.copy(), base.copy()
            hi[idx] += h
            lo[idx] -= h
            args = {"z": lambda v: (v, kernel), "kernel": lambda v: (z, v)}.get(name)
            if args is not None:
                numeric[idx] = (ref_loss(*args(hi)) - ref_loss(*args(lo))) / (2 * h)
            else:
                numeric[idx] = (ref_loss(z, kernel, **{name: hi})
                                - ref_loss(z, kernel, **{name: lo})) / (2 * h)
        np.testing.assert_allclose(np.asarray(grad), numeric, atol=1e-6, rtol=1e-5, err_msg=name)


# ---- training/inference semantics ---------------------------------------------------------
def test_trainable_false_is_inference(rng):
    layer = _layer(rng, window_size=3)
    z = (rng.standard_normal(Z_SHAPE) + 0.5).astype("float32")
    _train(layer, z, layer.kernel.numpy())
    state = [w.numpy().copy() for w in layer.weights]
    ref = RO.CBNReference(C, 3)
    ref.moving_mean, ref.moving_var = layer.moving_mean.numpy(), layer.moving_variance.numpy()
    expected = ref.inference(z, layer.kernel.numpy())
    # As Keras BatchNormalization: no `training` argument is inference.
    np.testing.assert_allclose(layer(z).numpy(), expected, atol=1e-4)
    layer.trainable = False
    np.testing.assert_allclose(layer(z, training=True).numpy(), expected, atol=1e-4)
    for before, w in zip(state, layer.weights):
        np.testing.assert_array_equal(w.numpy(), before, err_msg=w.name)


def test_xla_matches_eager(rng):
    eager = _layer(rng, window_size=3, burnin_steps=1, activation="relu")
    compiled = _layer(rng, window_size=3, burnin_steps=1, activation="relu")
    jit = tf.function(lambda t: compiled(t, training=True), jit_compile=True)
    for z, kernel, _ in _steps(rng, eager, 4):
        compiled.kernel.assign(kernel)
        np.testing.assert_allclose(jit(tf.constant(z)).numpy(), _train(eager, z, kernel),
                                   atol=1e-5)
    for a, b in zip(compiled.non_trainable_weights, eager.non_trainable_weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6, err_msg=a.name)


def _model(**cbn):
    return keras.Sequential([
        keras.Input(Z_SHAPE[1:]),
        tfpn.CBNConv2D(C, 3, padding="same", activation="relu", name="cbn", **cbn),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(2),
    ])


@pytest.mark.parametrize("jit_compile", [False, True])
def test_model_fit(rng, jit_compile):
    model = _model(window_size=3, burnin_steps=1)
    model.compile(optimizer=keras.optimizers.SGD(0.1), jit_compile=jit_compile,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = rng.standard_normal((16,) + Z_SHAPE[1:]).astype("float32")
    history = model.fit(x, rng.integers(0, 2, 16), epochs=1, batch_size=4, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    cbn = model.get_layer("cbn")
    assert int(cbn.step.numpy()) == 4
    # Steps 1..3 were recorded (ring of 2 slots): the stored kernels are past kernels.
    stored = cbn.buffer_kernel.numpy()
    assert np.abs(stored).max(axis=(1, 2, 3, 4)).min() > 0
    assert not np.allclose(stored[0], stored[1])
    assert not np.allclose(stored[0], cbn.kernel.numpy())
    assert np.abs(cbn.buffer_variance_grad.numpy()).max(axis=(1, 2, 3, 4)).min() > 0


def test_checkpoint_and_keras_round_trip_keep_the_buffers(rng, tmp_path):
    model = _model(window_size=3)
    layer = model.get_layer("cbn")
    for z, kernel, _ in _steps(rng, layer, 3):
        layer.kernel.assign(kernel)
        model(z, training=True)
    names = [w.name for w in layer.weights]
    assert {"step", "buffer_mean", "buffer_mean_grad", "buffer_kernel"} <= set(names)
    z = (rng.standard_normal(Z_SHAPE) + 0.5).astype("float32")

    tf.train.Checkpoint(model=model).write(str(tmp_path / "ckpt"))
    restored = _model(window_size=3)
    status = tf.train.Checkpoint(model=restored).read(str(tmp_path / "ckpt"))
    status.assert_existing_objects_matched()
    model.save(str(tmp_path / "m.keras"))
    loaded = keras.saving.load_model(str(tmp_path / "m.keras"))
    for other in (restored, loaded):
        for a, b in zip(other.get_layer("cbn").weights, layer.weights):
            assert a.name == b.name
            np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=a.name)
    expected = model(z, training=True).numpy()      # one more training step on each
    for other in (restored, loaded):
        np.testing.assert_allclose(other(z, training=True).numpy(), expected, atol=1e-6)
        np.testing.assert_allclose(other.predict(z, verbose=0), model.predict(z, verbose=0),
                                   atol=1e-6)
        assert int(other.get_layer("cbn").step.numpy()) == 4


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"], indirect=True)
def test_mixed_precision(rng, policy):
    compute = "float16" if policy == "mixed_float16" else "bfloat16"
    layer = _layer(rng, window_size=3)
    assert layer.kernel.dtype == "float32" and layer.buffer_kernel.dtype == "float32"
    ref = RO.CBNReference(C, 3)
    for z, kernel, _ in _steps(rng, layer, 4):
        z16 = tf.cast(z, compute)
        layer.kernel.assign(kernel)
        y = layer(z16, training=True)   # dtypes: tests/test_layer_contract.py
        expected = ref.train_step(tf.cast(z16, "float64").numpy(),
                                  tf.cast(tf.cast(kernel, compute), "float64").numpy())
        tol = 2e-2 if compute == "float16" else 5e-2
        np.testing.assert_allclose(tf.cast(y, "float32").numpy(), expected, atol=tol, rtol=tol / 2)


# ---- factory and builder hook --------------------------------------------------------------
def test_factory_name_and_conv_binding(rng):
    norm = tfpn.get_norm_act_layer("cbn", window_size=3, rho=0.5, burnin_steps=7,
                                   activation="relu", axis=-1, name="block_norm")
    assert isinstance(norm, tfpn.CrossIterationBatchNormalization)
    conv = keras.layers.Conv2D(C, 3, strides=2, padding="same", use_bias=False,
                               kernel_initializer="he_normal", name="block_conv")
    (fused,) = tfpn.conv_norm_layers(conv, norm)
    assert isinstance(fused, tfpn.CBNConv2D)
    assert (fused.name, fused.strides, fused.kernel_size) == ("block_conv", (2, 2), (3, 3))
    assert (fused.window_size, fused.rho, fused.burnin_steps) == (3, 0.5, 7)
    assert fused.get_config()["activation"] == "relu"
    bn = tfpn.get_norm_act_layer("bn")
    assert tfpn.conv_norm_layers(conv, bn) == [conv, bn]
    inputs = keras.Input(Z_SHAPE[1:])
    model = keras.Model(inputs, fused(inputs))
    y = model(np.ones((2,) + Z_SHAPE[1:], "float32"), training=True)
    assert y.shape == (2, 3, 3, C) and float(tf.reduce_min(y)) >= 0.0   # relu applied


@pytest.mark.parametrize("conv, match", [
    (lambda: tfpn.WSConv2D(C, 3), "Received: conv=WSConv2D"),
    (lambda: keras.layers.Conv2D(C, 3, activation="relu"), "Received: activation='relu'"),
    (lambda: keras.layers.Conv2D(C, 3, data_format="channels_first"), "Received: axis=-1"),
    (lambda: _built_conv(), "Received: conv='built'"),
])
def test_binding_errors(conv, match):
    norm = tfpn.get_norm_act_layer("cbn")
    with pytest.raises(ValueError, match=match):
        norm.bind_conv(conv())


def _built_conv():
    conv = keras.layers.Conv2D(C, 3, name="built")
    conv.build((None, 6, 6, C_IN))
    return conv


def test_the_norm_layer_alone_refuses_to_run():
    with pytest.raises(ValueError, match="conv_norm_layers"):
        tfpn.get_norm_act_layer("cbn")(np.ones((1, 4, 4, C), "float32"))


@pytest.mark.parametrize("kwargs, match", [
    (dict(window_size=0), "Received: window_size=0"),
    (dict(rho=-1.0), "Received: rho=-1.0"),
    (dict(burnin_steps=-2), "Received: burnin_steps=-2"),
    (dict(momentum=1.1), "Received: momentum=1.1"),
    (dict(epsilon=0.0), "Received: epsilon=0.0"),
    (dict(activation="nope"), "Received: activation='nope'"),
])
def test_argument_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tfpn.CBNConv2D(C, 3, **kwargs)
    with pytest.raises(ValueError, match=match):
        tfpn.get_norm_act_layer("cbn", **kwargs)
