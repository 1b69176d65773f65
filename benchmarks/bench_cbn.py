"""Training-step cost of Cross-Iteration BN: CBNConv2D vs Conv2D + BatchNormAct.

One 3x3 'same' convolution + norm + ReLU, trained with SGD (forward, backward, update) in a
`tf.function`, three ways side by side: Conv2D + BatchNormAct, CBNConv2D (window 4) with
pooling active, and CBNConv2D still in burn-in (plain BN; the derivatives are skipped).
Rounds are interleaved (A, B, C, A, B, C, ...) so that load on the shared machine hits all
variants alike; each ratio is the median over rounds of the per-round time ratio.

CBN's extra work per step is one backward-filter convolution (d var / dW), a probe
convolution with one filter per group (d mean / dW), and the buffer updates.

    python benchmarks/bench_cbn.py                      # eager-graph and XLA
    python benchmarks/bench_cbn.py --configs=8x32x64 --rounds=9
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
flags.DEFINE_list("configs", ["8x32x64", "32x16x128"], "Batch x size x channels per run.")
flags.DEFINE_integer("rounds", 7, "Interleaved rounds per configuration.")
flags.DEFINE_integer("calls", 5, "Training steps per variant per round (timed together).")


def train_step(layers, jit_compile):
    variables = [v for layer in layers for v in layer.trainable_variables]

    @tf.function(jit_compile=jit_compile)
    def step(x):
        with tf.GradientTape() as tape:
            y = x
            for layer in layers:
                y = layer(y, training=True)
            loss = tf.reduce_mean(tf.square(y))
        for v, g in zip(variables, tape.gradient(loss, variables)):
            v.assign_sub(0.01 * g)
        return loss

    return step


def variants(channels):
    conv = keras.layers.Conv2D(channels, 3, padding="same", use_bias=False)
    return {
        "conv+BN": [conv, tfpn.BatchNormAct(activation="relu")],
        "CBN": [tfpn.CBNConv2D(channels, 3, padding="same", activation="relu")],
        "CBN burn-in": [tfpn.CBNConv2D(channels, 3, padding="same", activation="relu",
                                       burnin_steps=10**9)],
    }


def measure(config, jit_compile):
    batch, size, channels = (int(v) for v in config.split("x"))
    x = tf.random.normal((batch, size, size, channels))
    steps = {name: train_step(layers, jit_compile) for name, layers in variants(channels).items()}
    for step in steps.values():   # trace, compile, fill the CBN window
        for _ in range(4):
            step(x).numpy()
    times = {name: [] for name in steps}
    for _ in range(FLAGS.rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            for _ in range(FLAGS.calls):
                step(x).numpy()
            times[name].append((time.perf_counter() - start) / FLAGS.calls)
    base = np.array(times["conv+BN"])
    cells = [f"conv+BN {np.median(base) * 1e3:.1f} ms"]
    for name in ("CBN", "CBN burn-in"):
        ratio = np.median(np.array(times[name]) / base)
        cells.append(f"{name} {np.median(times[name]) * 1e3:.1f} ms (x{ratio:.2f})")
    print(f"{config} jit_compile={jit_compile}: " + ", ".join(cells), flush=True)


def main(_):
    print(f"devices: {[d.device_type for d in tf.config.list_logical_devices()]}")
    for config in FLAGS.configs:
        for jit_compile in (False, True):
            measure(config, jit_compile)


if __name__ == "__main__":
    app.run(main)
