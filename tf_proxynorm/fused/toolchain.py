"""The host C++ compiler and the flags every translation unit of the library shares."""

import os
import shutil
import subprocess
import time

from tf_proxynorm.fused import settings
from tf_proxynorm.fused.errors import BuildError

# Common flags on top of TensorFlow's. -fno-trapping-math lets the compiler vectorize the
# select-based math of the kernels; -fopenmp-simd honours `#pragma omp simd` without
# linking an OpenMP runtime. Never -march=native: the library may be loaded on another CPU
# (a shared cache); CPU-specific code is built per ISA and chosen at run time.
CXXFLAGS = ("-O3", "-DNDEBUG", "-fPIC", "-fvisibility=hidden", "-fopenmp-simd",
            "-fno-trapping-math", "-Wno-deprecated-declarations")


def find_compiler():
    """(path, first line of `--version`) of the C++ compiler, or (None, None)."""
    for name in settings.compiler_candidates():
        path = shutil.which(name)
        if path is None:
            continue
        try:
            out = subprocess.run([path, "--version"], capture_output=True, text=True,
                                 timeout=60, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            continue
        return path, (out.splitlines() or ["unknown"])[0].strip()
    return None, None


def run(command, log):
    """Runs one compiler command, logging it and its output; returns the seconds it took.

    Raises BuildError with the tail of the output when it fails.
    """
    log("$ " + " ".join(command))
    start = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True)
    elapsed = time.monotonic() - start
    if result.stdout or result.stderr:
        log((result.stdout + result.stderr).rstrip())
    log(f"# exit {result.returncode} in {elapsed:.1f} s")
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise BuildError(f"`{os.path.basename(command[0])}` failed (exit "
                         f"{result.returncode}) on {command[-1]}:\n{tail}")
    return elapsed
