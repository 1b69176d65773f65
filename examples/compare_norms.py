r"""Accuracy study: every norm of the package on Fashion-MNIST, at a normal and a small batch.

Trains the same pre-activation CIFAR ResNet (`tfpn.models.cifar_resnet`) on Fashion-MNIST
(the IDX files of Debian's `dataset-fashion-mnist`) with each norm, at batch 64 and at batch
4, and writes the test accuracies to a CSV, then `docs/results.md` (table, plot, commands,
machine, a reading against the Proxy Normalization paper's claim that LN+PN and GN+PN match
or exceed BatchNorm).

    python examples/compare_norms.py --dry_run     # the planned runs and their estimated time
    python examples/compare_norms.py               # runs them (resumable), writes the report
    python examples/compare_norms.py --report_only # rewrites docs/results.md from the CSV

Protocol (every batch size gets the same one):
- the same training set (`--train_subset` examples, default all 60,000) for the same number
  of epochs, so every run sees the same number of samples; the learning rate is scaled
  linearly with the batch size (`--base_lr` at batch 128, as `examples/train.py`), SGD with
  momentum 0.9, linear warmup then cosine decay to 0; weight decay (coupled L2) on conv and
  dense kernels and on PN's proxy parameters, never on gamma/beta/biases (`train.py`'s
  `make_optimizer`); pad-2 random crop + horizontal flip;
- test accuracy on the full 10,000 test images (inference mode: BN-like norms use their
  moving statistics), evaluated at batch 500 whatever the training batch;
- deterministic seeding: a seed sets the initialization, the data order and the
  augmentation; seeds are 0, 1, 2, ...; the group count of GN/GN+PN/GN+WS is `--groups`;
- "cbn" needs the conv that produces its input, which pre-activation blocks do not have:
  it runs in the post-activation (v1) CIFAR ResNet of the same depth and width, built by
  `cifar_resnet(version="v1")` (column `arch` of the CSV). A name ending in "@v1" (e.g.
  "bn@v1") runs any other norm in that architecture, as a control. CBN follows the
  official recipe: window 4, rho 1, and plain BN for the first 2/3 of the steps (burn-in;
  the official COCO schedule: 8 of 12 epochs), changed by `--cbn_window`, `--cbn_rho` and
  `--cbn_burnin`. `--cbn_ablation` runs the variants of CBN_ABLATION (no burn-in, naive
  CBN, window 1) into their own CSV, reported in a section of their own.

Resuming: each finished run is appended to the CSV at once (flush + fsync). A rerun skips the
runs whose (norm, batch_size, seed, config_hash) row exists; `config_hash` covers every flag
that changes the result, so a changed protocol reruns everything into the same CSV. A run
interrupted midway leaves no row and restarts from scratch.
"""

import argparse
import csv
import datetime
import fcntl
import hashlib
import json
import math
import os
import platform
import shlex
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# "bn@v1" is BN in CBN's post-activation network: the control that tells CBN's effect apart
# from the architecture's.
NORMS = ("bn", "gn", "ln", "in", "gn+pn", "ln+pn", "evonorm_s0", "evonorm_b0", "bgn", "iebn",
         "cbn", "bn@v1", "gn+ws")
MULTI_SEED_NORMS = ("bn", "gn", "gn+pn", "ln+pn")
# Norms that need post-activation blocks (their statistics are tied to their own conv).
POSTACT_NORMS = ("cbn",)
POSTACT_SUFFIX = "@v1"
# Norms that take the `--groups` argument (EvoNorm-S0 picks its own: 32, lowered until it
# divides the channels; BGN keeps its own default of 32 groups of the flattened features).
GROUPED_NORMS = ("gn", "gn+pn", "gn+ws")
# CBN's settings in the study: (flag, CBNConv2D argument, default). The burn-in is a
# fraction of the run's steps.
CBN_SETTINGS = (("cbn_window", "window_size", 4), ("cbn_rho", "rho", 1.0),
                ("cbn_burnin", "burnin_steps", 2 / 3))
# The CBN ablation (`--cbn_ablation`): (label, flag values, batch sizes), seed 0, in the default
# network; each variant is its own config in `--ablation_csv`.
CBN_ABLATION = (
    ("no burn-in", {"cbn_burnin": 0.0}, (64, 4)),
    ("no burn-in, rho 0 (naive CBN: plain average)", {"cbn_burnin": 0.0, "cbn_rho": 0.0}, (64,)),
    ("window 1 (BN inside the CBN layer)", {"cbn_window": 1}, (64,)),
)
EVAL_BATCH_SIZE = 500
# The protocol's version: bump it when the training code changes what a run computes.
PROTOCOL = 1

# Calibration of the time estimates (--dry_run, the report): CPU seconds (process time, which
# other jobs on the machine inflate far less than wall-clock time) per training example of
# each norm at the calibrated batch sizes, with the defaults (ResNet-8, width 1, 28x28 inputs)
# on the 2-core development machine. bn and gn+pn: mean of two one-epoch calibration runs
# (CALIBRATION_COMMAND; they include tracing and XLA compilation); the other norms: their
# steady-state step cost over a few hundred steps, on the same scale. Expect +-30%: the
# machine was shared (load average 6 to 13). On an idle 2-core machine wall-clock time is
# about the CPU time or less (TensorFlow uses both cores).
CPU_SECONDS_PER_EXAMPLE = {
    64: {"bn": 0.00091, "gn": 0.00065, "ln": 0.00063, "in": 0.00069, "gn+pn": 0.00068,
         "ln+pn": 0.00066, "evonorm_s0": 0.00108, "evonorm_b0": 0.00134, "bgn": 0.00146,
         "iebn": 0.00107, "cbn": 0.00139, "gn+ws": 0.00067},
    4: {"bn": 0.00154, "gn": 0.00148, "ln": 0.00138, "in": 0.00130, "gn+pn": 0.00197,
        "ln+pn": 0.00205, "evonorm_s0": 0.00160, "evonorm_b0": 0.00170, "bgn": 0.00180,
        "iebn": 0.00158, "cbn": 0.00270, "gn+ws": 0.00170},
}
CALIBRATION_COMMAND = ("python examples/compare_norms.py --norms=bn,gn+pn --multi_seed_norms= "
                       "--epochs=1 --train_subset=20000 --out_csv=docs/results/calibration.csv "
                       "--report= --plot=")
CALIBRATION_CSV = os.path.join(ROOT, "docs", "results", "calibration.csv")
# Fixed cost of a run: model build, tracing (XLA compilation at small batch), evaluation.
SECONDS_PER_RUN = 20.0

COLUMNS = ("norm", "batch_size", "seed", "config_hash", "arch", "depth", "width", "epochs",
           "train_examples", "test_examples", "steps", "learning_rate", "weight_decay",
           "test_accuracy", "test_loss", "train_accuracy", "train_loss", "diverged",
           "train_seconds", "train_cpu_seconds", "seconds_per_epoch", "epoch_seconds", "eval_seconds",
           "trainable_parameters", "jit_compile", "tf_version", "keras_version", "cpu", "nproc",
           "load_average", "finished_at")


# -- flags -------------------------------------------------------------------------------------
def _csv_list(kind):
    return lambda text: [kind(v.strip()) for v in text.split(",") if v.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--norms", type=_csv_list(str), default=list(NORMS),
                   help="Comma-separated norms (tf_proxynorm.available_norm_acts(), '+ws' for "
                        "weight-standardized convs, '@v1' for the post-activation ResNet).")
    p.add_argument("--batch_sizes", type=_csv_list(int), default=[64, 4],
                   help="Comma-separated training batch sizes.")
    p.add_argument("--multi_seed_norms", type=_csv_list(str), default=list(MULTI_SEED_NORMS),
                   help="Norms run with --seeds seeds; the others get --other_seeds.")
    p.add_argument("--seeds", type=int, default=3, help="Seeds of --multi_seed_norms.")
    p.add_argument("--other_seeds", type=int, default=1, help="Seeds of the other norms.")
    p.add_argument("--depth", type=int, default=8, help="CIFAR ResNet depth 6n+2.")
    p.add_argument("--width", type=int, default=1, help="Channel multiplier (16, 32, 64 x width).")
    p.add_argument("--groups", type=int, default=8, help="Groups of gn, gn+pn and gn+ws.")
    p.add_argument("--epochs", type=int, default=3, help="Epochs, the same at every batch size.")
    p.add_argument("--train_subset", type=int, default=0,
                   help="Train on a fixed subset of this many training images (0: all 60,000); "
                        "the same subset for every run.")
    p.add_argument("--test_subset", type=int, default=0,
                   help="Evaluate on the first N test images (0: all 10,000).")
    p.add_argument("--max_steps", type=int, default=0,
                   help="Cap on the optimizer steps of a run (0: none). When it binds, runs at "
                        "different batch sizes no longer see the same number of samples.")
    p.add_argument("--base_lr", type=float, default=0.1,
                   help="Peak learning rate at batch 128; scaled linearly with the batch size.")
    p.add_argument("--momentum", type=float, default=0.9, help="SGD momentum.")
    p.add_argument("--weight_decay", type=float, default=5e-4,
                   help="L2 on kernels and PN's proxy parameters (never gamma/beta/biases).")
    p.add_argument("--warmup_epochs", type=float, default=0.2, help="Linear warmup, in epochs.")
    p.add_argument("--cbn_window", type=int, default=4,
                   help="CBN: steps pooled (current + window - 1 previous); 1 is BN.")
    p.add_argument("--cbn_rho", type=float, default=1.0,
                   help="CBN: Taylor compensation scale (0: naive CBN, a plain average).")
    p.add_argument("--cbn_burnin", type=float, default=2 / 3,
                   help="CBN: fraction of the run's steps trained as plain BN before pooling "
                        "starts (official code: 8 of 12 epochs).")
    p.add_argument("--cbn_ablation", action="store_true",
                   help="Run (or with --report_only, report) the CBN ablation variants into "
                        "--ablation_csv instead of the study.")
    p.add_argument("--ablation_csv",
                   default=os.path.join(ROOT, "docs", "results", "cbn_ablation.csv"))
    p.add_argument("--pad", type=int, default=2, help="Padding of the random crop (0: no "
                   "augmentation at all, neither crop nor flip).")
    p.add_argument("--dataset", default="fashion_mnist",
                   help="'fashion_mnist' (IDX files), or a TFDS dataset already prepared in "
                        "--data_dir (e.g. 'cifar10'); nothing is downloaded.")
    p.add_argument("--data_dir", default=None,
                   help="Folder of the Fashion-MNIST IDX files (default: "
                        "/usr/share/datasets/fashion-mnist) or of the prepared TFDS data.")
    p.add_argument("--jit_max_batch", type=int, default=16,
                   help="Compile the training step with XLA for batch sizes up to this (it "
                        "halves the per-step overhead of small batches on CPU; larger batches "
                        "run faster without). 0: never.")
    p.add_argument("--out_csv", default=os.path.join(ROOT, "docs", "results", "compare_norms.csv"))
    p.add_argument("--report", default=os.path.join(ROOT, "docs", "results.md"),
                   help="Markdown report rewritten after every run ('' : none).")
    p.add_argument("--plot", default=os.path.join(ROOT, "docs", "results", "accuracy_vs_batch.png"),
                   help="Plot of accuracy against batch size ('' : none; needs matplotlib).")
    p.add_argument("--dry_run", "--list", action="store_true",
                   help="Print the planned runs, which are done, and the estimated time; train nothing.")
    p.add_argument("--report_only", action="store_true", help="Write the report; train nothing.")
    p.add_argument("--verbose", type=int, default=0, help="Keras fit verbosity (0, 1, 2).")
    args = p.parse_args(argv)
    _validate(args)
    return args


def _validate(args):
    from tf_proxynorm.layers import factory

    for norm in args.norms:
        base = norm[:-len(POSTACT_SUFFIX)] if norm.endswith(POSTACT_SUFFIX) else norm
        base = base[:-3] if base.endswith("+ws") else base
        try:
            factory.lookup(base)
        except ValueError as e:
            raise ValueError(f"Unknown norm in `--norms`. Received: norms={norm!r}") from e
    if not 0 <= args.cbn_burnin < 1:
        raise ValueError(f"`--cbn_burnin` is a fraction of the steps in [0, 1). "
                         f"Received: cbn_burnin={args.cbn_burnin}")
    if args.cbn_rho < 0:
        raise ValueError(f"`--cbn_rho` must be >= 0. Received: cbn_rho={args.cbn_rho}")
    for name in ("depth", "width", "groups", "epochs", "cbn_window"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"`--{name}` must be >= 1. Received: {name}={value}")
    if (args.depth - 2) % 6:
        raise ValueError(f"`--depth` must be 6n+2 (8, 14, 20, ...). Received: depth={args.depth}")
    if not args.batch_sizes or min(args.batch_sizes) < 1:
        raise ValueError(f"`--batch_sizes` must be positive ints. Received: batch_sizes={args.batch_sizes}")
    for name in ("train_subset", "test_subset", "max_steps", "pad", "seeds", "other_seeds"):
        if getattr(args, name) < 0:
            raise ValueError(f"`--{name}` must be >= 0. Received: {name}={getattr(args, name)}")


def study_config(args):
    """Everything that changes what a run computes, except its norm, batch size and seed."""
    return {"protocol": PROTOCOL, "dataset": args.dataset, "depth": args.depth,
            "width": args.width, "groups": args.groups, "epochs": args.epochs,
            "train_subset": args.train_subset, "test_subset": args.test_subset,
            "max_steps": args.max_steps, "base_lr": args.base_lr, "momentum": args.momentum,
            "weight_decay": args.weight_decay, "warmup_epochs": args.warmup_epochs,
            "pad": args.pad,
            # CBN's settings only where they differ from the defaults (configs made before
            # they became flags keep their hash).
            **{flag: getattr(args, flag) for flag, _, default in CBN_SETTINGS
               if getattr(args, flag) != default}}


def config_hash(args):
    from data import FASHION_MNIST_DIR

    config = study_config(args)
    if args.data_dir and os.path.realpath(args.data_dir) != os.path.realpath(FASHION_MNIST_DIR):
        config["data_dir"] = os.path.realpath(args.data_dir)  # other data: never mixed in
    text = json.dumps(config, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def study_command(args):
    """The command line that reproduces this study (every result-changing flag spelled out)."""
    parts = ["python", "examples/compare_norms.py", "--norms=" + ",".join(args.norms),
             "--batch_sizes=" + ",".join(map(str, args.batch_sizes)),
             "--multi_seed_norms=" + ",".join(args.multi_seed_norms),
             f"--seeds={args.seeds}", f"--other_seeds={args.other_seeds}"]
    for key, value in study_config(args).items():
        if key != "protocol" and (key != "dataset" or value != "fashion_mnist"):
            parts.append(f"--{key}={value}")
    if args.data_dir:
        parts.append(f"--data_dir={args.data_dir}")
    return " ".join(shlex.quote(p) for p in parts)


# -- plan and CSV ------------------------------------------------------------------------------
def planned_runs(args):
    """`[(norm, batch_size, seed), ...]`, seed 0 of every norm and batch size first, then seed
    1, ... (so a study stopped midway already has a complete table at one seed)."""
    counts = {norm: args.seeds if norm in args.multi_seed_norms else args.other_seeds
              for norm in args.norms}
    return [(norm, batch_size, seed) for seed in range(max(counts.values(), default=0))
            for batch_size in args.batch_sizes for norm in args.norms if seed < counts[norm]]


def read_rows(path):
    """The complete rows of the CSV (a line cut by a crash is ignored)."""
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [r for r in rows if all(r.get(c) not in (None, "") for c in ("norm", "finished_at"))]


def run_key(row_or_run, digest):
    norm, batch_size, seed = row_or_run
    return (norm, int(batch_size), int(seed), digest)


def finished_keys(rows):
    return {(r["norm"], int(r["batch_size"]), int(r["seed"]), r["config_hash"]) for r in rows}


def append_row(path, row):
    """Appends one row (header first in a new file) under an exclusive lock, then fsyncs."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a+", newline="") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        content = f.read()
        if content:
            header = next(csv.reader([content.splitlines()[0]]))
            if tuple(header) != COLUMNS:
                raise ValueError(f"{path} has other columns than this script writes; use another "
                                 f"--out_csv. Received: header={header}")
            if not content.endswith("\n"):
                f.write("\n")  # a crash cut the last line: start a fresh one
        writer = csv.DictWriter(f, COLUMNS, lineterminator="\n")
        if not content:
            writer.writeheader()
        writer.writerow({c: row.get(c, "") for c in COLUMNS})
        f.flush()
        os.fsync(f.fileno())
        fcntl.flock(f, fcntl.LOCK_UN)


def _depth_width_scale(args):
    """Rough cost of the network relative to the calibrated ResNet-8 width 1 (conv FLOPs)."""
    return (args.depth - 2) / 6 * args.width ** 2


def estimate_seconds(norm, batch_size, args, rows=()):
    """Estimated CPU seconds of one run: the measured CPU time of finished runs of the same
    norm, batch size and config when there are some, else the calibration constants."""
    digest = config_hash(args)
    measured = [float(r["train_cpu_seconds"]) + float(r["eval_seconds"]) for r in rows
                if r["norm"] == norm and int(r["batch_size"]) == batch_size
                and r["config_hash"] == digest and r.get("train_cpu_seconds")]
    if measured:
        return statistics.mean(measured) + 5.0
    examples = (args.train_subset or 60000) // batch_size * batch_size * args.epochs
    if args.max_steps:
        examples = min(examples, args.max_steps * batch_size)
    per_example = _interpolate(batch_size, norm.removesuffix(POSTACT_SUFFIX))
    return SECONDS_PER_RUN + examples * per_example * _depth_width_scale(args)


def _interpolate(batch_size, norm):
    """CPU seconds per example at `batch_size`, linear in log(batch) between calibrated sizes."""
    sizes = sorted(CPU_SECONDS_PER_EXAMPLE)
    b = min(max(batch_size, sizes[0]), sizes[-1])
    lo = max(s for s in sizes if s <= b)
    hi = min(s for s in sizes if s >= b)
    cost = lambda size: CPU_SECONDS_PER_EXAMPLE[size].get(  # noqa: E731
        norm, CPU_SECONDS_PER_EXAMPLE[size]["gn+pn"])
    if hi == lo:
        return cost(lo)
    t = math.log(b / lo) / math.log(hi / lo)
    return (1 - t) * cost(lo) + t * cost(hi)


def wall_to_cpu(rows):
    """`(ratio, load average)` of wall-clock to CPU training time over rows (None if none)."""
    pairs = [(float(r["train_seconds"]), float(r["train_cpu_seconds"]), float(r["load_average"]))
             for r in rows if r.get("train_cpu_seconds") and r.get("load_average")]
    if not pairs:
        return None, None
    return (sum(p[0] for p in pairs) / sum(p[1] for p in pairs),
            statistics.mean(p[2] for p in pairs))


def _hours(seconds):
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{seconds / 60:.0f} min"


def describe_plan(args, rows):
    digest = config_hash(args)
    done = finished_keys(rows)
    lines, total, remaining = [], 0.0, 0.0
    for norm, batch_size, seed in planned_runs(args):
        seconds = estimate_seconds(norm, batch_size, args, rows)
        finished = run_key((norm, batch_size, seed), digest) in done
        total += seconds
        remaining += 0.0 if finished else seconds
        lines.append(f"  {norm:<12} batch {batch_size:>4}  seed {seed}  "
                     f"{'done' if finished else f'~{seconds / 60:.1f} min'}")
    count = len(lines)
    left = sum(1 for line in lines if not line.endswith("done"))
    lines.insert(0, f"Config {digest}: {study_command(args)}")
    lines.insert(1, f"{count} planned runs, {count - left} done, {left} to run.")
    lines.append(f"Estimated CPU time: {_hours(total)} for the whole study, {_hours(remaining)} "
                 "left; about the wall-clock time on an idle 2-core machine.")
    ratio, load = wall_to_cpu(rows or read_rows(CALIBRATION_CSV))
    if ratio:
        lines.append(f"On a shared machine wall-clock grows: the runs measured so far took "
                     f"{ratio:.1f}x their CPU time at load average {load:.0f} "
                     f"(-> {_hours(remaining * ratio)} left at that load).")
    return "\n".join(lines)


# -- training ---------------------------------------------------------------------------------
def _arch(norm):
    return "v1" if norm.endswith(POSTACT_SUFFIX) or norm in POSTACT_NORMS else "v2"


def _norm_name_and_kwargs(norm, args, steps):
    """The factory name and arguments of `norm` in a run of `steps` optimizer steps."""
    name = norm.removesuffix(POSTACT_SUFFIX)
    kwargs = {"groups": args.groups} if name in GROUPED_NORMS else {}
    if name == "cbn":
        kwargs = {arg: getattr(args, flag) for flag, arg, _ in CBN_SETTINGS}
        kwargs["burnin_steps"] = int(args.cbn_burnin * steps)
    return name, kwargs


def _train_lib():
    here = os.path.dirname(os.path.abspath(__file__))
    if here not in sys.path:
        sys.path.insert(0, here)
    import train  # examples/train.py: model wrapper, optimizer and weight decay convention

    return train


def _train_config(args, norm, batch_size, steps):
    """The fields `train.build_model` and `train.make_optimizer` read."""
    import types

    name, norm_kwargs = _norm_name_and_kwargs(norm, args, steps)
    return types.SimpleNamespace(
        model="cifar_resnet", depth=args.depth, width=args.width, norm=name,
        norm_kwargs=json.dumps(norm_kwargs), sync_bn=False, activation="relu",
        weight_standardization=False, batch_size=batch_size, epochs=args.epochs,
        learning_rate=args.base_lr * batch_size / 128, optimizer="momentum",
        momentum=args.momentum, lr_schedule="cosine", lr_decay_epochs=[],
        warmup_epochs=args.warmup_epochs, weight_decay=args.weight_decay)


def build_model(args, norm, batch_size, info, steps):
    """The network for `norm` after a fixed pixel standardization, as `train.build_model`."""
    import keras

    train = _train_lib()
    cfg = _train_config(args, norm, batch_size, steps)
    if _arch(norm) == "v2":
        return train.build_model(cfg, info), cfg
    from tf_proxynorm.models import cifar_resnet

    backbone = cifar_resnet(args.depth, args.width, version="v1", norm=cfg.norm,
                            norm_kwargs=json.loads(cfg.norm_kwargs),
                            input_shape=info.image_shape, num_classes=info.num_classes,
                            classifier_activation=None, name=f"cifar_resnet{args.depth}_v1")
    inputs = keras.Input(info.image_shape, name="pixels")
    x = keras.layers.Normalization(mean=list(info.mean), variance=[s * s for s in info.std],
                                   name="standardize")(inputs)
    return keras.Model(inputs, backbone(x), name=backbone.name), cfg


def load_data(args):
    """`(train, test, info)`: the fixed training subset and the test images, unbatched."""
    import dataclasses

    import numpy as np
    import tensorflow as tf

    import data

    train, test, info = data.load(args.dataset, args.data_dir)
    if args.train_subset and args.train_subset < info.num_train:
        # A fixed random subset, the same for every run whatever TensorFlow's seed state.
        keep = np.zeros(info.num_train, bool)
        keep[np.random.default_rng(0).permutation(info.num_train)[:args.train_subset]] = True
        def kept(example, flag):
            return flag

        def drop_flag(example, flag):
            return example

        train = tf.data.Dataset.zip((train, tf.data.Dataset.from_tensor_slices(keep)))
        train = train.filter(kept).map(drop_flag)
        info = dataclasses.replace(info, num_train=args.train_subset)
    if args.test_subset and args.test_subset < info.num_test:
        test = test.take(args.test_subset)
        info = dataclasses.replace(info, num_test=args.test_subset)
    return train, test, info


def _steps_per_execution(steps_per_epoch, jit):
    """Several steps per `tf.function` call (a divisor of the epoch's steps) with XLA."""
    if not jit:
        return 1
    return max(d for d in range(1, 51) if steps_per_epoch % d == 0)


def _machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    return cpu, os.cpu_count()


def train_one(args, norm, batch_size, seed, datasets):
    """Trains and evaluates one run; returns its CSV row."""
    import keras
    import tensorflow as tf

    import data

    train_src, test_src, info = datasets
    tf.get_logger().setLevel("ERROR")  # one model per run: retracing warnings are expected
    keras.backend.clear_session()
    keras.utils.set_random_seed(seed)
    steps_per_epoch = info.num_train // batch_size
    if steps_per_epoch < 1:
        raise ValueError(f"`--train_subset` ({info.num_train}) is smaller than the batch size. "
                         f"Received: batch_size={batch_size}")
    epochs = args.epochs
    if args.max_steps and args.max_steps < epochs * steps_per_epoch:
        steps_per_epoch = max(args.max_steps // epochs, 1)
    model, cfg = build_model(args, norm, batch_size, info, epochs * steps_per_epoch)
    train = _train_lib()
    optimizer = train.make_optimizer(cfg, model, steps_per_epoch)
    jit = batch_size <= args.jit_max_batch
    model.compile(optimizer=optimizer, jit_compile=jit,
                  steps_per_execution=_steps_per_execution(steps_per_epoch, jit),
                  loss=keras.losses.CategoricalCrossentropy(from_logits=True),
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
    train_ds = data.pipeline(train_src, info, batch_size, training=True, augment=args.pad > 0,
                             pad=args.pad, seed=seed, deterministic=True,
                             shuffle_buffer=info.num_train)
    test_ds = data.pipeline(test_src, info, EVAL_BATCH_SIZE, training=False)

    epoch_seconds = []

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            epoch_seconds.append(time.perf_counter() - self.start)

    start, cpu_start = time.perf_counter(), time.process_time()
    history = model.fit(train_ds, epochs=epochs, steps_per_epoch=steps_per_epoch,
                        callbacks=[EpochTimer(), keras.callbacks.TerminateOnNaN()],
                        shuffle=False, verbose=args.verbose)
    train_seconds = time.perf_counter() - start
    train_cpu_seconds = time.process_time() - cpu_start
    model.jit_compile = False  # evaluation at batch 500 gains nothing from XLA on CPU
    start = time.perf_counter()
    test_loss, test_accuracy = model.evaluate(test_ds, verbose=0)
    eval_seconds = time.perf_counter() - start
    train_loss = history.history["loss"][-1]
    cpu, nproc = _machine()
    return {
        "norm": norm, "batch_size": batch_size, "seed": seed, "config_hash": config_hash(args),
        "arch": _arch(norm), "depth": args.depth, "width": args.width, "epochs": epochs,
        "train_examples": info.num_train, "test_examples": info.num_test,
        "steps": int(model.optimizer.iterations.numpy()), "learning_rate": cfg.learning_rate,
        "weight_decay": args.weight_decay, "test_accuracy": f"{test_accuracy:.4f}",
        "test_loss": f"{test_loss:.4f}",
        "train_accuracy": f"{history.history['accuracy'][-1]:.4f}",
        "train_loss": f"{train_loss:.4f}",
        "diverged": int(not math.isfinite(train_loss) or not math.isfinite(test_loss)),
        "train_seconds": f"{train_seconds:.1f}", "train_cpu_seconds": f"{train_cpu_seconds:.1f}",
        "seconds_per_epoch": f"{statistics.median(epoch_seconds):.1f}",
        "epoch_seconds": " ".join(f"{s:.1f}" for s in epoch_seconds),
        "eval_seconds": f"{eval_seconds:.1f}",
        "trainable_parameters": sum(math.prod(v.shape) for v in model.trainable_variables),
        "jit_compile": int(jit), "tf_version": tf.__version__,
        "keras_version": keras.__version__, "cpu": cpu, "nproc": nproc,
        "load_average": f"{os.getloadavg()[0]:.1f}",
        "finished_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def run_study(args):
    """Runs the planned runs that have no row yet; returns how many it ran."""
    digest = config_hash(args)
    done = finished_keys(read_rows(args.out_csv))
    todo = [r for r in planned_runs(args) if run_key(r, digest) not in done]
    print(f"{len(todo)} of {len(planned_runs(args))} planned runs to do (config {digest}).",
          flush=True)
    if not todo:
        return 0
    datasets = load_data(args)
    for index, (norm, batch_size, seed) in enumerate(todo, 1):
        print(f"[{index}/{len(todo)}] {norm} batch {batch_size} seed {seed} ...", flush=True)
        row = train_one(args, norm, batch_size, seed, datasets)
        append_row(args.out_csv, row)
        print(f"    test accuracy {row['test_accuracy']}, {row['train_seconds']} s of training "
              f"({row['seconds_per_epoch']} s/epoch)", flush=True)
        if args.report:
            write_report(args)
    return len(todo)


# -- report -----------------------------------------------------------------------------------
def summarize(args, rows):
    """`{(norm, batch_size): dict(n, planned, mean, std, sec_epoch, accuracies)}` over the
    current config's rows (None for the statistics of a cell with no run)."""
    digest = config_hash(args)
    planned = {}
    for norm, batch_size, _ in planned_runs(args):
        planned[(norm, batch_size)] = planned.get((norm, batch_size), 0) + 1
    cells = {}
    for key, count in planned.items():
        mine = [r for r in rows if r["config_hash"] == digest and r["norm"] == key[0]
                and int(r["batch_size"]) == key[1]]
        accs = [float(r["test_accuracy"]) for r in mine]
        cells[key] = dict(
            n=len(accs), planned=count, accuracies=accs,
            mean=statistics.mean(accs) if accs else None,
            std=statistics.stdev(accs) if len(accs) > 1 else None,
            sec_epoch=min(_epoch_times(r) for r in mine) if mine else None,
            diverged=sum(int(r["diverged"]) for r in mine))
    return cells


def _epoch_times(row):
    """The fastest epoch of a run: the least disturbed by other jobs sharing the machine (the
    first epoch also pays for graph tracing)."""
    times = [float(t) for t in (row.get("epoch_seconds") or "").split()]
    return min(times) if times else float(row["seconds_per_epoch"])


def _dataset_name(args):
    return "Fashion-MNIST" if args.dataset == "fashion_mnist" else args.dataset


def _pct(value):
    return f"{100 * value:.2f}"


def _cell_text(cell):
    if not cell["n"]:
        return "not yet run"
    text = _pct(cell["mean"]) + (f" ± {_pct(cell['std'])}" if cell["std"] is not None else "")
    if cell["diverged"]:
        text += f" ({cell['diverged']} diverged)"
    return text


def write_plot(args, cells):
    """Accuracy (mean, error bar = std over seeds) against batch size; False without matplotlib."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    sizes = sorted(args.batch_sizes)
    plotted = False
    # tab10 then three more, so no two of the default study's 13 lines share a colour.
    colors = [plt.get_cmap("tab10")(i) for i in range(10)] + ["black", "darkgoldenrod", "magenta"]
    for index, norm in enumerate(args.norms):
        points = [(b, cells[(norm, b)]) for b in sizes if cells[(norm, b)]["n"]]
        if not points:
            continue
        key = norm in args.multi_seed_norms
        ax.errorbar([b for b, _ in points], [100 * c["mean"] for _, c in points],
                    yerr=[100 * (c["std"] or 0.0) for _, c in points], label=norm,
                    color=colors[index % len(colors)],
                    marker="o" if key else ".", linewidth=2.0 if key else 1.0, capsize=3,
                    linestyle="-" if key else "--")
        plotted = True
    if not plotted:
        plt.close(fig)
        return False
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.set_xlabel("training batch size")
    ax.set_ylabel(f"{_dataset_name(args)} test accuracy (%)")
    postact = [n for n in args.norms if _arch(n) == "v1"]
    ax.set_title(f"Pre-activation ResNet-{args.depth} (width {args.width}), {args.epochs} epochs"
                 + (f"\n({', '.join(postact)}: post-activation)" if postact else ""))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(args.plot)), exist_ok=True)
    fig.savefig(args.plot, dpi=120)
    plt.close(fig)
    return True


def _versus(cells, norm, other, batch_size):
    """A sentence comparing two cells: the difference and whether it exceeds the noise
    (twice the standard error of the difference; with one seed, only the difference)."""
    a, b = cells.get((norm, batch_size)), cells.get((other, batch_size))
    if not a or not b or not a["n"] or not b["n"]:
        return None, f"{norm} vs {other} at batch {batch_size}: not yet run"
    diff = a["mean"] - b["mean"]
    if a["std"] is not None and b["std"] is not None:
        se = math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
        verdict = ("within noise" if abs(diff) <= 2 * se else
                   "above" if diff > 0 else "below")
        noise = f", 2 SE = {_pct(2 * se)} points"
    else:
        verdict, noise = ("above" if diff > 0 else "below"), " (single seed: no error bar)"
    return verdict, (f"{norm} {_pct(a['mean'])} vs {other} {_pct(b['mean'])} at batch "
                     f"{batch_size}: {diff * 100:+.2f} points{noise}; {verdict}")


def reading(args, cells):
    """The data-driven reading of the results against the paper's claim."""
    lines = []
    sizes = sorted(args.batch_sizes, reverse=True)
    claims = []
    for batch_size in sizes:
        for pn, plain in (("gn+pn", "gn"), ("ln+pn", "ln")):
            if pn not in args.norms:
                continue
            verdict, text = _versus(cells, pn, "bn", batch_size)
            lines.append(f"- {text}.")
            if verdict:
                seeded = min(cells[(pn, batch_size)]["n"], cells[("bn", batch_size)]["n"]) > 1
                claims.append((verdict in ("within noise", "above"), seeded))
            if plain in args.norms:
                lines.append(f"- PN's own effect: {_versus(cells, pn, plain, batch_size)[1]}.")
    if "cbn" in args.norms and "bn@v1" in args.norms:
        for batch_size in sizes:
            lines.append("- CBN against BN in the same post-activation network: "
                         f"{_versus(cells, 'cbn', 'bn@v1', batch_size)[1]}.")
    big, small = max(args.batch_sizes), min(args.batch_sizes)
    if big != small and "bn" in args.norms:
        a, b = cells[("bn", big)], cells[("bn", small)]
        if a["n"] and b["n"]:
            lines.append(f"- BN from batch {big} to {small}: {_pct(a['mean'])} -> {_pct(b['mean'])} "
                         f"({(b['mean'] - a['mean']) * 100:+.2f} points).")
        for batch_size in (big, small):
            done = [(n, c) for (n, bs), c in cells.items() if bs == batch_size and c["n"]]
            if done:
                best = max(done, key=lambda nc: nc[1]["mean"])
                lines.append(f"- Best at batch {batch_size}: {best[0]} ({_pct(best[1]['mean'])}).")
    missing = sum(c["planned"] - min(c["n"], c["planned"]) for c in cells.values())
    made = "made so far" if missing else "made"
    gaps = [f"{norm} at batch {b} ({c['planned'] - c['n']} of {c['planned']})"
            for (norm, b), c in cells.items() if c["n"] < c["planned"]]
    solid = [ok for ok, seeded in claims if seeded]
    judged = solid or [ok for ok, _ in claims]
    prefix = "" if solid else "Preliminary (single seeds, no error bars): "
    if not claims:
        verdict = ("**Not yet run**: no comparison of LN+PN/GN+PN with BN exists yet, so the "
                   "claim is neither confirmed nor refuted here.")
    elif all(judged):
        verdict = (f"{prefix}in every comparison {made}, LN+PN and GN+PN match (within "
                   "noise) or exceed BN: the paper's claim holds in this setting.")
    else:
        verdict = (f"{prefix}in {judged.count(False)} of {len(judged)} comparisons {made}, "
                   "an LN+PN/GN+PN mean falls below BN's"
                   + (" by more than the noise" if solid else "")
                   + ": the paper's claim does not fully hold in this setting.")
    verdict = verdict[0].upper() + verdict[1:]
    if missing:
        verdict += f" {missing} planned run(s) are still missing (marked \"not yet run\")."
        everything = missing == sum(c["planned"] for c in cells.values())
        lines.append(f"- Missing runs: {'all of them' if everything else ', '.join(gaps)}.")
    return verdict, lines


def _calibration_lines(args):
    """The calibration runs behind the estimates, when their CSV exists."""
    rows = read_rows(CALIBRATION_CSV)
    if not rows:
        return [""]
    lines = ["", f"Calibration ([`{os.path.relpath(CALIBRATION_CSV, ROOT)}`]"
             f"({os.path.relpath(CALIBRATION_CSV, os.path.dirname(os.path.abspath(args.report)))})"
             f", ResNet-{rows[0]['depth']} width {rows[0]['width']}, one epoch of "
             f"{int(rows[0]['train_examples']):,} examples, while other jobs shared the CPU):", "",
             "```bash", CALIBRATION_COMMAND, "```", "",
             "| norm | batch | wall s | CPU s | CPU ms / example | load average | test accuracy |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        examples = int(r["steps"]) * int(r["batch_size"])
        lines.append(f"| {r['norm']} | {r['batch_size']} | {float(r['train_seconds']):.0f} | "
                     f"{float(r['train_cpu_seconds']):.0f} | "
                     f"{1000 * float(r['train_cpu_seconds']) / examples:.2f} | "
                     f"{r['load_average']} | {_pct(float(r['test_accuracy']))} |")
    return lines + [""]


def _setup_lines(args):
    sizes = ", ".join(f"{args.base_lr * b / 128:g} at batch {b}" for b in args.batch_sizes)
    train = "all" if not args.train_subset else f"a fixed subset of {args.train_subset:,}"
    test = "all" if not args.test_subset else f"the first {args.test_subset:,}"
    augment = f"pad-{args.pad} random crop + horizontal flip" if args.pad else "none"
    epochs = f"{args.epochs} epoch{'s' if args.epochs > 1 else ''}"
    w = args.width
    return [
        "## Setup", "",
        f"- Network: pre-activation CIFAR ResNet-{args.depth}, width {w} (channels {16 * w}, "
        f"{32 * w}, {64 * w}) from `tfpn.models.cifar_resnet`, after a fixed pixel "
        "standardization; `cbn` (and any `@v1` norm) in the post-activation ResNet of the same "
        f"size, because CBN needs the conv that produces its input; CBN: {_cbn_text(args)} "
        "(the official recipe; see \"CBN ablation\"). GN, GN+PN, GN+WS: "
        f"{args.groups} groups; the other norms: their package defaults.",
        f"- Data: {_dataset_name(args)}, {train} training images, {test} test images; "
        f"augmentation: {augment}.",
        f"- Training: {epochs} at every batch size (the same samples seen), SGD momentum "
        f"{args.momentum}, peak learning rate {args.base_lr} x batch / 128 ({sizes}), "
        f"{args.warmup_epochs} epoch linear warmup then cosine to 0, weight decay "
        f"{args.weight_decay} (L2) on kernels and PN's proxy parameters only (as the paper), "
        "none on gamma, beta, biases or the other norms' parameters."
        + (f" At most {args.max_steps} steps per run." if args.max_steps else ""),
        f"- Seeds: {args.seeds} for {', '.join(args.multi_seed_norms) or 'none'}; "
        f"{args.other_seeds} for the others. Test accuracy in inference mode (moving statistics "
        f"for the batch-dependent norms), evaluated at batch {EVAL_BATCH_SIZE}.", ""]


def _table_lines(args, cells):
    sizes = list(args.batch_sizes)
    lines = ["## Results", "",
             "Test accuracy (%) as mean ± standard deviation over seeds (no ± with one seed), "
             "seeds done / planned, and training seconds per epoch (the fastest epoch over the "
             "cell's runs: the least disturbed by other jobs on the machine).", "",
             "| norm | " + " | ".join(f"batch {b}: accuracy | seeds | s/epoch" for b in sizes)
             + " |", "|---|" + "---:|---:|---:|" * len(sizes)]
    for norm in args.norms:
        parts = []
        for b in sizes:
            c = cells[(norm, b)]
            parts += [_cell_text(c), f"{c['n']}/{c['planned']}",
                      f"{c['sec_epoch']:.0f}" if c["sec_epoch"] is not None else "—"]
        lines.append(f"| {norm} | " + " | ".join(parts) + " |")
    return lines + [""]


def _budget_lines(args, rows, mine):
    spent = sum(float(r["train_seconds"]) + float(r["eval_seconds"]) for r in mine)
    spent_cpu = sum(float(r["train_cpu_seconds"] or 0) + float(r["eval_seconds"]) for r in mine)
    estimate = sum(estimate_seconds(n, b, args, rows) for n, b, _ in planned_runs(args))
    return ["## Time budget", "",
            f"Spent: {_hours(spent)} wall-clock ({_hours(spent_cpu)} CPU) on {len(mine)} "
            f"finished run(s). Whole plan: {_hours(estimate)} of CPU time (measured where a run "
            "exists, calibration constants elsewhere), about the wall-clock time on an idle "
            "2-core machine; other jobs on the machine stretch the wall-clock time."
            ] + _calibration_lines(args)


def _machine_lines(args, mine):
    machines = sorted({(r["cpu"], r["nproc"], r["tf_version"], r["keras_version"]) for r in mine})
    lines = ["## Machine", ""]
    lines += [f"- Runs: {m[0]}, {m[1]} CPU cores, TensorFlow {m[2]}, Keras {m[3]}."
              for m in machines]
    if not machines:
        import importlib.metadata as md

        cpu, nproc = _machine()
        try:
            versions = f"TensorFlow {md.version('tensorflow')}, Keras {md.version('keras')}"
        except md.PackageNotFoundError:
            versions = "TensorFlow not installed"
        lines.append(f"- No run yet; this report was written on {cpu}, {nproc} CPU cores, "
                     f"{versions}.")
    lines.append(f"- Training steps of batches up to {args.jit_max_batch} run XLA-compiled, "
                 "several per call (less per-step overhead on CPU); larger batches run without "
                 "XLA. Times are wall-clock unless marked CPU, on a CPU that other jobs may share.")
    return lines


def ablation_args(args, overrides, batch_sizes):
    """The arguments of one CBN ablation variant: cbn alone, seed 0, into --ablation_csv."""
    values = {**vars(args), **overrides, "norms": ["cbn"], "batch_sizes": list(batch_sizes),
              "multi_seed_norms": [], "other_seeds": 1, "out_csv": args.ablation_csv,
              "report": "", "plot": "", "cbn_ablation": False}
    variant = argparse.Namespace(**values)
    _validate(variant)
    return variant


def _cbn_text(args):
    return (f"window {args.cbn_window}, rho {args.cbn_rho:g}, plain BN for the first "
            f"{100 * args.cbn_burnin:.0f}% of the steps")


def _flags(overrides):
    return " ".join(f"--{k}={v:g}" for k, v in overrides.items())


def _ablation_lines(args, cells):
    """The CBN ablation table (from --ablation_csv) next to the study's own cbn and bn@v1."""
    rows = read_rows(args.ablation_csv)
    if not rows or "cbn" not in args.norms:
        return []
    sizes = list(args.batch_sizes)
    lines = ["## CBN ablation", "",
             "Why CBN is where it is: the same network and protocol, seed 0, one CBN setting "
             "changed at a time (test accuracy %; train accuracy % of the last epoch in "
             "parentheses). Window 1 checks the layer's BN path against bn@v1; no burn-in "
             "pools stale statistics from the first step, while the weights move fastest; "
             "rho 0 removes the Taylor compensation of the stale statistics. A low train "
             "accuracy means the optimization suffered, not only the inference statistics.", "",
             "| variant | " + " | ".join(f"batch {b}" for b in sizes) + " |",
             "|---|" + "---:|" * len(sizes)]

    def cell_text(found):
        return (f"{_pct(float(found['test_accuracy']))} "
                f"({_pct(float(found['train_accuracy']))})") if found else "—"

    for label, norm in ((f"study's cbn ({_cbn_text(args)})", "cbn"),
                        ("study's bn@v1 (BN, same network)", "bn@v1")):
        if norm in args.norms:
            parts = []
            for b in sizes:
                c = cells[(norm, b)]
                parts.append(f"{_pct(c['mean'])}" if c["n"] else "—")
            lines.append(f"| {label} | " + " | ".join(parts) + " |")
    for label, overrides, batch_sizes in CBN_ABLATION:
        digest = config_hash(ablation_args(args, overrides, batch_sizes))
        found = {int(r["batch_size"]): r for r in rows
                 if r["config_hash"] == digest and r["norm"] == "cbn" and r["seed"] == "0"}
        lines.append(f"| {label} (`{_flags(overrides)}`) | "
                     + " | ".join(cell_text(found.get(b)) for b in sizes) + " |")
    return lines + ["", "```bash", study_command(args) + " --cbn_ablation", "```", ""]


def write_report(args):
    """Writes the markdown report (and the plot) from the CSV's rows of the current config."""
    rows = read_rows(args.out_csv)
    cells = summarize(args, rows)
    digest = config_hash(args)
    mine = [r for r in rows if r["config_hash"] == digest]
    others = sorted({r["config_hash"] for r in rows} - {digest})
    here = os.path.dirname(os.path.abspath(args.report))
    out = [f"# Accuracy study: batch-independent norms vs BatchNorm on {_dataset_name(args)}", "",
           f"Generated by `examples/compare_norms.py` from [`{os.path.relpath(args.out_csv, ROOT)}`]"
           f"({os.path.relpath(args.out_csv, here)}) (one row per run; config `{digest}`). Do "
           "not edit by hand: rerun the report command of \"Reproduce\".", "",
           "**Question.** Proxy Normalization (Labatie et al., NeurIPS 2021) claims that LN+PN "
           "and GN+PN \"consistently match or exceed\" BatchNorm while being batch-independent. "
           "Does that hold on real data here, and do they beat BN at small batch?", ""]
    out += _setup_lines(args) + _table_lines(args, cells)
    if args.plot and write_plot(args, cells):
        out += [f"![accuracy against batch size]({os.path.relpath(args.plot, here)})", ""]
    elif args.plot:
        out += ["(No plot yet: no run is finished.)" if not mine else
                "(No plot: matplotlib is not installed.)", ""]
    verdict, lines = reading(args, cells)
    out += ["## Reading against the paper's claim", "", verdict, ""] + lines + [
        "", "Caveats: one small network, one easy dataset and a few epochs on a CPU: this tests "
        "the claim in a cheap regime, not the paper's ImageNet-scale one; differences below the "
        "seed noise mean \"no measurable difference\", not equality; norms with one seed have no "
        "error bar. Batch-dependent norms (bn, bgn, iebn, cbn, evonorm_b0) are evaluated with "
        "their moving statistics; the others compute the same function in training and "
        "inference.", ""]
    out += _ablation_lines(args, cells)
    out += ["## Reproduce", "", "```bash",
            "# the study (resumable: rerun the same command to continue; --dry_run lists the runs)",
            study_command(args)]
    if study_command(args) == study_command(parse_args([])):
        out += ["# (these are the defaults: `python examples/compare_norms.py` does the same)"]
    out += ["# the report alone, from the CSV",
            study_command(args) + " --report_only", "```", ""]
    out += _budget_lines(args, rows, mine) + _machine_lines(args, mine)
    if others:
        out += ["", f"The CSV also holds rows of other configs ({', '.join(others)}), not shown."]
    os.makedirs(here, exist_ok=True)
    with open(args.report, "w") as f:
        f.write("\n".join(out) + "\n")


def main(argv=None):
    args = parse_args(argv)
    if args.cbn_ablation:
        for _, overrides, batch_sizes in CBN_ABLATION:
            variant = ablation_args(args, overrides, batch_sizes)
            if args.dry_run:
                print(describe_plan(variant, read_rows(variant.out_csv)))
            elif not args.report_only:
                run_study(variant)
        if args.report and not args.dry_run:
            write_report(args)
        return 0
    if args.dry_run:
        print(describe_plan(args, read_rows(args.out_csv)))
        return 0
    if not args.report_only:
        run_study(args)
    if args.report:
        write_report(args)
        print(f"Wrote {args.report}", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
