"""One serving-form norm layer's cost, in passes of a ReLU over the same tensor.

`bench_serve.py` times whole networks; this times the layer it is made of
(`tf_proxynorm.layers.inference_norm.group_norm_act_inference`, GN with 32 groups, or the
largest divisor of C below, + ReLU + a PN output offset, as `export_saved_model` leaves a
GN+PN layer) on the shapes of ResNet-50's stages, next to a ReLU, which is about what BN costs at inference once folded
into the convolution (XLA: the affine + ReLU pass after the conv; the graph executor's
oneDNN fuses even that). Paths: `graph` (`tf.function`, TensorFlow's graph executor, as a
SavedModel is served), `xla` (`jit_compile=True`), `tflite` (`tf.lite.Interpreter`, 2
threads). Statistics: `auto` (what serving runs: raw sums when every group's mean is within
4 standard deviations of zero, the case here), `raw`, `shifted` (the form for inputs with a
large offset, one more pass).

Each path's functions are timed in turn within a round (interleaved, `--rounds`), each
`--calls` times; the median per-call time over rounds is divided by the ReLU's. Per-call
overhead (about 0.1-0.5 ms here) is in every number, so small tensors (batch 1) read
closer to 1 than the work alone would.

    python benchmarks/bench_serve_layer.py                 # batch 1 and 8, ~3 min
    python benchmarks/bench_serve_layer.py --quick         # a tiny smoke run
"""

import argparse
import os
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tf_proxynorm.layers import inference_norm  # noqa: E402

SHAPES = ((56, 56, 256), (28, 28, 512), (14, 14, 1024), (7, 7, 2048))
PATHS = ("graph", "xla", "tflite")
STATISTICS = ("auto", "raw", "shifted")    # the `statistics` settings timed
GROUPS = 32


def shape_parser(description, shapes, paths):
    """An argument parser with `--batches`, `--shapes` and `--paths` (also used by
    bench_sum_squares.py); `checked` parses those."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--batches", default="1,8")
    p.add_argument("--shapes", default=",".join("x".join(map(str, s)) for s in shapes),
                   help="HxWxC per example, comma-separated")
    p.add_argument("--paths", default=",".join(paths))
    return p


def checked(p, args, paths, quick_shape):
    """`args` with `batches`, `shapes` and `paths` as lists and `full_shapes` the tensors to
    time (`[quick_shape]`, with 2 rounds, under `--quick`), or `p.error` naming the value."""
    args.batches = [int(b) for b in args.batches.split(",")]
    args.paths = args.paths.split(",")
    try:
        shapes = [tuple(int(d) for d in s.split("x")) for s in args.shapes.split(",")]
    except ValueError:
        shapes = []
    if not shapes or any(len(s) != 3 or min(s) < 1 for s in shapes):
        p.error(f"--shapes takes HxWxC,...; Received: --shapes={args.shapes}")
    args.shapes = shapes
    bad = [q for q in args.paths if q not in paths]
    if bad:
        p.error(f"unknown --paths {bad}; choose from {list(paths)}. "
                f"Received: --paths={','.join(args.paths)}")
    args.full_shapes = [(b,) + s for b in args.batches for s in shapes]
    if args.quick:
        args.full_shapes, args.rounds = [quick_shape], 2
    return args


def parse(argv):
    p = shape_parser(__doc__.split("\n\n")[0], SHAPES, PATHS)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=5)
    p.add_argument("--quick", action="store_true", help="a (2, 8, 8, 64) tensor, 2 rounds")
    return checked(p, p.parse_args(argv), PATHS, (2, 8, 8, 64))


def _functions(shape, rng):
    """{name: f(x)} for the ReLU and each `statistics` setting."""
    c = shape[-1]
    groups = max(g for g in range(1, GROUPS + 1) if c % g == 0)   # as convert_model's rule
    gamma, beta, offset = (tf.constant(v.astype("float32")) for v in
                           (1 + 0.2 * rng.standard_normal(c), 0.2 * rng.standard_normal(c),
                            0.2 * rng.standard_normal(c)))

    def norm(statistics):
        return lambda x: inference_norm.group_norm_act_inference(
            x, gamma, beta, groups=groups, epsilon=1e-5, output_offset=offset,
            statistics=statistics)
    return {"relu": tf.nn.relu, **{s: norm(s) for s in STATISTICS}}


def _callables(path, fns, x):
    """{name: () -> output} running each function on `x` through `path` (traced once)."""
    spec = tf.TensorSpec(x.shape, tf.float32)
    out = {}
    for name, f in fns.items():
        traced = tf.function(f, input_signature=[spec], jit_compile=path == "xla")
        if path != "tflite":
            t = tf.constant(x)
            out[name] = lambda traced=traced, t=t: traced(t)
            continue
        converter = tf.lite.TFLiteConverter.from_concrete_functions(
            [traced.get_concrete_function()], traced)
        interp = tf.lite.Interpreter(model_content=converter.convert(), num_threads=2)
        interp.allocate_tensors()
        i, o = interp.get_input_details()[0]["index"], interp.get_output_details()[0]["index"]

        def run(interp=interp, i=i, o=o):
            interp.set_tensor(i, x)
            interp.invoke()
            return interp.get_tensor(o)
        out[name] = run
    return out


def measure(shape, path, args, rng):
    """{name: (median seconds per call, ratio to the ReLU)}, after checking that every
    statistics setting computes the same output."""
    x = rng.standard_normal(shape).astype("float32")
    calls = _callables(path, _functions(shape, rng), x)
    outs = {k: np.asarray(f()) for k, f in calls.items()}
    for s in STATISTICS[1:]:
        np.testing.assert_allclose(outs[s], outs["auto"], atol=1e-4, rtol=1e-4)
    times = {k: [] for k in calls}
    for r in range(args.rounds):
        names = list(calls)
        for k in names[r % len(names):] + names[:r % len(names)]:
            t = time.perf_counter()
            for _ in range(args.calls):
                calls[k]()
            times[k].append((time.perf_counter() - t) / args.calls)
    relu = float(np.median(times["relu"]))
    return {k: (float(np.median(v)), float(np.median(v)) / relu) for k, v in times.items()}


def main(argv=None):
    args = parse(argv)
    rng = np.random.default_rng(0)
    rows = []
    print("shape                 path    relu us  " + "  ".join(f"{s:>8}" for s in STATISTICS))
    for shape in args.full_shapes:
        for path in args.paths:
            res = measure(shape, path, args, rng)
            rows.append({"shape": shape, "path": path, **{k: v[1] for k, v in res.items()}})
            print(f"{str(shape):21} {path:7} {1e6 * res['relu'][0]:8.0f}  "
                  + "  ".join(f"{res[s][1]:8.2f}" for s in STATISTICS), flush=True)
    return rows


if __name__ == "__main__":
    main()
