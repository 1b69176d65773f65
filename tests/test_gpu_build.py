"""The GPU-enabled op library: the TF_PROXYNORM_BUILD_CUDA policy, a real build with nvcc
on a host without a GPU (it loads, registers CPU and GPU kernels, and its CPU kernels still
compute the contract's values), and the CPU-only fallback when the GPU step fails.

The builds run in subprocesses into temporary caches, so the library this process may
already have loaded is never touched. docs/gpu.md.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tf_proxynorm.fused import cache as build_cache
from tf_proxynorm.fused import cuda, settings
from tf_proxynorm.fused.errors import BuildError

ROOT = Path(__file__).resolve().parent.parent
DEFAULT = settings.DEFAULT_CUDA_ARCHS
NVCC = cuda.find_nvcc()
needs_nvcc = pytest.mark.skipif(
    NVCC is None, reason="nvcc not found: the GPU-enabled build is not tested here "
    "(install a CUDA toolkit, or see docs/gpu.md)")


# -- policy (no compilation) ----------------------------------------------------------------

@pytest.fixture
def fake_toolkit(monkeypatch):
    """A toolkit and GPU that the policy sees, without running anything."""
    state = {"nvcc": "/opt/cuda/bin/nvcc", "gpu": True, "driver": 12080,
             "codes": {"50", "75", "80", "86", "89", "90"}}
    monkeypatch.setattr(cuda, "find_nvcc", lambda: state["nvcc"])
    monkeypatch.setattr(cuda, "nvcc_version", lambda nvcc: ("12.5.82", 12050))
    monkeypatch.setattr(cuda, "tensorflow_sees_gpu", lambda: state["gpu"])
    monkeypatch.setattr(cuda, "driver_version", lambda: state["driver"])
    monkeypatch.setattr(cuda, "_supported_codes", lambda nvcc: state["codes"])
    monkeypatch.delenv(settings.ENV_CUDA_ARCHS, raising=False)
    return state


def test_auto_builds_gpu_kernels_only_with_nvcc_and_a_gpu(fake_toolkit, monkeypatch):
    monkeypatch.setenv("TF_PROXYNORM_BUILD_CUDA", "auto")
    assert cuda.cuda_config() == {"nvcc": "/opt/cuda/bin/nvcc", "nvcc_version": "12.5.82",
                                    "sass": ["sm_75", "sm_80", "sm_86", "sm_89", "sm_90"],
                                    "ptx": "compute_90"}
    fake_toolkit["gpu"] = False
    assert cuda.cuda_config() is None
    fake_toolkit.update(gpu=True, nvcc=None)
    assert cuda.cuda_config() is None


def test_auto_skips_a_driver_older_than_nvcc(fake_toolkit, monkeypatch):
    monkeypatch.setenv("TF_PROXYNORM_BUILD_CUDA", "auto")
    fake_toolkit["driver"] = 11080
    assert cuda.cuda_config() is None
    monkeypatch.setenv("TF_PROXYNORM_BUILD_CUDA", "1")
    assert cuda.cuda_config()["nvcc_version"] == "12.5.82"


def test_forced_builds_without_a_gpu_and_fails_clearly_without_nvcc(fake_toolkit, monkeypatch):
    monkeypatch.setenv("TF_PROXYNORM_BUILD_CUDA", "1")
    fake_toolkit["gpu"] = False
    assert cuda.cuda_config()["sass"][0] == "sm_75"
    fake_toolkit["nvcc"] = None
    with pytest.raises(BuildError, match=r"TF_PROXYNORM_BUILD_CUDA=1 but nvcc was not"):
        cuda.cuda_config()


@pytest.mark.parametrize("value", ["0", "off", "false"])
def test_disabled(fake_toolkit, monkeypatch, value):
    monkeypatch.setenv("TF_PROXYNORM_BUILD_CUDA", value)
    assert cuda.cuda_config() is None


def test_bad_mode_is_rejected(monkeypatch):
    monkeypatch.setenv("TF_PROXYNORM_BUILD_CUDA", "sometimes")
    with pytest.raises(BuildError,
                       match=r"Received: TF_PROXYNORM_BUILD_CUDA='sometimes'"):
        cuda.cuda_config()


def test_architectures(fake_toolkit, monkeypatch):
    monkeypatch.setenv("TF_PROXYNORM_BUILD_CUDA", "1")
    monkeypatch.setenv("TF_PROXYNORM_CUDA_ARCHS", "sm_90, 80")
    config = cuda.cuda_config()
    assert (config["sass"], config["ptx"]) == (["sm_80", "sm_90"], "compute_90")
    assert cuda.gencode_flags(["80", "90"], "90") == [
        "-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90",
        "-gencode", "arch=compute_90,code=compute_90"]
    fake_toolkit["codes"] = {"75", "80"}  # an older nvcc: unsupported targets are dropped
    monkeypatch.delenv("TF_PROXYNORM_CUDA_ARCHS")
    assert cuda.cuda_config()["sass"] == ["sm_75", "sm_80"]
    monkeypatch.setenv("TF_PROXYNORM_CUDA_ARCHS", "ampere")
    with pytest.raises(BuildError, match=r"Received: TF_PROXYNORM_CUDA_ARCHS='ampere'"):
        cuda.cuda_config()


def test_gpu_config_is_in_the_cache_key(fake_toolkit, monkeypatch):
    monkeypatch.setenv("TF_PROXYNORM_BUILD_CUDA", "1")
    with_gpu = build_cache.current_config()
    monkeypatch.setenv("TF_PROXYNORM_CUDA_ARCHS", "90")
    one_arch = build_cache.current_config()
    monkeypatch.setenv("TF_PROXYNORM_BUILD_CUDA", "0")
    cpu_only = build_cache.current_config()
    assert with_gpu.cuda["sass"] == ["sm_75", "sm_80", "sm_86", "sm_89", "sm_90"]
    assert cpu_only.cuda is None
    assert len({with_gpu.key(), one_arch.key(), cpu_only.key()}) == 3
    # The GPU sources are hashed only into a GPU build's key.
    assert with_gpu.source_hash != cpu_only.source_hash


# -- real builds (subprocesses, temporary caches) ---------------------------------------------

_INSPECT = textwrap.dedent("""
    import json, sys
    import numpy as np
    import tensorflow as tf
    from tensorflow.python.framework import kernels
    sys.path.insert(0, sys.argv[2])
    import reference_np as ref

    module = tf.load_op_library(sys.argv[1])
    out = {"kernels": {}}
    for op in ("TfProxyNorm>GroupNormAct", "TfProxyNorm>GroupNormActGrad"):
        out["kernels"][op] = sorted(
            [k.device_type, tf.dtypes.as_dtype(c.allowed_values.list.type[0]).name]
            for k in kernels.get_registered_kernels_for_op(op).kernel
            for c in k.constraint if c.name == "T")

    rng = np.random.default_rng(0)
    shape, groups, eps = (2, 3, 4, 8), 2, 1e-3
    x = rng.normal(size=shape).astype(np.float32) * 2 + 0.5
    dy = rng.normal(size=shape).astype(np.float32)
    p = [1 + 0.3 * rng.normal(size=8), 0.3 * rng.normal(size=8), 0.3 * rng.normal(size=8),
         1 + 0.2 * rng.random(size=8)]
    p = [v.astype(np.float32) for v in p]
    attrs = dict(groups=groups, epsilon=eps, activation="silu", channels_last=True,
                 use_proxy=True)
    with tf.device("/CPU:0"):
        y, mean, inv = module.tf_proxy_norm_group_norm_act(x, *p, **attrs)
        grads = module.tf_proxy_norm_group_norm_act_grad(dy, x, *p, mean, inv, **attrs)
    y_ref, mean_ref, inv_ref, _ = ref.forward(x, *p, **attrs)
    bw = ref.backward(dy, x, *p, **attrs)
    names = ("dx", "dgamma", "dbeta", "dproxy_mean", "dproxy_inv_std")
    errors = {"y": y.numpy() - y_ref, "mean": mean.numpy() - mean_ref,
              "inv_std": (inv.numpy() - inv_ref) / inv_ref}
    errors.update({n: (g.numpy() - bw[n]) / (1 + abs(bw[n])) for n, g in zip(names, grads)})
    out["max_error"] = {k: float(np.max(np.abs(v))) for k, v in errors.items()}
    print("RESULT " + json.dumps(out))
""")


def _env(cache, **extra):
    # Generic CPU kernels only (TF_PROXYNORM_CPU_ISAS): the GPU step is what is tested here.
    env = dict(os.environ, TF_PROXYNORM_CACHE_DIR=str(cache), TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONWARNINGS="default", TF_PROXYNORM_CPU_ISAS="generic")
    env.pop("TF_PROXYNORM_NO_BUILD", None)
    env.update(extra)
    return env


def _build(cache, **extra):
    """Runs `python -m tf_proxynorm.build` into `cache`; (library path, stamp, stderr)."""
    result = subprocess.run([sys.executable, "-m", "tf_proxynorm.build"], cwd=ROOT,
                            env=_env(cache, **extra), capture_output=True, text=True,
                            timeout=1800)
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]
    (directory,) = [p for p in Path(cache).glob("tf*") if p.is_dir()]
    stamp = json.loads((directory / build_cache.STAMP_NAME).read_text())
    return directory / build_cache.LIBRARY_NAME, stamp, result.stderr


def _inspect(library, cache):
    """Loads `library` in a fresh process: registered kernels and CPU-kernel errors."""
    result = subprocess.run(
        [sys.executable, "-c", _INSPECT, str(library), str(ROOT / "custom_ops" / "gpu_test")],
        env=_env(cache), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr[-5000:]
    (line,) = [l for l in result.stdout.splitlines() if l.startswith("RESULT ")]
    return json.loads(line[len("RESULT "):])


ALL_TYPES = ["bfloat16", "float16", "float32"]


def _assert_cpu_kernels_correct(found):
    for name, error in found["max_error"].items():
        assert error < 2e-5, f"{name}: max error {error}"


@pytest.mark.slow
@needs_nvcc
def test_gpu_enabled_build_registers_both_devices_and_keeps_correct_cpu_kernels(tmp_path):
    """One GPU-enabled build (TF_PROXYNORM_BUILD_CUDA=1), for the oldest and the newest
    default architecture (all five take minutes more on 2 cores; the default list itself is
    checked by the policy tests above). One test, so that a run builds it once: it registers
    CPU and GPU kernels for every dtype, its CPU kernels still compute the reference values,
    and its stamp records the CUDA build."""
    library, stamp, _ = _build(tmp_path, TF_PROXYNORM_BUILD_CUDA="1",
                               TF_PROXYNORM_CUDA_ARCHS=f"{DEFAULT[0]},{DEFAULT[-1]}")
    found = _inspect(library, tmp_path)
    for op, kernels in found["kernels"].items():
        assert kernels == sorted([d, t] for d in ("CPU", "GPU") for t in ALL_TYPES), op
    _assert_cpu_kernels_correct(found)

    recorded = stamp["cuda_build"]
    version, number = cuda.nvcc_version(NVCC)
    assert recorded["nvcc_version"] == version and recorded["cuda_version"] == number
    assert recorded["sass"] == [f"sm_{DEFAULT[0]}", f"sm_{DEFAULT[-1]}"]
    assert recorded["ptx"] == f"compute_{DEFAULT[-1]}"
    assert recorded["cudart"].startswith("static")
    assert recorded["headers"]["source"] in ("tensorflow wheel", "toolkit")
    assert stamp["config"]["cuda"]["sass"] == recorded["sass"]
    needed = subprocess.run(["readelf", "-d", str(library)], capture_output=True, text=True)
    if needed.returncode == 0:
        assert "libcudart" not in needed.stdout
    assert not list(library.parent.glob("*.o"))  # objects are not left in the cache


@pytest.mark.slow
def test_failed_gpu_step_leaves_a_cpu_library_and_one_warning(tmp_path):
    """A toolkit whose nvcc fails to compile: the build still succeeds, CPU-only, with one
    warning, and records no CUDA build."""
    toolkit = tmp_path / "toolkit"
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "lib64").mkdir()
    (toolkit / "lib64" / "libcudart_static.a").write_bytes(b"!<arch>\n")
    nvcc = toolkit / "bin" / "nvcc"
    nvcc.write_text(textwrap.dedent("""\
        #!/bin/sh
        case "$1" in
          --version) echo "Cuda compilation tools, release 12.5, V12.5.82" ;;
          --list-gpu-code) printf 'sm_75\\nsm_80\\nsm_86\\nsm_89\\nsm_90\\n' ;;
          --dryrun) ;;
          *) echo "fake nvcc: internal compiler error" >&2; exit 3 ;;
        esac
        """))
    nvcc.chmod(0o755)
    cache = tmp_path / "cache"
    library, stamp, stderr = _build(
        cache, TF_PROXYNORM_BUILD_CUDA="1",
        PATH=f"{toolkit / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
    assert stderr.count("the GPU kernels failed to build") == 1, stderr[-3000:]
    assert "fake nvcc: internal compiler error" in stderr
    assert stamp["cuda_build"] is None
    assert stamp["config"]["cuda"]["nvcc"] == str(nvcc)
    found = _inspect(library, cache)
    for op, kernels in found["kernels"].items():
        assert kernels == sorted(["CPU", t] for t in ALL_TYPES), op
    _assert_cpu_kernels_correct(found)
