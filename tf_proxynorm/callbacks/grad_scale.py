"""Scale of activations and gradients (Bjorck et al. 2018, "Understanding Batch Normalization").

Other-methods spec, section 6, measured on a fixed evaluation batch in inference mode:

- M1 activation growth: per convolution/dense output, the mean over channels of
  |channel mean| and of the channel variance, against depth.
- M2 gradient scale: per kernel, ||dL/dW||, ||dL/dW|| / ||W||, max |g|, the excess
  kurtosis of the entries (0 for a Gaussian) and the share of entries beyond 5 sigma.
- M3 input-independence: ||sum_b g_b|| / sum_b ||g_b|| over per-example gradients
  (1 = every example pushes the same way), overall and per kernel.
- M4 relative loss after one step: L(theta - alpha g) / L(theta) over a grid of alpha,
  evaluated statelessly (`model.stateless_call` on the stepped weights): the model's
  weights are never assigned, so they stay bit-identical.
- M5 output concentration: share of the examples predicted as the modal class.
- M8 conditioning: largest over mean channel variance, per convolution/dense output.

Gradients are taken on the TensorFlow (`tf.GradientTape`) and JAX (`jax.grad` of
`model.stateless_call`) backends; the other backends get a clear error.
"""

import os

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from tf_proxynorm import _backend
from tf_proxynorm.callbacks import _output, base
from tf_proxynorm.callbacks.probe import LayerProbe, is_kernel_layer, output_axis
from tf_proxynorm.ops.norm_act import batch_moments

DEFAULT_ALPHAS = (1e-3, 1e-2, 1e-1, 1.0)
SUPPORTED_BACKENDS = ("tensorflow", "jax")


def check_backend(name):
    """Raises a clear error on a Keras backend whose gradients the probes cannot take."""
    backend = _backend.backend()
    if backend not in SUPPORTED_BACKENDS:
        raise ValueError(
            f"{name} supports the TensorFlow and JAX backends (set KERAS_BACKEND=tensorflow "
            "or jax); FailureModeMonitor and power_decomposition run on every backend. "
            f"Received: backend={backend!r}")


def _loss_function(model, loss):
    """A `(y_true, y_pred) -> scalar` loss from `loss` or the model's compiled loss."""
    if loss is None:
        loss = getattr(model, "loss", None)
        if loss is None:
            raise ValueError("Pass `loss` or compile the model with a loss. Received: loss=None")
        if isinstance(loss, (dict, list, tuple)):
            raise ValueError("The model was compiled with several losses: pass a single "
                             f"`loss` callable. Received: model.loss={loss!r}")
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    if not callable(loss):
        raise ValueError(f"`loss` must be a loss name or a callable. Received: loss={loss!r}")
    return lambda y_true, y_pred: ops.mean(ops.cast(loss(y_true, y_pred), "float32"))


def tensor_statistics(g, w=None):
    """M2 for one gradient tensor `g` (and its weight `w`): a dict of Python floats."""
    g = np.asarray(g, np.float64).ravel()
    norm = float(np.linalg.norm(g))
    out = {"grad_norm": norm, "grad_max": float(np.max(np.abs(g))) if g.size else 0.0}
    if w is not None:
        w_norm = float(np.linalg.norm(np.asarray(w, np.float64)))
        out["grad_ratio"] = norm / w_norm if w_norm > 0 else float("nan")
    centered = g - g.mean()
    var = float(np.mean(centered ** 2))
    if var > 0:
        out["kurtosis"] = float(np.mean(centered ** 4) / var ** 2 - 3.0)
        out["tail5"] = float(np.mean(np.abs(centered) > 5.0 * np.sqrt(var)))
    else:
        out["kurtosis"] = out["tail5"] = float("nan")
    return out


def _ratio(a, b):
    return float(a / b) if b > 0 else float("nan")


def channel_statistics(mean, var):
    """M1 and M8 from per-channel mean and variance: a dict of Python floats."""
    mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
    avg_var = float(var.mean())
    return {"abs_mean": float(np.abs(mean).mean()), "var": avg_var,
            "conditioning": float(var.max() / avg_var) if avg_var > 0 else float("nan")}


def output_concentration(predictions):
    """M5: share of examples whose argmax is the most frequent one (None for 1 output)."""
    predictions = np.asarray(predictions)
    if predictions.ndim != 2 or predictions.shape[1] < 2:
        return None
    counts = np.bincount(predictions.argmax(axis=1), minlength=predictions.shape[1])
    return float(counts.max() / predictions.shape[0])


class ScaleProbe:
    """Runs the M1-M5, M8 measurements of a model on one evaluation batch.

    Args:
        model: a built Keras model.
        loss: a loss name or `(y_true, y_pred)` callable; defaults to the compiled loss.
        per_example: number of examples (the first of the batch) for the per-example
            gradients of M3. 0 skips M3.
        alphas: step sizes of the relative-loss probe M4. Empty skips M4.

    The model runs with `training=False`; `measure(x, y)` returns a dict with `loss`,
    `activations` (M1, M8 per convolution/dense output), `kernels` (M2 and M3 per kernel),
    `alignment` (M3 over all trainable weights), `relative_loss` (M4: alpha ->
    L(theta - alpha g) / L(theta)) and `concentration` (M5). The per-example gradients
    (M3) and the relative-loss probes (M4) each run in one compiled call; M4 evaluates
    the stepped weights with `model.stateless_call`, so no variable is ever assigned.

    Backends: TensorFlow (`tf.GradientTape` in `tf.function`s) and JAX (`jax.grad` of
    pure functions of the weights, `model.stateless_call`, in `jax.jit`; the per-example
    gradients in one `jax.lax.scan`), compiled by `tf_proxynorm._backend`. Other backends
    raise a `ValueError`.
    """

    def __init__(self, model, loss=None, per_example=8, alphas=DEFAULT_ALPHAS):
        check_backend(type(self).__name__)
        if not model.built:
            raise ValueError(f"The model {model.name!r} must be built (called once) first.")
        if not isinstance(per_example, int) or per_example < 0:
            raise ValueError(
                f"`per_example` must be an int >= 0. Received: per_example={per_example}")
        alphas = tuple(float(a) for a in alphas)
        if any(not a > 0 for a in alphas):
            raise ValueError(f"`alphas` must be positive step sizes. Received: alphas={alphas}")
        self.model = model
        self.loss_fn = _loss_function(model, loss)
        self.per_example = per_example
        self.alphas = alphas
        self.variables = list(model.trainable_variables)
        self.kernel_layers = [layer for layer in _backend.all_layers(model)
                              if is_kernel_layer(layer)]
        paths = [v.path for v in self.variables]
        self.kernel_index = [paths.index(layer.kernel.path) if layer.kernel.path in paths else None
                             for layer in self.kernel_layers]
        self.probe = LayerProbe(model, [(layer, "output") for layer in self.kernel_layers])
        # The model's calls, compiled per backend by the adapter (tf_proxynorm._backend).
        self._forward_backward = _backend.compile_loss_and_gradients(
            self._loss_and_statistics, model)
        self._per_example = _backend.compile_per_example_gradients(model, self.loss_fn)
        self._stepped_losses = _backend.compile_function_of_weights(
            self._stepped_losses_fn, model)

    def _loss_and_statistics(self, x, y):
        """The loss, and (M1, M8 moments per kernel layer output, the prediction)."""
        outputs, prediction = self.probe(x, training=False)
        loss = self.loss_fn(y, prediction)
        stats = [batch_moments(out, output_axis(layer))
                 for layer, out in zip(self.kernel_layers, outputs)]
        return loss, (stats, prediction)

    def _stepped_losses_fn(self, trainable, fixed, x, y, grads):
        """M4 losses L(theta - alpha g) for every alpha, `trainable` and `fixed` the values
        of the model's variables: no variable is assigned."""
        losses = []
        for alpha in self.alphas:
            stepped = [v - ops.cast(alpha * g, v.dtype) for v, g in zip(trainable, grads)]
            prediction, _ = self.model.stateless_call(stepped, fixed, x, training=False)
            losses.append(self.loss_fn(y, prediction))
        return ops.stack(losses)

    # -- measurements -----------------------------------------------------------------------
    def relative_loss(self, x, y, grads, loss0):
        """M4: alpha -> L(theta - alpha g) / L(theta), `grads` the gradient at theta.

        The stepped weights are evaluated with `model.stateless_call`: the model's
        variables are never assigned, so they stay bit-identical.
        """
        losses = _backend.to_numpy(self._stepped_losses(x, y, list(grads)))
        return {alpha: _ratio(float(loss), loss0) for alpha, loss in zip(self.alphas, losses)}

    def alignment(self, x, y):
        """M3 over the first `per_example` examples of `(x, y)`.

        Returns `(overall, per_variable)`: ||sum_b g_b|| / sum_b ||g_b|| over all the
        trainable weights, and the same per trainable variable (a list).
        """
        n = min(self.per_example, int(keras.tree.flatten(x)[0].shape[0]))
        first = keras.tree.map_structure(lambda a: a[:n], (x, y))
        sum_norms, norms = (_backend.to_numpy(t).astype(np.float64)
                            for t in self._per_example(*first))
        overall = _ratio(np.sqrt(np.sum(sum_norms ** 2)),
                         np.sum(np.sqrt(np.sum(norms ** 2, axis=1))))
        return overall, [_ratio(a, b) for a, b in zip(sum_norms, norms.sum(axis=0))]

    def measure(self, x, y):
        """`(record, gradients)`: the record described above, and the gradient of every
        trainable variable as NumPy arrays."""
        x, y = _backend.to_inputs((x, y))
        loss, grads, (stats, prediction) = self._forward_backward(x, y)
        loss = float(_backend.to_numpy(loss))
        grads_np = [_backend.to_numpy(g) for g in grads]
        per_variable = None
        record = {"loss": loss}
        if self.per_example:
            record["alignment"], per_variable = self.alignment(x, y)
        kernels = []
        for layer, index in zip(self.kernel_layers, self.kernel_index):
            if index is None:
                continue
            weight = _backend.to_numpy(self.variables[index].value)
            row = {"name": layer.name, **tensor_statistics(grads_np[index], weight)}
            if per_variable is not None:
                row["alignment"] = per_variable[index]
            kernels.append(row)
        record["activations"] = [
            {"name": layer.name,
             **channel_statistics(_backend.to_numpy(m), _backend.to_numpy(v))}
            for layer, (m, v) in zip(self.kernel_layers, stats)]
        record["kernels"] = kernels
        if self.alphas:
            record["relative_loss"] = self.relative_loss(x, y, grads, loss)
        prediction = keras.tree.flatten(prediction)[0]
        record["concentration"] = output_concentration(_backend.to_numpy(prediction))
        return record, grads_np


def gradient_scale(model, x, y, *, loss=None, per_example=8, alphas=DEFAULT_ALPHAS):
    """The M1-M5, M8 measurements of `model` on the batch `(x, y)` (see `ScaleProbe`).

    Example:

    >>> record = gradient_scale(model, x_val[:64], y_val[:64])
    >>> record["alignment"], record["relative_loss"][0.1]

    Runs on the TensorFlow and JAX backends.
    """
    return ScaleProbe(model, loss, per_example, alphas).measure(x, y)[0]


def _alpha_key(alpha):
    return f"{alpha:g}"


class GradientScaleMonitor(base.StatisticsCallback):
    """Tracks the scale of activations and gradients during training (Bjorck et al. 2018).

    Every `every_n_epochs` epochs (or `every_n_steps` steps), on one fixed evaluation
    batch, in inference mode (M1-M5, M8 of the other-methods spec, section 6):

    ```python
    M1  abs_mean = E_c|E[h_c]|, var = E_c Var[h_c]          per conv/dense output h
    M2  grad_norm = ||dL/dW||, grad_ratio = ||dL/dW|| / ||W||, grad_max = max|g|,
        kurtosis (excess), tail5 = share of |g - mean| > 5 std      per kernel
    M3  alignment = ||sum_b g_b|| / sum_b ||g_b||            per-example gradients
    M4  rel_loss@alpha = L(theta - alpha g) / L(theta)      stateless: weights untouched
    M5  concentration = share of examples predicted as the modal class
    M8  conditioning = max_c Var[h_c] / E_c Var[h_c]
    ```

    Keras `logs` get the global scalars `gs/loss`, `gs/alignment`, `gs/rel_loss@<alpha>`,
    `gs/concentration` and, per layer, the metrics of `log_keys` (`gs/<layer>/<metric>`).
    TensorBoard (when installed) gets every scalar and a histogram of each kernel's
    gradient; `<log_dir>/gradient_scale.json` gets every record; at the end of training
    `<log_dir>/depth_profiles.png` (M1, M2, M3, M8 against depth, one line per
    measurement) and `<log_dir>/relative_loss.png` (M4 against alpha) are drawn when
    matplotlib is installed. The model is only read (M4 never assigns a variable).

    Args:
        data: the evaluation batch: a tuple `(x, y)` of arrays/tensors, or a
            `tf.data.Dataset` of `(x, y, ...)` whose first batch is taken once.
        loss: a loss name or `(y_true, y_pred)` callable; defaults to the model's
            compiled loss (one output).
        per_example: examples used for the per-example gradients (M3). Defaults to 8.
        alphas: step sizes of the relative-loss probe (M4). Defaults to 1e-3 ... 1.
        every_n_epochs, every_n_steps, at_train_begin, log_dir, tensorboard, plots: as
            `FailureModeMonitor`.
        log_keys: per-layer metrics put into the Keras logs: a tuple of names among
            `abs_mean`, `var`, `conditioning`, `grad_norm`, `grad_ratio`, `grad_max`,
            `kurtosis`, `tail5`, `alignment`; "all"; or "default" = `()` (only the global
            scalars, to keep the progress bar readable).

    Example:

    >>> monitor = GradientScaleMonitor((x_val[:64], y_val[:64]), log_dir="runs/bn")
    >>> model.fit(ds, epochs=5, callbacks=[monitor])

    Backends: TensorFlow and JAX (see `ScaleProbe`); on any other Keras backend the
    constructor raises a `ValueError`.

    Reference:
        - [Bjorck et al., 2018](https://arxiv.org/abs/1806.02375), Understanding Batch
          Normalization.
    """

    json_name = "gradient_scale.json"
    LAYER_KEYS = ("abs_mean", "var", "conditioning", "grad_norm", "grad_ratio", "grad_max",
                  "kurtosis", "tail5", "alignment")
    GLOBAL_KEYS = ("loss", "alignment", "concentration")

    def __init__(self, data, *, loss=None, per_example=8, alphas=DEFAULT_ALPHAS,
                 every_n_epochs=1, every_n_steps=None, at_train_begin=True, log_dir=None,
                 tensorboard="auto", plots="auto", log_keys="default"):
        check_backend(type(self).__name__)
        super().__init__(every_n_epochs=every_n_epochs, every_n_steps=every_n_steps,
                         at_train_begin=at_train_begin, log_dir=log_dir,
                         tensorboard=tensorboard, plots=plots, log_keys=log_keys)
        keys = {"default": (), "all": self.LAYER_KEYS}.get(log_keys, log_keys)
        if isinstance(keys, str) or not set(keys) <= set(self.LAYER_KEYS):
            raise ValueError(f"`log_keys` must be 'default', 'all' or a tuple of "
                             f"{self.LAYER_KEYS}. Received: log_keys={log_keys!r}")
        self._keys = tuple(keys)
        if isinstance(data, tf.data.Dataset):
            data = _backend.to_inputs(next(iter(data)))
        if not isinstance(data, tuple) or len(data) < 2:
            raise ValueError("`data` must be a tuple `(x, y)` or a tf.data.Dataset of "
                             f"`(x, y)`. Received: data of type {type(data).__name__}")
        base.check_data(data, None)
        self.x, self.y = data[0], data[1]
        self.loss = loss
        self.per_example = per_example
        self.alphas = tuple(alphas)
        self.probe = None

    def _setup(self):
        self.probe = ScaleProbe(self.model, self.loss, self.per_example, self.alphas)

    def _logged(self, key):
        parts = key.split("/")
        return len(parts) == 2 or parts[-1] in self._keys

    def measure(self):
        record, grads = self.probe.measure(self.x, self.y)
        scalars = {f"gs/{k}": record[k] for k in self.GLOBAL_KEYS
                   if record.get(k) is not None}
        for alpha, value in record.get("relative_loss", {}).items():
            scalars[f"gs/rel_loss@{_alpha_key(alpha)}"] = value
        for section in ("activations", "kernels"):
            for row in record[section]:
                for key, value in row.items():
                    if key != "name":
                        scalars[f"gs/{row['name']}/{key}"] = value
        histograms = {f"gs/{layer.name}/grad": grads[index]
                      for layer, index in zip(self.probe.kernel_layers, self.probe.kernel_index)
                      if index is not None}
        if "relative_loss" in record:
            record["relative_loss"] = {_alpha_key(a): v for a, v in record["relative_loss"].items()}
        return record, scalars, histograms

    def _plots(self, records):
        panels = [("M1 mean |channel mean|", "activations", "abs_mean", True),
                  ("M1 mean channel variance", "activations", "var", True),
                  ("M8 conditioning max/mean var", "activations", "conditioning", False),
                  ("M2 ||dL/dW|| / ||W||", "kernels", "grad_ratio", True),
                  ("M2 excess kurtosis of dL/dW", "kernels", "kurtosis", False),
                  ("M3 per-example alignment", "kernels", "alignment", False)]
        paths = [_output.save_depth_profiles(
            panels, records, os.path.join(self.log_dir, "depth_profiles.png"))]
        curves = [(r["label"], [float(a) for a in r["relative_loss"]],
                   list(r["relative_loss"].values()))
                  for r in _output.spaced(records, 8) if r.get("relative_loss")]
        paths.append(_output.save_curves(
            curves, os.path.join(self.log_dir, "relative_loss.png"),
            "M4 loss after one gradient step", "step size alpha",
            "L(theta - alpha g) / L(theta)", log_y=True))
        return paths
