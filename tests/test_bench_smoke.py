"""Smoke tests of benchmarks/bench_norm.py and bench_jax.py: they run end to end on a tiny
shape and report what they claim (the timings themselves are checked by reading the
benchmark, not here)."""

import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import tf_proxynorm as tfpn
from helpers import load_benchmark

_BENCHMARKS = pathlib.Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_norm")


def test_pass_bytes_is_the_issue_five_pass_model(bench):
    # Issue 3: read x, write y, read x and dy, write dx = 5 * N*H*W*C * 4 bytes in float32.
    assert bench.pass_bytes((8, 56, 56, 256), 5) == 128_450_560
    assert bench.pass_bytes((2, 3, 5, 7), 2, itemsize=2) == 2 * 210 * 2


def test_bad_flags_are_refused(bench, capsys):
    with pytest.raises(SystemExit):
        bench.main(["--norms=gn,bn"])
    assert "Received: --norms=['bn']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--shapes=8x56x256"])
    assert "8x56x256" in capsys.readouterr().err


def test_quick_run_on_a_tiny_shape(bench, capsys):
    shape = (2, 4, 4, 64)
    results = bench.main(["--quick", "--shapes=2x4x4x64", "--norms=gn,in", "--repeats=2",
                          "--markdown"])
    out = capsys.readouterr().out
    expected = [n for n in bench.CANDIDATES
                if n != bench.FUSED or tfpn.fused_op_available()]
    assert [(r["shape"], r["norm"]) for r in results] == [(shape, "gn"), (shape, "in")]
    for r in results:
        for key in ("fwd", "fwd_bwd"):
            assert list(r[key + "_ratio"]) == expected
            times = np.array([r[key][n] for n in expected])
            assert np.all(np.isfinite(times)) and np.all(times > 0)
            assert r[key + "_ratio"][bench.BASELINE] == 1.0
            # 5 (or 2) tensors of 2*4*4*64 float32 over the time, as a share of the copy's
            # 2 tensors over its time.
            passes = 5 if key == "fwd_bwd" else 2
            name = expected[0]
            want = (passes * 2048 * 4 / r[key][name]) / (2 * 2048 * 4 / r[key][bench.COPY])
            assert bench.efficiency(r, name, key) == pytest.approx(want, rel=1e-12)
    for name in expected:
        assert name in out
    assert "Targets" in out and "| 2x4x4x64 | IN |" in out


@pytest.mark.slow
def test_bench_step_runs_end_to_end_on_a_tiny_model(capsys):
    """benchmarks/bench_step.py: whole training steps with and without XLA, ratios in one run."""
    step = load_benchmark("bench_step")
    summary = step.main(["--models=cifar_resnet20", "--norms=gn+pn,keras_gn", "--jit=both",
                         "--cifar_batch=2", "--rounds=2", "--warmup=1"])
    out = capsys.readouterr().out
    assert sorted(summary) == sorted(
        ("cifar_resnet20", norm, jit) for norm in ("gn+pn", "keras_gn") for jit in (True, False))
    for (model, norm, jit), (seconds, vs_keras, _) in summary.items():
        assert seconds > 0 and np.isfinite(vs_keras)
        assert norm != "keras_gn" or vs_keras == 1.0
    assert "cifar_resnet20, jit_compile=True" in out and "vs keras_gn" in out
    with pytest.raises(SystemExit):
        step.main(["--norms=batchnorm"])


def test_bench_jax_runs_on_a_tiny_shape_under_the_jax_backend():
    """benchmarks/bench_jax.py in a JAX-backend process: every candidate timed, one row
    per (shape, norm), the target line printed."""
    env = dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="2")
    out = subprocess.run(
        [sys.executable, str(_BENCHMARKS / "bench_jax.py"), "--shapes=2x4x4x64",
         "--norms=gn,ln", "--rounds=2", "--markdown"],
        env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode in (0, 1), out.stderr[-3000:]   # 1: a target missed (timing noise)
    assert "JAX " in out.stdout
    for norm in ("GN", "LN"):
        assert f"| 2x4x4x64 | {norm} |" in out.stdout
    assert out.stdout.count("tfpn GN+PN+ReLU <= 1.0x Keras GN+ReLU") == 2
