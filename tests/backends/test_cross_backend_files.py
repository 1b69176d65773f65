"""Files written under one Keras backend, read under another (this file runs once per
backend; see conftest.py).

- a `.keras` file of a small GN+PN / BN / LN+PN model, saved by a subprocess running the
  *other* backend (TensorFlow <-> JAX), loads here and gives the outputs the saving
  process computed (inference and training mode) and those of a float64 NumPy forward
  of its weights (`tests/reference.py`);
- `tfpn.export_saved_model` is TensorFlow-only: elsewhere a clear error at the call;
- `model.export(format="tf_saved_model")` of a folded GN+PN CIFAR ResNet (with JAX:
  through jax2tf) reloads with `tf.saved_model.load` and serves the model's outputs;
- a `.keras` file of a *compiled* model saved under PyTorch loads here (TensorFlow, JAX)
  with the README's line, `load_model(path, compile=False)`, without importing torch (a
  plain `load_model` imports it to rebuild the recorded PyTorch optimizer, which crashed
  TensorFlow processes with PyTorch's CUDA build).
"""

import importlib.util
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import reference as R
import reference_other as RO
import tf_proxynorm as tfpn

BACKEND = keras.backend.backend()
OTHER = "jax" if BACKEND == "tensorflow" else "tensorflow"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Run by the other backend: builds the model, gives every weight a non-trivial value,
# saves it, then records its outputs (after saving: a training-mode call updates BN's
# moving statistics).
SAVE_SCRIPT = r"""
import sys
import keras
import numpy as np
import tf_proxynorm as tfpn

path = sys.argv[1]
L = keras.layers
z = {"kernel_initializer": "zeros"}   # all weights are assigned below
inputs = keras.Input((6, 6, 3), name="images")
h = L.Conv2D(8, 3, padding="same", name="conv1", **z)(inputs)
h = tfpn.get_norm_act_layer("gn+pn", groups=4, name="gn_pn")(h)
h = L.Conv2D(8, 3, padding="same", use_bias=False, name="conv2", **z)(h)
h = tfpn.get_norm_act_layer("bn", name="bn")(h)
h = L.Conv2D(8, 1, name="conv3", **z)(h)
h = tfpn.get_norm_act_layer("ln+pn", activation="silu", name="ln_pn")(h)
h = L.GlobalAveragePooling2D(name="pool")(h)
model = keras.Model(inputs, L.Dense(3, name="dense", **z)(h))
rng = np.random.default_rng(0)
for v in model.weights:
    name = v.path.rsplit("/", 1)[-1]
    value = {"gamma": 1.0 + 0.3 * rng.standard_normal(v.shape),
             "moving_variance": rng.uniform(0.5, 2.0, v.shape),
             "kernel": rng.standard_normal(v.shape) / np.sqrt(np.prod(v.shape[:-1]))}.get(
                 name, 0.3 * rng.standard_normal(v.shape))
    v.assign(value.astype("float32"))
model.save(path + ".keras")
x = rng.standard_normal((4, 6, 6, 3)).astype("float32")
np.savez(path + ".npz", x=x,
         inference=keras.ops.convert_to_numpy(model(x, training=False)),
         training=keras.ops.convert_to_numpy(model(x, training=True)))
print("saved with", keras.backend.backend())
"""


def _reference(p, x, training):
    """Float64 forward of SAVE_SCRIPT's model from its weights `p` (path -> array)."""
    w = lambda name: p[name].astype(np.float64)  # noqa: E731
    h = RO.conv2d(x.astype(np.float64), w("conv1/kernel"), 1, "same", w("conv1/bias"))
    h = R.group_norm_act(h, 4, gamma=w("gn_pn/gamma"), beta=w("gn_pn/beta"),
                         proxy=(w("gn_pn/proxy_beta"), w("gn_pn/proxy_gamma")))
    h = RO.conv2d(h, w("conv2/kernel"), 1, "same")
    stats = {} if training else {"mean": w("bn/moving_mean"), "var": w("bn/moving_variance")}
    h = R.batch_norm_act(h, gamma=w("bn/gamma"), beta=w("bn/beta"), **stats)
    h = RO.conv2d(h, w("conv3/kernel"), 1, "same", w("conv3/bias"))
    h = R.group_norm_act(h, 1, activation="silu", gamma=w("ln_pn/gamma"),
                         beta=w("ln_pn/beta"),
                         proxy=(w("ln_pn/proxy_beta"), w("ln_pn/proxy_gamma")))
    return h.mean((1, 2)) @ w("dense/kernel") + w("dense/bias")


def test_keras_file_saved_under_the_other_backend(tmp_path):
    path = str(tmp_path / "model")
    # XLA_FLAGS: the saving process's run time is mostly compiling tiny programs.
    env = {**os.environ, "KERAS_BACKEND": OTHER, "TF_CPP_MIN_LOG_LEVEL": "2",
           "XLA_FLAGS": "--xla_backend_optimization_level=0",
           "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", SAVE_SCRIPT, path], env=env, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"saved with {OTHER}" in out.stdout

    saved = np.load(path + ".npz")
    model = keras.saving.load_model(path + ".keras")
    assert [type(model.get_layer(n)) for n in ("gn_pn", "bn", "ln_pn")] == [
        tfpn.GroupNormAct, tfpn.BatchNormAct, tfpn.LayerNormAct]
    weights = {v.path: keras.ops.convert_to_numpy(v) for v in model.weights}
    x = saved["x"]
    got = keras.ops.convert_to_numpy(model(x, training=False))
    np.testing.assert_allclose(got, saved["inference"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, _reference(weights, x, training=False), rtol=1e-4,
                               atol=1e-4)
    got = keras.ops.convert_to_numpy(model(x, training=True))
    np.testing.assert_allclose(got, saved["training"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got, _reference(weights, x, training=True), rtol=1e-4,
                               atol=1e-4)


def _cifar_resnet():
    model = tfpn.models.cifar_resnet(8, norm="gn+pn", norm_kwargs={"groups": 4},
                                     num_classes=3, input_shape=(8, 8, 3))
    rng = np.random.default_rng(1)
    for v in model.weights:
        if v.path.rsplit("/", 1)[-1] in ("beta", "proxy_beta", "proxy_gamma"):
            v.assign((0.3 * rng.standard_normal(v.shape)).astype("float32"))
    return model


@pytest.mark.skipif(BACKEND == "tensorflow", reason="the error is for other backends")
def test_export_saved_model_needs_the_tensorflow_backend(tmp_path):
    model = keras.Sequential([keras.Input((2,)), tfpn.GroupNormAct(groups=1)])
    with pytest.raises(RuntimeError, match=f"needs the TensorFlow backend.*"
                       f"format=\"tf_saved_model\".*Received: backend='{BACKEND}'"):
        tfpn.export_saved_model(model, str(tmp_path / "served"))
    assert not os.path.exists(tmp_path / "served")


@pytest.mark.skipif(BACKEND == "torch", reason="Keras 3.15's tf_saved_model export from "
                    "PyTorch fails inside torch.export (dynamic shapes); not ours to fix")
def test_keras_export_of_a_folded_model_loads_in_tensorflow(tmp_path):
    import tensorflow as tf

    model = _cifar_resnet()
    folded = tfpn.fold_for_inference(model)
    folded.export(str(tmp_path / "served"), format="tf_saved_model", verbose=False)
    served = tf.saved_model.load(str(tmp_path / "served"))
    x = np.random.default_rng(2).standard_normal((5, 8, 8, 3)).astype("float32")
    expected = keras.ops.convert_to_numpy(model(x, training=False))
    np.testing.assert_allclose(served.serve(tf.constant(x)).numpy(), expected, rtol=1e-5,
                               atol=1e-5)


# Run under PyTorch: a compiled GN+PN model, trained one step (the optimizer has state),
# saved; its outputs after saving.
TORCH_SAVE_SCRIPT = r"""
import sys
import keras
import numpy as np
import tf_proxynorm as tfpn

path = sys.argv[1]
keras.utils.set_random_seed(0)
inputs = keras.Input((6, 6, 3))
h = keras.layers.Conv2D(8, 3, padding="same")(inputs)
h = tfpn.get_norm_act_layer("gn+pn", groups=4)(h)
h = keras.layers.GlobalAveragePooling2D()(h)
model = keras.Model(inputs, keras.layers.Dense(3)(h))
model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
rng = np.random.default_rng(0)
x = rng.standard_normal((8, 6, 6, 3)).astype("float32")
model.fit(x, rng.integers(0, 3, 8), batch_size=8, epochs=1, verbose=0)
model.save(path + ".keras")
np.savez(path + ".npz", x=x, y=keras.ops.convert_to_numpy(model(x, training=False)))
print("saved with", keras.backend.backend(), type(model.optimizer).__module__)
"""

# The README's line, then one training step on this backend; then what a plain
# `load_model` does with the same file.
README_LOAD_LINE = 'model = keras.saving.load_model("model.keras", compile=False)'
LOAD_SCRIPT = r"""
import os, sys
import keras
import numpy as np
import tf_proxynorm

os.chdir(sys.argv[1])
saved = np.load("model.npz")
{line}
assert "torch" not in sys.modules, "compile=False imported torch"
np.testing.assert_allclose(keras.ops.convert_to_numpy(model(saved["x"], training=False)),
                           saved["y"], rtol=1e-5, atol=1e-5)
model.compile(optimizer="adam",
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
model.fit(saved["x"], np.zeros(8, "int32"), batch_size=8, epochs=1, verbose=0)
print("loaded with", keras.backend.backend(), "without torch")
plain = keras.saving.load_model("model.keras")
print("plain load_model: torch imported" if "torch" in sys.modules else "plain: no torch",
      type(plain.optimizer).__module__)
"""


@pytest.mark.slow
@pytest.mark.skipif(BACKEND == "torch", reason="a PyTorch file loaded on the other backends")
@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="needs PyTorch to save")
def test_keras_file_of_a_compiled_model_saved_under_torch_loads_with_the_readme_line(
        tmp_path):
    with open(os.path.join(REPO, "README.md")) as f:
        assert README_LOAD_LINE in f.read(), "the README no longer documents the line tested"
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2",
           "XLA_FLAGS": "--xla_backend_optimization_level=0",
           "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", TORCH_SAVE_SCRIPT, str(tmp_path / "model")],
                         env={**env, "KERAS_BACKEND": "torch"}, cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "saved with torch keras.src.backend.torch.optimizers" in out.stdout

    out = subprocess.run(
        [sys.executable, "-c", LOAD_SCRIPT.format(line=README_LOAD_LINE), str(tmp_path)],
        env={**env, "KERAS_BACKEND": BACKEND}, cwd=REPO, capture_output=True, text=True,
        timeout=300)
    # A negative return code is a signal: -11 is the segmentation fault (exit 139 in a
    # shell) seen with PyTorch's CUDA build.
    assert out.returncode == 0, (out.returncode, out.stdout[-3000:] + out.stderr[-3000:])
    assert f"loaded with {BACKEND} without torch" in out.stdout
    # Why the README says compile=False: what it avoids (if Keras stops recording the
    # backend's optimizer class, update the README's backend section).
    assert ("plain load_model: torch imported keras.src.backend.torch.optimizers"
            in out.stdout), out.stdout
