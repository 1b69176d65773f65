"""Issue 25 item 5: what `tfpn.export_saved_model`'s error recommends on a backend other
than TensorFlow works on that backend (or nothing is recommended).

Each backend runs this file in its own pytest process. On JAX the error recommends Keras'
own export of the folded model (jax2tf); on PyTorch, where that export fails inside
torch.export, it recommends a `.keras` file exported by `export_saved_model` in a
TensorFlow-backend process. Both routes are run here and the SavedModel is served."""

import os
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import tf_proxynorm as tfpn
from backend_helpers import BACKEND, to_numpy


def _model():
    inputs = keras.Input((6, 6, 3))
    x = keras.layers.Conv2D(8, 3, padding="same")(inputs)
    x = tfpn.GroupNormAct(groups=2, proxy_norm=True)(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inputs, keras.layers.Dense(3)(x))
    rng = np.random.default_rng(0)
    for w in model.weights:
        if w.name.startswith(("gamma", "beta", "proxy")):
            w.assign((0.2 * rng.standard_normal(w.shape) + (w.name == "gamma")).astype("float32"))
    return model


def _message(model, path):
    with pytest.raises(RuntimeError) as error:
        tfpn.export_saved_model(model, path)
    message = str(error.value)
    assert f"Received: backend={BACKEND!r}" in message
    assert not os.path.exists(path)
    return message


def _serve(path, x):
    import tensorflow as tf
    loaded = tf.saved_model.load(path)     # kept alive while serving: it owns the variables
    return loaded.serve(tf.constant(x)).numpy()


@pytest.mark.skipif(BACKEND == "tensorflow", reason="no error on TensorFlow")
def test_recommended_route_works_on_this_backend(tmp_path):
    model = _model()
    x = np.random.default_rng(1).standard_normal((2, 6, 6, 3)).astype("float32")
    expected = to_numpy(model(x, training=False))
    message = _message(model, str(tmp_path / "direct"))
    recommends_keras_export = "fold_for_inference(model).export(" in message
    if BACKEND == "torch":   # Keras' own export fails inside torch.export there
        assert not recommends_keras_export
        assert re.search(r"fails on PyTorch", message)
    if recommends_keras_export:
        path = str(tmp_path / "keras_export")
        tfpn.fold_for_inference(model).export(path, format="tf_saved_model", verbose=False)
        np.testing.assert_allclose(_serve(path, x), expected, rtol=1e-5, atol=1e-5)
    if "KERAS_BACKEND=tensorflow" in message:
        keras_path, served = str(tmp_path / "model.keras"), str(tmp_path / "served")
        model.save(keras_path)
        code = textwrap.dedent(f"""
            import keras, tf_proxynorm as tfpn
            model = keras.saving.load_model({keras_path!r}, compile=False)
            tfpn.export_saved_model(model, {served!r})
        """)
        env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="2")
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        np.testing.assert_allclose(_serve(served, x), expected, rtol=1e-5, atol=1e-5)
