r"""From a pretrained BatchNorm model to small-batch fine-tuning (docs/finetune.md).

Pretrains a BatchNorm CIFAR ResNet-20 on task A (Fashion-MNIST classes 0-4), then fine-tunes
it on task B (classes 5-9, a new 5-way head) at batch 2 and 4 for the same number of steps,
with each method:

- `bn`: BatchNorm in training mode (batch statistics of 2 or 4 examples, moving averages
  updated);
- `frozen_bn`: BatchNorm layers `trainable=False` (moving statistics and affine frozen, the
  rest trains);
- `plain`: `tfpn.convert_model(model, "gn+pn")` (gamma/beta copied);
- `calibrated`: `tfpn.convert_model(model, "gn+pn", calibration_data=...)` on
  `--calibration_images` task-A training images;
- `distilled`: the same with `calibration_steps=--calibration_steps` (the calibrated norms
  then trained on the BN model's logits on those images, no labels);
- `gnpn_scratch`: a GN+PN ResNet-20 pretrained on task A from scratch with BN's recipe (no
  conversion), then fine-tuned like the others.

Every run records the accuracy on task A's test images right after pretraining/conversion
(before fine-tuning, old head) and on task B's test images after fine-tuning. Seeds 0, 1, 2.

    python examples/finetune_small_batch.py            # the study (resumable), then the report
    python examples/finetune_small_batch.py --conversion_sweep   # conversions of seed 0's model
    python examples/finetune_small_batch.py --report_only
    python examples/finetune_small_batch.py --smoke --out_dir=/tmp/ft   # seconds, synthetic

Resuming: pretrained models are kept in `--out_dir/models/` (`.keras`), every finished
fine-tuning run is appended to the CSV at once; a rerun skips what exists for the same
`config_hash` (every flag that changes a result).
"""

import argparse
import csv
import hashlib
import json
import math
import os
import platform
import statistics
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = ("bn", "frozen_bn", "plain", "calibrated", "distilled", "gnpn_scratch")
LABELS = {"bn": "BN (training mode)", "frozen_bn": "FrozenBN", "plain": "GN+PN, plain conversion",
          "calibrated": "GN+PN, calibrated conversion",
          "distilled": "GN+PN, calibrated + distilled", "gnpn_scratch": "GN+PN from scratch"}
SHORT_LABELS = {"bn": "BN\ntraining mode", "frozen_bn": "FrozenBN", "plain": "GN+PN\nplain conv.",
                "calibrated": "GN+PN\ncalibrated", "distilled": "GN+PN\ndistilled",
                "gnpn_scratch": "GN+PN\nfrom scratch"}
COLUMNS = ("method", "batch_size", "seed", "config_hash", "acc_a_before", "acc_b_after",
           "output_error", "finetune_seconds", "finished_at")
PROTOCOL = 1
CALIBRATION_STEPS = 800


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--batch_sizes", default="2,4")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--depth", type=int, default=20)
    p.add_argument("--groups", type=int, default=8, help="GN groups of the GN+PN models.")
    p.add_argument("--pretrain_images", type=int, default=6000,
                   help="Task-A training images used for pretraining.")
    p.add_argument("--pretrain_epochs", type=int, default=3)
    p.add_argument("--pretrain_batch", type=int, default=64)
    p.add_argument("--pretrain_lr", type=float, default=0.05)
    p.add_argument("--finetune_steps", type=int, default=200)
    p.add_argument("--finetune_lr", type=float, default=0.1,
                   help="Learning rate at batch 64, scaled linearly with the batch.")
    p.add_argument("--calibration_images", type=int, default=256)
    p.add_argument("--calibration_steps", type=int, default=CALIBRATION_STEPS,
                   help="Distillation steps of the `distilled` method.")
    p.add_argument("--test_images", type=int, default=1000, help="Per task.")
    p.add_argument("--smoke", action="store_true",
                   help="Synthetic data, tiny sizes, one seed: checks the pipeline in seconds.")
    p.add_argument("--out_dir", default=os.path.join(ROOT, "docs", "results", "finetune"))
    p.add_argument("--report", default=os.path.join(ROOT, "docs", "results", "finetune",
                                                    "results.md"))
    p.add_argument("--plot", default=os.path.join(ROOT, "docs", "images", "finetune.png"))
    p.add_argument("--report_only", action="store_true")
    p.add_argument("--conversion_sweep", action="store_true",
                   help="Instead of the study: seed 0's BN model converted with other norms, "
                        "group counts, calibration sizes, fit targets and distillation "
                        "steps (SWEEP), task-A accuracy and logits error on the test images, "
                        "into out_dir/conversion_sweep.csv.")
    args = p.parse_args(argv)
    if args.smoke:
        args.depth, args.pretrain_images, args.pretrain_epochs = 8, 128, 1
        args.finetune_steps, args.calibration_images, args.test_images = 4, 16, 32
        args.calibration_steps = 3
        args.seeds = 1
    args.methods = [m for m in args.methods.split(",") if m]
    unknown = sorted(set(args.methods) - set(METHODS))
    if unknown:
        p.error(f"unknown methods {unknown}; expected some of {list(METHODS)}")
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    args.csv = os.path.join(args.out_dir, "runs.csv")
    return args


PRETRAIN_KEYS = ("depth", "groups", "pretrain_images", "pretrain_epochs", "pretrain_batch",
                 "pretrain_lr", "calibration_images", "smoke")


def config_hash(args, keys=PRETRAIN_KEYS + ("finetune_steps", "finetune_lr", "test_images")):
    """A digest of the flags that change a result (`keys`: those of the pretrained and
    converted models only, which the cached `.keras` files are named by)."""
    config = {k: getattr(args, k) for k in keys}
    config["protocol"] = PROTOCOL
    if args.calibration_steps != CALIBRATION_STEPS:   # only then: the rows from before the
        config["calibration_steps"] = args.calibration_steps   # flag existed stay valid
    return hashlib.sha1(json.dumps(config, sort_keys=True).encode()).hexdigest()[:10]


# -- data ------------------------------------------------------------------------------------
def load_tasks(args):
    """`{"a": (train x, y, test x, y), "b": ...}`, images standardized, labels 0-4."""
    import data

    if args.smoke:
        x, y = data.synthetic_arrays(2 * args.pretrain_images + 2 * args.test_images, seed=0)
        split = 2 * args.pretrain_images
        splits = {"train": (x[:split], y[:split]), "test": (x[split:], y[split:])}
    else:
        splits = data.load_fashion_mnist()
    mean, std = 72.94, 90.02          # Fashion-MNIST's pixel mean and std
    tasks = {}
    for name, classes in (("a", range(0, 5)), ("b", range(5, 10))):
        out = []
        for split, limit in (("train", None), ("test", args.test_images)):
            x, y = splits[split]
            keep = np.isin(y, list(classes))
            xs = ((x[keep].astype("float32") - mean) / std)[:limit]
            out += [xs, (y[keep] - classes.start)[:limit].astype("int64")]
        tasks[name] = tuple(out)
    return tasks


# -- models ----------------------------------------------------------------------------------
def _build(args, norm, seed):
    import keras
    import tf_proxynorm as tfpn

    keras.utils.set_random_seed(seed)
    kwargs = {"norm_kwargs": {"groups": args.groups}} if norm != "bn" else {}
    return tfpn.models.cifar_resnet(args.depth, norm=norm, input_shape=(28, 28, 1),
                                    num_classes=5, classifier_activation=None, **kwargs)


def _compile(model, lr):
    import keras

    model.compile(optimizer=keras.optimizers.SGD(lr, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"], jit_compile=False)


def accuracy(model, x, y):
    logits = model.predict(x, batch_size=256, verbose=0)
    return float(np.mean(np.argmax(logits, -1) == y))


def pretrained(args, norm, seed, task_a):
    """The model pretrained on task A (cached in out_dir/models)."""
    import keras

    path = os.path.join(args.out_dir, "models", 
                        f"{norm}_seed{seed}_{config_hash(args, PRETRAIN_KEYS)}.keras")
    if os.path.exists(path):
        return keras.saving.load_model(path)
    x, y = task_a[0][:args.pretrain_images], task_a[1][:args.pretrain_images]
    model = _build(args, "bn" if norm == "bn" else "gn+pn", seed)
    steps = args.pretrain_epochs * math.ceil(len(x) / args.pretrain_batch)
    _compile(model, keras.optimizers.schedules.CosineDecay(args.pretrain_lr, steps))
    model.fit(x, y, batch_size=args.pretrain_batch, epochs=args.pretrain_epochs, verbose=0)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    model.save(path)
    return model


def calibration_images(args, tasks, count):
    """`count` task-A training images: those after the pretraining ones when there are
    enough, else the first ones (the model saw them: fine for calibration)."""
    xa = tasks["a"][0]
    start = args.pretrain_images if len(xa) >= args.pretrain_images + count else 0
    return xa[start:start + count]


def prepare(args, method, seed, tasks):
    """`(model on task A, output relative error of a conversion or None)`."""
    import tf_proxynorm as tfpn

    if method == "gnpn_scratch":
        return pretrained(args, "gnpn", seed, tasks["a"]), None
    bn_model = pretrained(args, "bn", seed, tasks["a"])
    if method in ("bn", "frozen_bn"):
        if method == "frozen_bn":
            for layer in bn_model.layers:            # a flat functional model
                if isinstance(layer, tfpn.BatchNormAct):
                    layer.trainable = False
        return bn_model, None
    path = os.path.join(args.out_dir, "models", 
                        f"{method}_seed{seed}_{config_hash(args, PRETRAIN_KEYS)}.keras")
    if os.path.exists(path):                 # the conversion of this seed, done for a batch
        import keras

        with open(path + ".json") as f:
            return keras.saving.load_model(path), json.load(f)["output_error"]
    calibration = None
    if method in ("calibrated", "distilled"):
        calibration = calibration_images(args, tasks, args.calibration_images)
    model, report = tfpn.convert_model(
        bn_model, "gn+pn", groups=args.groups, calibration_data=calibration,
        calibration_steps=args.calibration_steps if method == "distilled" else 0)
    error = report[-1].error if calibration is not None else None
    model.save(path)
    with open(path + ".json", "w") as f:
        json.dump({"output_error": error, "report": [list(step) for step in report]}, f)
    return model, error


def with_new_head(model, seed):
    import keras

    keras.utils.set_random_seed(1000 + seed)
    features = model.get_layer("avg_pool").output
    head = keras.layers.Dense(5, name="new_predictions")(features)
    return keras.Model(model.inputs, head, name=model.name)


def run_one(args, method, batch_size, seed, tasks):
    import keras

    model, output_error = prepare(args, method, seed, tasks)
    acc_a = accuracy(model, tasks["a"][2], tasks["a"][3])
    model = with_new_head(model, seed)
    xb, yb = tasks["b"][0], tasks["b"][1]
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(xb))[:args.finetune_steps * batch_size]
    _compile(model, args.finetune_lr * batch_size / 64)
    keras.utils.set_random_seed(seed)
    start = time.time()
    model.fit(xb[order], yb[order], batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    seconds = time.time() - start
    acc_b = accuracy(model, tasks["b"][2], tasks["b"][3])
    if not math.isfinite(acc_b):
        acc_b = 0.0
    return {"acc_a_before": f"{acc_a:.4f}", "acc_b_after": f"{acc_b:.4f}",
            "output_error": "" if output_error is None else f"{output_error:.4f}",
            "finetune_seconds": f"{seconds:.1f}"}


# (label, norm, groups or None, calibration images (0: plain conversion), fit target,
# distillation steps)
SWEEP = (("GN+PN plain", "gn+pn", 8, 0, "model", 0),
         ("GN+PN calibrated (the study's)", "gn+pn", 8, 256, "model", 0),
         ("GN+PN calibrated, target: BN on the converted input", "gn+pn", 8, 256, "layer", 0),
         ("GN+PN calibrated, 1024 images", "gn+pn", 8, 1024, "model", 0),
         ("GN (no PN) calibrated", "gn", 8, 256, "model", 0),
         ("GN+PN, 4 groups, calibrated", "gn+pn", 4, 256, "model", 0),
         ("LN+PN calibrated", "ln+pn", None, 256, "model", 0),
         ("IN+PN calibrated", "in+pn", None, 256, "model", 0),
         ("GN+PN calibrated, epsilon search", "gn+pn", 8, 256, "model+epsilon", 0),
         ("LN+PN calibrated, epsilon search", "ln+pn", None, 256, "model+epsilon", 0),
         ("GN+PN calibrated + distilled 800 steps (the study's)", "gn+pn", 8, 256, "model", 800),
         ("GN+PN calibrated + distilled 200 steps", "gn+pn", 8, 256, "model", 200),
         ("GN+PN calibrated + distilled 1600 steps", "gn+pn", 8, 256, "model", 1600),
         ("GN+PN calibrated + distilled 800 steps, 1024 images", "gn+pn", 8, 1024, "model", 800),
         ("LN+PN calibrated + distilled 800 steps", "ln+pn", None, 256, "model", 800))
# Epsilon candidates of the "+epsilon" rows (multiples of each layer's median group variance).
SWEEP_EPSILON_FACTORS = (0.1, 1.0, 10.0, 100.0)
SWEEP_COLUMNS = ("label", "norm", "groups", "calibration_images", "target",
                 "calibration_steps", "acc_a", "logits_error", "bn_acc_a", "seconds")


def conversion_sweep(args):
    import keras
    import tf_proxynorm as tfpn
    from tf_proxynorm import calibrate

    tasks = load_tasks(args)
    xa, ya = tasks["a"][2], tasks["a"][3]
    bn_model = pretrained(args, "bn", 0, tasks["a"])
    ref = bn_model.predict(xa, batch_size=256, verbose=0)
    bn_acc = float(np.mean(np.argmax(ref, -1) == ya))
    path = os.path.join(args.out_dir, "conversion_sweep.csv")
    done = {r["label"] for r in read_rows(path)}
    for label, norm, groups, images, target, steps in SWEEP:
        if label in done:
            continue
        kwargs = {"groups": groups} if groups else {}
        data = calibration_images(args, tasks, images) if images else None
        calibrate.TARGET = target.split("+")[0]
        calibrate.EPSILON_FACTORS = SWEEP_EPSILON_FACTORS if "+epsilon" in target else ()
        start = time.time()
        model, _ = tfpn.convert_model(bn_model, norm, calibration_data=data,
                                      calibration_steps=steps, **kwargs)
        calibrate.TARGET, calibrate.EPSILON_FACTORS = "model", ()
        seconds = time.time() - start
        out = model.predict(xa, batch_size=256, verbose=0)
        row = {"label": label, "norm": norm, "groups": groups or "", "calibration_images": images,
               "target": target, "calibration_steps": steps,
               "acc_a": f"{np.mean(np.argmax(out, -1) == ya):.4f}",
               "logits_error": f"{np.linalg.norm(out - ref) / np.linalg.norm(ref):.4f}",
               "bn_acc_a": f"{bn_acc:.4f}", "seconds": f"{seconds:.0f}"}
        _append(path, row, SWEEP_COLUMNS)
        print(f"{label}: task A {row['acc_a']} (BN {row['bn_acc_a']}), logits error "
              f"{row['logits_error']}", flush=True)
        keras.backend.clear_session()


# -- bookkeeping ---------------------------------------------------------------------------------
def read_rows(path):
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def append_row(path, row):
    _append(path, row, COLUMNS)


def _append(path, row, columns):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    new = not os.path.exists(path)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, columns, lineterminator="\n")
        if new:
            writer.writeheader()
        writer.writerow(row)
        f.flush()
        os.fsync(f.fileno())


def run_study(args):
    digest = config_hash(args)
    done = {(r["method"], int(r["batch_size"]), int(r["seed"])) for r in read_rows(args.csv)
            if r["config_hash"] == digest}
    tasks = load_tasks(args)
    # Batch by batch (the smallest first), so that a cut-short study has whole batches.
    for batch_size in args.batch_sizes:
        for seed in range(args.seeds):
            for method in args.methods:
                if (method, batch_size, seed) in done:
                    continue
                start = time.time()
                row = run_one(args, method, batch_size, seed, tasks)
                row.update(method=method, batch_size=batch_size, seed=seed, config_hash=digest,
                           finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"))
                append_row(args.csv, row)
                print(f"{method:>13} batch {batch_size} seed {seed}: task A before "
                      f"{row['acc_a_before']}, task B after {row['acc_b_after']} "
                      f"({time.time() - start:.0f} s)", flush=True)


# -- report ------------------------------------------------------------------------------------
def _mean_se(values):
    mean = statistics.fmean(values)
    se = statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return mean, se


def summarize(args):
    digest = config_hash(args)
    rows = [r for r in read_rows(args.csv) if r["config_hash"] == digest]
    cells = {}
    for r in rows:
        key = (r["method"], int(r["batch_size"]))
        cells.setdefault(key, []).append(r)
    return cells


def _fmt(mean_se):
    mean, se = mean_se
    return f"{100 * mean:.2f}" + ("" if math.isnan(se) else f" ± {100 * se:.2f}")


def write_report(args):
    cells = summarize(args)
    lines = ["# Fine-tuning study: results (written by examples/finetune_small_batch.py)", "",
             f"Config `{config_hash(args)}`: ResNet-{args.depth}, pretraining on "
             f"{args.pretrain_images} task-A images x {args.pretrain_epochs} epochs (batch "
             f"{args.pretrain_batch}), fine-tuning {args.finetune_steps} steps, GN groups "
             f"{args.groups}, calibration on {args.calibration_images} images, "
             f"{args.test_images} test images per task; {platform.processor() or 'CPU'}, "
             f"{os.cpu_count()} cores. Accuracy %, mean ± standard error over seeds (n).", "",
             "| method | batch | task A before fine-tuning | task B after fine-tuning | n |",
             "|---|---:|---:|---:|---:|"]
    for method in args.methods:
        for batch_size in args.batch_sizes:
            rows = cells.get((method, batch_size))
            if not rows:
                continue
            before = _mean_se([float(r["acc_a_before"]) for r in rows])
            after = _mean_se([float(r["acc_b_after"]) for r in rows])
            lines.append(f"| {LABELS[method]} | {batch_size} | {_fmt(before)} | {_fmt(after)} | "
                         f"{len(rows)} |")
    for method in ("calibrated", "distilled"):
        errors = [float(r["output_error"]) for (m, _), rows in cells.items() if m == method
                  for r in rows if r["output_error"]]
        if errors and method in args.methods:
            lines += ["", f"{LABELS[method]}: relative error of the logits against the BN "
                      f"model on the calibration images, {min(errors):.4f}-{max(errors):.4f}."]
    os.makedirs(os.path.dirname(os.path.abspath(args.report)), exist_ok=True)
    with open(args.report, "w") as f:
        f.write("\n".join(lines) + "\n")
    if args.plot:
        write_plot(args, cells)


def write_plot(args, cells):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    width = 0.8 / max(1, len(args.batch_sizes))
    for ax, column, title in ((axes[0], "acc_a_before", "task A, before fine-tuning"),
                              (axes[1], "acc_b_after", "task B, after fine-tuning")):
        for i, batch_size in enumerate(args.batch_sizes):
            means, ses = [], []
            for method in args.methods:
                rows = cells.get((method, batch_size), [])
                m, s = _mean_se([float(r[column]) for r in rows]) if rows else (0.0, 0.0)
                means.append(100 * m)
                ses.append(0.0 if math.isnan(s) else 100 * s)
            xs = np.arange(len(args.methods)) + (i - (len(args.batch_sizes) - 1) / 2) * width
            ax.bar(xs, means, width, yerr=ses, capsize=3, label=f"batch {batch_size}")
        ax.set_xticks(np.arange(len(args.methods)))
        ax.set_xticklabels([SHORT_LABELS[m] for m in args.methods], fontsize=7)
        ax.set_title(title)
        ax.set_ylabel("accuracy %")
        lows = [100 * float(r[column]) for rows in cells.values() for r in rows]
        if lows:
            ax.set_ylim(max(0, min(lows) - 5), 100)
        ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
    fig.savefig(args.plot, dpi=110)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if args.conversion_sweep:
        conversion_sweep(args)
        return
    if not args.report_only:
        run_study(args)
    write_report(args)
    print(f"Wrote {args.report}")


if __name__ == "__main__":
    main()
