"""Builds the fused op library from `custom_ops/` into a per-user cache.

```
python -m tf_proxynorm.build            # build (or reuse) the library; `make build` runs this
python -m tf_proxynorm.build --force    # rebuild even if a good library is cached
```

The package itself stays pure Python: the C++ sources are compiled on this machine, with the
compiler flags that `tf.sysconfig.get_compile_flags()` / `get_link_flags()` report (so the
C++ standard and `_GLIBCXX_USE_CXX11_ABI` always match the installed TensorFlow), into

    $TF_PROXYNORM_CACHE_DIR or ~/.cache/tf_proxynorm / tf<version>-<key> /
        _tf_proxynorm_ops.so   the op library
        stamp.json             what it was built for (checked before every load)
        build.log              compiler commands and output

`<key>` hashes the TensorFlow version and build, the compiler and its version, every flag,
and the contents of the sources, so a change of any of them selects a new directory. A
build happens in a temporary directory that is renamed into place only when complete, under
an `fcntl` lock, so concurrent processes never see a half-written library and build once.
A failed build leaves `<dir>.failed.log`; lazy builds do not retry it (this command does).

Environment:
    TF_PROXYNORM_CACHE_DIR   cache root (default `~/.cache/tf_proxynorm`).
    TF_PROXYNORM_NO_BUILD=1  never compile on first use; only load a cached library.
    TF_PROXYNORM_BUILD_CUDA  `auto` (default: GPU kernels when nvcc is found and TensorFlow
                             sees a GPU), `1` (always; an error without nvcc) or `0` (CPU
                             only). See tf_proxynorm/_build_cuda.py and docs/gpu.md.
    TF_PROXYNORM_SOURCE_DIR  the `custom_ops/` folder (default: next to the package).
    CXX                      the C++ compiler (default: g++, then c++, then clang++).
"""

import argparse
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

LIBRARY_NAME = "_tf_proxynorm_ops.so"
STAMP_NAME = "stamp.json"
LOG_NAME = "build.log"

ENV_CACHE_DIR = "TF_PROXYNORM_CACHE_DIR"
ENV_NO_BUILD = "TF_PROXYNORM_NO_BUILD"
ENV_BUILD_CUDA = "TF_PROXYNORM_BUILD_CUDA"
ENV_SOURCE_DIR = "TF_PROXYNORM_SOURCE_DIR"

# Bump when the recipe below changes in a way that the flags do not show.
RECIPE_VERSION = 1

# Common flags on top of TensorFlow's. -fno-trapping-math lets the compiler vectorize the
# select-based math of the kernels; -fopenmp-simd honours `#pragma omp simd` without
# linking an OpenMP runtime. Never -march=native: the library may be loaded on another CPU
# (a shared cache); CPU-specific code is built per ISA below and chosen at run time.
_CXXFLAGS = ["-O3", "-DNDEBUG", "-fPIC", "-fvisibility=hidden", "-fopenmp-simd",
             "-fno-trapping-math", "-Wno-deprecated-declarations"]
_ISA_FLAGS = {
    "generic": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma",
               "-mf16c"],
}
_ISA_GETTERS = {"generic": "GenericKernels", "avx2": "Avx2Kernels", "avx512": "Avx512Kernels"}

_TF_SOURCES = ["cc/ops/group_norm_act_ops.cc", "cc/kernels/group_norm_act_cpu.cc"]
_ISA_SOURCE = "cc/kernels/cpu/kernels_isa.cc"
_HASHED_SUFFIXES = (".cc", ".h", ".cu", ".cuh", ".py")


class BuildError(RuntimeError):
    """The library could not be built or loaded; the message says why and what to do."""


# -- what a library is built from ---------------------------------------------------------

def source_dir():
    """The `custom_ops/` folder holding the C++ sources."""
    env = os.environ.get(ENV_SOURCE_DIR)
    return Path(env) if env else Path(__file__).resolve().parent.parent / "custom_ops"


def cache_root():
    env = os.environ.get(ENV_CACHE_DIR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "tf_proxynorm"


def _hash_sources(src, with_cuda):
    """sha256 over the relative paths and contents of the sources that go into the library:
    `cc/` (op registration, CPU kernels) and, for a GPU build, `cc/gpu/`, `cuda/` and the GPU
    build step."""
    digest = hashlib.sha256()
    folders = ["cc", "cuda"] if with_cuda else ["cc"]
    files = sorted(p for folder in folders for p in (src / folder).rglob("*")
                   if p.is_file() and p.suffix in _HASHED_SUFFIXES
                   and (with_cuda or (src / "cc" / "gpu") not in p.parents))
    cuda_step = Path(__file__).resolve().parent / "_build_cuda.py"
    if with_cuda and cuda_step.is_file():
        files.append(cuda_step)
    for path in files:
        name = path.relative_to(src) if path.is_relative_to(src) else path.name
        digest.update(str(name).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def _find_compiler():
    """(command, first line of `--version`) of the C++ compiler, or (None, None)."""
    candidates = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
    for name in candidates:
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


def _cuda_config():
    """What the GPU step would build with, for the cache key (None: CPU-only build).
    The policy of TF_PROXYNORM_BUILD_CUDA is `tf_proxynorm._build_cuda.cuda_config`."""
    if os.environ.get(ENV_BUILD_CUDA, "auto").strip().lower() in ("0", "off", "false", "no"):
        return None
    if not (Path(__file__).resolve().parent / "_build_cuda.py").is_file():
        return None
    from tf_proxynorm import _build_cuda
    return _build_cuda.cuda_config()


def _isas():
    machine = platform.machine().lower()
    return ["generic", "avx2", "avx512"] if machine in ("x86_64", "amd64") else ["generic"]


@dataclasses.dataclass
class BuildConfig:
    """Everything a library depends on; `key` names its cache directory."""

    tf_version: str
    tf_git_version: str
    cxx11_abi: int
    compile_flags: list
    link_flags: list
    compiler: str
    compiler_version: str
    source_hash: str
    isas: list
    cuda: dict
    machine: str
    recipe: int = RECIPE_VERSION

    def fields(self):
        return dataclasses.asdict(self)

    def key(self, with_compiler=True):
        fields = self.fields()
        if not with_compiler:
            fields.pop("compiler")
            fields.pop("compiler_version")
        blob = json.dumps(fields, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def directory(self):
        return cache_root() / f"tf{self.tf_version}-{self.key()}"


def current_config():
    """The BuildConfig of this environment (compiler fields empty when there is none)."""
    import tensorflow as tf

    src = source_dir()
    if not (src / _ISA_SOURCE).is_file():
        raise BuildError(
            f"the C++ sources were not found in {src} (an install without `custom_ops/`). "
            f"Set {ENV_SOURCE_DIR} to a checkout's custom_ops folder.")
    compiler, version = _find_compiler()
    cuda = _cuda_config()
    return BuildConfig(
        tf_version=tf.__version__,
        tf_git_version=tf.version.GIT_VERSION,
        cxx11_abi=int(tf.sysconfig.CXX11_ABI_FLAG),
        compile_flags=list(tf.sysconfig.get_compile_flags()),
        link_flags=list(tf.sysconfig.get_link_flags()),
        compiler=os.path.basename(compiler) if compiler else "",
        compiler_version=version or "",
        source_hash=_hash_sources(src, with_cuda=cuda is not None),
        isas=_isas(),
        cuda=cuda,
        machine=platform.machine(),
    )


# -- checking a cached library --------------------------------------------------------------

def _sha256_file(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def check_stamp(directory, config, with_compiler=True):
    """None when `directory` holds a complete library built for `config`, else the reason."""
    stamp_path = directory / STAMP_NAME
    library = directory / LIBRARY_NAME
    if not stamp_path.is_file() or not library.is_file():
        return f"{directory} has no {STAMP_NAME} or no {LIBRARY_NAME}"
    try:
        stamp = json.loads(stamp_path.read_text())
    except (OSError, ValueError) as e:
        return f"unreadable {stamp_path}: {e}"
    expected = config.fields()
    if not with_compiler:
        expected.pop("compiler")
        expected.pop("compiler_version")
    built_for = stamp.get("config", {})
    for name, value in expected.items():
        if built_for.get(name) != value:
            return (f"{stamp_path} records {name}={built_for.get(name)!r} but this environment "
                    f"has {name}={value!r}")
    if stamp.get("library_sha256") != _sha256_file(library):
        return f"{library} does not match the checksum recorded in {stamp_path}"
    return None


def _failed_log(directory):
    return directory.with_name(directory.name + ".failed.log")


def find_library(config):
    """The path of a verified cached library for `config`, or None.

    Raises BuildError when the library's directory exists but its stamp does not match
    (a stale or tampered library is never loaded).
    """
    directory = config.directory()
    if directory.exists():
        reason = check_stamp(directory, config)
        if reason is not None:
            raise BuildError(
                f"refusing to load the cached library: {reason}. Rebuild it with "
                "`python -m tf_proxynorm.build --force`.")
        return directory / LIBRARY_NAME
    if not config.compiler:
        # No compiler to key on: accept a library built for everything else.
        prefix = f"tf{config.tf_version}-"
        for candidate in sorted(cache_root().glob(prefix + "*")):
            if candidate.is_dir() and check_stamp(candidate, config, with_compiler=False) is None:
                return candidate / LIBRARY_NAME
    return None


# -- building -------------------------------------------------------------------------------

class _Log:
    """The build log: a file plus optional echo. Callable (`log(line)`) and file-like."""

    def __init__(self, path, echo=False):
        self._file = open(path, "a", encoding="utf-8")
        self._echo = echo

    def __call__(self, message):
        self.write(str(message).rstrip("\n") + "\n")

    def write(self, text):
        self._file.write(text)
        self._file.flush()
        if self._echo:
            sys.stderr.write(text)

    def close(self):
        self._file.close()


def _run(command, log):
    log("$ " + " ".join(command))
    start = time.monotonic()
    result = subprocess.run(command, capture_output=True, text=True)
    if result.stdout or result.stderr:
        log((result.stdout + result.stderr).rstrip())
    log(f"# exit {result.returncode} in {time.monotonic() - start:.1f} s")
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-15:])
        raise BuildError(f"`{os.path.basename(command[0])}` failed (exit "
                         f"{result.returncode}) on {command[-1]}:\n{tail}")


def _cuda_step(config, tf_flags, out_dir, log):
    """Runs tf_proxynorm._build_cuda.cuda_build_step, or returns None (CPU-only build)."""
    if config.cuda is None:
        return None
    try:
        from tf_proxynorm import _build_cuda
        step = _build_cuda.cuda_build_step(list(tf_flags), str(out_dir), log)
    except Exception as e:  # noqa: BLE001 - any failure of the GPU step means CPU only
        log("# the GPU build step failed; building the CPU-only library:\n"
            + traceback.format_exc())
        import warnings
        warnings.warn(
            f"tf_proxynorm: the GPU kernels failed to build ({type(e).__name__}: {e}); the "
            f"fused op is built for CPU only. Build log: {out_dir.parent}", RuntimeWarning,
            stacklevel=2)
        return None
    if step is not None:
        log("# GPU build step: " + json.dumps(step.get("stamp", {}), sort_keys=True))
    return step


def _compile_and_link(config, compiler, out_dir, log):
    """Compiles every source into out_dir and links LIBRARY_NAME; returns the CUDA stamp."""
    src = source_dir()
    tf_compile, tf_link = config.compile_flags, config.link_flags
    cuda = _cuda_step(config, tf_compile, out_dir, log) or {}
    extra = list(cuda.get("cxx_flags", []))
    have = [f"-DTFPN_HAVE_{isa.upper()}" for isa in config.isas if isa != "generic"]
    base = [compiler] + tf_compile + _CXXFLAGS + extra
    jobs = []
    for rel in _TF_SOURCES:
        jobs.append((base + have, src / rel))
    for path in cuda.get("cxx_sources", []):
        jobs.append((base + have, Path(path)))
    for isa in config.isas:
        defines = [f"-DTFPN_ISA={isa}", f"-DTFPN_ISA_GETTER={_ISA_GETTERS[isa]}"]
        jobs.append((base + _ISA_FLAGS[isa] + defines, src / _ISA_SOURCE, isa))
    objects = []
    commands = []
    for job in jobs:
        flags, path = job[0], job[1]
        suffix = f".{job[2]}" if len(job) > 2 else ""
        obj = out_dir / f"{path.stem}{suffix}.o"
        objects.append(obj)
        commands.append(flags + ["-c", "-o", str(obj), str(path)])
    workers = max(1, min(len(commands), os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for future in [pool.submit(_run, c, log) for c in commands]:
            future.result()
    link = ([compiler, "-shared", "-o", str(out_dir / LIBRARY_NAME)]
            + [str(o) for o in objects] + list(cuda.get("objects", []))
            + tf_link + list(cuda.get("link_flags", [])))
    _run(link, log)
    for obj in objects + [Path(o) for o in cuda.get("objects", [])]:
        obj.unlink()
    return cuda.get("stamp")


@contextlib.contextmanager
def _locked(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def build(config=None, force=False, verbose=False):
    """Builds the library for `config` unless a verified one is cached; returns its path.

    Raises:
        BuildError: no compiler, a failed compilation (the log says why), or a cached
            library whose stamp does not match (without `force`).
    """
    config = config or current_config()
    if not config.compiler:
        raise BuildError("no C++ compiler was found (set CXX or install g++)")
    directory = config.directory()
    with _locked(directory.with_name(directory.name + ".lock")):
        if directory.exists():
            if not force:
                return find_library(config)
            shutil.rmtree(directory)
        failed = _failed_log(directory)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        log = _Log(tmp / LOG_NAME, echo=verbose)
        log(f"# tf_proxynorm build of {directory.name}\n# config: "
            + json.dumps(config.fields(), sort_keys=True))
        try:
            start = time.monotonic()
            cuda_stamp = _compile_and_link(config, shutil.which(config.compiler) or
                                           config.compiler, tmp, log)
            log(f"# built in {time.monotonic() - start:.1f} s")
            stamp = {"config": config.fields(), "cuda_build": cuda_stamp,
                     "library_sha256": _sha256_file(tmp / LIBRARY_NAME),
                     "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            (tmp / STAMP_NAME).write_text(json.dumps(stamp, indent=1, sort_keys=True))
        except BaseException as e:
            log.close()
            shutil.copyfile(tmp / LOG_NAME, failed)
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, BuildError):
                raise BuildError(f"{e}\nFull build log: {failed}") from None
            raise
        log.close()
        os.replace(tmp, directory)
        failed.unlink(missing_ok=True)
    return directory / LIBRARY_NAME


def ensure_library(allow_build=True):
    """The path of a verified library, building it first when allowed and needed.

    Raises BuildError with the reason when there is none.
    """
    config = current_config()
    path = find_library(config)
    if path is not None:
        return path
    directory = config.directory()
    if not allow_build:
        raise BuildError(f"no cached library in {directory.parent} and {ENV_NO_BUILD}=1; "
                         "run `python -m tf_proxynorm.build`")
    failed = _failed_log(directory)
    if failed.exists():
        raise BuildError(f"a previous build failed (log: {failed}); fix it and run "
                         "`python -m tf_proxynorm.build`")
    if not config.compiler:
        raise BuildError("no C++ compiler was found (set CXX or install g++), and no library "
                         f"built for this TensorFlow is cached in {directory.parent}")
    import logging
    logging.getLogger("tf_proxynorm").warning(
        "tf_proxynorm: compiling the fused op once for this TensorFlow into %s "
        "(about a minute; set %s=1 to skip)", directory, ENV_NO_BUILD)
    return build(config)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tf_proxynorm.build",
                                     description="Build the tf_proxynorm fused op library.")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--verbose", action="store_true", help="echo the build log")
    args = parser.parse_args(argv)
    try:
        config = current_config()
        start = time.monotonic()
        path = build(config, force=args.force, verbose=args.verbose)
    except BuildError as e:
        print(f"tf_proxynorm: the fused op was not built: {e}\n"
              "The package still works, with the reference (pure TensorFlow) path.",
              file=sys.stderr)
        return 1
    print(f"tf_proxynorm: fused op library ready in {time.monotonic() - start:.1f} s: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
