"""The accuracy study script (examples/compare_norms.py): plan, resumable CSV, report, smoke run."""

import csv
import gzip
import importlib.util
import os
import re
import sys
import time

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import compare_norms  # noqa: E402

from tf_proxynorm import data  # noqa: E402


def _args(tmp_path, *extra):
    return compare_norms.parse_args([
        f"--out_csv={tmp_path / 'runs.csv'}", f"--report={tmp_path / 'results.md'}",
        f"--plot={tmp_path / 'plot.png'}", *extra])


def _row(args, norm, batch_size, seed, accuracy, seconds=10.0):
    return {"norm": norm, "batch_size": batch_size, "seed": seed,
            "config_hash": compare_norms.config_hash(args), "arch": "v2", "depth": args.depth,
            "width": args.width, "epochs": args.epochs, "test_accuracy": f"{accuracy:.4f}",
            "test_loss": "0.3", "diverged": 0, "train_seconds": seconds,
            "train_cpu_seconds": seconds / 2, "eval_seconds": 1.0, "load_average": 4.0,
            "seconds_per_epoch": seconds / args.epochs, "cpu": "test cpu", "nproc": 2,
            "tf_version": "2.x", "keras_version": "3.x", "finished_at": "2026-01-01T00:00:00"}


def _write_idx(path, array):
    """IDX (the MNIST format) written from its definition: 0, 0, type 0x08, ndim, big-endian
    dims, then the uint8 values."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


# -- plan ----------------------------------------------------------------------------------
def test_default_plan_is_the_issue_s_forty_runs(tmp_path):
    runs = compare_norms.planned_runs(_args(tmp_path))
    counts = {}
    for norm, batch_size, _ in runs:
        counts[(norm, batch_size)] = counts.get((norm, batch_size), 0) + 1
    # Issue 9: 3 seeds for bn, gn, gn+pn, ln+pn at both batch sizes, 1 for 8 other norms,
    # plus the control "bn@v1" (BN in CBN's post-activation network).
    assert len(runs) == 3 * 4 * 2 + 1 * 9 * 2 == 42
    assert {b for _, b in counts} == {64, 4}
    for norm in ("bn", "gn", "gn+pn", "ln+pn"):
        assert counts[(norm, 64)] == counts[(norm, 4)] == 3
    for norm in ("ln", "in", "evonorm_s0", "evonorm_b0", "bgn", "iebn", "cbn", "bn@v1", "gn+ws"):
        assert counts[(norm, 64)] == counts[(norm, 4)] == 1
    assert len(set(runs)) == 42


def test_dry_run_lists_the_runs_and_an_estimate_within_budget(tmp_path, capsys):
    assert compare_norms.main([f"--out_csv={tmp_path / 'none.csv'}", "--dry_run"]) == 0
    out = capsys.readouterr().out
    assert "42 planned runs, 0 done, 42 to run." in out
    assert out.count("seed 2") == 8  # the 4 multi-seed norms at 2 batch sizes
    estimate = re.search(r"Estimated CPU time: ([\d.]+) (h|min) for the whole study", out)
    hours = float(estimate.group(1)) / (1 if estimate.group(2) == "h" else 60)
    assert 0.5 < hours <= 4.0  # the issue's budget for the default study
    assert not os.path.exists(tmp_path / "none.csv")


def test_config_hash_follows_the_protocol_not_the_output_paths(tmp_path):
    base = compare_norms.config_hash(_args(tmp_path))
    assert compare_norms.config_hash(_args(tmp_path / "elsewhere", "--verbose=2")) == base
    assert compare_norms.config_hash(_args(tmp_path, "--jit_max_batch=0")) == base
    assert compare_norms.config_hash(_args(tmp_path, f"--data_dir={data.FASHION_MNIST_DIR}")) == base
    assert compare_norms.config_hash(_args(tmp_path, f"--data_dir={tmp_path}")) != base
    for flag in ("--epochs=4", "--depth=14", "--train_subset=1000", "--weight_decay=1e-4",
                 "--groups=4", "--base_lr=0.05"):
        assert compare_norms.config_hash(_args(tmp_path, flag)) != base, flag


@pytest.mark.parametrize("flag, message", [
    ("--depth=10", "depth=10"), ("--norms=bn,foo", "norms='foo'"),
    ("--batch_sizes=0", "batch_sizes=[0]"), ("--epochs=0", "epochs=0"),
    ("--train_subset=-1", "train_subset=-1")])
def test_bad_flags_raise_naming_the_value(tmp_path, flag, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _args(tmp_path, flag)


# -- CSV -----------------------------------------------------------------------------------
def test_append_survives_a_cut_line_and_skips_it(tmp_path):
    args = _args(tmp_path)
    path = args.out_csv
    compare_norms.append_row(path, _row(args, "bn", 64, 0, 0.9))
    with open(path, "a") as f:
        f.write("gn,64,0,abc")  # a crash in the middle of a write: no newline, no end
    compare_norms.append_row(path, _row(args, "gn", 64, 0, 0.8))
    rows = compare_norms.read_rows(path)
    assert [(r["norm"], r["test_accuracy"]) for r in rows] == [("bn", "0.9000"), ("gn", "0.8000")]
    done = compare_norms.finished_keys(rows)
    assert ("bn", 64, 0, compare_norms.config_hash(args)) in done
    assert ("bn", 64, 1, compare_norms.config_hash(args)) not in done


def test_append_refuses_a_csv_with_other_columns(tmp_path):
    path = tmp_path / "other.csv"
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="header"):
        compare_norms.append_row(str(path), {"norm": "bn"})


# -- report --------------------------------------------------------------------------------
def test_report_table_statistics_placeholders_and_reading(tmp_path):
    args = _args(tmp_path)
    accuracies = {("bn", 64): [0.91, 0.92, 0.93], ("gn+pn", 64): [0.915, 0.925, 0.92],
                  ("bn", 4): [0.80, 0.82, 0.81], ("gn+pn", 4): [0.90, 0.91, 0.905],
                  ("ln", 64): [0.88]}
    for (norm, batch_size), values in accuracies.items():
        for seed, accuracy in enumerate(values):
            compare_norms.append_row(args.out_csv, _row(args, norm, batch_size, seed, accuracy))
    compare_norms.append_row(args.out_csv, {**_row(args, "gn", 64, 0, 0.5),
                                            "config_hash": "0000000000"})  # another config
    compare_norms.write_report(args)
    report = open(args.report).read()

    def cell(values):
        mean, std = np.mean(values) * 100, np.std(values, ddof=1) * 100
        return f"{mean:.2f} ± {std:.2f}"

    bn_line = next(line for line in report.splitlines() if line.startswith("| bn |"))
    assert bn_line.split(" | ")[1:4] == [cell(accuracies[("bn", 64)]), "3/3", "3"]
    assert cell(accuracies[("bn", 4)]) in bn_line
    ln_line = next(line for line in report.splitlines() if line.startswith("| ln |"))
    assert "| 88.00 | 1/1 |" in ln_line and "not yet run | 0/1" in ln_line
    gn_line = next(line for line in report.splitlines() if line.startswith("| gn |"))
    assert gn_line.count("not yet run") == 2  # the other config's row is not mixed in
    assert "0000000000" in report
    # gn+pn vs bn at batch 4: +9.50 points, far beyond 2 SE; at 64: within noise.
    assert "gn+pn 90.50 vs bn 81.00 at batch 4: +9.50 points" in report
    assert re.search(r"gn\+pn 92\.00 vs bn 92\.00 at batch 64: \+0\.00 points.*within noise",
                     report)
    assert "BN from batch 64 to 4: 92.00 -> 81.00 (-11.00 points)" in report
    assert "ln+pn vs bn at batch 64: not yet run" in report
    assert ("In every comparison made so far, LN+PN and GN+PN match (within noise) or exceed BN"
            in report)
    assert "still missing" in report
    assert compare_norms.study_command(args) in report
    if importlib.util.find_spec("matplotlib"):
        assert open(tmp_path / "plot.png", "rb").read(8) == b"\x89PNG\r\n\x1a\n"
        assert "![accuracy against batch size](plot.png)" in report
    else:
        assert "No plot: matplotlib is not installed" in report


def test_reading_reports_a_shortfall_beyond_noise_and_flags_single_seeds(tmp_path):
    args = _args(tmp_path, "--norms=bn,gn+pn", "--batch_sizes=64")
    for seed, (bn, pn) in enumerate([(0.92, 0.88), (0.925, 0.885), (0.93, 0.89)]):
        compare_norms.append_row(args.out_csv, _row(args, "bn", 64, seed, bn))
        compare_norms.append_row(args.out_csv, _row(args, "gn+pn", 64, seed, pn))
    verdict, lines = compare_norms.reading(args, compare_norms.summarize(
        args, compare_norms.read_rows(args.out_csv)))
    assert verdict.startswith("In 1 of 1 comparisons made so far, an LN+PN/GN+PN mean falls "
                              "below BN's by more than the noise")
    # std 0.5 points each over 3 seeds: 2 SE = 2 * sqrt(2 * 0.5^2 / 3) = 0.82 points.
    assert "gn+pn 88.50 vs bn 92.50 at batch 64: -4.00 points, 2 SE = 0.82 points; below" in (
        "\n".join(lines))

    single = _args(tmp_path / "single", "--norms=bn,gn+pn", "--batch_sizes=64", "--seeds=1")
    compare_norms.append_row(single.out_csv, _row(single, "bn", 64, 0, 0.90))
    compare_norms.append_row(single.out_csv, _row(single, "gn+pn", 64, 0, 0.91))
    verdict, _ = compare_norms.reading(single, compare_norms.summarize(
        single, compare_norms.read_rows(single.out_csv)))
    assert verdict.startswith("Preliminary (single seeds, no error bars): in every comparison")


def test_report_with_no_run_says_not_yet_run(tmp_path):
    args = _args(tmp_path)
    compare_norms.write_report(args)
    report = open(args.report).read()
    assert report.count("not yet run | 0/") == 2 * len(compare_norms.NORMS)
    assert "**Not yet run**" in report and "Missing runs: all of them." in report
    assert not os.path.exists(tmp_path / "plot.png")


# -- smoke run -----------------------------------------------------------------------------
@pytest.fixture
def data_dir(tmp_path):
    """The real Fashion-MNIST files when installed, else a small generated IDX set."""
    if data.fashion_mnist_available():
        return None
    folder = tmp_path / "fmnist"
    folder.mkdir()
    for prefix, count, seed in (("train", 512, 0), ("t10k", 256, 1)):
        images, labels = data.synthetic_arrays(count, seed=seed)
        _write_idx(str(folder / f"{prefix}-images-idx3-ubyte.gz"), images[..., 0])
        _write_idx(str(folder / f"{prefix}-labels-idx1-ubyte.gz"), labels)
    return str(folder)


@pytest.mark.slow
def test_smoke_study_writes_rows_report_and_resumes(tmp_path, data_dir, monkeypatch):
    flags = ["--norms=bn,gn+pn", "--batch_sizes=64", "--epochs=1", "--train_subset=256",
             "--test_subset=128", "--depth=8", "--width=1", "--groups=4", "--seeds=1"]
    flags += [f"--data_dir={data_dir}"] if data_dir else []
    args = _args(tmp_path, *flags)
    assert compare_norms.main(_argv(args, flags)) == 0

    with open(args.out_csv, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["norm"], r["batch_size"], r["seed"]) for r in rows] == [
        ("bn", "64", "0"), ("gn+pn", "64", "0")]
    for r in rows:
        assert r["config_hash"] == compare_norms.config_hash(args)
        assert int(r["steps"]) == 256 // 64  # one epoch of the subset
        assert int(r["test_examples"]) == 128
        assert 0.0 <= float(r["test_accuracy"]) <= 1.0 and r["diverged"] == "0"
    report = open(args.report).read()
    for r in rows:
        assert f"| {r['norm']} | {100 * float(r['test_accuracy']):.2f} | 1/1 |" in report
    assert os.path.exists(tmp_path / "plot.png") == bool(importlib.util.find_spec("matplotlib"))
    # The same seed gives the same run (initialization, data order and augmentation).
    by_seed = {(r["norm"], r["seed"]): r for r in rows}
    again = tmp_path / "again.csv"
    compare_norms.main(_argv(args, flags, out_csv=again) + ["--norms=bn", "--report="])
    assert next(csv.DictReader(open(again)))["test_loss"] == by_seed[("bn", "0")]["test_loss"]

    def must_not_train(*_):
        raise AssertionError("a finished run was trained again")

    monkeypatch.setattr(compare_norms, "train_one", must_not_train)
    start = time.perf_counter()
    assert compare_norms.main(_argv(args, flags)) == 0
    assert time.perf_counter() - start < 5
    assert len(compare_norms.read_rows(args.out_csv)) == 2


def _argv(args, flags, out_csv=None):
    return flags + [f"--out_csv={out_csv or args.out_csv}", f"--report={args.report}",
                    f"--plot={args.plot}"]
