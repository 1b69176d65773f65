"""examples/demo.py (`make demo`): says where it writes before training, takes the folder
as `--model_dir` (`make demo DEMO_DIR=...`), and writes everything there."""

import os
import shutil
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_demo_passes_demo_dir_as_model_dir(tmp_path):
    out = subprocess.run(["make", "-n", "demo", f"DEMO_DIR={tmp_path}/run"], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    demo = [line for line in out.stdout.splitlines() if "examples/demo.py" in line]
    assert demo and demo[-1].endswith(f"--model_dir={tmp_path}/run"), out.stdout + out.stderr
    out = subprocess.run(["make", "-n", "demo"], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert "--model_dir" not in out.stdout   # the demo's own default folder


@pytest.mark.slow
def test_demo_prints_its_folder_first_and_writes_there(tmp_path):
    model_dir = str(tmp_path / "demo_run")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run(
        [sys.executable, "examples/demo.py", "--dataset=synthetic", "--depth=8",
         "--batch_size=8", "--epochs=1", "--steps_per_epoch=2", "--eval_steps=2",
         "--nojit_compile", f"--model_dir={model_dir}"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith(f"Writing checkpoints, logs, metrics and the exported models "
                               f"to {model_dir} "), lines[:3]
    assert f"Outputs in {model_dir}:" in out.stdout
    assert {"checkpoints", "logs", "metrics.json", "model.keras", "saved_model"} <= set(
        os.listdir(model_dir))
