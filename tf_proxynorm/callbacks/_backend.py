"""What the statistics callbacks do differently per Keras backend.

Every measurement is written in `keras.ops` on the model's own calls; only compilation
differs:

- TensorFlow: `tf.function` (the model's variables are read inside the traced function);
- JAX: `jax.jit` of a pure function of the model's variable values, which are passed in
  at each call and substituted for the variables with `keras.StatelessScope`, so a
  compiled measurement always sees the current weights and never assigns a variable;
- other backends (PyTorch): the same stateless function, run eagerly.
"""

import keras
import numpy as np


def backend():
    return keras.backend.backend()


def to_numpy(value):
    """A backend tensor (or a NumPy array, a TensorFlow tensor) as a NumPy array."""
    if isinstance(value, np.ndarray):
        return value
    if _is_tf_tensor(value):  # e.g. a tf.data element, on any backend
        return np.asarray(value.numpy())
    return np.asarray(keras.ops.convert_to_numpy(value))


def to_inputs(structure):
    """Model inputs for the current backend: TensorFlow tensors (e.g. the elements of a
    `tf.data.Dataset`) become NumPy arrays on the other backends."""
    if backend() == "tensorflow":
        return structure
    return keras.tree.map_structure(
        lambda t: to_numpy(t) if _is_tf_tensor(t) else t, structure)


def _is_tf_tensor(value):
    return type(value).__module__.startswith("tensorflow")


def stateless(fn, variables):
    """`fn(*args)` evaluated with `variables` replaced by the values passed in:
    returns `run(values, *args)` (collected updates, such as BatchNorm moving
    statistics in a training-mode call, are dropped)."""
    variables = list(variables)

    def run(values, *args):
        with keras.StatelessScope(state_mapping=list(zip(variables, values))):
            return fn(*args)

    return run


def compile_model_function(fn, model):
    """`fn(*args)`, a function that calls `model` (or its layers), compiled for the
    backend; each call reads the model's current weights.

    On JAX and the eager backends the model's variables are never assigned inside `fn`
    (a training-mode BatchNorm call updates nothing); on TensorFlow they may be, as in a
    plain call.
    """
    if backend() == "tensorflow":
        import tensorflow as tf

        return tf.function(fn, reduce_retracing=True)
    variables = list(model.variables)
    run = stateless(fn, variables)
    if backend() == "jax":
        import jax

        run = jax.jit(run)
    return lambda *args: run([v.value for v in variables], *args)
