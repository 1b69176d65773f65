"""Empty axes on the running backend: 0 positions, 0 examples and 0 channels.

Keras' own normalization tests run a `(1, 0, 10)` input. An empty tensor has an empty
output of the same shape; what can go wrong is the shape (a reshape with `-1` and a zero
dimension is ambiguous: TensorFlow returned `(0, 0, 10)`, JAX divided by zero, PyTorch
refused the reshape), NaN/Inf leaking into the parameter gradients (a mean over no
positions), or a missing gradient. The float64 answer needs no implementation: every
gradient is a sum over an empty set of terms, so it is exactly zero.
"""

import keras
import numpy as np
import pytest

import tf_proxynorm as tfpn
from backend_helpers import BACKEND, layer_gradients

L = tfpn.layers

LAYERS = {
    "gn": lambda **kw: L.GroupNormAct(groups=2, **kw),
    "gn+pn": lambda **kw: L.GroupNormAct(groups=2, proxy_norm=True, **kw),
    "gn1+pn": lambda **kw: L.GroupNormAct(groups=1, proxy_norm=True, **kw),
    "ln+pn": lambda **kw: L.LayerNormAct(proxy_norm=True, activation="silu", **kw),
    "in+pn": lambda **kw: L.InstanceNormAct(proxy_norm=True, activation="gelu", **kw),
    "in": lambda **kw: L.InstanceNormAct(activation=None, **kw),
    "shifted": lambda **kw: L.ShiftedGroupNormAct(groups=2, **kw),
    "bn": lambda **kw: L.BatchNormAct(**kw),
}
IMPLEMENTATIONS = ["auto", "reference"] if BACKEND == "tensorflow" else ["auto"]

# (shape, channel axis): 0 positions (the Keras test's (1, 0, 10), images with an empty
# row axis, channels first), 0 examples.
SHAPES = [((1, 0, 8), -1), ((2, 0, 3, 8), -1), ((2, 8, 0), 1), ((2, 8, 3, 0), 1),
          ((0, 5, 8), -1), ((0, 8, 2, 3), 1)]


def _make(name, axis, implementation):
    kwargs = {"axis": axis}
    if name != "bn":
        kwargs["implementation"] = implementation
    return LAYERS[name](**kwargs)


def _check(layer, shape, training=False):
    rng = np.random.default_rng(0)
    layer.build(shape)
    for weight in layer.trainable_weights:   # non-trivial weights
        weight.assign(1.0 + 0.3 * rng.standard_normal(weight.shape).astype("float32"))
    x = np.zeros(shape, "float32")
    y, dx, dweights = layer_gradients(layer, x, np.zeros(shape, "float32"), training=training)
    assert y.shape == shape and dx is not None and dx.shape == shape
    assert np.isfinite(y).all() and np.isfinite(dx).all()
    for weight in layer.trainable_weights:
        grad = dweights[weight.name]
        assert grad is not None, weight.name
        assert grad.shape == tuple(weight.shape), weight.name
        np.testing.assert_array_equal(grad, np.zeros(weight.shape), err_msg=weight.name)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape, axis", SHAPES, ids=str)
@pytest.mark.parametrize("name", sorted(LAYERS))
def test_empty_positions_or_examples(name, shape, axis, implementation):
    _check(_make(name, axis, implementation), shape)


@pytest.mark.parametrize("shape, axis", SHAPES[:2] + SHAPES[4:5], ids=str)
def test_batch_norm_training_on_an_empty_batch_keeps_its_moving_statistics(shape, axis):
    """No statistics can be measured on no elements: the output is empty and the moving
    averages stay as they were (a mean over nothing would write NaN into them)."""
    layer = L.BatchNormAct(axis=axis, momentum=0.5)
    _check(layer, shape, training=True)
    y = layer(np.zeros(shape, "float32"), training=True)   # a call that updates the state
    assert tuple(y.shape) == shape
    moving = {w.name: keras.ops.convert_to_numpy(w) for w in layer.non_trainable_weights}
    assert set(moving) == {"moving_mean", "moving_variance"}
    np.testing.assert_array_equal(moving["moving_mean"], np.zeros(8))
    np.testing.assert_array_equal(moving["moving_variance"], np.ones(8))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("name", ["gn", "ln+pn", "in+pn"])
def test_zero_channels(name, implementation):
    """A tensor with no channels normalizes to an empty tensor (no weights to train)."""
    if name == "gn":
        layer = L.GroupNormAct(groups=1, implementation=implementation)
    else:
        layer = _make(name, -1, implementation)
    _check(layer, (2, 3, 0))


@pytest.mark.parametrize("shape", [(1, 0, 8), (0, 4, 8)], ids=str)
def test_compiled_empty_positions_or_examples(shape):
    """The same under the backend's compiler (XLA on TensorFlow and JAX)."""
    if BACKEND == "torch":
        pytest.skip("torch.compile is not how the package's PyTorch users train (eager)")
    layer = L.GroupNormAct(groups=2, proxy_norm=True, implementation="reference")
    layer.build(shape)
    if BACKEND == "tensorflow":
        import tensorflow as tf
        run = tf.function(lambda x: layer(x), jit_compile=True)
    else:
        import jax
        fixed = [w.value for w in layer.non_trainable_variables]
        trainable = [w.value for w in layer.trainable_variables]
        run = jax.jit(lambda x: layer.stateless_call(trainable, fixed, x)[0])
    y = keras.ops.convert_to_numpy(run(np.zeros(shape, "float32")))
    assert y.shape == shape
