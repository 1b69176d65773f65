"""Whole training steps with each normalization, with and without XLA, side by side.

Models (from `tf_proxynorm.models`): ResNet-50 v1.5 (batch 8, 112x112 by default) and the
CIFAR ResNet-20 (pre-activation, batch 64, 32x32), each built with the norms `bn`, `gn`,
`gn+pn`, `ln+pn`, `evonorm_s0` and `keras_gn`: `keras.layers.GroupNormalization` (+ the
activation) in the same places as `gn` (same groups: 32, lowered until they divide the
channels). Each model is compiled with SGD and sparse categorical cross-entropy, once with
`jit_compile=True` and once with `jit_compile=False`.

One round calls `train_on_batch` once on every (model, norm, jit) candidate, in turn, so
that load from other processes hits all of them alike. After the warm-up steps, a
candidate's time is the median over rounds, and its ratio is the median over rounds of
(its step time / the `keras_gn` model's step time with the same `jit_compile` in the same
round); the `vs gn` column is the same ratio to the `gn` model.

    python benchmarks/bench_step.py                          # both models, every norm
    python benchmarks/bench_step.py --models=resnet50 --norms=gn,gn+pn,keras_gn
    python benchmarks/bench_step.py --resnet_batch=32 --resnet_size=224 --rounds=10
    python benchmarks/bench_step.py --jit=on                 # XLA only (also: off, both)

Targets (issue 15): ResNet-50 under XLA, gn+pn <= 1.05x keras_gn; without XLA,
gn+pn <= 1.03x gn.
"""

import argparse
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_proxynorm as tfpn  # noqa: E402
from tf_proxynorm.ops.stats import largest_divisor_at_most  # noqa: E402

tf.get_logger().setLevel("ERROR")

NORMS = ("bn", "gn", "gn+pn", "ln+pn", "evonorm_s0", "keras_gn")
MODELS = ("resnet50", "cifar_resnet20")
KERAS_GN = "keras_gn"


class KerasGroupNormAct(keras.layers.Layer):
    """`keras.layers.GroupNormalization` followed by the activation: the Keras baseline."""

    def __init__(self, activation="relu", axis=-1, groups=None, **kwargs):
        for unused in ("center", "proxy_norm"):
            kwargs.pop(unused, None)
        super().__init__(**kwargs)
        self.activation = keras.activations.get(activation)
        self.axis = axis
        self.groups = groups
        self.norm = None

    def build(self, input_shape):
        channels = input_shape[self.axis]
        groups = self.groups or largest_divisor_at_most(channels, 32)
        self.norm = keras.layers.GroupNormalization(groups=groups, axis=self.axis,
                                                    epsilon=1e-3)
        self.norm.build(input_shape)

    def call(self, x):
        return self.activation(self.norm(x))


def build_model(model, norm, args):
    """A compiled-ready functional model and its (inputs, labels) batch."""
    norm_arg = KerasGroupNormAct if norm == KERAS_GN else norm
    if model == "resnet50":
        size, batch, classes = args.resnet_size, args.resnet_batch, 1000
        net = tfpn.models.resnet(50, "v1.5", norm=norm_arg, num_classes=classes,
                                 input_shape=(size, size, 3))
    elif model == "cifar_resnet20":
        size, batch, classes = 32, args.cifar_batch, 10
        net = tfpn.models.cifar_resnet(20, norm=norm_arg, num_classes=classes,
                                       input_shape=(size, size, 3))
    else:
        raise ValueError(model)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((batch, size, size, 3)).astype("float32"))
    y = tf.constant(rng.integers(0, classes, batch))
    return net, (x, y)


def make_candidates(models, norms, jits, args):
    """(model, norm, jit) -> a function running one training step."""
    candidates = {}
    for model in models:
        for norm in norms:
            for jit in jits:
                keras.utils.set_random_seed(0)
                net, (x, y) = build_model(model, norm, args)
                net.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9),
                            loss=keras.losses.SparseCategoricalCrossentropy(),
                            jit_compile=jit)
                candidates[(model, norm, jit)] = (
                    lambda net=net, x=x, y=y: net.train_on_batch(x, y))
    return candidates


def measure(candidates, rounds, warmup):
    for name, step in candidates.items():
        start = time.perf_counter()
        for _ in range(max(warmup, 1)):
            step()
        print(f"  warm-up of {name}: {time.perf_counter() - start:.0f} s (compiles the step)",
              flush=True)
    times = {name: [] for name in candidates}
    for _ in range(rounds):
        for name, step in candidates.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: np.array(t) for name, t in times.items()}


def report(times, out=sys.stdout):
    """Prints one table per (model, jit); returns {(model, norm, jit): (median s, ratio to
    keras_gn, ratio to gn)}."""
    summary = {}
    keys = sorted({(m, j) for m, _, j in times}, key=lambda k: (k[0], not k[1]))
    for model, jit in keys:
        print(f"\n{model}, jit_compile={jit}", file=out)
        print(f"  {'norm':12s} {'ms/step':>9s} {'vs keras_gn':>12s} {'vs gn':>7s}", file=out)
        base = times.get((model, KERAS_GN, jit))
        gn = times.get((model, "gn", jit))
        for (m, norm, j), t in times.items():
            if (m, j) != (model, jit):
                continue
            vs_keras = float(np.median(t / base)) if base is not None else float("nan")
            vs_gn = float(np.median(t / gn)) if gn is not None else float("nan")
            summary[(m, norm, j)] = (float(np.median(t)), vs_keras, vs_gn)
            print(f"  {norm:12s} {1e3 * np.median(t):9.1f} {vs_keras:12.3f} {vs_gn:7.3f}",
                  file=out, flush=True)
    return summary


def check_targets(summary):
    checks = []
    xla = summary.get(("resnet50", "gn+pn", True))
    if xla is not None and not np.isnan(xla[1]):
        checks.append(("ResNet-50, XLA: gn+pn <= 1.05x keras_gn", f"{xla[1]:.3f}x",
                       xla[1] <= 1.05))
    plain = summary.get(("resnet50", "gn+pn", False))
    if plain is not None and not np.isnan(plain[2]):
        checks.append(("ResNet-50, no XLA: gn+pn <= 1.03x gn", f"{plain[2]:.3f}x",
                       plain[2] <= 1.03))
    return checks


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", type=lambda s: s.split(","), default=list(MODELS),
                        help=f"comma-separated subset of {','.join(MODELS)}")
    parser.add_argument("--norms", type=lambda s: s.split(","), default=list(NORMS),
                        help=f"comma-separated subset of {','.join(NORMS)}")
    parser.add_argument("--jit", choices=("both", "on", "off"), default="both")
    parser.add_argument("--resnet_batch", type=int, default=8)
    parser.add_argument("--resnet_size", type=int, default=112)
    parser.add_argument("--cifar_batch", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (default 7)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per candidate")
    args = parser.parse_args(argv)
    for flag, values, allowed in (("--models", args.models, MODELS),
                                  ("--norms", args.norms, NORMS)):
        bad = [v for v in values if v not in allowed]
        if bad:
            parser.error(f"{flag} must be a subset of {','.join(allowed)}. Received: {bad}")
    if args.rounds < 1:
        parser.error(f"--rounds must be >= 1. Received: --rounds={args.rounds}")
    jits = {"both": (True, False), "on": (True,), "off": (False,)}[args.jit]
    print(f"TensorFlow {tf.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPUs, "
          f"fused op available: {tfpn.fused_op_available()}, load average "
          f"{os.getloadavg()[0]:.2f}; ResNet-50 batch {args.resnet_batch} at "
          f"{args.resnet_size}x{args.resnet_size}, CIFAR ResNet-20 batch {args.cifar_batch}; "
          f"medians of {args.rounds} rounds after {args.warmup} warm-up steps")
    start = time.perf_counter()
    candidates = make_candidates(args.models, args.norms, jits, args)
    times = measure(candidates, args.rounds, args.warmup)
    print(f"built, compiled and timed in {time.perf_counter() - start:.0f} s; load average "
          f"at the end {os.getloadavg()[0]:.2f}")
    summary = report(times)
    checks = check_targets(summary)
    if checks:
        print("\nTargets (issue 15):")
        for text, value, met in checks:
            print(f"  {'met ' if met else 'MISS'}  {text}: {value}")
    return summary


if __name__ == "__main__":
    main()
