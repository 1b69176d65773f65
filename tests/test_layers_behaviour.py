"""Layer behaviour: batch independence, execution modes, serialization, export, dtypes, errors."""

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
from conftest import random_params, set_params

BATCH_INDEPENDENT = [
    ("gn+pn", dict(groups=4)), ("ln+pn", {}), ("in+pn", {}), ("gn", dict(groups=4)), ("ln", {}),
    ("in", {}),
]


def _built(name, kwargs, shape, rng, **extra):
    layer = tfpn.get_norm_act_layer(name, **kwargs, **extra)
    layer.build(shape)
    set_params(layer, random_params(rng, shape[-1], proxy=True))
    return layer


@pytest.mark.parametrize("name, kwargs", BATCH_INDEPENDENT)
def test_batch_independence_and_train_equals_eval(rng, implementation, name, kwargs):
    x = rng.standard_normal((5, 6, 6, 16)).astype("float32")
    layer = _built(name, kwargs, x.shape, rng, implementation=implementation)
    batch_train = layer(x, training=True).numpy()
    batch_eval = layer(x, training=False).numpy()
    alone = np.concatenate([layer(x[i:i + 1], training=False).numpy() for i in range(5)])
    np.testing.assert_allclose(batch_train, batch_eval, atol=1e-6)
    np.testing.assert_allclose(alone, batch_eval, atol=1e-5)


@pytest.mark.parametrize("mode", ["eager", "function", "jit"])
@pytest.mark.parametrize("name", ["gn+pn", "ln+pn", "bn"])
def test_execution_modes(rng, implementation, mode, name):
    x = rng.standard_normal((4, 5, 5, 8)).astype("float32")
    # BN has no fused path and no `implementation` argument.
    layer = _built(name, dict(groups=2) if name == "gn+pn" else {}, x.shape, rng,
                   **({} if name == "bn" else dict(implementation=implementation)))
    expected = layer(x, training=False).numpy()
    if mode == "jit" and implementation == "fused" and name != "bn":
        # The custom op cannot be XLA-compiled: an explicit request says so clearly (BN has
        # no custom op: TensorFlow's own fused batch norm compiles).
        with pytest.raises(ValueError, match="XLA"):
            tf.function(lambda t: layer(t, training=False), jit_compile=True)(tf.constant(x))
        return
    fn = {"eager": lambda f: f, "function": tf.function,
          "jit": lambda f: tf.function(f, jit_compile=True)}[mode]
    call = fn(lambda t: layer(t, training=False))
    np.testing.assert_allclose(call(tf.constant(x)).numpy(), expected, atol=1e-5)
    # Unknown batch and spatial sizes.
    dyn = tf.function(lambda t: layer(t, training=False), jit_compile=mode == "jit",
                      input_signature=[tf.TensorSpec([None, None, None, 8])])
    np.testing.assert_allclose(dyn(x[:3]).numpy(), expected[:3], atol=1e-5)


def _small_model(norm="gn+pn", **kwargs):
    return keras.Sequential([
        keras.Input((8, 8, 3)),
        keras.layers.Conv2D(16, 3, padding="same", use_bias=False),
        tfpn.get_norm_act_layer(norm, **kwargs),
        keras.layers.Conv2D(16, 3, padding="same", use_bias=False),
        tfpn.get_norm_act_layer(norm, **kwargs),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(4),
    ])


@pytest.mark.parametrize("jit_compile", [True, False])
def test_model_fit(rng, jit_compile):
    model = _small_model(groups=4)
    model.compile(optimizer="sgd", jit_compile=jit_compile,
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    x = rng.standard_normal((16, 8, 8, 3)).astype("float32")
    y = rng.integers(0, 4, 16)
    before = [w.numpy().copy() for w in model.layers[1].weights]
    history = model.fit(x, y, epochs=2, batch_size=8, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    # The proxy parameters receive gradients (through the proxy statistics).
    after = model.layers[1].weights
    assert [w.name for w in after] == ["gamma", "beta", "proxy_beta", "proxy_gamma"]
    assert all(not np.array_equal(b, a.numpy()) for b, a in zip(before, after))


@pytest.mark.slow
def test_export_loads_in_a_process_that_never_imports_tf_proxynorm(rng, tmp_path):
    model = _small_model(groups=4)
    set_params(model.layers[1], random_params(rng, 16))
    x = rng.standard_normal((3, 8, 8, 3)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", model.predict(x, verbose=0))
    model.export(str(tmp_path / "saved"), verbose=False)
    script = textwrap.dedent(f"""
        import sys, numpy as np, tensorflow as tf
        m = tf.saved_model.load({str(tmp_path / 'saved')!r})
        x = np.load({str(tmp_path / 'x.npy')!r})
        y = m.serve(tf.constant(x)).numpy()
        assert "tf_proxynorm" not in sys.modules
        np.testing.assert_allclose(y, np.load({str(tmp_path / 'y.npy')!r}), atol=1e-5)
        y1 = m.serve(tf.constant(x[:1])).numpy()   # another batch size
        np.testing.assert_allclose(y1, y[:1], atol=1e-5)
        print("OK")
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         cwd=str(tmp_path), env={**os.environ, "PYTHONPATH": ""})
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"], indirect=True)
@pytest.mark.parametrize("name", ["gn+pn", "ln+pn", "in", "bn", "pn"])
def test_mixed_precision(rng, implementation, policy, name):
    # Up to 6e4 for the normalizing layers; PN-Act alone does not normalize its input.
    x = rng.uniform(-6e4, 6e4, (2, 4, 4, 8)).astype("float32") / (6e4 if name == "pn" else 1)
    kwargs = dict(groups=2) if name == "gn+pn" else {}
    if name != "bn" and name != "pn":
        kwargs["implementation"] = implementation
    layer = tfpn.get_norm_act_layer(name, **kwargs)
    compute = "float16" if policy == "mixed_float16" else "bfloat16"
    xh = tf.cast(x, compute)
    y = layer(xh, training=True)   # dtypes: tests/test_layer_contract.py
    assert np.isfinite(tf.cast(y, "float32").numpy()).all()
    if name in ("gn+pn", "ln+pn", "in"):
        groups = {"gn+pn": 2, "ln+pn": 1, "in": 8}[name]
        proxy = (np.zeros(8), np.zeros(8)) if name.endswith("pn") else None
        ref = R.group_norm_act(tf.cast(xh, "float64").numpy(), groups, proxy=proxy)
        tol = 2e-2 if compute == "bfloat16" else 4e-3
        np.testing.assert_allclose(tf.cast(y, "float32").numpy(), ref, atol=tol * 4, rtol=tol)


# ---- errors ----------------------------------------------------------------------------
@pytest.mark.parametrize("make, shape, match", [
    (lambda: tfpn.GroupNormAct(groups=5), (2, 4, 12), "Received: groups=5"),
    (lambda: tfpn.GroupNormAct(groups=2), (2, 4, None), "Received: input_shape="),
    (lambda: tfpn.LayerNormAct(), (4,), "rank >= 2"),
    (lambda: tfpn.GroupNormAct(groups=2, axis=3), (2, 4, 8), "Received: axis=3"),
    (lambda: tfpn.BatchNormAct(axis=-4), (2, 4, 8), "Received: axis=-4"),
])
def test_build_errors(make, shape, match):
    with pytest.raises(ValueError, match=match):
        make().build(shape)


@pytest.mark.parametrize("make, match", [
    (lambda: tfpn.GroupNormAct(activation="no_such_act"), "Received: activation='no_such_act'"),
    (lambda: tfpn.GroupNormAct(implementation="cuda"), "Received: implementation='cuda'"),
    (lambda: tfpn.GroupNormAct(proxy_norm=True, proxy_epsilon=0.0), "Received: proxy_epsilon=0.0"),
    (lambda: tfpn.GroupNormAct(groups=0), "Received: groups=0"),
    (lambda: tfpn.GroupNormAct(epsilon=-1.0), "Received: epsilon=-1.0"),
    (lambda: tfpn.BatchNormAct(momentum=2.0), "Received: momentum=2.0"),
    (lambda: tfpn.get_norm_act_layer("gn+xx"), "Received: norm='gn\\+xx'"),
    (lambda: tfpn.get_norm_act_layer("gn+pn", group=8), "Received: group=8"),
    (lambda: tfpn.get_norm_act_layer("bn", proxy_norm=True), "proxy_norm"),
])
def test_constructor_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_factory_names_and_defaults():
    assert tfpn.get_norm_act_layer("GN+PN", groups=8).proxy_norm
    assert tfpn.get_norm_act_layer("gn+pn", groups=8).groups == 8
    assert isinstance(tfpn.get_norm_act_layer("ln"), tfpn.LayerNormAct)
    assert not tfpn.get_norm_act_layer("in").proxy_norm
    assert isinstance(tfpn.get_norm_act_layer("bn", momentum=0.9), tfpn.BatchNormAct)
    make = tfpn.resolve_norm_act(tfpn.GroupNormAct, groups=2)
    assert make(activation=None).groups == 2
    with pytest.raises(ValueError, match="Received: norm=3"):
        tfpn.resolve_norm_act(3)


def test_proxy_regularizers_and_weight_names():
    layer = tfpn.GroupNormAct(groups=2, proxy_norm=True, proxy_beta_regularizer="l2",
                              proxy_gamma_regularizer=keras.regularizers.L2(0.1))
    layer.build((2, 4, 4, 8))
    assert (layer.gamma.name, layer.beta.name) == ("gamma", "beta")
    assert (layer.proxy_beta.name, layer.proxy_gamma.name) == ("proxy_beta", "proxy_gamma")
    np.testing.assert_array_equal(layer.gamma.numpy(), np.ones(8))
    for w in (layer.beta, layer.proxy_beta, layer.proxy_gamma):
        np.testing.assert_array_equal(w.numpy(), np.zeros(8))
    layer.proxy_gamma.assign(np.ones(8))
    layer(np.zeros((1, 4, 4, 8), "float32"))
    assert len(layer.losses) == 2
    assert float(sum(layer.losses)) == pytest.approx(0.1 * 8)


def test_fused_implementation_errors_early_when_unavailable(monkeypatch):
    from tf_proxynorm import fused
    monkeypatch.setattr(fused, "fused_op_available", lambda: False)
    with pytest.raises(ValueError, match="Received: implementation='fused'"):
        tfpn.GroupNormAct(groups=2, implementation="fused").build((1, 4, 4, 8))


def test_environment_variable_forces_reference(monkeypatch, rng):
    from tf_proxynorm import fused
    monkeypatch.setenv("TF_PROXYNORM_IMPLEMENTATION", "reference")
    monkeypatch.setattr(fused, "can_use_fused",
                        lambda *a: pytest.fail("the fused op was consulted"))
    assert tfpn.get_implementation() == "reference"
    tfpn.GroupNormAct(groups=2)(rng.standard_normal((1, 4, 4, 8)).astype("float32"))


@pytest.mark.parametrize("use_scale, use_offset", [(True, True), (False, True), (True, False)])
def test_channel_affine_old_config_loads_to_the_same_weights_and_outputs(
        rng, use_scale, use_offset):
    """A `ChannelAffine` config of tf_proxynorm 0.x (`use_scale` / `use_offset`, weights
    `scale` / `offset`) loads as today's `scale` / `center` layer, the old weight values
    (in their order, as a `.keras` file loads them) giving the old output."""
    old_config = {**keras.layers.Layer(name="affine").get_config(), "axis": 1,
                  "use_scale": use_scale, "use_offset": use_offset, "activation": "relu"}
    layer = keras.saving.deserialize_keras_object(
        {"module": "tf_proxynorm.layers.channel_affine", "class_name": "ChannelAffine",
         "config": old_config, "registered_name": "tf_proxynorm>ChannelAffine"})
    assert (layer.scale, layer.center) == (use_scale, use_offset)
    x = rng.standard_normal((2, 3, 4)).astype("float32")
    layer.build(x.shape)
    assert [w.name for w in layer.weights] == [n for n, on in (("gamma", use_scale),
                                                                ("beta", use_offset)) if on]
    old = {"scale": 1.0 + 0.3 * rng.standard_normal(3), "offset": rng.standard_normal(3)}
    layer.set_weights([old[n].astype("float32") for n, on in (("scale", use_scale),
                                                               ("offset", use_offset)) if on])
    expected = R.affine_act_proxy(x.astype(np.float64), old["scale"] if use_scale else None,
                                  old["offset"] if use_offset else None, 1, "relu")
    np.testing.assert_allclose(layer(x).numpy(), expected, rtol=1e-6, atol=1e-6)
    new = tfpn.layers.ChannelAffine(axis=1, scale=use_scale, center=use_offset,
                                    activation="relu", name="affine")
    assert layer.get_config() == new.get_config()
