"""Where serving time goes: TensorFlow's graph executor profiled op type by op type.

For the BN network and its GN+PN twin (`bench_serve.py`'s models, random non-trivial norm
parameters), traces `--calls` calls of each inference `tf.function` with `tf.profiler`, the
models in turn, and prints, per call, the op time summed by op type, side by side:

- `bn`: the BN model (Keras' BN at inference: its own elementwise ops, not folded);
- `serving`: `fold_for_inference(model, inference_layers=True)`, the graph that
  `tfpn.export_saved_model` exports and a SavedModel's `serve` runs;
- `fused`: the unfolded GN+PN model on the fused op (where the library is built).

Op times overlap when the executor runs ops side by side (2 cores here), so a column sums
to more than `Run`, the whole call. One trace is one sample: compare within a run.

    python benchmarks/profile_serve.py                  # ResNet-50 224x224 batch 1, ~1 min
    python benchmarks/profile_serve.py --batch=8 --top=12
    python benchmarks/profile_serve.py --quick          # CIFAR ResNet-20 at 16x16 (tests)
"""

import argparse
import collections
import glob
import os
import sys
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import bench_serve  # noqa: E402
import tf_proxynorm as tfpn  # noqa: E402


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="resnet50", choices=sorted(bench_serve.MODELS))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--size", type=int, default=None, help="image size (default: the model's)")
    p.add_argument("--calls", type=int, default=5, help="traced calls per model")
    p.add_argument("--top", type=int, default=16, help="op types shown")
    p.add_argument("--quick", action="store_true", help="CIFAR ResNet-20 at 16x16, 1 call")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.size, args.calls = "cifar_resnet20", args.size or 16, 1
    for name in ("batch", "calls", "top"):
        if getattr(args, name) < 1:
            p.error(f"--{name} takes a positive int; Received: --{name}={getattr(args, name)}")
    return args


def _trace(fn, x):
    """{op type: microseconds} of one traced call of `fn(x)`; "Run" is the whole call."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2
    with tempfile.TemporaryDirectory() as logdir:
        tf.profiler.experimental.start(logdir)
        try:
            fn(x)
        finally:
            tf.profiler.experimental.stop()
        space = xplane_pb2.XSpace()
        with open(glob.glob(f"{logdir}/**/*.xplane.pb", recursive=True)[0], "rb") as f:
            space.ParseFromString(f.read())
    totals = collections.defaultdict(float)
    for plane in space.planes:
        names = {k: m.name for k, m in plane.event_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                name = names.get(event.metadata_id, "")
                if name == "KernelAndDeviceFunc::Run":
                    totals["Run"] += event.duration_ps / 1e6
                elif ":" in name and "::" not in name and ": " not in name:
                    totals[name.rsplit(":", 1)[1]] += event.duration_ps / 1e6  # node:op
    return totals


def op_times(fns, x, calls):
    """{column: {op type: microseconds per call}}: `calls` traced calls of each function,
    in turn (one of each per round, so that load on a shared machine hits all alike),
    after two untraced calls each (Grappler and the first-call costs)."""
    for fn in fns.values():
        fn(x)
        fn(x)
    out = {k: collections.defaultdict(float) for k in fns}
    for _ in range(calls):
        for k, fn in fns.items():
            for op, us in _trace(fn, x).items():
                out[k][op] += us / calls
    return out


def models(args, rng):
    """{column: inference function} for the BN, serving-form and fused-op models."""
    builder, default_size = bench_serve.MODELS[args.model]
    size = args.size or default_size
    bn, gn_pn = builder("bn", size), builder("gn+pn", size)
    for model in (bn, gn_pn):
        bench_serve._randomize(model, rng)
    serving = tfpn.fold_for_inference(gn_pn, inference_layers=True)
    out = {"bn": bn, "serving": serving}
    if tfpn.fused_op_available():
        out["fused"] = gn_pn
    spec = tf.TensorSpec((args.batch, size, size, 3), tf.float32)
    return size, {k: tf.function(lambda t, m=m: m(t, training=False)).get_concrete_function(
        spec) for k, m in out.items()}


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    rng = np.random.default_rng(0)
    size, fns = models(args, rng)
    x = tf.constant(rng.standard_normal((args.batch, size, size, 3)).astype("float32"))
    columns = op_times(fns, x, args.calls)
    ops = sorted({op for c in columns.values() for op in c if op != "Run"},
                 key=lambda op: -max(c.get(op, 0.0) for c in columns.values()))[:args.top]
    print(f"{args.model} {size}x{size}, batch {args.batch}: op time per call (ms), "
          f"{args.calls} traced calls")
    print(f"{'op type':<24}" + "".join(f"{k:>10}" for k in columns))
    for op in ["Run"] + ops:
        print(f"{op:<24}" + "".join(f"{c.get(op, 0.0) / 1e3:>10.2f}" for c in columns.values()))
    return columns


if __name__ == "__main__":
    main()
