"""Scheduling and output shared by the statistics callbacks."""

import math
import os
import time
import warnings

import keras
import tensorflow as tf

from tf_proxynorm import _backend
from tf_proxynorm.callbacks import _output


def _check_frequency(name, value):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"`{name}` must be a positive int or None. Received: {name}={value!r}")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"`{name}` must be one of {choices}. Received: {name}={value!r}")


def split_data(data):
    """`x` of an array, a tensor, a tuple `(x, y, ...)` or a dict-free structure."""
    if isinstance(data, tuple):
        return data[0], (data[1] if len(data) > 1 else None)
    return data, None


def batches(data, batch_size, max_batches):
    """Yields model inputs `x` from an array/tensor/tuple or a `tf.data.Dataset` (its
    elements as NumPy arrays on the backends other than TensorFlow)."""
    if isinstance(data, tf.data.Dataset):
        for i, element in enumerate(data):
            if max_batches is not None and i >= max_batches:
                return
            yield _backend.to_inputs(split_data(element)[0])
        return
    x, _ = split_data(data)
    n = int(keras.tree.flatten(x)[0].shape[0])
    for i, start in enumerate(range(0, n, batch_size)):
        if max_batches is not None and i >= max_batches:
            return
        yield keras.tree.map_structure(lambda t, s=start: t[s:s + batch_size], x)


def check_data(data, max_batches):
    """Raises early on data the callbacks cannot iterate."""
    if isinstance(data, tf.data.Dataset):
        if data.cardinality() == tf.data.INFINITE_CARDINALITY and max_batches is None:
            raise ValueError("`data` is an infinite tf.data.Dataset: pass `max_batches`. "
                             "Received: max_batches=None")
        return
    x, _ = split_data(data)
    flat = keras.tree.flatten(x)
    if not flat or not hasattr(flat[0], "shape") or len(flat[0].shape) < 1:
        raise ValueError("`data` must be an array, a tensor, a tuple `(x, y)` or a "
                         f"tf.data.Dataset. Received: data of type {type(data).__name__}")


class StatisticsCallback(keras.callbacks.Callback):
    """Runs `measure()` every N epochs or steps and sends its scalars to the Keras `logs`
    (so History, CSVLogger and the progress bar see them), TensorBoard, a JSON file and
    plots. Subclasses implement `_setup()`, `measure()` and `_plots(records)`."""

    json_name = "statistics.json"

    def __init__(self, every_n_epochs=1, every_n_steps=None, at_train_begin=True, log_dir=None,
                 tensorboard="auto", plots="auto", log_keys="default"):
        super().__init__()
        _check_frequency("every_n_epochs", every_n_epochs)
        _check_frequency("every_n_steps", every_n_steps)
        if every_n_steps is not None:
            every_n_epochs = None
        if every_n_epochs is None and every_n_steps is None:
            raise ValueError("Pass `every_n_epochs` or `every_n_steps`. "
                             "Received: every_n_epochs=None, every_n_steps=None")
        _check_choice("tensorboard", tensorboard, ("auto", True, False))
        _check_choice("plots", plots, ("auto", True, False))
        if log_dir is None and (tensorboard is True or plots is True):
            raise ValueError("`tensorboard=True` and `plots=True` need a `log_dir`. "
                             "Received: log_dir=None")
        self.every_n_epochs = every_n_epochs
        self.every_n_steps = every_n_steps
        self.at_train_begin = bool(at_train_begin)
        self.log_dir = None if log_dir is None else os.fspath(log_dir)
        self.tensorboard = tensorboard
        self.plots = plots
        self.log_keys = log_keys
        self.records = []
        self._json = self._tb = None
        self._latest = {}
        self._step = 0
        self._epoch = 0
        self._measured_step = -1
        self._epoch_start_step = 0

    # -- subclass API ------------------------------------------------------------------------
    def _setup(self):
        """Builds probes for `self.model` (called once, at the first measurement)."""

    def measure(self):
        """Returns `(record, scalars, histograms)` for the current weights."""
        raise NotImplementedError

    def _logged(self, key):
        """Whether a scalar key goes into the Keras logs (all go to TensorBoard/JSON)."""
        return True

    def _plots(self, records):
        """Writes the PNG files; returns their paths."""
        return []

    # -- machinery ---------------------------------------------------------------------------
    def _run(self, label):
        if not hasattr(self, "_ready"):
            self._setup()
            self._ready = True
        self._step = self._current_step()
        start = time.perf_counter()
        record, scalars, histograms = self.measure()
        record = {"label": label, "epoch": self._epoch, "step": self._step,
                  "seconds": time.perf_counter() - start, **record}
        self.records.append(record)
        if self._json is not None:
            self._json.append(record)
        if self._tb is not None:
            self._tb.write(self._epoch if self.every_n_epochs else self._step, scalars,
                           histograms)
        self._latest = {k: v for k, v in scalars.items() if self._logged(k)}
        self._measured_step = self._step
        return self._latest

    def _current_step(self):
        """The optimizer's iteration count (exact under `steps_per_execution`), else the
        number of `on_train_batch_end` calls. (On JAX, `self.model` first brings the
        training state back onto the model's variables.)"""
        optimizer = getattr(self.model, "optimizer", None)
        if optimizer is not None and getattr(optimizer, "iterations", None) is not None:
            return int(_backend.to_numpy(optimizer.iterations.value))
        return self._step

    def on_epoch_begin(self, epoch, logs=None):
        # On JAX the variables are detached from the model during an epoch (reading them
        # forces a state sync), so the steps are counted from the epoch's first step and
        # the batch index Keras passes, exact under `steps_per_execution` too.
        if self.every_n_steps and _backend.backend() == "jax":
            self._epoch_start_step = self._current_step()

    def on_train_begin(self, logs=None):
        self.records = []
        self._step = self._epoch_start_step = self._current_step()
        self._epoch = 0
        self._latest = {}
        if self.log_dir is not None:
            self._json = _output.JsonLog(os.path.join(self.log_dir, self.json_name),
                                         meta={"callback": type(self).__name__})
            if self.tensorboard and (self.tensorboard is True or _output.tensorboard_available()):
                if not _output.tensorboard_available():
                    raise ValueError("`tensorboard=True` needs the tensorboard package "
                                     "(pip install tensorboard). Received: tensorboard=True")
                self._tb = _output.TensorBoardLog(os.path.join(self.log_dir, "tensorboard"))
        if self.at_train_begin:
            if self.model.built:
                self._run("init")
            else:
                warnings.warn(f"{type(self).__name__}: the model is not built before training "
                              "(no Input), so the initialization is not measured.",
                              stacklevel=2)

    def on_train_batch_end(self, batch, logs=None):
        self._step += 1
        if not self.every_n_steps:
            return
        if _backend.backend() == "jax":
            self._step = self._epoch_start_step + batch + 1
        else:
            self._step = self._current_step()
        if self._step // self.every_n_steps > max(self._measured_step, 0) // self.every_n_steps:
            values = self._run(f"step {self._step}")
            if logs is not None:
                logs.update(values)

    def on_epoch_end(self, epoch, logs=None):
        self._epoch = epoch + 1
        if self.every_n_epochs and epoch % self.every_n_epochs == 0:
            self._run(f"epoch {epoch + 1}")
            values = self._latest
        elif self.every_n_epochs:
            # Unmeasured epoch: NaN keeps History's lists aligned with the epochs.
            values = {k: math.nan for k in self._latest}
        else:
            values = self._latest
        if logs is not None:
            logs.update(values)

    def on_train_end(self, logs=None):
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self.log_dir is not None and self.records and self.plots and (
                self.plots is True or _output.matplotlib_available()):
            if not _output.matplotlib_available():
                raise ValueError("`plots=True` needs matplotlib (pip install matplotlib). "
                                 "Received: plots=True")
            self.plot_paths = [p for p in self._plots(self.records) if p]
