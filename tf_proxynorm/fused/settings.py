"""Every `TF_PROXYNORM_*` setting of the build and the cache, each parsed here only.

    TF_PROXYNORM_CACHE_DIR   cache root (default `~/.cache/tf_proxynorm`).
    TF_PROXYNORM_NO_BUILD=1  never compile on first use (nor retry a failed build there);
                             only load a cached library.
    TF_PROXYNORM_BUILD_CUDA  `auto` (default: GPU kernels when nvcc is found and TensorFlow
                             sees a GPU), `1` (always; an error without nvcc) or `0` (CPU only).
    TF_PROXYNORM_CUDA_ARCHS  compute capabilities of the GPU kernels (default 75,80,86,89,90).
    TF_PROXYNORM_CPU_ISAS    x86-64 CPU kernel variants, chosen per machine at run time
                             (default generic,avx2,avx512; `generic` is always built: e.g.
                             `generic` alone builds about twice as fast).
    TF_PROXYNORM_SOURCE_DIR  a `custom_ops/` folder to build from (default: the sources
                             installed with the package, else the checkout's).
    CXX                      the C++ compiler (default: g++, then c++, then clang++).

They are read at call time (not at import), so a process may change them before first use.
"""

import os
import re
from pathlib import Path

from tf_proxynorm.fused.errors import BuildError

ENV_CACHE_DIR = "TF_PROXYNORM_CACHE_DIR"
ENV_NO_BUILD = "TF_PROXYNORM_NO_BUILD"
ENV_BUILD_CUDA = "TF_PROXYNORM_BUILD_CUDA"
ENV_CUDA_ARCHS = "TF_PROXYNORM_CUDA_ARCHS"
ENV_SOURCE_DIR = "TF_PROXYNORM_SOURCE_DIR"
ENV_CPU_ISAS = "TF_PROXYNORM_CPU_ISAS"
ENV_CXX = "CXX"

DEFAULT_CUDA_ARCHS = ("75", "80", "86", "89", "90")
X86_ISAS = ("generic", "avx2", "avx512")

_PACKAGE = Path(__file__).resolve().parent.parent
# Where a wheel carries the sources (setup.py copies `custom_ops/` there), and where an
# editable checkout has them.
INSTALLED_SOURCE_DIR = _PACKAGE / "fused" / "custom_ops"
CHECKOUT_SOURCE_DIR = _PACKAGE.parent / "custom_ops"

_TRUE = ("1", "on", "true", "yes")
_FALSE = ("0", "off", "false", "no")


def cache_root():
    """The per-user cache root of built libraries."""
    env = os.environ.get(ENV_CACHE_DIR, "").strip()
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tf_proxynorm"


def source_dir():
    """`(folder, where it came from)` of the `custom_ops/` sources to build from."""
    env = os.environ.get(ENV_SOURCE_DIR, "").strip()
    if env:
        return Path(env).expanduser(), f"{ENV_SOURCE_DIR}={env!r}"
    if INSTALLED_SOURCE_DIR.is_dir():
        return INSTALLED_SOURCE_DIR, "installed with the package"
    return CHECKOUT_SOURCE_DIR, "the source checkout"


def build_allowed():
    """False when TF_PROXYNORM_NO_BUILD forbids compiling on first use."""
    return os.environ.get(ENV_NO_BUILD, "").strip().lower() not in _TRUE


def cuda_mode():
    """"auto", "1" or "0" from TF_PROXYNORM_BUILD_CUDA (BuildError for anything else)."""
    raw = os.environ.get(ENV_BUILD_CUDA, "auto")
    value = raw.strip().lower()
    if value in ("", "auto"):
        return "auto"
    if value in _TRUE:
        return "1"
    if value in _FALSE:
        return "0"
    raise BuildError(f"{ENV_BUILD_CUDA} must be auto, 1 or 0. Received: {ENV_BUILD_CUDA}={raw!r}")


def cuda_archs():
    """The requested compute capabilities ("75", ...): TF_PROXYNORM_CUDA_ARCHS or the default."""
    env = os.environ.get(ENV_CUDA_ARCHS, "").strip()
    requested = [a.strip().removeprefix("sm_") for a in re.split(r"[,; ]+", env) if a.strip()]
    for arch in requested:
        if not arch.isdigit():
            raise BuildError(f"{ENV_CUDA_ARCHS} must list compute capabilities like `75,80,90`. "
                             f"Received: {ENV_CUDA_ARCHS}={env!r}")
    return sorted(set(requested or DEFAULT_CUDA_ARCHS), key=int)


def cpu_isas(machine):
    """The CPU kernel variants to build for `machine` (platform.machine()): `generic` only
    off x86-64; on x86-64 `generic` plus those of TF_PROXYNORM_CPU_ISAS (default: all)."""
    if machine.lower() not in ("x86_64", "amd64"):
        return ["generic"]
    env = os.environ.get(ENV_CPU_ISAS, "").strip()
    requested = {a.strip().lower() for a in re.split(r"[,; ]+", env) if a.strip()}
    if requested - set(X86_ISAS):
        raise BuildError(f"{ENV_CPU_ISAS} must list some of {', '.join(X86_ISAS)}. "
                         f"Received: {ENV_CPU_ISAS}={env!r}")
    requested = (requested or set(X86_ISAS)) | {"generic"}
    return [isa for isa in X86_ISAS if isa in requested]


def compiler_candidates():
    """The C++ compilers to try, in order: $CXX alone when set, else g++, c++, clang++."""
    env = os.environ.get(ENV_CXX, "").strip()
    return [env] if env else ["g++", "c++", "clang++"]
