"""examples/finetune_small_batch.py --smoke: the fine-tuning study's pipeline in seconds."""

import csv
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "examples"))

import finetune_small_batch as study  # noqa: E402


def _argv(tmp_path, *extra):
    return ["--smoke", f"--out_dir={tmp_path}", f"--report={tmp_path / 'report.md'}",
            f"--plot={tmp_path / 'plot.png'}", *extra]


def _rows(tmp_path):
    with open(tmp_path / "runs.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_smoke_run_report_and_resume(tmp_path):
    study.main(_argv(tmp_path, "--methods=frozen_bn,calibrated,distilled", "--batch_sizes=2"))
    rows = _rows(tmp_path)
    assert [(r["method"], r["batch_size"], r["seed"]) for r in rows] == [
        ("frozen_bn", "2", "0"), ("calibrated", "2", "0"), ("distilled", "2", "0")]
    for r in rows:
        assert 0.0 <= float(r["acc_a_before"]) <= 1.0 and 0.0 <= float(r["acc_b_after"]) <= 1.0
    assert rows[0]["output_error"] == "" and 0.0 < float(rows[1]["output_error"]) < 1.0
    assert 0.0 < float(rows[2]["output_error"]) < 1.0
    report = (tmp_path / "report.md").read_text()
    assert "| FrozenBN | 2 |" in report and "| GN+PN, calibrated conversion | 2 |" in report
    assert "| GN+PN, calibrated + distilled | 2 |" in report
    assert (tmp_path / "plot.png").stat().st_size > 1000
    models = sorted(os.listdir(tmp_path / "models"))
    assert any(m.startswith("bn_seed0") and m.endswith(".keras") for m in models)
    assert any(m.startswith("calibrated_seed0") and m.endswith(".keras") for m in models)
    assert any(m.startswith("distilled_seed0") and m.endswith(".keras") for m in models)
    # Resumed: nothing is rerun; the report alone is rewritten.
    study.main(_argv(tmp_path, "--methods=frozen_bn,calibrated,distilled", "--batch_sizes=2"))
    assert len(_rows(tmp_path)) == 3
    study.main(_argv(tmp_path, "--methods=frozen_bn,calibrated,distilled", "--batch_sizes=2",
                     "--report_only"))
    assert len(_rows(tmp_path)) == 3


def test_config_hash_and_args():
    base = study.parse_args([])
    assert (base.finetune_steps, base.seeds, base.batch_sizes) == (200, 3, [2, 4])
    other = study.parse_args(["--finetune_steps=10"])
    assert study.config_hash(base) != study.config_hash(other)
    # The pretrained models do not depend on the fine-tuning flags.
    assert (study.config_hash(base, study.PRETRAIN_KEYS)
            == study.config_hash(other, study.PRETRAIN_KEYS))
    assert base.calibration_steps == 800
    steps = study.parse_args(["--calibration_steps=100"])
    assert study.config_hash(base) != study.config_hash(steps)


def test_smoke_conversion_sweep(tmp_path, monkeypatch):
    monkeypatch.setattr(study, "SWEEP", (("plain", "gn+pn", 8, 0, "model", 0),
                                         ("distilled", "gn+pn", 8, 16, "model", 2)))
    study.main(["--smoke", f"--out_dir={tmp_path}", "--conversion_sweep"])
    with open(tmp_path / "conversion_sweep.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["label"], r["calibration_steps"]) for r in rows] == [("plain", "0"),
                                                                     ("distilled", "2")]
    assert all(0.0 <= float(r["acc_a"]) <= 1.0 and float(r["logits_error"]) >= 0.0 for r in rows)
