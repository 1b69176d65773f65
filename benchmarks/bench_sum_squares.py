"""Single-op candidates for GroupNorm's per-channel sum of squares, in reads of the tensor.

What is left between the serving form and BN (issue 22, docs/benchmarks.md) is GroupNorm's
statistics: a BN model reads nothing for its norm at inference, the serving form reads
every normalized activation for `sum(x)` and again for `sum(x * x)`, and TensorFlow
writes `x * x` as a full-size temporary in between. Serving at BN's cost would need the
sum of squares in about one read. This times every single-op way to get it that
TensorFlow's graph executor (`graph`, how a SavedModel is served) and XLA (`xla`) offer,
against `sum` (`sum(x)`: one read, the floor) and `relu` (a read and a write), on the
shapes of ResNet-50's stages, and checks each against float64:

`sum` is each path's fastest form: a batched matmul with a row of ones in the graph
executor, a reduce of the `(N, P, C)` view under XLA (which XLA:CPU hands to YNNPACK).

- graph: `square_matmul` (what the serving form runs: `Square`, then a batched matmul
  with a row of ones; TFLite-legal), `euclidean_norm` (`EuclideanNorm`: one op, no
  temporary; not a TFLite builtin), and, at batch 1 only (they sum over the batch too),
  `batch_norm_stats` (`FusedBatchNormV3` in training mode: per-channel mean and variance,
  and an output it writes) and `depthwise_filter_grad`
  (`DepthwiseConv2dNativeBackpropFilter(x, x)`);
- xla: `reduce` (`sum(x * x)` of the `(N, P, C)` view: a loop fusion writes `x * x`, a
  reduce-window and YNNPACK sum it), `sliced` (what the serving form compiles, from 256
  positions: the squares of 8 slices of the positions added in one loop fusion, then
  reduced), `variadic_reduce`
  (`sum(x)` and `sum(x * x)` as one multi-output reduce, `tf2xla`'s op) and `einsum`
  (`"nhwc,nhwc->nc"`).

Each candidate runs on `--inputs` distinct tensors per call (inter-op parallelism 1, so
one at a time), timed in turn within each round; the table gives median time over rounds
divided by `sum`'s.

    python benchmarks/bench_sum_squares.py             # batch 1 and 8, ~3 min
    python benchmarks/bench_sum_squares.py --quick     # a tiny smoke run
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import bench_serve_layer  # noqa: E402
from tf_proxynorm.layers import inference_norm  # noqa: E402

SHAPES = ((112, 112, 64), (56, 56, 256), (28, 28, 512), (14, 14, 1024), (7, 7, 2048))
PATHS = ("graph", "xla")


def _positions(x):
    """`x` as (N, P, C), the serving form's view."""
    return tf.reshape(x, (-1, x.shape[1] * x.shape[2], x.shape[3]))


def _sum_matmul(x):
    v = _positions(x)
    return tf.reshape(tf.matmul(tf.ones((1, 1, v.shape[1])), v), (-1, v.shape[2]))


def _square_matmul(x):
    return _sum_matmul(tf.square(x))


def _euclidean_norm(x):
    return tf.square(tf.math.reduce_euclidean_norm(x, axis=(1, 2)))


def _batch_norm_stats(x):
    c = x.shape[-1]
    _, mean, var = tf.raw_ops.FusedBatchNormV3(
        x=x, scale=tf.ones(c), offset=tf.zeros(c), mean=tf.zeros(0), variance=tf.zeros(0),
        epsilon=0.0, exponential_avg_factor=1.0, is_training=True)[:3]
    p = x.shape[1] * x.shape[2]     # the variance output is Bessel-corrected
    return tf.reshape(p * (var * ((p - 1) / p) + mean * mean), (1, c))


def _depthwise_filter_grad(x):
    c = x.shape[-1]
    return tf.reshape(tf.raw_ops.DepthwiseConv2dNativeBackpropFilter(
        input=x, filter_sizes=[1, 1, c, 1], out_backprop=x, strides=[1, 1, 1, 1],
        padding="VALID"), (1, c))


def _sliced(x):
    v = _positions(x)
    slices = inference_norm._slices(v, v.shape[1], last=True)    # 8 from 256 positions
    return tf.reshape(inference_norm._sum_positions(v, True, v.shape[1], square=True,
                                                    slices=slices), (-1, v.shape[2]))


def _variadic_reduce(x):
    from tensorflow.compiler.tf2xla.python import xla

    @tf.function(autograph=False)
    def add(a1, a2, b1, b2):
        return a1 + b1, a2 + b2
    zero = tf.constant(0.0)
    return xla.variadic_reduce([x, x * x], [zero, zero], [1, 2],
                               add.get_concrete_function(zero, zero, zero, zero))[1]


def candidates(path, batch):
    """{name: f(x) -> (N, C) sum over the positions of x * x} ("sum", "relu": references)."""
    if path == "graph":
        out = {"sum": _sum_matmul, "relu": tf.nn.relu}
        out.update(square_matmul=_square_matmul, euclidean_norm=_euclidean_norm)
        if batch == 1:
            out.update(batch_norm_stats=_batch_norm_stats,
                       depthwise_filter_grad=_depthwise_filter_grad)
    else:
        out = {"sum": lambda x: tf.reduce_sum(_positions(x), axis=1), "relu": tf.nn.relu}
        out.update(reduce=lambda x: tf.reduce_sum(tf.square(_positions(x)), axis=1),
                   sliced=_sliced,
                   variadic_reduce=_variadic_reduce,
                   einsum=lambda x: tf.einsum("nhwc,nhwc->nc", x, x))
    return out


def parse(argv):
    p = bench_serve_layer.shape_parser(__doc__.split("\n\n")[0], SHAPES, PATHS)
    p.add_argument("--rounds", type=int, default=21)
    p.add_argument("--inputs", type=int, default=8, help="distinct tensors per call")
    p.add_argument("--quick", action="store_true", help="(1, 8, 8, 64), 2 rounds")
    return bench_serve_layer.checked(p, p.parse_args(argv), PATHS, (1, 8, 8, 64))


def measure(shape, path, args, rng):
    """{name: (ratio of its median time to `sum`'s, max relative error vs float64)}."""
    xs = [rng.standard_normal(shape).astype("float32") * 2 + 0.5 for _ in range(args.inputs)]
    want = np.sum(np.square(xs[0], dtype=np.float64), axis=(1, 2))
    calls, errors = {}, {}
    for name, f in candidates(path, shape[0]).items():
        fn = tf.function(lambda ts, f=f: [f(t) for t in ts], jit_compile=path == "xla",
                         autograph=False)
        ts = [tf.constant(x) for x in xs]
        got = np.asarray(fn(ts)[0], np.float64)
        if name not in ("sum", "relu"):
            errors[name] = float(np.max(np.abs(got / want - 1)))
        calls[name] = lambda fn=fn, ts=ts: fn(ts)
    times = {k: [] for k in calls}
    names = list(calls)
    for r in range(args.rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            calls[k]()
            times[k].append(time.perf_counter() - t)
    floor = float(np.median(times["sum"]))
    return {k: (float(np.median(v)) / floor, errors.get(k, 0.0)) for k, v in times.items()}


def main(argv=None):
    args = parse(argv)
    tf.get_logger().setLevel("ERROR")     # one tf.function per candidate and shape
    try:
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:    # TensorFlow already initialized (the tests): leave it
        pass
    rng = np.random.default_rng(0)
    rows = []
    for shape in args.full_shapes:
        for path in args.paths:
            res = measure(shape, path, args, rng)
            rows.append({"shape": shape, "path": path, **res})
            print(f"{str(shape):20} {path:5} " + "  ".join(
                f"{k} {r:.2f}" + (f" (err {e:.0e})" if e else "")
                for k, (r, e) in res.items()), flush=True)
    return rows


if __name__ == "__main__":
    main()
