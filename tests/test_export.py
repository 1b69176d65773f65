"""export_saved_model: portable SavedModels (fresh process, no tf_proxynorm) and TFLite."""

import contextlib
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
from tf_proxynorm.export import saved_model_op_types


def _model(rng, activations=("relu", "silu")):
    """conv - GN+PN - conv(3x3) - LN+PN - GAP - Dense, random non-trivial parameters."""
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", name="c1")(inputs)
    x = tfpn.GroupNormAct(groups=2, proxy_norm=True, activation=activations[0], name="n1")(x)
    x = keras.layers.Conv2D(8, 3, padding="same", name="c2")(x)
    x = tfpn.LayerNormAct(activation=activations[1], proxy_norm=True, name="n2")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(4, name="fc")(x))
    for name in ("n1", "n2"):
        set_params(model.get_layer(name), random_params(rng, 8))
    return model


def _reference(model, x):
    """Float64 NumPy forward pass of `_model` (convs through TF in float64)."""
    def conv(name, v):
        layer = model.get_layer(name)
        k, b = (w.numpy().astype(np.float64) for w in layer.weights)
        return tf.nn.conv2d(v, k, 1, "SAME").numpy() + b

    def pn(name, v, groups, act):
        p = {w.name: w.numpy() for w in model.get_layer(name).weights}
        return R.group_norm_act(v, groups, activation=act, gamma=p["gamma"], beta=p["beta"],
                                proxy=(p["proxy_beta"], p["proxy_gamma"]))

    act1, act2 = (model.get_layer(name).activation for name in ("n1", "n2"))
    y = pn("n2", conv("c2", pn("n1", conv("c1", x.astype(np.float64)), 2, act1)), 1, act2)
    k, b = (w.numpy().astype(np.float64) for w in model.get_layer("fc").weights)
    return y.mean(axis=(1, 2)) @ k + b


def test_export_is_folded_reference_only_and_restores_settings(rng, tmp_path, monkeypatch):
    from tf_proxynorm import fused
    model = _model(rng)
    model.get_layer("n1").implementation = "fused"
    monkeypatch.setattr(fused, "can_use_fused",
                        lambda *a: pytest.fail("the fused op was consulted while tracing"))
    tfpn.set_implementation("fused")
    try:
        traced = tfpn.export_saved_model(model, str(tmp_path / "sm"))
        assert tfpn.get_implementation() == "fused"
    finally:
        tfpn.set_implementation(None)
    assert model.get_layer("n1").implementation == "fused"
    assert not any(getattr(l, "proxy_norm", False) for l in traced.layers)
    ops = saved_model_op_types(str(tmp_path / "sm"))
    assert "Conv2D" in ops and not any(op.startswith("TfProxyNorm>") for op in ops)
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    x = rng.standard_normal((5, 6, 6, 3)).astype("float32")
    np.testing.assert_allclose(loaded.serve(tf.constant(x)).numpy(), _reference(model, x),
                               atol=1e-5)
    sig = loaded.signatures["serving_default"]
    assert sig.structured_input_signature[1][next(iter(sig.structured_input_signature[1]))
                                             ].shape.as_list() == [None, 6, 6, 3]


def test_export_without_fold_keeps_the_proxy_step(rng, tmp_path):
    model = _model(rng)
    traced = tfpn.export_saved_model(model, str(tmp_path / "sm"), fold=False)
    assert traced is model
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    x = rng.standard_normal((2, 6, 6, 3)).astype("float32")
    np.testing.assert_allclose(loaded.serve(x).numpy(), _reference(model, x), atol=1e-5)


def _fused_saved_model(path):
    """A SavedModel that holds the fused op on purpose (traced outside any save context)."""
    from tf_proxynorm import fused

    @tf.function(input_signature=[tf.TensorSpec([None, 4, 4, 8])])
    def forward(x):
        return fused.fused_group_norm_act(x, tf.ones(8), tf.zeros(8), None, None, groups=2,
                                         axis=-1, epsilon=1e-3, activation="relu")

    module = tf.Module()
    module.forward = forward
    forward.get_concrete_function()
    tf.saved_model.save(module, path)


def _fused_ops(graph_ops):
    return sorted({op for op in graph_ops if op.startswith("TfProxyNorm>")})


@pytest.mark.parametrize("implementation", ["fused"], indirect=True)
def test_no_fused_op_in_export_with_the_library_loaded(rng, tmp_path, monkeypatch,
                                                       implementation):
    from tf_proxynorm import export, fused
    model = _model(rng)
    for name in ("n1", "n2"):
        model.get_layer(name).implementation = implementation
    # Controls: outside an export the model traces the fused op, and the checker sees it.
    graph = tf.function(lambda t: model(t, training=False)).get_concrete_function(
        tf.TensorSpec([None, 6, 6, 3])).graph
    assert _fused_ops(op.type for op in graph.get_operations()) == ["TfProxyNorm>GroupNormAct"]
    _fused_saved_model(str(tmp_path / "fused"))
    assert _fused_ops(saved_model_op_types(str(tmp_path / "fused"))) == [
        "TfProxyNorm>GroupNormAct"]
    x = rng.standard_normal((3, 6, 6, 3)).astype("float32")
    for fold in (True, False):
        path = str(tmp_path / f"sm_{fold}")
        tfpn.export_saved_model(model, path, fold=fold)
        assert not _fused_ops(saved_model_op_types(path))
        loaded = tf.saved_model.load(path)
        np.testing.assert_allclose(loaded.serve(x).numpy(), _reference(model, x), atol=1e-5)
    # With both safeguards switched off, the fused op reaches the graph and export refuses.
    monkeypatch.setattr(export, "_all_layers_on_reference", lambda m: contextlib.nullcontext())
    monkeypatch.setattr(fused.ops, "in_save_context", lambda: False)
    with pytest.raises(RuntimeError, match="fused-op nodes \\['TfProxyNorm>GroupNormAct'\\]"):
        tfpn.export_saved_model(model, str(tmp_path / "unsafe"), fold=False)


def test_use_implementation_nests_and_restores(monkeypatch):
    monkeypatch.delenv("TF_PROXYNORM_IMPLEMENTATION", raising=False)
    assert tfpn.get_implementation() == "auto"
    with tfpn.use_implementation("reference"):
        assert tfpn.get_implementation() == "reference"
        with pytest.raises(KeyError):
            with tfpn.use_implementation("fused"):
                assert tfpn.get_implementation() == "fused"
                raise KeyError("restored on error")
        assert tfpn.get_implementation() == "reference"
    assert tfpn.get_implementation() == "auto"
    with pytest.raises(ValueError, match="Received: implementation='cuda'"):
        with tfpn.use_implementation("cuda"):
            pass
    assert tfpn.get_implementation() == "auto"


@pytest.mark.slow
def _run_without_tf_proxynorm(body, cwd):
    """Runs `body` (Python source) in a fresh process where importing tf_proxynorm fails."""
    script = textwrap.dedent("""
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name.split(".")[0] == "tf_proxynorm":
                    raise ImportError("tf_proxynorm is blocked in this process")

        sys.meta_path.insert(0, Block())
        import numpy as np, tensorflow as tf
    """) + textwrap.dedent(body)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          cwd=str(cwd), env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})


def test_loads_in_a_process_without_tf_proxynorm(rng, tmp_path):
    base = keras.Sequential([
        keras.Input((8, 8, 3)), keras.layers.Conv2D(8, 3, padding="same", use_bias=False),
        keras.layers.BatchNormalization(), keras.layers.ReLU(),
        keras.layers.Conv2D(8, 1), keras.layers.BatchNormalization(),
        keras.layers.Activation("swish"), keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(3)])
    model, _ = tfpn.convert_model(base, "gn+pn", groups=4)
    for layer in model.layers:
        if isinstance(layer, tfpn.GroupNormAct):
            set_params(layer, random_params(rng, 8))
    x = rng.standard_normal((4, 8, 8, 3)).astype("float32")
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", model.predict(x, verbose=0))
    tfpn.export_saved_model(model, str(tmp_path / "sm"))
    # Negative control (with the library built): a SavedModel holding the fused op must
    # fail to load in that process, which shows it really has no op library.
    fused = None
    if tfpn.fused_op_available():
        fused = str(tmp_path / "fused")
        _fused_saved_model(fused)
    out = _run_without_tf_proxynorm(f"""
        m = tf.saved_model.load({str(tmp_path / 'sm')!r})
        x = np.load({str(tmp_path / 'x.npy')!r})
        expected = np.load({str(tmp_path / 'y.npy')!r})
        np.testing.assert_allclose(m.serve(tf.constant(x)).numpy(), expected, atol=1e-5)
        out = m.signatures["serving_default"](tf.constant(x[:1]))
        np.testing.assert_allclose(next(iter(out.values())).numpy(), expected[:1], atol=1e-5)
        assert not any(k.startswith("tf_proxynorm") for k in sys.modules)
        if {fused!r} is not None:
            try:
                tf.saved_model.load({fused!r})
            except Exception as e:
                assert "TfProxyNorm>GroupNormAct" in str(e), e
                print("FUSED REFUSED")
            else:
                raise AssertionError("a SavedModel with the fused op loaded without the library")
        print("OK")
    """, tmp_path)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
    assert ("FUSED REFUSED" in out.stdout) == (fused is not None)


@pytest.mark.slow
def test_jit_compiled_export_loads_without_tf_proxynorm(rng, tmp_path):
    """`jit_compile=True`: the `serve` endpoint is an XLA-compiled function. A 32x32x64 map
    has the "auto" `cond`, the sliced sums and the optimization barrier of the XLA form;
    the SavedModel loads and runs in a process that cannot import tf_proxynorm, and matches
    a float64 forward pass."""
    inputs = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(64, 3, padding="same", name="c1")(inputs)
    x = tfpn.GroupNormAct(groups=8, proxy_norm=True, name="n1")(x)
    model = keras.Model(inputs, keras.layers.Dense(3, name="fc")(
        keras.layers.GlobalAveragePooling2D()(x)))
    set_params(model.get_layer("n1"), random_params(rng, 64))
    x = rng.standard_normal((2, 32, 32, 3)).astype("float32")
    k, b = (w.numpy().astype(np.float64) for w in model.get_layer("c1").weights)
    p = {w.name: w.numpy() for w in model.get_layer("n1").weights}
    y = R.group_norm_act(tf.nn.conv2d(x.astype(np.float64), k, 1, "SAME").numpy() + b, 8,
                         activation="relu", gamma=p["gamma"], beta=p["beta"],
                         proxy=(p["proxy_beta"], p["proxy_gamma"]))
    k, b = (w.numpy().astype(np.float64) for w in model.get_layer("fc").weights)
    np.save(tmp_path / "x.npy", x)
    np.save(tmp_path / "y.npy", y.mean(axis=(1, 2)) @ k + b)
    path = str(tmp_path / "sm")
    tfpn.export_saved_model(model, path, jit_compile=True)
    assert "XlaOptimizationBarrier" in saved_model_op_types(path)
    out = _run_without_tf_proxynorm(f"""
        m = tf.saved_model.load({path!r})
        x, expected = np.load({str(tmp_path / 'x.npy')!r}), np.load({str(tmp_path / 'y.npy')!r})
        np.testing.assert_allclose(m.serve(tf.constant(x)).numpy(), expected, atol=2e-5)
        out = m.signatures["serving_default"](tf.constant(x[:1]))
        np.testing.assert_allclose(next(iter(out.values())).numpy(), expected[:1], atol=2e-5)
        print("OK")
    """, tmp_path)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
    with pytest.raises(ValueError, match=r"Received: jit_compile='yes'"):
        tfpn.export_saved_model(model, str(tmp_path / "bad"), jit_compile="yes")
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated:UserWarning")
@pytest.mark.parametrize("activations", [("relu", "silu"), ("gelu", "leaky_relu")])
def test_tflite_conversion_and_run(rng, tmp_path, activations):
    model = _model(rng, activations)
    tfpn.export_saved_model(model, str(tmp_path / "sm"))
    converter = tf.lite.TFLiteConverter.from_saved_model(str(tmp_path / "sm"))
    x = rng.standard_normal((3, 6, 6, 3)).astype("float32")
    y, _ = _tflite_run(converter.convert(), x)
    np.testing.assert_allclose(y, _reference(model, x), atol=1e-4)


def _tflite_run(content, x):
    """The TFLite model's output for `x` and its op names."""
    interpreter = tf.lite.Interpreter(model_content=content)
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, x.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(index, x)
    interpreter.invoke()
    ops = [op["op_name"] for op in interpreter._get_ops_details()]
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"]), ops


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*tf.lite.Interpreter is deprecated:UserWarning")
def test_tflite_export_without_control_flow(rng, tmp_path, monkeypatch):
    """`statistics="shifted"`: no `IF` in the TFLite model (the default has one per norm
    layer, its `cond`), and the same outputs, both against the float64 reference."""
    from tf_proxynorm.layers import inference_norm
    monkeypatch.setattr(inference_norm, "RAW_MIN_SIZE", 0)     # the `cond` at this size too
    model = _model(rng)
    x = rng.standard_normal((3, 6, 6, 3)).astype("float32")
    want = _reference(model, x)
    for statistics, ifs in (("auto", 2), ("shifted", 0)):
        path = str(tmp_path / statistics)
        tfpn.export_saved_model(model, path, statistics=statistics)
        y, ops = _tflite_run(tf.lite.TFLiteConverter.from_saved_model(path).convert(), x)
        assert ops.count("IF") == ifs, (statistics, ops)
        assert "WHILE" not in ops
        np.testing.assert_allclose(y, want, atol=1e-4)
        loaded = tf.saved_model.load(path)
        np.testing.assert_allclose(loaded.serve(x).numpy(), want, atol=1e-4)


def test_statistics_argument_errors(rng, tmp_path):
    model = _model(rng)
    with pytest.raises(ValueError, match=r"`statistics` must be one of 'auto', 'shifted', "
                                         r"'raw'. Received: statistics='fast'"):
        tfpn.export_saved_model(model, str(tmp_path / "a"), statistics="fast")
    with pytest.raises(ValueError, match=r"needs `fold=True`. Received: "
                                         r"statistics='shifted', fold=False"):
        tfpn.export_saved_model(model, str(tmp_path / "b"), fold=False, statistics="shifted")
    with pytest.raises(ValueError, match=r"needs `inference_layers=True`. Received: "
                                         r"statistics='raw', inference_layers=False"):
        tfpn.fold_for_inference(model, inference_layers=False, statistics="raw")
    with pytest.raises(ValueError, match=r"Received: statistics=None"):
        tfpn.fold_for_inference(model, statistics=None)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    folded = tfpn.fold_for_inference(model, statistics="raw")
    norms = [layer for layer in folded.layers if hasattr(layer, "statistics")]
    assert [layer.statistics for layer in norms] == ["raw", "raw"]
    assert norms[0].get_config()["statistics"] == "raw"
