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
- the gradients of a model's loss for the gradient statistics, on TensorFlow and JAX
  (`compile_loss_and_gradients`, `compile_per_example_gradients`,
  `compile_function_of_weights`: a `tf.GradientTape` in a `tf.function`; `jax.grad` of a
  pure function of the weights in `jax.jit`, the per-example gradients in one
  `jax.lax.scan`);
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
def export_input_signature(model):
    """The input signature Keras' `model.export` gives the model's `serve` endpoint."""
    from keras.src.export.export_utils import get_input_signature
    return get_input_signature(model)


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


# -- gradients of a model's loss (TensorFlow and JAX: the gradient statistics) -----------------
def compile_loss_and_gradients(fn, model):
    """`fn(*args) -> (loss, aux)`, a function that calls `model`, compiled into
    `run(*args) -> (loss, gradients, aux)`: `gradients` of the scalar `loss` with respect to
    `model.trainable_variables`, in their order (zeros where `loss` does not depend on one).

    TensorFlow: a `tf.GradientTape` in a `tf.function`. JAX: `jax.value_and_grad` of a pure
    function of the variables' values (substituted with `keras.StatelessScope`) in
    `jax.jit`, so each call reads the current weights and assigns no variable.
    """
    trainable = list(model.trainable_variables)
    if backend() == "tensorflow":
        import tensorflow as tf

        def run(*args):
            with tf.GradientTape() as tape:
                loss, aux = fn(*args)
            return loss, _tf_gradients(tape, loss, trainable), aux

        return tf.function(run, reduce_retracing=True)
    import jax

    def forward_backward(trainable_values, fixed_values, *args):
        (loss, aux), grads = jax.value_and_grad(_stateless_pure(fn, model), has_aux=True)(
            trainable_values, fixed_values, *args)
        return loss, grads, aux

    return _with_values(jax.jit(forward_backward), model)


def compile_per_example_gradients(model, loss_fn):
    """`run(x, y) -> (sum_norms, norms)` over the examples `b` of the batch `(x, y)`, with
    `g_b` the gradient (float32) of `loss_fn(y_b, model(x_b, training=False))` with respect to
    each of `model.trainable_variables`: `sum_norms` (V,) the norm of `sum_b g_b` per
    variable and `norms` (B, V) the norm of each `g_b` (the two sums the per-example
    gradients are reduced to, instead of B copies of the weights).

    TensorFlow: one `tf.GradientTape` per example in a `tf.function`. JAX: `jax.grad` of
    `model.stateless_call`, one example per `jax.lax.scan` step, in `jax.jit`.
    """
    trainable = list(model.trainable_variables)
    if backend() == "tensorflow":
        import tensorflow as tf

        def run(x, y):
            n = int(keras.tree.flatten(x)[0].shape[0])
            sums = [tf.zeros(v.shape, tf.float32) for v in trainable]
            norms = []
            for b in range(n):
                example = keras.tree.map_structure(lambda a, b=b: a[b:b + 1], (x, y))
                with tf.GradientTape() as tape:
                    loss = loss_fn(example[1], model(example[0], training=False))
                grads = [tf.cast(g, tf.float32) for g in _tf_gradients(tape, loss, trainable)]
                sums = [s + g for s, g in zip(sums, grads)]
                norms.append(tf.stack([tf.norm(g) for g in grads]))
            return tf.stack([tf.norm(s) for s in sums]), tf.stack(norms)

        return tf.function(run, reduce_retracing=True)
    import jax

    def example_loss(trainable_values, fixed_values, x, y):
        prediction, _ = model.stateless_call(trainable_values, fixed_values, x, training=False)
        return loss_fn(y, prediction)

    def per_example(trainable_values, fixed_values, x, y):
        grad = jax.grad(example_loss)

        def step(sums, example):
            xb, yb = jax.tree_util.tree_map(lambda a: a[None], example)
            grads = [ops.cast(g, "float32") for g in grad(trainable_values, fixed_values, xb, yb)]
            return [s + g for s, g in zip(sums, grads)], ops.stack([_norm(g) for g in grads])

        zeros = [ops.zeros(v.shape, "float32") for v in trainable_values]
        sums, norms = jax.lax.scan(step, zeros, (x, y))
        return ops.stack([_norm(s) for s in sums]), norms

    return _with_values(jax.jit(per_example), model)


def compile_function_of_weights(fn, model):
    """`fn(trainable_values, non_trainable_values, *args)`, a pure function of the values of
    `model`'s variables (e.g. through `model.stateless_call`), compiled into `run(*args)`
    that passes their current values: `tf.function` on TensorFlow, `jax.jit` on JAX."""
    if backend() == "tensorflow":
        import tensorflow as tf

        return tf.function(
            lambda *args: fn([ops.convert_to_tensor(v) for v in model.trainable_variables],
                             [ops.convert_to_tensor(v) for v in model.non_trainable_variables],
                             *args),
            reduce_retracing=True)
    import jax

    return _with_values(jax.jit(fn), model)


def _tf_gradients(tape, loss, variables):
    import tensorflow as tf

    grads = tape.gradient(loss, variables)
    return [tf.zeros_like(v) if g is None else tf.convert_to_tensor(g)
            for g, v in zip(grads, variables)]


def _stateless_pure(fn, model):
    """`fn(*args)` as a pure function `(trainable_values, non_trainable_values, *args)`."""
    trainable, fixed = list(model.trainable_variables), list(model.non_trainable_variables)

    def pure(trainable_values, fixed_values, *args):
        mapping = list(zip(trainable, trainable_values)) + list(zip(fixed, fixed_values))
        with keras.StatelessScope(state_mapping=mapping):
            return fn(*args)

    return pure


def _with_values(run, model):
    """`run(trainable_values, non_trainable_values, *args)` called on the current values."""
    trainable, fixed = list(model.trainable_variables), list(model.non_trainable_variables)
    return lambda *args: run([v.value for v in trainable], [v.value for v in fixed], *args)


def _norm(t):
    """Frobenius norm of a tensor of any rank."""
    return ops.sqrt(ops.sum(ops.square(t)))
