"""`tfpn.models`, `convert_model`, `fold_for_inference` and examples/train_backends.py on
the running Keras backend (this file runs once per backend; see backend_helpers.py).

- every builder builds with the expected number of PN layers; one
  `model.fit` step (XLA-compiled; eager on PyTorch) gives a finite loss (ImageNet builders: `slow`,
  compiling them takes minutes on a CPU; ResNet-34/101/152 run a forward pass only);
- a CIFAR ResNet-20 GN+PN (pre-activation) learns a separable problem in 20 steps;
- `convert_model` of a BatchNormalization / GroupNormalization model: the layers expected,
  and the output of the float64 reference with the copied BN affine;
- a GN+PN CIFAR ResNet and its `fold_for_inference` model against a float64 NumPy forward
  written from the architecture (He et al. 2016, pre-activation) and the PN-Act spec
  (`tests/reference.py`);
- examples/train_backends.py runs 2 steps in a subprocess with this process's backend.
"""

import os
import subprocess
import sys

import keras
import numpy as np
import pytest

import reference as R
import reference_other as RO
from backend_helpers import BACKEND, JIT_COMPILE
from helpers import randomize_norm_weights, write_idx
import tf_proxynorm as tfpn
from tf_proxynorm.fold import ChannelAffine, ShiftedGroupNormAct
from tf_proxynorm.layers._base import NormActBase
from tf_proxynorm.layers.proxy_norm_act import is_proxy_layer

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(REPO, "examples"))
import data  # noqa: E402  (examples/data.py: synthetic_arrays)
M = tfpn.models
L = keras.layers


def _numpy(t):
    return np.asarray(keras.ops.convert_to_numpy(t))


# The norms whose per-channel weights the tests move away from their 1/0 initializers.
NORMS = (NormActBase, L.GroupNormalization, L.BatchNormalization)


# ---- float64 NumPy forward of a GN+PN pre-activation CIFAR ResNet (weights by name) -------
def _weights(model):
    return {v.path: _numpy(v).astype(np.float64) for v in model.weights}


def _gn_pn(p, x, name, groups):
    w = lambda k: p[f"{name}/{k}"]  # noqa: E731
    return R.group_norm_act(x, groups, gamma=w("gamma"), beta=w("beta"),
                            proxy=(w("proxy_beta"), w("proxy_gamma")))


def cifar_v2_reference(model, x, per_stage, groups):
    """He et al. 2016 (identity mappings): conv stem, pre-activation basic blocks
    (norm-act, conv, norm-act, conv, + shortcut; a 1x1 projection of the pre-activation
    when the shape changes), final norm-act, global average pooling, dense."""
    p = _weights(model)
    x = RO.conv2d(x.astype(np.float64), p["stem_conv/kernel"], 1, "same")
    for s, filters in enumerate((16, 32, 64), 1):
        for b in range(1, per_stage + 1):
            n, stride = f"stage{s}_block{b}", 2 if b == 1 and s > 1 else 1
            pre = _gn_pn(p, x, f"{n}_norm1", groups)
            shortcut = x
            if stride != 1 or x.shape[-1] != filters:
                shortcut = RO.conv2d(pre, p[f"{n}_shortcut_conv/kernel"], stride, "same")
            y = RO.conv2d(pre, p[f"{n}_conv1/kernel"], stride, "same")
            y = _gn_pn(p, y, f"{n}_norm2", groups)
            x = shortcut + RO.conv2d(y, p[f"{n}_conv2/kernel"], 1, "same")
    x = _gn_pn(p, x, "final_norm", groups).mean((1, 2))
    return x @ p["predictions/kernel"] + p["predictions/bias"]


def _small_cifar(rng):
    model = M.cifar_resnet(8, norm="gn+pn", norm_kwargs={"groups": 4}, num_classes=3,
                           input_shape=(8, 8, 3), classifier_activation=None)
    randomize_norm_weights(model, rng, types=NORMS)
    return model


def _close(got, expected, rtol=2e-3):
    np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


# ---- every builder: one compiled fit step ------------------------------------------------
# ImageNet builders get 32x32 inputs (their last stage is 1x1). The third field is the
# number of norm + PN-Act layers: v1 / v1.5, one per block and per bottleneck 3x3 + 1x1
# (plus the stem's); v2, every norm of a block plus the final one.
_IMAGENET = {
    "resnet18": (lambda **kw: M.resnet18(input_shape=(32, 32, 3), **kw), 1 + 8),
    "resnet18_v2": (lambda **kw: M.resnet18("v2", input_shape=(32, 32, 3), **kw), 16 + 1),
    "resnet50": (lambda **kw: M.resnet50(input_shape=(32, 32, 3), **kw), 1 + 16 * 2),
    "resnet50_v2": (lambda **kw: M.resnet(50, "v2", input_shape=(32, 32, 3), **kw), 48 + 1),
    "resnext50_32x4d": (lambda **kw: M.resnext50_32x4d(input_shape=(32, 32, 3), **kw),
                        1 + 16 * 2),
    "resnet34": (lambda **kw: M.resnet34(input_shape=(32, 32, 3), **kw), 1 + 16),
    "resnet101": (lambda **kw: M.resnet101(input_shape=(32, 32, 3), **kw), 1 + 33 * 2),
    "resnet152": (lambda **kw: M.resnet152("v2", input_shape=(32, 32, 3), **kw), 50 * 3 + 1),
}
# The basic v2 block takes a compiled step here (cifar_resnet_v1 the basic v1 block; on
# TensorFlow, tests/test_models.py trains every builder); the other builders (bottleneck,
# grouped), whose compiled steps take a minute each on a 2-core CPU, build and run a
# forward pass in training mode.
_COMPILED = ("resnet18_v2",)
# The pre-activation cifar_resnet (v2) trains in the next test.
BUILDERS = [pytest.param("cifar_resnet_v1", lambda **kw: M.cifar_resnet(
    8, version="v1", input_shape=(16, 16, 3), **kw), 1 + 3, id="cifar_resnet_v1")] + [
    pytest.param(name, *_IMAGENET[name], marks=pytest.mark.slow, id=name)
    for name in _COMPILED]


def _build(build, pn_layers):
    keras.utils.set_random_seed(0)
    model = build(norm="gn+pn", norm_kwargs={"groups": 8}, num_classes=3,
                  classifier_activation=None)
    norms = [layer for layer in model.layers if isinstance(layer, NormActBase)]
    assert sum(layer.proxy_norm for layer in norms) == pn_layers
    assert all(layer.proxy_norm == (layer.activation_name == "relu") for layer in norms)
    return model


@pytest.mark.parametrize("name, build, pn_layers", BUILDERS)
def test_every_builder_takes_a_compiled_fit_step(rng, name, build, pn_layers):
    model = _build(build, pn_layers)
    model.compile(keras.optimizers.SGD(0.01),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=JIT_COMPILE)
    assert model.jit_compile == JIT_COMPILE
    x = rng.standard_normal((2,) + model.input_shape[1:]).astype("float32")
    before = _numpy(model.get_layer("stem_conv").kernel)
    history = model.fit(x, np.array([0, 2]), batch_size=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert not np.array_equal(before, _numpy(model.get_layer("stem_conv").kernel))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet18", "resnet50", "resnet50_v2", "resnext50_32x4d",
                                  "resnet34"])
def test_deeper_builders_build_and_run(rng, name):
    model = _build(*_IMAGENET[name])
    y = _numpy(model(rng.standard_normal((2, 32, 32, 3)).astype("float32"), training=True))
    assert y.shape == (2, 3) and np.all(np.isfinite(y)) and np.ptp(y, axis=0).max() > 0


def test_cifar_resnet20_gn_pn_learns_a_separable_problem():
    keras.utils.set_random_seed(0)
    x, y = data.synthetic_arrays(64, (12, 12, 1), num_classes=4, seed=1)
    x = ((x - 127.5) / 64.0).astype("float32")
    model = M.cifar_resnet(20, norm="gn+pn", norm_kwargs={"groups": 8}, num_classes=4,
                           input_shape=(12, 12, 1), classifier_activation=None)
    # jit_compile="auto": XLA with JAX, a tf.function graph on a TensorFlow CPU.
    model.compile(keras.optimizers.Adam(2e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    history = model.fit(x, y, batch_size=64, epochs=20, verbose=0).history  # 20 steps
    assert np.all(np.isfinite(history["loss"]))
    assert history["loss"][-1] < 0.5 * history["loss"][0], history["loss"]
    assert history["accuracy"][-1] > 0.6, history["accuracy"]


# ---- convert_model -----------------------------------------------------------------------
def _bn_model(rng):
    # Zero-initialized, then random kernels from NumPy: with JAX, every random
    # initializer of a new shape is an XLA compilation (seconds on a busy CPU).
    z = {"kernel_initializer": "zeros"}
    inputs = keras.Input((6, 6, 4))
    h = L.Conv2D(8, 3, padding="same", use_bias=False, name="conv1", **z)(inputs)
    h = L.BatchNormalization(name="bn1")(h)
    h = L.ReLU(name="relu1")(h)
    h = L.Conv2D(8, 1, name="conv2", **z)(h)
    h = L.GroupNormalization(groups=2, name="keras_gn")(h)
    h = L.Conv2D(12, 3, padding="same", use_bias=False, name="conv3", **z)(h)
    h = L.BatchNormalization(name="bn2")(h)
    h = L.GlobalAveragePooling2D(name="pool")(h)
    model = keras.Model(inputs, L.Dense(3, name="dense", **z)(h))
    for v in model.weights:
        if v.path.endswith(("kernel", "bias")):
            fan_in = np.prod(v.shape[:-1]) if v.path.endswith("kernel") else 10
            v.assign((rng.standard_normal(v.shape) / np.sqrt(fan_in)).astype("float32"))
    randomize_norm_weights(model, rng, types=NORMS)
    return model


def test_convert_model_to_gn_pn(rng):
    model = _bn_model(rng)
    new, report = tfpn.convert_model(model, "gn+pn", groups=4)
    names = [layer.name for layer in new.layers]
    assert "relu1" not in names                   # moved into bn1's replacement
    bn1, bn2 = new.get_layer("bn1"), new.get_layer("bn2")
    assert type(bn1) is tfpn.GroupNormAct and bn1.proxy_norm and bn1.groups == 4
    assert bn1.activation_name == "relu"
    # No activation after bn2: the linear norm, scale only (spec section 5).
    assert type(bn2) is tfpn.GroupNormAct and not bn2.proxy_norm and not bn2.center
    assert bn2.activation_name == "identity"
    assert type(new.get_layer("keras_gn")) is L.GroupNormalization
    assert [(s.old, s.new) for s in report] == [("bn1", "bn1"), ("relu1", "bn1"),
                                                ("bn2", "bn2")]
    # gamma/beta: BN's copies.
    randomize_norm_weights(new, rng, types=NORMS, names=("proxy_beta", "proxy_gamma"))
    x = rng.standard_normal((2, 6, 6, 4)).astype("float32")

    p, old = _weights(new), _weights(model)
    for name in ("bn1/gamma", "bn1/beta", "bn2/gamma"):
        np.testing.assert_array_equal(p[name], old[name])
    h = RO.conv2d(x.astype(np.float64), p["conv1/kernel"], 1, "same")
    h = _gn_pn(p, h, "bn1", 4)
    h = RO.conv2d(h, p["conv2/kernel"], 1, "same", bias=p["conv2/bias"])
    h = R.group_norm_act(h, 2, activation=None, gamma=p["keras_gn/gamma"],
                         beta=p["keras_gn/beta"])
    h = RO.conv2d(h, p["conv3/kernel"], 1, "same")
    h = R.group_norm_act(h, 4, activation=None, gamma=p["bn2/gamma"]).mean((1, 2))
    expected = h @ p["dense/kernel"] + p["dense/bias"]
    for training in (False, True):
        _close(_numpy(new(x, training=training)), expected)


# ---- fold_for_inference ------------------------------------------------------------------
def test_cifar_resnet_and_its_folded_model_match_float64_reference(rng):
    model = _small_cifar(rng)
    x = rng.standard_normal((3, 8, 8, 3)).astype("float32")
    expected = cifar_v2_reference(model, x, 1, 4)
    unfolded = _numpy(model(x, training=False))
    _close(unfolded, expected)

    folded, report = tfpn.fold_for_inference(model, return_report=True, inference_layers=False)
    assert not any(is_proxy_layer(layer) for layer in folded.layers)
    assert {s.old for s in report} == {layer.name for layer in model.layers
                                       if is_proxy_layer(layer)}
    # The three ways: into a 'same' 3x3 conv only (the shift stays as the norm's output
    # offset); into a 3x3 conv and a 1x1 projection (shift into the 1x1's bias, and a
    # shift in front of the 3x3); into the classifier through the pooling (exact).
    assert type(folded.get_layer("stage1_block1_norm1")) is ShiftedGroupNormAct
    assert type(folded.get_layer("stage2_block1_norm1_proxy_shift")) is ChannelAffine
    assert folded.get_layer("stage2_block1_shortcut_conv").use_bias
    assert [(s.old, s.new) for s in report][-1] == ("final_norm", "predictions")
    got = _numpy(folded(x, training=False))
    np.testing.assert_allclose(got, unfolded, rtol=1e-4, atol=1e-4 * np.abs(unfolded).max())
    _close(got, expected)


# ---- examples/train_backends.py ----------------------------------------------------------
def test_train_backends_example_smoke_run(tmp_path):
    """2 steps of examples/train_backends.py on Fashion-MNIST-format files (synthetic
    images, as the real files need not be installed), with this process's backend."""
    x, y = data.synthetic_arrays(48, (28, 28, 1), seed=2)
    for split, sl in (("train", slice(0, 32)), ("t10k", slice(32, 48))):
        write_idx(str(tmp_path / f"{split}-images-idx3-ubyte.gz"), x[sl, ..., 0])
        write_idx(str(tmp_path / f"{split}-labels-idx1-ubyte.gz"), y[sl])
    # XLA's compilation dominates a 2-step run: compile unoptimized (same code path).
    env = {**os.environ, "KERAS_BACKEND": BACKEND, "TF_CPP_MIN_LOG_LEVEL": "2",
           "XLA_FLAGS": "--xla_backend_optimization_level=0",
           "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run(
        [sys.executable, os.path.join(REPO, "examples", "train_backends.py"),
         f"--data_dir={tmp_path}", "--depth=8", "--batch_size=16", "--steps=2", "--epochs=1",
         f"--save={tmp_path / 'model.keras'}"],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert f"Keras backend: {BACKEND}" in out.stdout
    assert f"32 training images, 2 steps per epoch, jit_compile={JIT_COMPILE}" in out.stdout
    assert "epoch 1: loss" in out.stdout and "test accuracy:" in out.stdout
    loaded = keras.saving.load_model(str(tmp_path / "model.keras"))
    assert loaded.get_layer("cifar_resnet8").get_layer("final_norm").proxy_norm
