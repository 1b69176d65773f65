"""The failure modes of batch-independent normalization, measured during training.

Proxy Norm spec, section 8: for every normalization layer, the power of its normalized
output `y` (before the affine) and its three parts over a data set; the collapse ratio
(1)/P (failure mode (i), LayerNorm's channel-wise collapse), the instance-mean
variability (2)/P (failure mode (ii): zero under InstanceNorm) and the instance-scale
variability.
"""

import math
import os

from tf_proxynorm import _backend
from tf_proxynorm.callbacks import _output, base
from tf_proxynorm.callbacks.probe import (LayerProbe, is_kernel_layer, is_normalization,
                                          normalized_output, output_axis)
from tf_proxynorm.callbacks.power import POWER_METRICS, PowerAccumulator, instance_statistics


def _select(model, layers, include_convs):
    """`(layer, kind)` pairs in depth order: normalizations, and convolutions if asked."""
    everything = _backend.all_layers(model)
    if layers is not None:
        by_name = {layer.name: layer for layer in everything}
        unknown = [name for name in layers if name not in by_name]
        if unknown:
            raise ValueError(f"Unknown layer names {unknown}; the model has "
                             f"{sorted(by_name)}. Received: layers={list(layers)}")
        chosen = [by_name[name] for name in layers]
        for layer in chosen:
            if not (is_normalization(layer) or is_kernel_layer(layer)):
                raise ValueError(f"Layer {layer.name!r} is neither a known normalization nor a "
                                 f"convolution/dense layer. Received: layers={list(layers)}")
    else:
        chosen = [layer for layer in everything if is_normalization(layer)
                  or (include_convs and is_kernel_layer(layer))]
    return [(layer, "norm" if is_normalization(layer) else "conv") for layer in chosen]


class PowerProbe:
    """Streams the power decomposition of a model's normalizations over a data set.

    Args:
        model: a built Keras model.
        training: for batch normalizations, use the batch statistics of each batch (True)
            or the moving statistics (False, inference mode). The model runs with this
            `training` flag; with True its non-trainable variables (BatchNorm moving
            statistics) are left unchanged (restored after each batch on TensorFlow,
            never assigned on the other backends).
        include_convs: also decompose the outputs of convolution and dense layers.
        layers: names of the layers to monitor (default: every normalization).

    `probe.measure(batches)` returns a list, in depth order, of dicts with `name`,
    `kind` ("norm" or "conv"), the `POWER_METRICS` and `channel_mean` (mu_c).
    """

    def __init__(self, model, training=False, include_convs=False, layers=None):
        if not model.built:
            raise ValueError(f"The model {model.name!r} must be built (called once) first.")
        self.model = model
        self.training = bool(training)
        self.selected = _select(model, layers, include_convs)
        if not self.selected:
            raise ValueError(
                f"The model {model.name!r} has no normalization layer the callbacks know "
                "(tf_proxynorm norm+act layers, Keras BatchNormalization, LayerNormalization, "
                "GroupNormalization; others via `register_normalized_output`). "
                f"Received: include_convs={include_convs}, layers={layers}")
        self.probe = LayerProbe(
            model, [(layer, "input" if kind == "norm" else "output")
                    for layer, kind in self.selected])
        # tf.function on TensorFlow, jax.jit of the variables' values on JAX, eager else.
        self._stats = _backend.compile_model_function(self._statistics, model)

    def _statistics(self, x):
        values, _ = self.probe(x, training=self.training)
        out = []
        for (layer, kind), value in zip(self.selected, values):
            if kind == "norm":
                y, axis = normalized_output(layer, value, training=self.training)
            else:
                y, axis = value, output_axis(layer)
            out.append(instance_statistics(y, axis))
        return out

    def measure(self, batches):
        accumulators = [PowerAccumulator() for _ in self.selected]
        # Only TensorFlow's traced call may assign the moving statistics (the other
        # backends run it statelessly): they are restored after each batch.
        restore = self.training and _backend.backend() == "tensorflow"
        saved = ([v.numpy() for v in self.model.non_trainable_variables]
                 if restore else None)
        try:
            for x in batches:
                for acc, stats in zip(accumulators, self._stats(x)):
                    acc.update(*(_backend.to_numpy(s) for s in stats))
                if saved is not None:
                    for v, value in zip(self.model.non_trainable_variables, saved):
                        v.assign(value)
        finally:
            if saved is not None:
                for v, value in zip(self.model.non_trainable_variables, saved):
                    v.assign(value)
        if not accumulators[0].count:
            raise ValueError("`data` yielded no example.")
        return [{"name": layer.name, "kind": kind, **acc.result(),
                 "channel_mean": acc.channel_means()}
                for (layer, kind), acc in zip(self.selected, accumulators)]


def power_decomposition(model, data, *, training=False, include_convs=False, layers=None,
                        batch_size=64, max_batches=None):
    """The power decomposition of every normalization of `model` over `data`.

    Args:
        model: a built Keras model (functional, Sequential or subclassed).
        data: model inputs: an array/tensor, a tuple `(x, y, ...)` (only `x` is used) or a
            `tf.data.Dataset` of `x` or `(x, y, ...)` (on every Keras backend).
        training: see `PowerProbe` (True: batch statistics for batch normalizations,
            each batch being a sample of the data set; the model is left unchanged).
        include_convs: also decompose convolution/dense outputs.
        layers: names of the layers to monitor (default: every normalization).
        batch_size: batch size for array data.
        max_batches: stop after this many batches (needed for infinite datasets).

    Returns:
        A list in depth order of dicts with `name`, `kind`, `power`, `constant` (1),
        `instance_mean` (2), `within` (3), `collapse` (1)/P, `mean_var` (2)/P,
        `scale_var` and `channel_mean` (a `(C,)` array).

    Example:

    >>> parts = power_decomposition(model, x_eval)
    >>> [(p["name"], round(p["collapse"], 3)) for p in parts]
    """
    base.check_data(data, max_batches)
    probe = PowerProbe(model, training=training, include_convs=include_convs, layers=layers)
    return probe.measure(base.batches(data, batch_size, max_batches))


def _headline(layers, headline):
    """`{name: reduction of metric}` over the normalization layers of `layers` (every layer
    when none is a normalization), NaN values left out (NaN when all are)."""
    rows = [layer for layer in layers if layer["kind"] == "norm"] or layers
    summary = {}
    for name, metric, reduce in headline:
        values = [float(row[metric]) for row in rows if not math.isnan(float(row[metric]))]
        summary[name] = reduce(values) if values else math.nan
    return summary


class FailureModeMonitor(base.StatisticsCallback):
    """Measures the two failure modes of batch-independent normalization during training.

    Every `every_n_epochs` epochs (or `every_n_steps` steps), on a fixed data subset, in
    inference mode, for every normalization layer: the power `P(y)` of its normalized
    output `y` (before the affine) and its decomposition (Labatie et al. 2021, Fig. 2):

    ```python
    P(y) = E_c[mu_c^2] + E_c[Var_x(mu_{x,c})] + E_c[E_x(s2_{x,c})]      # (1) + (2) + (3)
    collapse = (1) / P        mean_var = (2) / P
    scale_var = E_c[Var_x(s_{x,c})] / E_c[E_x(s_{x,c})^2]
    ```

    Where the numbers go:

    - the Keras `logs` (History, CSVLogger listed after this callback, and the progress
      bar): three headline scalars, whatever the depth, over the monitored normalization
      layers (every monitored layer when none is a normalization): `fm/collapse_max`
      (the most collapsed layer, failure mode (i)), `fm/mean_var_min` and
      `fm/scale_var_min` (the layer with the least instance variability, failure mode
      (ii)); plus `fm/<layer>/<metric>` for each metric of `log_keys` when given;
    - `monitor.records` and `<log_dir>/failure_modes.json`: one record per measurement
      with every metric of every layer (`records[i]["layers"]`) and the headline
      (`records[i]["summary"]`);
    - TensorBoard (`<log_dir>/tensorboard`, when tensorboard is installed): the headline
      and `fm/<layer>/<metric>` for every layer and every metric of `POWER_METRICS`, and
      histograms of the channel means mu_c (`fm/<layer>/channel_mean`);
    - `<log_dir>/power_plot.png` at the end of training (stacked decomposition against
      depth, one panel per measurement; matplotlib needed).

    The model is only read: weights, moving statistics and the training step are
    unchanged. Epochs that are not measured log NaN.

    Runs on every Keras backend: in a `tf.function` on TensorFlow, in a `jax.jit` of the
    weights' values on JAX (no variable is ever assigned), eagerly on PyTorch.

    Args:
        data: the evaluation data: an array/tensor, a tuple `(x, y, ...)` or a finite (or
            `max_batches`-limited) `tf.data.Dataset`. A few hundred examples suffice.
        every_n_epochs: measure after epochs 1, 1 + n, 1 + 2n, ... Defaults to 1.
        every_n_steps: measure every n training steps instead (overrides epochs).
        at_train_begin: also measure before training (the initialization, label "init").
        include_convs: also decompose the outputs of convolution/dense layers.
        layers: names of the layers to monitor (default: every normalization).
        batch_size: batch size for array data. Defaults to 64.
        max_batches: at most this many batches per measurement.
        log_dir: folder for the JSON file, plots and TensorBoard events
            (`<log_dir>/tensorboard`); None writes no file.
        tensorboard: "auto" (when tensorboard is installed), True or False.
        plots: "auto" (when matplotlib is installed), True or False.
        log_keys: metrics also put into the Keras logs per layer, as
            `fm/<layer>/<metric>`: "default" = none (the three headline scalars only), a
            tuple of `POWER_METRICS` names (`("collapse", "mean_var", "scale_var")` was
            the default before the headline, 3 keys per layer in the progress bar), or
            "all".

    Example:

    >>> monitor = FailureModeMonitor(x_val[:256], log_dir="runs/ln_pn")
    >>> model.fit(ds, epochs=10, callbacks=[monitor, keras.callbacks.CSVLogger("log.csv")])
    >>> monitor.records[-1]["layers"][0]["collapse"]   # every layer; or the JSON file

    Reference:
        - [Labatie et al., 2021](https://arxiv.org/abs/2106.03743), Section 3, Fig. 2.
    """

    json_name = "failure_modes.json"
    DEFAULT_LOG_KEYS = ()
    # The headline in the logs: (name, metric, reduction over the layers); the worst layer
    # of each failure mode.
    HEADLINE = (("collapse_max", "collapse", max), ("mean_var_min", "mean_var", min),
                ("scale_var_min", "scale_var", min))

    def __init__(self, data, *, every_n_epochs=1, every_n_steps=None, at_train_begin=True,
                 include_convs=False, layers=None, batch_size=64, max_batches=None,
                 log_dir=None, tensorboard="auto", plots="auto", log_keys="default"):
        super().__init__(every_n_epochs=every_n_epochs, every_n_steps=every_n_steps,
                         at_train_begin=at_train_begin, log_dir=log_dir,
                         tensorboard=tensorboard, plots=plots, log_keys=log_keys)
        base.check_data(data, max_batches)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(
                f"`batch_size` must be a positive int. Received: batch_size={batch_size}")
        keys = {"default": self.DEFAULT_LOG_KEYS, "all": POWER_METRICS}.get(log_keys, log_keys)
        if isinstance(keys, str) or not set(keys) <= set(POWER_METRICS):
            raise ValueError(f"`log_keys` must be 'default', 'all' or a tuple of {POWER_METRICS}. "
                             f"Received: log_keys={log_keys!r}")
        self._keys = tuple(keys)
        self.data = data
        self.include_convs = include_convs
        self.layer_names = layers
        self.batch_size = batch_size
        self.max_batches = max_batches
        self.probe = None

    def _setup(self):
        self.probe = PowerProbe(self.model, training=False, include_convs=self.include_convs,
                                layers=self.layer_names)

    def _logged(self, key):
        # Headline keys have one "/" (`fm/collapse_max`), per-layer keys two.
        return key.count("/") == 1 or key.rsplit("/", 1)[-1] in self._keys

    def measure(self):
        layers = self.probe.measure(base.batches(self.data, self.batch_size, self.max_batches))
        scalars, histograms = {}, {}
        for layer in layers:
            for metric in POWER_METRICS:
                scalars[f"fm/{layer['name']}/{metric}"] = layer[metric]
            histograms[f"fm/{layer['name']}/channel_mean"] = layer.pop("channel_mean")
        summary = _headline(layers, self.HEADLINE)
        scalars.update({f"fm/{name}": value for name, value in summary.items()})
        return {"summary": summary, "layers": layers}, scalars, histograms

    def _plots(self, records):
        panels = [(r["label"], [layer for layer in r["layers"] if layer["kind"] == "norm"])
                  for r in records]
        return [_output.save_power_plot(panels, os.path.join(self.log_dir, "power_plot.png"))]

