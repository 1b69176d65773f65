"""Serving speed of GN / GN+PN / LN+PN ResNets against the same network with BatchNorm.

For each model (ResNet-50 v1.5 at 224x224, the CIFAR ResNet-20 at 32x32) and batch size,
the BN network and its GN / GN+PN / LN+PN twins (same architecture, same conv weights
init) are served five ways:

- `saved_model`: `tfpn.export_saved_model(model, path[, fold=False])` (BN: Keras'
  `model.export`), loaded with `tf.saved_model.load`, called through `.serve`;
- `saved_model_xla`: the same exported with `jit_compile=True` (BN too), its `serve`
  compiled by XLA at the first call;
- `graph`: in process, `tf.function(model(x, training=False))` (the fused op where it is
  built for unfolded models; folded models are `fold_for_inference(inference_layers=True)`);
- `xla`: the same with `jit_compile=True` (reference path for unfolded models);
- `tflite`: `tf.lite.TFLiteConverter.from_saved_model` of the SavedModel, run in
  `tf.lite.Interpreter` (default builtin ops; XNNPACK); for folded variants, of the
  SavedModel exported with `statistics="shifted"` (no `If` ops), as docs/export.md advises.

Variants: `bn` (baseline), `gn` (plain GN+ReLU, served in its inference form),
`gn+pn` (not folded), `gn+pn_folded`, `ln+pn_folded`. In every round each (variant, path)
is timed once (`--calls` calls), in a rotated order, so load on the shared machine hits all
alike; the ratio to BN of the same path is taken per round and the median over rounds is
reported (with the interquartile range of the per-round ratios).

    python benchmarks/bench_serve.py                      # ResNet-50 b1/b8 + ResNet-20, < 15 min
    python benchmarks/bench_serve.py --quick              # tiny smoke run (seconds)
    python benchmarks/bench_serve.py --models=cifar_resnet20 --rounds=9
"""

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_proxynorm as tfpn  # noqa: E402

MODELS = {
    # name: (builder, image size)
    "resnet50": (lambda norm, size: tfpn.models.resnet50(
        version="v1.5", norm=norm, num_classes=1000, input_shape=(size, size, 3)), 224),
    "cifar_resnet20": (lambda norm, size: tfpn.models.cifar_resnet(
        20, norm=norm, num_classes=10, input_shape=(size, size, 3)), 32),
}
VARIANTS = ("bn", "gn", "gn+pn", "gn+pn_folded", "ln+pn_folded")
PATHS = ("saved_model", "saved_model_xla", "graph", "xla", "tflite")
BASELINE = "bn"
_KEEP = []
_TFLITE = {}


def parse(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="resnet50,cifar_resnet20")
    p.add_argument("--batches", default="1,8")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--paths", default=",".join(PATHS))
    p.add_argument("--rounds", type=int, default=None,
                   help="interleaved rounds (default: 5 for ResNet-50, 9 for smaller models)")
    p.add_argument("--calls", type=int, default=None,
                   help="calls per timing (default: 1 for ResNet-50, 5 otherwise)")
    p.add_argument("--size", type=int, default=None, help="image size (default: the model's)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: CIFAR ResNet-20 at 16x16, batch 1, 2 rounds of 1 call")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time; cpu: CPU time of this process (all its threads), "
                   "steadier when other jobs share the cores")
    p.add_argument("--markdown", action="store_true", help="also print a markdown table")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.batches, args.size = "cifar_resnet20", "1", args.size or 16
        if args.variants == ",".join(VARIANTS):
            args.variants = "bn,gn+pn_folded"
        args.rounds, args.calls = args.rounds or 2, args.calls or 1
    args.models = args.models.split(",")
    args.batches = [int(b) for b in args.batches.split(",")]
    args.variants = args.variants.split(",")
    args.paths = args.paths.split(",")
    for values, allowed, flag in ((args.models, MODELS, "models"),
                                  (args.variants, VARIANTS, "variants"),
                                  (args.paths, PATHS, "paths")):
        bad = [v for v in values if v not in allowed]
        if bad:
            p.error(f"unknown --{flag} {bad}; choose from {list(allowed)}")
    if BASELINE not in args.variants:
        args.variants = [BASELINE] + args.variants
    return args


def _randomize(model, rng):
    """Non-trivial norm parameters (as after training), so that folding has work to do."""
    for layer in model.layers:                  # the builders make flat functional models
        for name in ("gamma", "beta", "proxy_beta", "proxy_gamma"):
            w = getattr(layer, name, None)
            if w is not None and hasattr(w, "assign"):
                base = 1.0 if name == "gamma" else 0.0
                w.assign((base + 0.2 * rng.standard_normal(w.shape)).astype("float32"))


def build_callables(model_name, variant, size, batch, paths, workdir, rng):
    """{path: callable(x) -> numpy output} for one variant."""
    builder, _ = MODELS[model_name]
    norm = variant.replace("_folded", "")
    model = builder(norm, size)
    _randomize(model, rng)
    folded = variant == "gn" or variant.endswith("_folded")
    out = {}
    if variant == BASELINE:
        serving = model
    elif folded:
        serving = tfpn.fold_for_inference(model, inference_layers=True)
    else:
        serving = model
    sm_path = os.path.join(workdir, f"{model_name}_{variant}_{size}")
    # TFLite converts the `statistics="shifted"` export of a folded variant (no `If` ops),
    # as docs/export.md advises; each export is written only for a path that uses it.
    tfl_path = sm_path + "_shifted" if folded else sm_path
    exports = {}          # path -> (statistics, jit_compile)
    if "saved_model" in paths:
        exports[sm_path] = ("auto", False)
    if "saved_model_xla" in paths:
        exports[sm_path + "_xla"] = ("auto", True)
    if "tflite" in paths:
        exports[tfl_path] = ("shifted" if folded else "auto", False)
    for export_path, (statistics, jit) in exports.items():
        if os.path.exists(export_path):
            continue
        if variant == BASELINE and not jit:
            model.export(export_path, format="tf_saved_model", verbose=False)
        else:
            tfpn.export_saved_model(model, export_path, fold=folded, statistics=statistics,
                                    jit_compile=jit)
    for path, export_path in (("saved_model", sm_path), ("saved_model_xla", sm_path + "_xla")):
        if path in paths:
            loaded = tf.saved_model.load(export_path)
            _KEEP.append(loaded)          # its variables live as long as the object
            out[path] = lambda x, f=loaded.serve: f(x).numpy()
    if "graph" in paths:
        fn = tf.function(lambda t, m=serving: m(t, training=False))
        out["graph"] = lambda x, f=fn: f(x).numpy()
    if "xla" in paths:
        fn = tf.function(lambda t, m=serving: m(t, training=False), jit_compile=True)
        with tfpn.use_implementation("reference"):      # trace now, on the reference path
            fn.get_concrete_function(tf.TensorSpec((batch, size, size, 3), tf.float32))
        out["xla"] = lambda x, f=fn: f(x).numpy()
    if "tflite" in paths:
        try:
            if tfl_path not in _TFLITE:      # converted once per SavedModel
                _TFLITE[tfl_path] = tf.lite.TFLiteConverter.from_saved_model(tfl_path).convert()
            interpreter = tf.lite.Interpreter(model_content=_TFLITE[tfl_path], num_threads=2)
            index = interpreter.get_input_details()[0]["index"]
            interpreter.resize_tensor_input(index, (batch, size, size, 3))
            interpreter.allocate_tensors()
            output = interpreter.get_output_details()[0]["index"]

            def run(x, it=interpreter, i=index, o=output):
                it.set_tensor(i, x)
                it.invoke()
                return it.get_tensor(o)
            out["tflite"] = run
        except Exception as e:  # noqa: BLE001  (reported, not fatal)
            print(f"  tflite: {variant} not converted: {type(e).__name__}: {e}"[:300])
    return out


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}


def time_calls(fn, x, calls, clock="wall"):
    clock = CLOCK[clock]
    start = clock()
    for _ in range(calls):
        fn(x)
    return (clock() - start) / calls


def measure(args, model_name, batch, workdir):
    _, default_size = MODELS[model_name]
    size = args.size or default_size
    big = model_name == "resnet50" and size >= 128
    rounds = args.rounds or (5 if big else 9)
    calls = args.calls or (1 if big else 5)
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((batch, size, size, 3)).astype("float32")
    x_tf = tf.constant(x_np)
    fns = {}
    t0 = time.perf_counter()
    for variant in args.variants:
        t1 = time.perf_counter()
        for path, fn in build_callables(model_name, variant, size, batch, args.paths, workdir,
                                        rng).items():
            fns[(variant, path)] = fn
        print(f"  {variant}: built in {time.perf_counter() - t1:.0f} s", flush=True)
    print(f"\n{model_name} {size}x{size}, batch {batch}: built in "
          f"{time.perf_counter() - t0:.0f} s; {rounds} rounds x {calls} calls", flush=True)
    xs = {"tflite": x_np}
    for key, fn in fns.items():                       # warm up (and XLA compile)
        time_calls(fn, xs.get(key[1], x_tf), 2)
    keys = list(fns)
    times = {k: [] for k in keys}
    for r in range(rounds):
        shift = r % len(keys)
        for key in keys[shift:] + keys[:shift]:
            times[key].append(time_calls(fns[key], xs.get(key[1], x_tf), calls, args.clock))
    rows = []
    for (variant, path), t in times.items():
        base = times.get((BASELINE, path))
        if base is None:
            continue
        ratios = np.array(t) / np.array(base)
        rows.append({"model": model_name, "size": size, "batch": batch, "variant": variant,
                     "path": path, "ms": 1e3 * float(np.median(t)),
                     "ratio": float(np.median(ratios)),
                     "iqr": tuple(float(q) for q in np.percentile(ratios, [25, 75]))})
    print(f"{'variant':<14}{'path':<13}{'median ms':>10}{'vs BN':>8}{'ratio IQR':>15}")
    for row in sorted(rows, key=lambda r: (PATHS.index(r["path"]),
                                           VARIANTS.index(r["variant"]))):
        print(f"{row['variant']:<14}{row['path']:<13}{row['ms']:>10.2f}{row['ratio']:>8.2f}"
              f"{row['iqr'][0]:>8.2f}-{row['iqr'][1]:.2f}")
    return rows


def markdown(rows):
    """One table: a row per (model, variant, path), a column per batch size."""
    batches = sorted({r["batch"] for r in rows})
    lines = ["| model | variant | path | " + " | ".join(f"batch {b}" for b in batches) + " |",
             "|---|---|---|" + "---|" * len(batches)]
    keyed = {(r["model"], r["variant"], r["path"], r["batch"]): r for r in rows}
    for model in dict.fromkeys(r["model"] for r in rows):
        for path in PATHS:
            for variant in VARIANTS:
                cells = [keyed.get((model, variant, path, b)) for b in batches]
                if not any(cells) or variant == BASELINE:
                    continue
                text = [f"{c['ratio']:.2f}x ({c['ms']:.1f} ms)" if c else "-" for c in cells]
                lines.append(f"| {model} | {variant} | {path} | " + " | ".join(text) + " |")
    return "\n".join(lines)


def main(argv=None):
    args = parse(sys.argv[1:] if argv is None else argv)
    tf.config.optimizer.set_jit(False)
    rows = []
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        for model_name in args.models:
            for batch in args.batches:
                rows += measure(args, model_name, batch, workdir)
    print(f"\ntotal {time.perf_counter() - start:.0f} s; ratios: median over rounds of the "
          "per-round time / BN's time on the same path")
    if args.markdown:
        print(markdown(rows))
    return rows


if __name__ == "__main__":
    main()
