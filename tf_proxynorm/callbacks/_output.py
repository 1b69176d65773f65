"""Where the statistics go: JSON, TensorBoard (optional), PNG plots (optional).

TensorBoard and matplotlib are optional: `tensorboard_available` and
`matplotlib_available` detect them (tests monkeypatch these two functions), and nothing
fails without them. Plots use matplotlib's Agg canvas directly, without pyplot, so the
user's matplotlib backend is never changed.
"""

import importlib.util
import json
import math
import os

import numpy as np
import tensorflow as tf

# Colours of the three parts of the power decomposition (1), (2), (3).
PART_COLORS = ("#d62728", "#ff7f0e", "#1f77b4")
PART_LABELS = ("(1) channel-wise constant (collapse)", "(2) instance-mean variability",
               "(3) within-instance variation")


def tensorboard_available():
    """Whether `tf.summary.scalar` can write (it needs the tensorboard package)."""
    return importlib.util.find_spec("tensorboard") is not None and hasattr(tf.summary, "scalar")


def matplotlib_available():
    return importlib.util.find_spec("matplotlib") is not None


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, (np.floating, float)):
        value = float(value)
        return value if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    return value


class JsonLog:
    """A JSON file `{"meta": ..., "records": [...]}` rewritten atomically on each append."""

    def __init__(self, path, meta=None):
        self.path = path
        self.meta = meta or {}
        self.records = []
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def append(self, record):
        self.records.append(record)
        tmp = f"{self.path}.tmp"
        with open(tmp, "w") as f:
            json.dump(_jsonable({"meta": self.meta, "records": self.records}), f, indent=1)
        os.replace(tmp, self.path)


class TensorBoardLog:
    """Scalars and histograms into a TensorBoard event directory, with `tf.summary` on
    every Keras backend (TensorFlow is installed with the package); it is fed Python
    floats and NumPy arrays only."""

    def __init__(self, logdir):
        self.logdir = logdir
        self.writer = tf.summary.create_file_writer(logdir)

    def write(self, step, scalars, histograms=None):
        with self.writer.as_default(step=int(step)):
            for tag, value in scalars.items():
                if value is not None and math.isfinite(float(value)):
                    tf.summary.scalar(tag, float(value))
            for tag, values in (histograms or {}).items():
                tf.summary.histogram(tag, np.asarray(values, np.float32))
        self.writer.flush()

    def close(self):
        self.writer.close()


def _figure(rows, cols, width=4.2, height=3.2, integer_x=True):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False)
    if integer_x:
        for ax in axes.flat:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, axes


def spaced(items, limit):
    """At most `limit` items, evenly spaced, always with the first and the last."""
    if len(items) <= limit:
        return list(items)
    picks = np.unique(np.round(np.linspace(0, len(items) - 1, limit)).astype(int))
    return [items[i] for i in picks]


def save_power_plot(panels, path, max_panels=8, cols=4):
    """Stacked power decomposition against depth, one panel per `(title, layers)`.

    `layers` is a list of dicts with `collapse`, `mean_var` and `power`, `constant`,
    `instance_mean`, `within` (as `PowerAccumulator.result`), in depth order.
    """
    panels = spaced([p for p in panels if p[1]], max_panels)
    if not panels:
        return None
    cols = min(cols, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = _figure(rows, cols, width=3.6, height=2.9)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (title, layers) in zip(axes.flat, panels):
        depth = np.arange(1, len(layers) + 1)
        power = np.array([layer["power"] for layer in layers], np.float64)
        safe_power = np.where(power > 0, power, 1)
        parts = [np.array([layer[k] for layer in layers], np.float64) / safe_power
                 for k in ("constant", "instance_mean", "within")]
        ax.stackplot(depth, *parts, colors=PART_COLORS, labels=PART_LABELS, alpha=0.85)
        ax.set_title(title, fontsize=10)
        ax.set_xlim(depth[0], max(depth[-1], depth[0] + 1))
        ax.set_ylim(0, 1)
        ax.set_xlabel("depth (normalization layer)")
        ax.set_ylabel("share of power P(y)")
        ax.grid(alpha=0.3)
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="outside lower center", ncol=3,
               fontsize=9)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def save_depth_profiles(panels, records, path, max_lines=8, categorical=False):
    """Line plots against depth, one line per record (monitored epoch), one panel per
    `(title, section, key, log_scale)`; `record[section]` is a list of per-layer dicts.
    `categorical` colours the lines with a qualitative map (records that are not epochs)."""
    records = spaced(list(records), max_lines) if not categorical else list(records)
    if not records:
        return None
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = _figure(rows, cols)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    from matplotlib import colormaps
    colors = (colormaps["tab10"](np.arange(len(records)) % 10) if categorical
              else colormaps["viridis"](np.linspace(0, 0.9, len(records))))
    for ax, (title, section, key, log_scale) in zip(axes.flat, panels):
        for color, record in zip(colors, records):
            rows_ = record.get(section) or []
            values = np.array([r.get(key, np.nan) for r in rows_], np.float64)
            if values.size:
                ax.plot(np.arange(1, values.size + 1), values, marker=".", color=color,
                        label=record["label"])
        if log_scale:
            ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("depth")
        ax.grid(alpha=0.3)
    fig.legend(*axes.flat[0].get_legend_handles_labels(), loc="outside right center", fontsize=8)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def save_curves(curves, path, title, xlabel, ylabel, log_x=True, log_y=False):
    """One panel of `(label, xs, ys)` curves."""
    if not curves:
        return None
    fig, axes = _figure(1, 1, width=5.0, height=3.6, integer_x=False)
    ax = axes[0, 0]
    from matplotlib import colormaps
    colors = colormaps["viridis"](np.linspace(0, 0.9, len(curves)))
    for color, (label, xs, ys) in zip(colors, curves):
        ax.plot(xs, ys, marker="o", color=color, label=label)
    if log_x:
        ax.set_xscale("log")
    if log_y:
        ax.set_yscale("log")
    ax.axhline(1.0, color="grey", lw=0.8, ls="--")
    ax.set_title(title, fontsize=10)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    return path
