"""Speed of the fused GroupNorm + Proxy Norm + ReLU op against TensorFlow's normalizations.

For every shape (NHWC, float32) and norm (GN(32), LN = GN(1), IN = GN(C)) this times, side by
side in one process, the forward (training mode) and the forward + backward (gradients of x
and of every parameter, with a fixed upstream gradient dy) of:

- fused GN+PN+ReLU: `tfpn.GroupNormAct(proxy_norm=True, implementation="fused")` in a
  tf.function (the proxy statistics are computed in TF at every call, as in training);
- the same layer on the reference path (`implementation="reference"`) in a tf.function and
  under XLA (`jit_compile=True`);
- the same layer without PN ("reference GN+ReLU XLA") under XLA: the XLA path of issue 15;
- `keras.layers.GroupNormalization` + ReLU (same groups; no PN) in a tf.function and under
  XLA ("Keras GN+ReLU XLA", the reference of the XLA targets);
- `keras.layers.BatchNormalization` + ReLU (training) in a tf.function and under XLA;
- `tf.compat.v1.nn.fused_batch_norm` (FusedBatchNormV3, training) + ReLU in a tf.function,
  the baseline of every ratio.

Each round calls every candidate once, in turn, so that load from other processes on the
machine hits all of them alike; after the warm-up, a candidate's time is the median over
rounds, and its ratio is the median over rounds of (its time / FusedBatchNormV3's time in the
same round). Bandwidth efficiency compares the bytes a memory-bound kernel must move with a
copy bandwidth measured in the same rounds (`np.copyto` of a float32 buffer of the size of
x into a preallocated one, timed between the candidates): forward + backward moves 5 tensors
of the size of x (read x, write y, read x and dy, write dx), the forward 2 (read x, write y).
"BW%" uses the medians; "best" uses the fastest round of the candidate and of the copy,
which is what the code reaches when other processes leave the cores alone.

    python benchmarks/bench_norm.py                        # every shape and norm (~5 min)
    python benchmarks/bench_norm.py --quick                # (8,56,56,256), GN only
    python benchmarks/bench_norm.py --shapes=8x56x56x256,2x56x56x256 --norms=gn,in
    python benchmarks/bench_norm.py --xla                  # XLA candidates (+ fused, FBN)
"""

import argparse
import gc
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_proxynorm as tfpn  # noqa: E402

tf.get_logger().setLevel("ERROR")  # one tf.function per candidate: retracing is expected

SHAPES = ((8, 56, 56, 256), (8, 28, 28, 512), (8, 14, 14, 1024), (8, 7, 7, 2048),
          (32, 56, 56, 64), (2, 56, 56, 256))
QUICK_SHAPES = ((8, 56, 56, 256),)
NORMS = {"gn": 32, "ln": 1, "in": -1}  # groups of GroupNormAct (-1: one per channel)
BASELINE = "FusedBatchNormV3+ReLU"
FUSED = "fused GN+PN+ReLU"
REF_XLA = "reference GN+PN+ReLU XLA"
REF_GN_XLA = "reference GN+ReLU XLA"      # the XLA path without PN
KERAS_GN_XLA = "Keras GN+ReLU XLA"
CANDIDATES = (FUSED, "reference GN+PN+ReLU", REF_XLA, REF_GN_XLA, "Keras GN+ReLU",
              KERAS_GN_XLA, "Keras BN+ReLU", "Keras BN+ReLU XLA", BASELINE)
# Targets of issue 15 (the XLA path): ratio to Keras GroupNormalization+ReLU under XLA.
XLA_TARGETS = ((REF_XLA, 1.0), (REF_GN_XLA, 0.9))
COPY = "copy"
FWD_PASSES, FWD_BWD_PASSES = 2, 5
EPSILON = 1e-3


def pass_bytes(shape, passes, itemsize=4):
    """Bytes of `passes` full reads or writes of a tensor of `shape` (the bandwidth model)."""
    return passes * int(np.prod(shape)) * itemsize


def _layer_candidate(layer, shape, jit_compile=False):
    """(forward, forward+backward) tf.functions of a Keras layer followed by nothing."""
    layer.build(shape)
    variables = layer.trainable_variables

    @tf.function(jit_compile=jit_compile)
    def forward(x):
        return layer(x, training=True)

    @tf.function(jit_compile=jit_compile)
    def forward_backward(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = layer(x, training=True)
        return tape.gradient(y, [x] + variables, output_gradients=dy)

    return forward, forward_backward


class NormThenRelu(keras.layers.Layer):
    """A Keras normalization layer followed by ReLU."""

    def __init__(self, norm, **kwargs):
        super().__init__(**kwargs)
        self.norm = norm

    def build(self, input_shape):
        self.norm.build(input_shape)

    def call(self, x, training=None):
        return tf.nn.relu(self.norm(x, training=training))


def _fused_batch_norm_candidate(shape):
    channels = shape[-1]
    gamma = tf.Variable(tf.ones([channels]))
    beta = tf.Variable(tf.zeros([channels]))

    def bn_relu(x):
        y, _, _ = tf.compat.v1.nn.fused_batch_norm(x, gamma, beta, epsilon=EPSILON,
                                                   is_training=True)
        return tf.nn.relu(y)

    @tf.function
    def forward(x):
        return bn_relu(x)

    @tf.function
    def forward_backward(x, dy):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = bn_relu(x)
        return tape.gradient(y, [x, gamma, beta], output_gradients=dy)

    return forward, forward_backward


def make_candidates(shape, groups, names=CANDIDATES):
    """name -> (forward, forward_backward) for one shape and one norm (groups of GN)."""
    keras_groups = shape[-1] if groups == -1 else groups
    builders = {
        FUSED: lambda: _layer_candidate(tfpn.GroupNormAct(
            groups=groups, proxy_norm=True, epsilon=EPSILON, implementation="fused"), shape),
        "reference GN+PN+ReLU": lambda: _layer_candidate(tfpn.GroupNormAct(
            groups=groups, proxy_norm=True, epsilon=EPSILON, implementation="reference"),
            shape),
        "reference GN+PN+ReLU XLA": lambda: _layer_candidate(tfpn.GroupNormAct(
            groups=groups, proxy_norm=True, epsilon=EPSILON, implementation="reference"),
            shape, jit_compile=True),
        REF_GN_XLA: lambda: _layer_candidate(tfpn.GroupNormAct(
            groups=groups, epsilon=EPSILON, implementation="reference"), shape,
            jit_compile=True),
        "Keras GN+ReLU": lambda: _layer_candidate(NormThenRelu(keras.layers.GroupNormalization(
            groups=keras_groups, epsilon=EPSILON)), shape),
        KERAS_GN_XLA: lambda: _layer_candidate(NormThenRelu(keras.layers.GroupNormalization(
            groups=keras_groups, epsilon=EPSILON)), shape, jit_compile=True),
        "Keras BN+ReLU": lambda: _layer_candidate(NormThenRelu(keras.layers.BatchNormalization(
            epsilon=EPSILON)), shape),
        "Keras BN+ReLU XLA": lambda: _layer_candidate(NormThenRelu(
            keras.layers.BatchNormalization(epsilon=EPSILON)), shape, jit_compile=True),
        BASELINE: lambda: _fused_batch_norm_candidate(shape),
    }
    return {name: builders[name]() for name in names}


def _time_once(fn, *args):
    start = time.perf_counter()
    out = fn(*args)  # CPU tf.functions run synchronously: the outputs are computed here
    elapsed = time.perf_counter() - start
    del out
    return elapsed


def measure(fns, args, repeats, copy, warmup=3):
    """Interleaved timing of fns(*args) and of `copy()`. Returns name -> array of per-round
    seconds, with the copy under the key COPY."""
    fns = {**fns, COPY: lambda *unused: copy()}
    for fn in fns.values():
        for _ in range(warmup):
            _time_once(fn, *args)
    times = {name: [] for name in fns}
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            for name, fn in fns.items():
                times[name].append(_time_once(fn, *args))
    finally:
        if gc_was_enabled:
            gc.enable()
    return {name: np.array(t) for name, t in times.items()}


def make_copy(shape):
    """A copy of a float32 buffer of `shape` into a preallocated one (the bandwidth probe)."""
    src = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
    dst = np.empty_like(src)
    return lambda: np.copyto(dst, src)


def run(shapes, norms, repeats, names=CANDIDATES, out=sys.stdout):
    """Benchmarks every (shape, norm); prints a table per pair; returns a list of result
    dicts with keys shape, norm, fwd, fwd_bwd (name -> median seconds), fwd_best,
    fwd_bwd_best (name -> fastest round), fwd_ratio, fwd_bwd_ratio (name -> median ratio to
    the baseline); the copy's times are under the name COPY."""
    results = []
    for shape in shapes:
        rng = np.random.default_rng(0)
        x = tf.constant(rng.standard_normal(shape, dtype=np.float32) * 2.0 + 0.5)
        dy = tf.constant(rng.standard_normal(shape, dtype=np.float32))
        copy = make_copy(shape)
        for norm in norms:
            fns = make_candidates(shape, NORMS[norm], names)
            fwd = measure({n: f[0] for n, f in fns.items()}, (x,), repeats, copy)
            fwd_bwd = measure({n: f[1] for n, f in fns.items()}, (x, dy), repeats, copy)
            result = {"shape": tuple(shape), "norm": norm}
            for key, times in (("fwd", fwd), ("fwd_bwd", fwd_bwd)):
                result[key] = {n: float(np.median(t)) for n, t in times.items()}
                result[key + "_best"] = {n: float(np.min(t)) for n, t in times.items()}
                base = times.get(BASELINE)
                result[key + "_ratio"] = {
                    n: float(np.median(t / base)) if base is not None else float("nan")
                    for n, t in times.items() if n != COPY}
                keras_xla = times.get(KERAS_GN_XLA)
                result[key + "_xla_ratio"] = {
                    n: float(np.median(t / keras_xla)) if keras_xla is not None else float("nan")
                    for n, t in times.items() if n != COPY}
            results.append(result)
            print_table(result, out)
    return results


def copy_bandwidth(result, key="fwd_bwd", best=False):
    """Bytes per second (read + written) of the copy timed in the rounds of `key`."""
    seconds = result[key + ("_best" if best else "")][COPY]
    return pass_bytes(result["shape"], 2) / seconds


def efficiency(result, name, key, best=False):
    """Share of the copy bandwidth reached by `name` in the pass model of `key`."""
    passes = FWD_PASSES if key == "fwd" else FWD_BWD_PASSES
    times = result[key + ("_best" if best else "")]
    return pass_bytes(result["shape"], passes) / times[name] / copy_bandwidth(result, key, best)


def print_table(result, out=sys.stdout):
    print(f"\n{'x'.join(map(str, result['shape']))} {result['norm'].upper()}: copy "
          f"{copy_bandwidth(result) / 1e9:.1f} GB/s (best {copy_bandwidth(result, best=True) / 1e9:.1f})"
          f"\n  {'':28s} {'fwd ms':>8s} {'x FBN':>6s} {'BW%':>5s}"
          f" {'fwd+bwd ms':>11s} {'x FBN':>6s} {'BW%':>5s} {'best':>5s}", file=out)
    for name in result["fwd_ratio"]:
        print(f"  {name:28s} {1e3 * result['fwd'][name]:8.2f} "
              f"{result['fwd_ratio'][name]:6.2f} {100 * efficiency(result, name, 'fwd'):5.0f} "
              f"{1e3 * result['fwd_bwd'][name]:11.2f} {result['fwd_bwd_ratio'][name]:6.2f} "
              f"{100 * efficiency(result, name, 'fwd_bwd'):5.0f} "
              f"{100 * efficiency(result, name, 'fwd_bwd', best=True):5.0f}", file=out, flush=True)


def check_targets(result):
    """The targets of the fused op (issue 3) -> (description, value, met) for one result."""
    fb, r = result["fwd_bwd"], result["fwd_bwd_ratio"]
    checks = []
    if FUSED not in fb:
        return checks
    if BASELINE in fb:
        checks.append(("fwd+bwd <= 1.0x FusedBatchNormV3+ReLU", f"{r[FUSED]:.2f}x",
                       r[FUSED] <= 1.0))
        fr = result["fwd_ratio"][FUSED]
        checks.append(("fwd <= 1.0x FusedBatchNormV3+ReLU", f"{fr:.2f}x", fr <= 1.0))
    for other, factor in (("Keras GN+ReLU", 3.0), ("reference GN+PN+ReLU XLA", 2.0)):
        if other in fb:
            speedup = fb[other] / fb[FUSED]
            checks.append((f">= {factor:g}x faster than {other}", f"{speedup:.1f}x",
                           speedup >= factor))
    eff = efficiency(result, FUSED, "fwd_bwd")
    best = efficiency(result, FUSED, "fwd_bwd", best=True)
    checks.append((">= 40% bandwidth efficiency (60% excellent), median rounds",
                   f"{100 * eff:.0f}%", eff >= 0.4))
    checks.append((">= 40% bandwidth efficiency (60% excellent), best rounds",
                   f"{100 * best:.0f}%", best >= 0.4))
    return checks


def check_xla_targets(result):
    """The targets of the XLA path (issue 15) -> (description, value, met) for one result:
    fwd+bwd ratio to Keras GroupNormalization+ReLU under XLA, median of per-round ratios."""
    r = result["fwd_bwd_xla_ratio"]
    return [(f"fwd+bwd {name} <= {limit:g}x {KERAS_GN_XLA}", f"{r[name]:.2f}x",
             r[name] <= limit) for name, limit in XLA_TARGETS if name in r and KERAS_GN_XLA in r]


def markdown(results):
    """The tables of docs/benchmarks.md: one row per (shape, norm)."""
    names = list(results[0]["fwd_ratio"]) if results else []
    lines = ["| shape | norm | " + " | ".join(f"{n} fwd+bwd ms (x FBN)" for n in names)
             + " | fused fwd ms (x FBN) | fused BW% (best) |",
             "|" + "---|" * (len(names) + 4)]
    for r in results:
        cells = [f"{1e3 * r['fwd_bwd'][n]:.1f} ({r['fwd_bwd_ratio'][n]:.2f})" for n in names]
        fused = (f"{1e3 * r['fwd'][FUSED]:.2f} ({r['fwd_ratio'][FUSED]:.2f})"
                 if FUSED in r["fwd"] else "-")
        eff = (f"{100 * efficiency(r, FUSED, 'fwd_bwd'):.0f} "
               f"({100 * efficiency(r, FUSED, 'fwd_bwd', best=True):.0f})"
               if FUSED in r["fwd"] else "-")
        lines.append(f"| {'x'.join(map(str, r['shape']))} | {r['norm'].upper()} | "
                     + " | ".join(cells) + f" | {fused} | {eff} |")
    return "\n".join(lines)


def parse_shape(text):
    try:
        shape = tuple(int(v) for v in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 4 or min(shape) < 1:
        raise argparse.ArgumentTypeError(f"a shape is NxHxWxC, e.g. 8x56x56x256. Received: {text}")
    return shape


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", type=lambda s: [parse_shape(v) for v in s.split(",")],
                        default=None, help="comma-separated NxHxWxC shapes (default: all six)")
    parser.add_argument("--norms", type=lambda s: s.split(","), default=None,
                        help="comma-separated subset of gn,ln,in (default: all)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds per candidate (default 15, 5 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke check: one shape (8x56x56x256), GN only, 5 rounds")
    parser.add_argument("--xla", action="store_true",
                        help="only the XLA candidates (issue 15), the fused op and the baseline")
    parser.add_argument("--markdown", action="store_true",
                        help="also print the summary table in Markdown")
    args = parser.parse_args(argv)
    norms = args.norms or (["gn"] if args.quick else list(NORMS))
    bad = [n for n in norms if n not in NORMS]
    if bad:
        parser.error(f"--norms must be a subset of {','.join(NORMS)}. Received: --norms={bad}")
    shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
    repeats = args.repeats or (5 if args.quick else 15)
    if repeats < 1:
        parser.error(f"--repeats must be >= 1. Received: --repeats={repeats}")
    if not tfpn.fused_op_available():
        print(f"The fused op is unavailable ({tfpn.fused.unavailable_reason()}); "
              "timing the other candidates only.")
        names = [n for n in CANDIDATES if n != FUSED]
    else:
        names = list(CANDIDATES)
    if args.xla:
        names = [n for n in names if n in (FUSED, REF_XLA, REF_GN_XLA, KERAS_GN_XLA,
                                           "Keras BN+ReLU XLA", BASELINE)]
    print(f"TensorFlow {tf.__version__}, {os.cpu_count()} CPUs, intra-op threads "
          f"{tf.config.threading.get_intra_op_parallelism_threads() or 'default'}, "
          f"load average {os.getloadavg()[0]:.2f}; medians of {repeats} rounds; ratios "
          f"'x FBN' are to {BASELINE}; BW% = (fwd: 2, fwd+bwd: 5) x size of x / time / copy "
          "bandwidth; best = fastest rounds")
    results = run(shapes, norms, repeats, names)
    print(f"load average at the end {os.getloadavg()[0]:.2f}")
    print("\nTargets (issue 3: fp32 (8,56,56,256) fwd+bwd; shown for every shape):")
    for r in results:
        for text, value, met in check_targets(r):
            print(f"  {'x'.join(map(str, r['shape'])):>12s} {r['norm'].upper():2s}  "
                  f"{'met ' if met else 'MISS'}  {text}: {value}")
    if any(KERAS_GN_XLA in r["fwd_bwd"] for r in results):
        print(f"\nTargets (issue 15: the XLA path, fwd+bwd, ratio to {KERAS_GN_XLA} in the "
              "same rounds):")
        for r in results:
            for text, value, met in check_xla_targets(r):
                print(f"  {'x'.join(map(str, r['shape'])):>12s} {r['norm'].upper():2s}  "
                      f"{'met ' if met else 'MISS'}  {text}: {value}")
    if args.markdown:
        print("\n" + markdown(results))
    return results


if __name__ == "__main__":
    main()
