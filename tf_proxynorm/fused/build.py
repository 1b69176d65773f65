"""Builds the fused op library from `custom_ops/` into a per-user cache.

```
python -m tf_proxynorm.build            # build (or reuse) the library; `make build` runs this
python -m tf_proxynorm.build --force    # rebuild even if a good library is cached
```

The package itself stays pure Python: the C++ sources (carried in the wheel, or the
checkout's `custom_ops/`) are compiled on this machine, with the compiler flags that
`tf.sysconfig.get_compile_flags()` / `get_link_flags()` report (so the C++ standard and
`_GLIBCXX_USE_CXX11_ABI` always match the installed TensorFlow), into

    $TF_PROXYNORM_CACHE_DIR or ~/.cache/tf_proxynorm / tf<version>-<key> /
        _tf_proxynorm_ops.so   the op library
        stamp.json             what it was built for (checked before every load)
        build.log              compiler commands and output

Nothing is ever written next to the sources (site-packages stays read-only).
`<key>` hashes the TensorFlow version and build, the compiler and its version, every flag,
and the contents of the sources, so a change of any of them selects a new directory. A
build happens in a temporary directory that is renamed into place only when complete, under
an `fcntl` lock, so concurrent processes never see a half-written library and build once.
A failed build leaves `<dir>.failed.log`; lazy builds do not retry it (this command does).
The settings (cache, sources, CUDA, compiler) are those of `tf_proxynorm.fused.settings`.
"""

import argparse
import concurrent.futures
import contextlib
import dataclasses
import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path

from tf_proxynorm.fused import cuda, settings, toolchain
from tf_proxynorm.fused.errors import BuildError

LIBRARY_NAME = "_tf_proxynorm_ops.so"
STAMP_NAME = "stamp.json"
LOG_NAME = "build.log"

# Bump when the recipe below changes in a way that the flags do not show.
RECIPE_VERSION = 1

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


# -- what a library is built from ---------------------------------------------------------

def source_dir():
    """The `custom_ops/` folder to build from (BuildError when it holds no sources)."""
    src, origin = settings.source_dir()
    if not (src / _ISA_SOURCE).is_file():
        hint = (f"Point {settings.ENV_SOURCE_DIR} at a folder holding cc/ and cuda/ (a "
                "checkout's custom_ops/)" if settings.ENV_SOURCE_DIR in origin else
                f"Reinstall tf-proxynorm, or set {settings.ENV_SOURCE_DIR} to a checkout's "
                "custom_ops/ folder")
        raise BuildError(f"the C++ sources were not found in {src} ({origin}). {hint}.")
    return src


def cache_root():
    return settings.cache_root()


def _hash_sources(src, with_cuda):
    """sha256 over the relative paths and contents of the sources that go into the library:
    `cc/` (op registration, CPU kernels) and, for a GPU build, `cc/gpu/`, `cuda/` and the GPU
    build step (`cuda.py`). The same sources hash the same from a checkout or a wheel."""
    digest = hashlib.sha256()
    folders = ["cc", "cuda"] if with_cuda else ["cc"]
    files = sorted(p for folder in folders for p in (src / folder).rglob("*")
                   if p.is_file() and p.suffix in _HASHED_SUFFIXES
                   and (with_cuda or (src / "cc" / "gpu") not in p.parents))
    if with_cuda:
        files.append(Path(cuda.__file__))
    for path in files:
        name = path.relative_to(src) if path.is_relative_to(src) else path.name
        digest.update(str(name).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


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
    compiler, version = toolchain.find_compiler()
    cuda_config = cuda.cuda_config()
    return BuildConfig(
        tf_version=tf.__version__,
        tf_git_version=tf.version.GIT_VERSION,
        cxx11_abi=int(tf.sysconfig.CXX11_ABI_FLAG),
        compile_flags=list(tf.sysconfig.get_compile_flags()),
        link_flags=list(tf.sysconfig.get_link_flags()),
        compiler=os.path.basename(compiler) if compiler else "",
        compiler_version=version or "",
        source_hash=_hash_sources(src, with_cuda=cuda_config is not None),
        isas=settings.cpu_isas(platform.machine()),
        cuda=cuda_config,
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


def failed_log(directory):
    """Where a failed build of `directory` leaves its log."""
    return directory.with_name(directory.name + ".failed.log")


def cache_files(directory):
    """The files a build left in the cache directory `directory`, for reports:
    `build_log` and `failed_log` (paths, or None when absent) and `stamp` (the parsed
    stamp, None when absent, or `{"error": ...}` when unreadable)."""
    stamp, log, failed = directory / STAMP_NAME, directory / LOG_NAME, failed_log(directory)
    out = {"build_log": log if log.is_file() else None,
           "failed_log": failed if failed.is_file() else None}
    try:
        out["stamp"] = json.loads(stamp.read_text()) if stamp.is_file() else None
    except (OSError, ValueError) as e:
        out["stamp"] = {"error": f"unreadable {stamp}: {e}"}
    return out


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


def _cuda_step(config, src, tf_flags, out_dir, log):
    """Runs the GPU step of `cuda.py`, or returns {} (a CPU-only build)."""
    if config.cuda is None:
        return {}
    try:
        step = cuda.cuda_build_step(config.cuda, src, list(tf_flags), str(out_dir), log)
    except Exception as e:  # noqa: BLE001 - any failure of the GPU step means CPU only
        log("# the GPU build step failed; building the CPU-only library:\n"
            + traceback.format_exc())
        warnings.warn(
            f"tf_proxynorm: the GPU kernels failed to build ({type(e).__name__}: {e}); the "
            f"fused op is built for CPU only. Build log: {out_dir.parent}", RuntimeWarning,
            stacklevel=2)
        return {}
    log("# GPU build step: " + json.dumps(step.get("stamp", {}), sort_keys=True))
    return step


def _compile_and_link(config, compiler, out_dir, log):
    """Compiles every source into out_dir and links LIBRARY_NAME; returns the CUDA stamp."""
    src = source_dir()
    tf_compile, tf_link = config.compile_flags, config.link_flags
    gpu = _cuda_step(config, src, tf_compile, out_dir, log)
    have = [f"-DTFPN_HAVE_{isa.upper()}" for isa in config.isas if isa != "generic"]
    base = [compiler] + tf_compile + list(toolchain.CXXFLAGS)
    jobs = []
    for rel in _TF_SOURCES:
        jobs.append((base + have, src / rel))
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
        for future in [pool.submit(toolchain.run, c, log) for c in commands]:
            future.result()
    link = ([compiler, "-shared", "-o", str(out_dir / LIBRARY_NAME)]
            + [str(o) for o in objects] + list(gpu.get("objects", []))
            + tf_link + list(gpu.get("link_flags", [])))
    toolchain.run(link, log)
    for obj in objects + [Path(o) for o in gpu.get("objects", [])]:
        obj.unlink()
    return gpu.get("stamp")


def _writable_cache(directory):
    """Creates the cache root; BuildError naming the variable to set when it cannot."""
    root = directory.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe = tempfile.NamedTemporaryFile(dir=root, prefix=".write-probe-")
        probe.close()
    except OSError as e:
        raise BuildError(
            f"the cache directory {root} is not writable ({type(e).__name__}: {e}). Set "
            f"{settings.ENV_CACHE_DIR} to a writable folder") from None


@contextlib.contextmanager
def _locked(path):
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
    _writable_cache(directory)
    with _locked(directory.with_name(directory.name + ".lock")):
        if directory.exists():
            if not force:
                return find_library(config)
            shutil.rmtree(directory)
        failed = failed_log(directory)
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


def ensure_library(allow_build=None):
    """The path of a verified library, building it first when allowed and needed
    (`allow_build=None`: unless TF_PROXYNORM_NO_BUILD is set).

    Raises BuildError with the reason when there is none.
    """
    config = current_config()
    path = find_library(config)
    if path is not None:
        return path
    directory = config.directory()
    if allow_build is None:
        allow_build = settings.build_allowed()
    if not allow_build:
        raise BuildError(f"no cached library in {directory.parent} and "
                         f"{settings.ENV_NO_BUILD}=1; "
                         "run `python -m tf_proxynorm.build`")
    failed = failed_log(directory)
    if failed.exists():
        raise BuildError(f"a previous build failed (log: {failed}); fix it and run "
                         "`python -m tf_proxynorm.build`")
    if not config.compiler:
        raise BuildError("no C++ compiler was found (set CXX or install g++), and no library "
                         f"built for this TensorFlow is cached in {directory.parent}")
    logging.getLogger("tf_proxynorm").warning(
        "tf_proxynorm: compiling the fused op once for this TensorFlow into %s "
        "(about a minute; set %s=1 to skip)", directory, settings.ENV_NO_BUILD)
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
