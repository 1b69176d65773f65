"""The one adapter for Keras / TensorFlow internals and for what differs per Keras backend.

Everything here is code a Keras or TensorFlow upgrade can break, or code written once per
backend; the rest of the package calls these functions instead. (Keras' functional-graph
internals, used to rewrite models, live in `tf_proxynorm._graph`; the fused op's TensorFlow
internals in `tf_proxynorm.fused`, which imports nothing else of the package.)

Private framework APIs touched here, and why:

- `keras.layers.Layer._flatten_layers(include_self=False, recursive=True)` in
  `all_layers`: every layer nested in a model or layer, at any depth, in tracking order.
  Keras has no public equivalent (`Model.layers` is one level, and plain layers holding
  sub-layers have no `layers`); without it, `all_layers` walks `layers` recursively.

Everything else here is public API, dispatched on `keras.backend.backend()`:

- gradients: `gradient` (`tf.GradientTape`, `jax.grad`, `torch.autograd.grad`) and
  `cond` (`ops.cond`, but an eager JAX predicate runs one branch in Python);
- compiling a function that calls a model, for the statistics callbacks
  (`compile_model_function`: `tf.function` on TensorFlow; `jax.jit` of a pure function of
  the model's variable values, substituted with `keras.StatelessScope`, on JAX; the same
  stateless function, eagerly, elsewhere);
- tensors in and out: `to_numpy`, and `to_inputs` (TensorFlow tensors, e.g. the elements of
  a `tf.data.Dataset`, as NumPy arrays on the other backends).
"""

import keras
import numpy as np
from keras import ops

# The backends whose autodiff `gradient` calls.
GRADIENT_BACKENDS = ("tensorflow", "jax", "torch")


def backend():
    """The name of the Keras backend (one place for tests to pretend another one)."""
    return keras.backend.backend()


# -- Keras internals --------------------------------------------------------------------------
def all_layers(layer):
    """Every layer nested in `layer` (a model or a layer), at any depth, `layer` excluded,
    in Keras' tracking order (depth first); a layer reached twice is listed once."""
    flatten = getattr(layer, "_flatten_layers", None)
    if flatten is not None:
        return list(flatten(include_self=False, recursive=True))
    found, seen = [], set()
    stack = list(reversed(getattr(layer, "layers", [])))
    while stack:
        sub = stack.pop()
        if id(sub) in seen:
            continue
        seen.add(id(sub))
        found.append(sub)
        stack.extend(reversed(getattr(sub, "layers", [])))
    return found


# -- gradients --------------------------------------------------------------------------------
def gradient(fn, x):
    """The gradient of the scalar `fn(x)` at `x`, with the backend's own autodiff
    (one of `GRADIENT_BACKENDS`)."""
    name = backend()
    if name == "jax":
        import jax

        return jax.grad(fn)(x)
    if name == "torch":
        import torch

        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            return torch.autograd.grad(fn(x), x)[0]
    import tensorflow as tf

    with tf.GradientTape() as tape:
        tape.watch(x)
        y = fn(x)
    return tape.gradient(y, x)


def cond(pred, true_fn, false_fn):
    """`ops.cond`, but a concrete JAX predicate (eager call) runs one branch in Python:
    `jax.lax.cond` would trace and compile both branches at every eager call."""
    if backend() == "jax":
        import jax

        try:
            concrete = bool(pred)
        except jax.errors.ConcretizationTypeError:   # traced (jit): a real cond
            return ops.cond(pred, true_fn, false_fn)
        return true_fn() if concrete else false_fn()
    return ops.cond(pred, true_fn, false_fn)


# -- tensors in and out -----------------------------------------------------------------------
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


# -- compiling functions of a model -----------------------------------------------------------
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
