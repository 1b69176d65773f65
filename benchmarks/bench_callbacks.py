"""Cost of the statistics callbacks: epoch time with and without each, side by side.

A small residual CNN (GN+PN) trains on synthetic 32x32 images; every configuration trains a
fresh copy of the same model for `--epochs` epochs with the callbacks at their default
frequency (every epoch). Two clocks, placed first and last in the callback list, split each
epoch into the training itself (epoch begin -> first `on_epoch_end`) and the callbacks'
work at the epoch end (first -> last `on_epoch_end`); `overhead` is their ratio measured
in the same epoch, so it does not depend on the load of a shared machine. Medians over the
epochs after the first (the first also traces the probes: its overhead is reported as the
one-time cost). `epoch ratio` compares whole epoch times with the no-callback run: side by
side, but sensitive to load changes between runs.

    python benchmarks/bench_callbacks.py                 # 200 steps of 32 per epoch
    python benchmarks/bench_callbacks.py --steps=400     # a longer epoch
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import time  # noqa: E402

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from absl import app, flags  # noqa: E402

import tf_proxynorm as tfpn  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_integer("steps", 200, "Training steps per epoch.")
flags.DEFINE_integer("batch", 32, "Training batch size.")
flags.DEFINE_integer("epochs", 3, "Epochs per configuration (the first is warm-up).")
flags.DEFINE_integer("width", 32, "Channels of the network.")
flags.DEFINE_integer("blocks", 3, "Residual blocks (2 conv + 2 norm each).")
flags.DEFINE_integer("eval_examples", 256, "Examples of the failure-mode subset.")
flags.DEFINE_integer("grad_examples", 64, "Examples of the gradient-scale batch.")
flags.DEFINE_string("norm", "gn+pn", "Normalization of the network.")
flags.DEFINE_string("jit", "auto", "jit_compile of model.compile: auto, true or false.")


def build_model(seed=0):
    keras.utils.set_random_seed(seed)
    norm = tfpn.resolve_norm_act(FLAGS.norm, **({"groups": 8} if "gn" in FLAGS.norm else {}))
    inputs = keras.Input((32, 32, 3))
    h = keras.layers.Conv2D(FLAGS.width, 3, padding="same")(inputs)
    h = norm()(h)
    for _ in range(FLAGS.blocks):
        r = keras.layers.Conv2D(FLAGS.width, 3, padding="same")(h)
        r = norm()(r)
        r = keras.layers.Conv2D(FLAGS.width, 3, padding="same")(r)
        r = norm(activation="linear")(r)
        h = keras.layers.ReLU()(keras.layers.Add()([h, r]))
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, keras.layers.Dense(10)(h))


class Clock(keras.callbacks.Callback):
    """Times of `on_epoch_begin` and `on_epoch_end` at its place in the callback list."""

    def on_train_begin(self, logs=None):
        self.begins, self.ends = [], []

    def on_epoch_begin(self, epoch, logs=None):
        self.begins.append(time.perf_counter())

    def on_epoch_end(self, epoch, logs=None):
        self.ends.append(time.perf_counter())


def run(make_callbacks, data, x_eval, y_eval):
    model = build_model()
    jit = {"auto": "auto", "true": True, "false": False}[FLAGS.jit.lower()]
    model.compile(keras.optimizers.SGD(0.01, momentum=0.9),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), jit_compile=jit)
    first, last = Clock(), Clock()
    callbacks = make_callbacks(x_eval, y_eval)
    model.fit(data, epochs=FLAGS.epochs, steps_per_epoch=FLAGS.steps, verbose=0,
              callbacks=[first] + callbacks + [last])
    train = np.subtract(first.ends, first.begins)
    extra = np.subtract(last.ends, first.ends)
    epoch = np.subtract(last.ends, first.begins)
    return (float(np.median(train[1:])), float(np.median(extra[1:])),
            float(np.median(extra[1:] / train[1:])), float(extra[0]), float(np.median(epoch[1:])))


def main(argv):
    del argv
    tf.get_logger().setLevel("ERROR")
    rng = np.random.default_rng(0)
    n = FLAGS.steps * FLAGS.batch
    x = rng.standard_normal((n, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, n).astype("int32")
    data = tf.data.Dataset.from_tensor_slices((x, y)).batch(FLAGS.batch).repeat().prefetch(2)
    configs = {
        "none": lambda xe, ye: [],
        "FailureModeMonitor": lambda xe, ye: [tfpn.callbacks.FailureModeMonitor(
            xe[:FLAGS.eval_examples], at_train_begin=False)],
        "GradientScaleMonitor": lambda xe, ye: [tfpn.callbacks.GradientScaleMonitor(
            (xe[:FLAGS.grad_examples], ye[:FLAGS.grad_examples]), at_train_begin=False)],
        "both": lambda xe, ye: [
            tfpn.callbacks.FailureModeMonitor(xe[:FLAGS.eval_examples], at_train_begin=False),
            tfpn.callbacks.GradientScaleMonitor(
                (xe[:FLAGS.grad_examples], ye[:FLAGS.grad_examples]), at_train_begin=False)],
    }
    print(f"model: {FLAGS.blocks} residual blocks, width {FLAGS.width}, {FLAGS.norm}; "
          f"epoch = {FLAGS.steps} steps of {FLAGS.batch} (32x32x3); jit_compile={FLAGS.jit}; "
          f"eval subsets {FLAGS.eval_examples} / {FLAGS.grad_examples} examples")
    results = {name: run(make, data, x, y) for name, make in configs.items()}
    base = results["none"][4]
    print("| callbacks | training (s/epoch) | callbacks (s/epoch) | overhead | "
          "first epoch: callbacks (s) | epoch ratio vs none |")
    print("|---|---|---|---|---|---|")
    for name, (train, extra, share, once, epoch) in results.items():
        print(f"| {name} | {train:.2f} | {extra:.3f} | {share:.1%} | {once:.2f} | "
              f"{epoch / base:.3f} |")


if __name__ == "__main__":
    app.run(main)
