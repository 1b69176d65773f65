"""The CUDA kernel core (custom_ops/cuda) without a GPU.

The very kernel source is compiled by g++ against the CPU emulator of
custom_ops/gpu_test/cuda_emu.h (blocks and threads scheduled in random orders, so a missing
barrier changes results) and its forward and backward are checked against the float64
reference of custom_ops/gpu_test/reference_np.py, written from docs/fused_op_contract.md,
through the C API that the TensorFlow wrapper and the GPU harness use. With nvcc, the
harness's own nvcc build is compiled and its host-side entry points are exercised.

Not covered here: GPU timing, the memory model (fences, L1), and the GPU's own math
functions; docs/gpu.md says what has been validated where.
"""

import ctypes
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HARNESS_DIR = Path(__file__).resolve().parent.parent / "custom_ops" / "gpu_test"
sys.path.insert(0, str(HARNESS_DIR))
import reference_np  # noqa: E402
import run_harness  # noqa: E402

from tf_proxynorm.fused import cuda as _build_cuda  # noqa: E402

pytestmark = pytest.mark.slow

TFPN_ERR_INVALID_ARGUMENT, TFPN_ERR_WORKSPACE, TFPN_ERR_DRIVER = 1, 2, 4
ACTIVATIONS = list(reference_np.ACTIVATIONS)
# (shape, channels_last): the vectorized path (C or P divisible by 4) and the scalar one.
LAYOUTS = {
    "nhwc-vec": ((2, 5, 6, 8), True),
    "nchw-vec": ((2, 8, 4, 5), False),
    "nhwc-scalar": ((2, 3, 5, 6), True),
    "nchw-scalar": ((2, 6, 3, 5), False),
}


def _emulator_includes():
    """CUDA headers for the g++ build (cuda_fp16.h, cuda_bf16.h and their dependencies): the
    copy bundled in the TensorFlow wheel, else a toolkit's."""
    import tensorflow as tf

    cuda = Path(tf.__file__).resolve().parent / "include" / "third_party" / "gpus" / "cuda"
    if (cuda / "include" / "cuda_bf16.h").is_file():
        return [cuda / "include", cuda / "libcudacxx" / "include"]
    nvcc = _build_cuda.find_nvcc()
    if nvcc is not None:
        return [_build_cuda.toolkit_root(nvcc) / "include"]
    pytest.skip("no CUDA headers (neither bundled with TensorFlow nor from a toolkit)")


def _make(target, build_dir, **variables):
    if shutil.which("make") is None:
        pytest.skip("`make` is not installed")
    command = ["make", "-C", str(HARNESS_DIR), f"BUILD={build_dir}", target]
    command += [f"{k}={v}" for k, v in variables.items()]
    result = subprocess.run(command, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


@pytest.fixture(scope="module")
def emu_library(tmp_path_factory):
    """libtfpn_emu.so built once per module into a temporary directory."""
    build_dir = tmp_path_factory.mktemp("tfpn_emu")
    includes = " ".join(str(p) for p in _emulator_includes())
    _make("emu", build_dir, CUDA_INC=includes)
    return build_dir / "libtfpn_emu.so"


@pytest.fixture(scope="module")
def runner(emu_library):
    # Random block and thread orders (read at the emulator's first launch).
    os.environ.update(TFPN_EMU_BLOCK_ORDER="rand", TFPN_EMU_THREAD_ORDER="rand",
                      TFPN_EMU_SEED="7")
    return run_harness.Runner(run_harness.load_library(str(emu_library)),
                              run_harness.EmuBackend())


def _assert_case(runner, seed, **case):
    ok, errs = run_harness.run_case(runner, np.random.default_rng(seed), **case)
    failing = {k: round(v, 3) for k, v in errs.items() if not v <= 1.0}
    assert ok, f"errors in units of the tolerance: {failing or errs} (non-finite output?)"


def _grid():
    for layout, (shape, channels_last) in LAYOUTS.items():
        c = shape[-1] if channels_last else shape[1]
        for groups in (1, 2, c):
            for act in ACTIVATIONS:
                for use_proxy in (False, True):
                    yield pytest.param(shape, channels_last, groups, act, use_proxy,
                                       id=f"{layout}-G{groups}-{act}-pn{int(use_proxy)}")


@pytest.mark.parametrize("shape,channels_last,groups,act,use_proxy", list(_grid()))
def test_float32_matches_reference(runner, shape, channels_last, groups, act, use_proxy):
    _assert_case(runner, 0, shape=shape, channels_last=channels_last, groups=groups,
                 dtype="float32", act=act, use_proxy=use_proxy)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("act", ACTIVATIONS)
@pytest.mark.parametrize("layout", ["nhwc-vec", "nchw-vec", "nhwc-scalar"])
def test_half_types_match_reference(runner, dtype, act, layout):
    shape, channels_last = LAYOUTS[layout]
    c = shape[-1] if channels_last else shape[1]
    for groups, use_proxy in ((1, True), (2, False), (c, True)):
        _assert_case(runner, 1, shape=shape, channels_last=channels_last, groups=groups,
                     dtype=dtype, act=act, use_proxy=use_proxy)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("case", [
    dict(shape=(2, 7, 9, 16), channels_last=True, groups=4, act="silu", offset=1),
    dict(shape=(2, 16, 7, 9), channels_last=False, groups=16, act="gelu", offset=1),
    dict(shape=(5, 6, 6, 32), channels_last=True, groups=8, act="relu", chunk_bytes=1),
    dict(shape=(5, 32, 6, 6), channels_last=False, groups=8, act="leaky_relu",
         chunk_bytes=2 * 32 * 36 * 4),
    dict(shape=(3, 4, 4, 32), channels_last=True, groups=4, act="gelu", misaligned=True),
    dict(shape=(3, 32, 4, 4), channels_last=False, groups=4, act="relu", misaligned=True),
    dict(shape=(2, 40, 40, 16), channels_last=True, groups=4, act="silu"),
    dict(shape=(2, 8, 64, 64), channels_last=False, groups=2, act="identity"),
    dict(shape=(1, 3, 3, 256), channels_last=True, groups=256, act="relu"),
], ids=["offset-nhwc", "offset-nchw", "chunk-per-example", "chunk-2-examples",
        "misaligned-nhwc", "misaligned-nchw", "multi-split-nhwc", "multi-split-nchw",
        "instance-256"])
def test_edge_paths_match_reference(runner, dtype, case):
    """Large means (fp32 1e4, 16-bit 300), L2 chunking, misaligned pointers (scalar path),
    several pass-1 splits per channel, many groups."""
    case = dict(case)
    if case.pop("offset", 0):
        case["offset"] = 1e4 if dtype == "float32" else 300.0
    _assert_case(runner, 2, dtype=dtype, use_proxy=True, **case)


@pytest.mark.parametrize("offset", [1e2, 1e3, 1e4])
@pytest.mark.parametrize("channels_last", [True, False], ids=["nhwc", "nchw"])
def test_large_offsets_keep_float32_accuracy(runner, offset, channels_last):
    """Means of 1e2..1e4 times the std (issue 21), GN, LN and IN: run_case's tolerances have
    no allowance for |mean| * inv_std, so y, dx and the parameter gradients must stay at
    float32 accuracy (pilot-shifted statistics, the mean's rounding error mean_lo)."""
    shape = (2, 20, 20, 32) if channels_last else (2, 32, 20, 20)
    for groups, act in ((8, "gelu"), (1, "relu"), (32, "silu")):
        _assert_case(runner, 4, shape=shape, channels_last=channels_last, groups=groups,
                     dtype="float32", act=act, use_proxy=True, offset=offset)


def test_explicit_values_float32(runner):
    """One case checked with plain assert_allclose, independently of the harness's
    tolerance model."""
    rng = np.random.default_rng(3)
    shape, groups, eps = (2, 4, 3, 8), 2, 1e-3
    x = rng.normal(size=shape).astype(np.float32) * 2 + 1
    dy = rng.normal(size=shape).astype(np.float32)
    params = [np.float32(1) + 0.3 * rng.normal(size=8).astype(np.float32),
              0.3 * rng.normal(size=8).astype(np.float32),
              0.3 * rng.normal(size=8).astype(np.float32),
              np.float32(1) + 0.2 * rng.random(size=8).astype(np.float32)]
    be = runner.be
    pr = runner.problem(shape, "float32", groups, True, "gelu", True, eps)
    par = [be.upload(p) for p in params]
    y, mean, inv = runner.forward(pr, be.upload(x), par, shape, np.float32)
    dx, grads = runner.backward(pr, be.upload(dy), be.upload(x), par, mean, inv, np.float32)
    kw = dict(groups=groups, epsilon=eps, activation="gelu", channels_last=True,
              use_proxy=True)
    y_ref, mean_ref, inv_ref, _ = reference_np.forward(x, *params, **kw)
    bw = reference_np.backward(dy, x, *params, **kw)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(mean, mean_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(inv, inv_ref, rtol=1e-5)
    np.testing.assert_allclose(dx, bw["dx"], rtol=1e-4, atol=1e-5)
    for got, name in zip(grads, ("dgamma", "dbeta", "dproxy_mean", "dproxy_inv_std")):
        np.testing.assert_allclose(got, bw[name], rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("shape,channels_last", [((2, 0, 8), True), ((0, 4, 8), True),
                                                 ((3, 8, 0), False)])
def test_empty_groups_and_batches(runner, shape, channels_last):
    """Empty groups give mean 0 and inv_std 1/sqrt(eps); all parameter gradients are 0."""
    be, eps = runner.be, 0.25
    c = shape[-1] if channels_last else shape[1]
    pr = runner.problem(shape, "float32", 2, channels_last, "relu", True, eps)
    par = [be.upload(np.full(c, v, np.float32)) for v in (1.5, 0.5, 0.1, 2.0)]
    x = np.zeros(shape, np.float32)
    y, mean, inv = runner.forward(pr, be.upload(x), par, shape, np.float32)
    dx, grads = runner.backward(pr, be.upload(x), be.upload(x), par, mean, inv, np.float32)
    assert y.shape == shape and dx.shape == shape
    np.testing.assert_array_equal(mean, np.zeros((shape[0], 2)))
    np.testing.assert_allclose(inv, np.full((shape[0], 2), 2.0), rtol=1e-6)
    for g in grads:
        np.testing.assert_array_equal(g, np.zeros(c))


def test_c_api_rejects_bad_problems(runner):
    lib, be = runner.lib, runner.be
    bad = runner.problem((2, 3, 6), "float32", 4, True, "relu", False)
    assert lib.tfpn_group_norm_act_fwd_workspace_size(ctypes.byref(bad)) == 0
    rc = lib.tfpn_group_norm_act_fwd(ctypes.byref(bad), *([None] * 9), 0, None)
    assert rc == TFPN_ERR_INVALID_ARGUMENT
    assert b"channels (6) must be divisible by groups (4)" in lib.tfpn_last_error()

    pr = runner.problem((2, 3, 8), "float32", 2, True, "relu", False)
    need = lib.tfpn_group_norm_act_fwd_workspace_size(ctypes.byref(pr))
    x = be.upload(np.ones((2, 3, 8), np.float32))
    params = [be.upload(np.ones(8, np.float32)) for _ in range(4)]
    outs = [be.empty((2, 3, 8), np.float32), be.empty((2, 2), np.float32),
            be.empty((2, 2), np.float32)]
    ws = be.workspace(need)
    rc = lib.tfpn_group_norm_act_fwd(ctypes.byref(pr), be.ptr(x), *map(be.ptr, params),
                                     *map(be.ptr, outs), be.ptr(ws), need - 1, None)
    assert rc == TFPN_ERR_WORKSPACE
    assert f"need {need} bytes".encode() in lib.tfpn_last_error()


def test_harness_cli_emulator_mode(emu_library):
    """run_harness.py end to end in its emulator mode: a few check cases pass, and --bench
    refuses to time the emulator."""
    script = str(HARNESS_DIR / "run_harness.py")
    env = dict(os.environ, TFPN_EMU_BLOCK_ORDER="rev")
    common = [sys.executable, script, "--emulate", "--no-build", "--lib", str(emu_library)]
    check = subprocess.run(common + ["--check", "--quick", "--limit", "6"],
                           capture_output=True, text=True, env=env, timeout=300)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "6/6 cases passed (emulator" in check.stdout
    bench = subprocess.run(common + ["--bench"], capture_output=True, text=True, env=env,
                           timeout=300)
    assert bench.returncode == 2
    assert "--bench needs a GPU" in bench.stdout


@pytest.mark.skipif(_build_cuda.find_nvcc() is None,
                    reason="nvcc not found: the nvcc build of the GPU harness is not tested")
def test_harness_library_builds_with_nvcc(tmp_path):
    """The standalone nvcc build (one architecture here, to keep CI fast; the op library's
    build compiles all of them) links with a static runtime and its host-side checks run
    without a GPU."""
    _make("lib", tmp_path, ARCH_FLAGS="-gencode=arch=compute_75,code=sm_75")
    path = tmp_path / "libtfpn_cuda.so"
    needed = subprocess.run(["readelf", "-d", str(path)], capture_output=True, text=True)
    if needed.returncode == 0:
        assert "libcudart" not in needed.stdout  # the CUDA runtime is linked statically
    lib = run_harness.load_library(str(path))
    bad = run_harness.Problem(2, 6, 3, 4, 1, 1, 0, 0, 1e-3, 0)
    assert lib.tfpn_group_norm_act_fwd(ctypes.byref(bad), *([None] * 9), 0, None) == \
        TFPN_ERR_INVALID_ARGUMENT
    assert b"must be divisible by groups" in lib.tfpn_last_error()
    rt, drv = ctypes.c_int(), ctypes.c_int()
    rc = lib.tfpn_cuda_check(ctypes.byref(rt), ctypes.byref(drv))
    assert rt.value == _build_cuda.nvcc_version(_build_cuda.find_nvcc())[1]
    if _build_cuda.driver_version() is None:
        assert rc == TFPN_ERR_DRIVER
        assert b"no CUDA driver found" in lib.tfpn_last_error()
