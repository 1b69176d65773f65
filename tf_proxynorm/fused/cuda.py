"""The GPU step of the build (`tf_proxynorm.fused.build`): compiles the CUDA kernels of
`custom_ops/cuda/` and their TensorFlow wrapper `custom_ops/cc/gpu/` into objects that the
op library links.

Policy (`TF_PROXYNORM_BUILD_CUDA`, parsed by `settings.cuda_mode`, applied by `cuda_config`):
    auto (default)  GPU kernels only when nvcc is found AND TensorFlow sees a GPU and, when
                    the driver is visible, it supports nvcc's CUDA major version; compiling
                    them on a machine that cannot run them would cost minutes for nothing.
    1               always (a CPU-only machine building for GPUs); no nvcc is an error.
    0               never.
`TF_PROXYNORM_CUDA_ARCHS` ("75,80,86,89,90" by default) chooses the SASS targets; PTX is
added for the newest, so later GPUs JIT-compile it.

Recipe (`cuda_build_step`): nvcc with the CUDA headers bundled in the TensorFlow wheel
when that nvcc accepts them (a probe compile decides; the CUDA 12.5 headers of TF 2.21 do
not work with nvcc 13, whose front end generates code for its own `crt/` headers), else the
toolkit's own headers; one translation unit per .cu file, compiled in parallel with
`--threads`; the CUDA runtime linked statically with its symbols hidden. The wrapper is
compiled here too, so that any failure of the GPU part raises before the CPU library is
linked and the build falls back to a CPU-only library with one warning. docs/gpu.md.
"""

import ctypes
import functools
import logging
import os
import re
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tf_proxynorm.fused import settings, toolchain
from tf_proxynorm.fused.errors import BuildError

_NVCC_FLAGS = ["-std=c++17", "-O3", "-DNDEBUG", "--expt-relaxed-constexpr",
               "-Xcompiler", "-fPIC,-fvisibility=hidden"]
_WRAPPER = "cc/gpu/group_norm_act_gpu_kernels.cc"
_STATIC_LINK = ["-ldl", "-lpthread", "-lrt", "-Wl,--exclude-libs,libcudart_static.a"]
_PROBE = r"""
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
__global__ void probe(const __half* a, const __nv_bfloat16* b, float* f) {
  f[threadIdx.x] = __half2float(a[0]) + __bfloat162float(b[0]) + __ldcs(f + 1);
}
extern "C" int tfpn_probe() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  probe<<<1, 32>>>(nullptr, nullptr, nullptr);
  return v;
}
"""


# -- what is installed ----------------------------------------------------------------------

def find_nvcc():
    """Path of nvcc: PATH, then $CUDA_HOME/bin, $CUDA_PATH/bin, /usr/local/cuda/bin."""
    found = shutil.which("nvcc")
    if found:
        return found
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "bin" / "nvcc").is_file():
            return str(Path(home) / "bin" / "nvcc")
    return None


@functools.lru_cache(maxsize=None)
def nvcc_version(nvcc):
    """(version string "13.0.88", version number 1000 * major + 10 * minor) of nvcc."""
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise BuildError(f"`{nvcc} --version` failed: {e}") from None
    match = re.search(r"release (\d+)\.(\d+), V([\d.]+)", out)
    if not match:
        raise BuildError(f"cannot read the CUDA version from `{nvcc} --version`: {out.strip()!r}")
    major, minor = int(match.group(1)), int(match.group(2))
    return match.group(3), 1000 * major + 10 * minor


@functools.lru_cache(maxsize=None)
def _supported_codes(nvcc):
    """The sm_XX codes this nvcc can emit (None when it cannot say)."""
    try:
        out = subprocess.run([nvcc, "--list-gpu-code"], capture_output=True, text=True,
                             timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    codes = set(re.findall(r"sm_(\d+)", out.stdout))
    return codes if out.returncode == 0 and codes else None


def target_archs(nvcc):
    """(SASS archs, PTX arch) as compute capabilities "75": the requested ones that nvcc
    supports (TF_PROXYNORM_CUDA_ARCHS or its default), PTX for the newest."""
    requested = settings.cuda_archs()
    supported = _supported_codes(nvcc)
    archs = [a for a in requested if a in supported] if supported is not None else requested
    if not archs:
        raise BuildError(f"nvcc ({nvcc}) supports none of the architectures "
                         f"{', '.join(requested)} (set {settings.ENV_CUDA_ARCHS})")
    return archs, archs[-1]


def gencode_flags(archs, ptx):
    flags = []
    for arch in archs:
        flags += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    return flags + ["-gencode", f"arch=compute_{ptx},code=compute_{ptx}"]


def driver_version():
    """CUDA version the installed driver supports (1000 * major + 10 * minor), or None."""
    for name in ("libcuda.so.1", "libcuda.so"):
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        version = ctypes.c_int(0)
        try:
            if lib.cuDriverGetVersion(ctypes.byref(version)) == 0:
                return version.value
        except AttributeError:
            return None
    return None


def tensorflow_sees_gpu():
    import tensorflow as tf
    try:
        return bool(tf.config.list_physical_devices("GPU"))
    except Exception:  # noqa: BLE001 - a broken GPU setup counts as no GPU
        return False


def cuda_config():
    """What the GPU step would build with (part of the library's cache key), or None for a
    CPU-only library, following the policy of the module docstring.

    Raises BuildError when TF_PROXYNORM_BUILD_CUDA=1 and nvcc is missing.
    """
    how = settings.cuda_mode()
    if how == "0":
        return None
    nvcc = find_nvcc()
    if nvcc is None:
        if how == "1":
            raise BuildError(
                f"{settings.ENV_BUILD_CUDA}=1 but nvcc was not found on PATH, in $CUDA_HOME/bin, "
                "$CUDA_PATH/bin or /usr/local/cuda/bin. Install a CUDA toolkit, or unset "
                f"{settings.ENV_BUILD_CUDA} to build the CPU kernels only")
        return None
    if how == "auto" and not tensorflow_sees_gpu():
        return None
    version, number = nvcc_version(nvcc)
    if how == "auto":
        driver = driver_version()
        if driver is not None and driver // 1000 < number // 1000:
            logging.getLogger("tf_proxynorm").warning(
                "tf_proxynorm: not building the GPU kernels: nvcc %s needs a driver for CUDA "
                "%d but the driver supports CUDA %d.%d (set %s=1 to build them anyway)",
                version, number // 1000, driver // 1000, driver % 1000 // 10,
                settings.ENV_BUILD_CUDA)
            return None
    archs, ptx = target_archs(nvcc)
    return {"nvcc": nvcc, "nvcc_version": version, "sass": [f"sm_{a}" for a in archs],
            "ptx": f"compute_{ptx}"}


# -- headers and runtime --------------------------------------------------------------------

def toolkit_root(nvcc):
    """The toolkit directory nvcc uses (its `TOP`; nvcc may be a symlink or wrapper)."""
    try:
        out = subprocess.run([nvcc, "--dryrun", "-c", "-x", "cu", os.devnull],
                             capture_output=True, text=True, timeout=60)
        match = re.search(r"^#\$ TOP=(.+)$", out.stdout + out.stderr, re.MULTILINE)
        if match:
            return Path(match.group(1).strip()).resolve()
    except (OSError, subprocess.SubprocessError):
        pass
    return Path(nvcc).resolve().parent.parent


def static_cudart(root):
    candidates = sorted(root.glob("targets/*/lib/libcudart_static.a")) + [
        root / "lib64" / "libcudart_static.a", root / "lib" / "libcudart_static.a"]
    for path in candidates:
        if path.is_file():
            return path
    raise BuildError(f"libcudart_static.a was not found in the CUDA toolkit at {root}")


def wheel_headers():
    """(include dir, CUDART_VERSION) of the CUDA headers bundled with TensorFlow, or None."""
    import tensorflow as tf

    tf_dir = Path(tf.__file__).resolve().parent
    site = tf_dir.parent
    candidates = [tf_dir / "include" / "third_party" / "gpus" / "cuda" / "include",
                  site / "nvidia" / "cuda_runtime" / "include"]
    for inc in candidates:
        api = inc / "cuda_runtime_api.h"
        if api.is_file() and (inc / "cuda_bf16.h").is_file() and (inc / "crt").is_dir():
            match = re.search(r"#define\s+CUDART_VERSION\s+(\d+)", api.read_text(errors="replace"))
            if match:
                return inc, int(match.group(1))
    return None


def choose_headers(nvcc, number, arch, work_dir, log):
    """The -I flags and a description of the CUDA headers to compile against."""
    bundled = wheel_headers()
    if bundled is None:
        return [], {"source": "toolkit", "reason": "the TensorFlow wheel bundles no CUDA headers"}
    inc, version = bundled
    described = {"wheel_path": str(inc), "wheel_version": version}
    if version // 1000 != number // 1000:
        return [], dict(described, source="toolkit", reason=(
            f"the wheel's CUDA {version // 1000}.{version % 1000 // 10} headers are for "
            f"another major version than nvcc's CUDA {number // 1000}.{number % 1000 // 10}"))
    probe = Path(work_dir) / "tfpn_header_probe.cu"
    probe.write_text(_PROBE)
    command = [nvcc, "-std=c++17", f"-I{inc}", "-Xcompiler", "-fPIC",
               "-gencode", f"arch=compute_{arch},code=sm_{arch}", "-c", str(probe),
               "-o", str(probe.with_suffix(".o"))]
    log("$ " + " ".join(command))
    result = subprocess.run(command, capture_output=True, text=True)
    probe.unlink(missing_ok=True)
    probe.with_suffix(".o").unlink(missing_ok=True)
    if result.returncode != 0:
        log((result.stdout + result.stderr).rstrip())
        return [], dict(described, source="toolkit",
                        reason="nvcc rejected the wheel's headers (probe compile failed)")
    return [f"-I{inc}"], dict(described, source="tensorflow wheel")


# -- the build step -------------------------------------------------------------------------

class _NoProgress:
    def add(self, steps):
        pass

    def say(self, line):
        pass

    def step(self, what, seconds):
        pass


def cuda_build_step(config, src, tf_compile_flags, out_dir, log, progress=None):
    """Compiles the GPU objects for `config` (from `cuda_config`) from the sources in `src`
    into `out_dir`; returns dict(objects, link_flags, stamp) for the build. Raises on any
    failure (the build then links a CPU-only library and warns once). `progress` (the
    build's `_Progress`) gets a line per compiled file and the architectures it is for."""
    progress = progress or _NoProgress()
    nvcc = config["nvcc"]
    version, number = nvcc_version(nvcc)
    archs = [a.removeprefix("sm_") for a in config["sass"]]
    ptx = config["ptx"].removeprefix("compute_")
    root = toolkit_root(nvcc)
    cudart = static_cudart(root)
    compiler, compiler_version = toolchain.find_compiler()
    if compiler is None:
        raise BuildError("no C++ compiler for the GPU wrapper")
    out = Path(out_dir)
    include_flags, headers = choose_headers(nvcc, number, archs[0], out, log)
    log(f"# CUDA headers: {headers}")

    cu_files = sorted((src / "cuda").glob("*.cu"), key=lambda p: -p.stat().st_size)
    workers = max(1, min(len(cu_files) + 1, os.cpu_count() or 1))
    threads = max(1, (os.cpu_count() or 1) // workers)
    nvcc_base = ([nvcc] + _NVCC_FLAGS + include_flags + gencode_flags(archs, ptx)
                 + ["--threads", str(threads)])
    jobs = {}
    for path in cu_files:
        jobs[path.name] = nvcc_base + ["-c", "-o", str(out / f"{path.stem}.cu.o"), str(path)]
    wrapper_obj = out / "group_norm_act_gpu_kernels.o"
    jobs[Path(_WRAPPER).name] = ([compiler] + list(tf_compile_flags) + list(toolchain.CXXFLAGS)
                                 + ["-DTFPN_WITH_CUDA=1", "-c", "-o", str(wrapper_obj),
                                    str(src / _WRAPPER)])
    targets = ", ".join([f"sm_{a}" for a in archs] + [f"compute_{ptx} (PTX)"])
    described = {f"CUDA {name} for {targets}" if name.endswith(".cu") else
                 f"GPU op wrapper ({name})": command for name, command in jobs.items()}
    progress.add(len(described) + 1)
    progress.say(f"compiling the CUDA kernels with nvcc {version} for {targets}: "
                 f"{len(cu_files)} files, {workers} at a time, nvcc --threads {threads}")
    start = time.monotonic()
    # Fail fast: on the first failure (or Ctrl-C) the queued jobs are skipped and the
    # running ones killed.
    by_description = toolchain.run_parallel(described, log, progress, workers)
    names = dict(zip(described, jobs))
    seconds = {names[d]: round(t, 1) for d, t in by_description.items()}
    cu_objects = [out / f"{p.stem}.cu.o" for p in cu_files]

    # The kernel core must link on its own against the static runtime (no TensorFlow).
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        progress.step("linked the CUDA kernels alone against the static CUDA runtime (check)",
                      toolchain.run([compiler, "-shared", "-o", str(Path(tmp) / "core_check.so")]
                                    + [str(o) for o in cu_objects] + [str(cudart)] + _STATIC_LINK
                                    + ["-Wl,--no-undefined"], log))

    stamp = {
        "nvcc": nvcc, "nvcc_version": version, "cuda_version": number,
        "sass": [f"sm_{a}" for a in archs], "ptx": f"compute_{ptx}",
        "headers": headers, "cudart": f"static ({cudart})",
        "host_compiler": compiler_version, "nvcc_threads": threads,
        "translation_units": sorted(jobs), "compile_seconds": seconds,
        "wall_seconds": round(time.monotonic() - start, 1),
    }
    return {"objects": [str(o) for o in cu_objects] + [str(wrapper_obj)],
            "link_flags": [str(cudart)] + _STATIC_LINK, "stamp": stamp}
