"""GN/LN/IN + Proxy Norm + ReLU on the JAX backend against Keras' own GroupNormalization.

Under `KERAS_BACKEND=jax` every tf_proxynorm layer runs the `keras.ops` reference path
(`tf_proxynorm/ops/group_norm.py`, with its hand-derived `custom_gradient`), compiled by
`jax.jit`. For every shape (NHWC, float32) and norm (GN(32), LN = GN(1), IN = GN(C)) this
times, side by side in one process, the forward + backward (training mode; gradients of x
and of every trainable weight for a fixed upstream gradient) under `jax.jit` of:

- tfpn GN+PN+ReLU: `tfpn.GroupNormAct(groups, proxy_norm=True)`;
- tfpn GN+ReLU: the same layer without PN;
- Keras GN+ReLU: `keras.layers.GroupNormalization(groups)` + ReLU, the baseline of the
  ratios (issue 16's target: tfpn GN+PN+ReLU <= 1.0x).

Each round calls every candidate once, in turn; a candidate's ratio is the median over
rounds of its time / the baseline's time in the same round.

    KERAS_BACKEND=jax python benchmarks/bench_jax.py --markdown
    KERAS_BACKEND=jax python benchmarks/bench_jax.py --shapes=8x56x56x256 --norms=gn
"""

import argparse
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_proxynorm as tfpn  # noqa: E402

SHAPES = ((8, 56, 56, 256), (8, 28, 28, 512), (8, 14, 14, 1024), (8, 7, 7, 2048),
          (32, 56, 56, 64))
NORMS = {"gn": 32, "ln": 1, "in": -1}
BASELINE = "Keras GN+ReLU"
CANDIDATES = ("tfpn GN+PN+ReLU", "tfpn GN+ReLU", BASELINE)


class KerasGroupNormRelu(keras.layers.Layer):
    def __init__(self, groups, **kwargs):
        super().__init__(**kwargs)
        self.norm = keras.layers.GroupNormalization(groups)

    def build(self, input_shape):
        self.norm.build(input_shape)

    def call(self, x, training=None):
        return keras.ops.relu(self.norm(x, training=training))


def make_layer(name, channels, groups):
    groups = channels if groups == -1 else groups
    if name == BASELINE:
        return KerasGroupNormRelu(groups)
    return tfpn.GroupNormAct(groups=groups, proxy_norm="PN" in name)


def make_step(layer, shape):
    """A jitted fwd+bwd of `layer`: gradients of sum(y * dy) for x and every weight.

    `dy` is an argument of the jitted function, as an upstream gradient is in training
    (a constant would let XLA fold every reduction of it at compile time)."""
    layer.build(shape)
    trainable = [v.value for v in layer.trainable_variables]
    fixed = [v.value for v in layer.non_trainable_variables]
    dy = jax.numpy.asarray(np.random.default_rng(1).standard_normal(shape), "float32")

    def loss(x, weights, dy):
        y, _ = layer.stateless_call(weights, fixed, x, training=True)
        return (y * dy).sum()

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return lambda x: jax.block_until_ready(grad(x, trainable, dy))


def measure(steps, x, rounds, warmup=3):
    for _ in range(warmup):
        for step in steps.values():
            step(x)
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            start = time.perf_counter()
            step(x)
            times[name].append(time.perf_counter() - start)
    return times


def run(shapes, norms, rounds, out=sys.stdout):
    rows = []
    for shape in shapes:
        x = jax.numpy.asarray(np.random.default_rng(0).standard_normal(shape), "float32")
        for norm in norms:
            steps = {name: make_step(make_layer(name, shape[-1], NORMS[norm]), shape)
                     for name in CANDIDATES}
            times = measure(steps, x, rounds)
            base = np.array(times[BASELINE])
            row = {"shape": "x".join(map(str, shape)), "norm": norm.upper()}
            for name in CANDIDATES:
                row[name] = (1e3 * float(np.median(times[name])),
                             float(np.median(np.array(times[name]) / base)))
            rows.append(row)
            print(f"{row['shape']:>14} {row['norm']}  " + "  ".join(
                f"{name}: {ms:.2f} ms ({ratio:.2f}x)" for name, (ms, ratio) in
                ((n, row[n]) for n in CANDIDATES)), file=out, flush=True)
    return rows


def markdown(rows, out=sys.stdout):
    print("\n| shape | norm | " + " | ".join(f"{n} fwd+bwd ms (x {BASELINE})"
                                           for n in CANDIDATES) + " |", file=out)
    print("|---|---|" + "---|" * len(CANDIDATES), file=out)
    for row in rows:
        print(f"| {row['shape']} | {row['norm']} | " + " | ".join(
            f"{row[n][0]:.1f} ({row[n][1]:.2f})" for n in CANDIDATES) + " |", file=out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default=",".join("x".join(map(str, s)) for s in SHAPES),
                        help="comma-separated NxHxWxC shapes")
    parser.add_argument("--norms", default="gn,ln,in", help="subset of gn,ln,in")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds (default 15)")
    parser.add_argument("--markdown", action="store_true", help="also print a Markdown table")
    args = parser.parse_args(argv)
    if keras.backend.backend() != "jax":
        parser.error(f"run with KERAS_BACKEND=jax. Received: backend={keras.backend.backend()!r}")
    shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
    norms = args.norms.split(",")
    unknown = set(norms) - set(NORMS)
    if unknown:
        parser.error(f"--norms must be among gn, ln, in. Received: norms={args.norms!r}")
    print(f"JAX {jax.__version__}, Keras {keras.__version__}, {os.cpu_count()} CPUs, load "
          f"average {os.getloadavg()[0]:.2f}; fwd+bwd under jax.jit, medians of "
          f"{args.rounds} rounds; ratios to {BASELINE}")
    rows = run(shapes, norms, args.rounds)
    failed = [r for r in rows if r["tfpn GN+PN+ReLU"][1] > 1.0]
    for row in rows:
        ratio = row["tfpn GN+PN+ReLU"][1]
        print(f"  {'met ' if ratio <= 1.0 else 'MISS'}  {row['shape']} {row['norm']}: "
              f"tfpn GN+PN+ReLU <= 1.0x {BASELINE}: {ratio:.2f}x")
    if args.markdown:
        markdown(rows)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
