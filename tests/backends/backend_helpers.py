"""Backend-neutral test helpers (imported by the tests of this folder): these tests run once per Keras backend, each in its own
pytest process (`make test`: TensorFlow, then `KERAS_BACKEND=jax`; `make test-torch`).
This module holds what is about backends (the running backend, its autodiff); helpers
shared with the tests of `tests/` are in `tests/helpers.py`.

Only `keras`, `keras.ops` and NumPy are used on the code under test; the gradient of a
layer is taken with the backend's own autodiff (`layer_gradients`). The float64
references (`tests/reference*.py`) are NumPy, or TensorFlow float64 code independent of
the package (TensorFlow is a dependency on every backend).
"""

import inspect

import keras
import numpy as np

BACKEND = keras.backend.backend()
# What `model.compile(jit_compile=...)` the fit tests use: XLA on TensorFlow and JAX. On
# PyTorch, Keras' `jit_compile=True` means torch.compile (TorchDynamo, marked experimental by
# Keras, and 10-100x slower to start than the step itself), so there the fit tests run
# eagerly, as PyTorch users train; the GN+PN SGD-step test also runs a torch.compile step.
JIT_COMPILE = BACKEND != "torch"


def to_numpy(t):
    return np.asarray(keras.ops.convert_to_numpy(t))


def layer_gradients(layer, x, dy, training=False):
    """`(y, dx, {weight name: gradient})` of `sum(layer(x) * dy)` with the backend's
    autodiff, as float64-castable NumPy arrays (gradients of the trainable weights)."""
    x = keras.ops.convert_to_tensor(x)
    dy = keras.ops.convert_to_tensor(dy, "float32")
    # Keras' own layers (Conv2D, ...) take no `training` argument.
    takes_training = "training" in inspect.signature(layer.call).parameters
    kwargs = {"training": training} if takes_training else {}
    names = [w.name for w in layer.trainable_weights]
    if BACKEND == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, **kwargs)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * dy)
        grads = tape.gradient(loss, [x] + list(layer.trainable_weights))
    elif BACKEND == "jax":
        import jax

        trainable = [w.value for w in layer.trainable_variables]
        fixed = [w.value for w in layer.non_trainable_variables]

        def loss_fn(x, trainable):
            y, _ = layer.stateless_call(trainable, fixed, x, **kwargs)
            return (y.astype("float32") * dy).sum(), y

        (_, y), (dx, dw) = jax.value_and_grad(loss_fn, argnums=(0, 1), has_aux=True)(
            x, trainable)
        grads = [dx] + list(dw)
    elif BACKEND == "torch":
        x = x.detach().requires_grad_(True)
        y = layer(x, **kwargs)
        (y.float() * dy).sum().backward()
        grads = [x.grad] + [w.value.grad for w in layer.trainable_weights]
    else:
        raise NotImplementedError(BACKEND)
    grads = [None if g is None else to_numpy(g) for g in grads]
    return to_numpy(y), grads[0], dict(zip(names, grads[1:]))
