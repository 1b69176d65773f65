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
an `fcntl` lock (`<dir>.lock`), so concurrent processes never see a half-written library and
build once; the kernel releases the lock of a killed process, and the next build removes the
temporary directory such a process left.

Progress goes to stderr (this command) or the `tf_proxynorm` logger (a build on first use):
one line per compiled unit (each CPU ISA variant, each CUDA file with its architectures) with
the elapsed time; nothing when the cache already holds the library.

An interrupted build (Ctrl-C, SIGTERM, a compiler killed by a signal or by the out-of-memory
killer) is not a failure: nothing is recorded and the next attempt compiles again. A build
that fails leaves `<dir>.failed.log` (the log, ending with the error). The build on first use
retries a recorded failure once per process (the cause may have been fixed: a header
installed, memory freed), and not again in that process; this command always builds.
`plan()` says what first use would do, or why the fused op is unavailable: the one place the
reason of the loader's warning and of `python -m tf_proxynorm.info` is computed.
The settings (cache, sources, CUDA, compiler) are those of `tf_proxynorm.fused.settings`.
"""

import argparse
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
import threading
import time
import traceback
import warnings
from pathlib import Path

from tf_proxynorm.fused import cuda, settings, toolchain
from tf_proxynorm.fused.errors import BuildError, BuildInterrupted

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

_LOGGER = logging.getLogger("tf_proxynorm")
# The cache keys whose build the first-use path has attempted in this process: a recorded
# failure is retried at most once per process.
_ATTEMPTED = set()
_FAILED_MARK = "# tf_proxynorm: BUILD FAILED at "
RETRY_NOTE = ("A failed build is retried once per process, by the first use of the fused op "
              f"(set {settings.ENV_NO_BUILD}=1 to stop that); after fixing the cause, "
              "`python -m tf_proxynorm.build` builds it at once.")


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


def _record_failure(directory, log_path, message):
    """Writes `<dir>.failed.log`: the build log, then the error (read by `recorded_failure`)."""
    failed = failed_log(directory)
    try:
        text = log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    text += f"{_FAILED_MARK}{when} (pid {os.getpid()}):\n"
    text += "".join(f"# | {line}\n" for line in message.splitlines())
    partial = failed.with_name(f".{failed.name}.{os.getpid()}")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, failed)


def recorded_failure(directory):
    """The failed build recorded for `directory`, or None: dict(log=path, at=when it failed,
    message=the error it raised, mtime)."""
    failed = failed_log(directory)
    try:
        text = failed.read_text(encoding="utf-8", errors="replace")
        mtime = failed.stat().st_mtime
    except OSError:
        return None
    at, lines = None, []
    for line in text.splitlines():
        if line.startswith(_FAILED_MARK):
            at, lines = line[len(_FAILED_MARK):].split(" (pid")[0], []
        elif at is not None and line.startswith("# | "):
            lines.append(line[4:])
    if at is None:  # written by an older version: no error recorded
        at = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(mtime))
        lines = [f"the build failed (log: {failed})"]
    return {"log": failed, "at": at, "message": "\n".join(lines), "mtime": mtime}


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


def _cuda_step(config, src, tf_flags, out_dir, log, progress):
    """Runs the GPU step of `cuda.py`, or returns {} (a CPU-only build)."""
    if config.cuda is None:
        return {}
    try:
        step = cuda.cuda_build_step(config.cuda, src, list(tf_flags), str(out_dir), log,
                                    progress=progress)
    except BuildInterrupted:
        raise  # stopped, not failed: no CPU-only fallback
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


_UNIT_NAMES = {"cc/ops/group_norm_act_ops.cc": "op registration",
               "cc/kernels/group_norm_act_cpu.cc": "CPU op wrapper"}


def _compile_and_link(config, compiler, out_dir, log, progress):
    """Compiles every source into out_dir and links LIBRARY_NAME; returns the CUDA stamp."""
    src = source_dir()
    tf_compile, tf_link = config.compile_flags, config.link_flags
    have = [f"-DTFPN_HAVE_{isa.upper()}" for isa in config.isas if isa != "generic"]
    base = [compiler] + tf_compile + list(toolchain.CXXFLAGS)
    jobs = {}
    objects = []
    for rel in _TF_SOURCES:
        obj = out_dir / f"{Path(rel).stem}.o"
        jobs[f"{_UNIT_NAMES.get(rel, rel)} ({Path(rel).name})"] = (
            base + have + ["-c", "-o", str(obj), str(src / rel)])
        objects.append(obj)
    for isa in config.isas:
        defines = [f"-DTFPN_ISA={isa}", f"-DTFPN_ISA_GETTER={_ISA_GETTERS[isa]}"]
        obj = out_dir / f"{Path(_ISA_SOURCE).stem}.{isa}.o"
        jobs[f"CPU kernels, {isa} variant"] = (base + _ISA_FLAGS[isa] + defines
                                              + ["-c", "-o", str(obj), str(src / _ISA_SOURCE)])
        objects.append(obj)
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    progress.add(len(jobs) + 1)   # the CUDA step adds its own steps when it starts
    gpu = _cuda_step(config, src, tf_compile, out_dir, log, progress)
    progress.say(f"compiling {len(jobs)} C++ units with {os.path.basename(compiler)}, "
                 f"{workers} at a time (CPU kernels: {', '.join(config.isas)}), then linking")
    toolchain.run_parallel(jobs, log, progress, workers)
    link = ([compiler, "-shared", "-o", str(out_dir / LIBRARY_NAME)]
            + [str(o) for o in objects] + list(gpu.get("objects", []))
            + tf_link + list(gpu.get("link_flags", [])))
    progress.step(f"linked {LIBRARY_NAME}", toolchain.run(link, log))
    for obj in objects + [Path(o) for o in gpu.get("objects", [])]:
        obj.unlink()
    return gpu.get("stamp")


def _unwritable(root, error):
    return (f"the cache directory {root} is not writable ({type(error).__name__}: {error}). "
            f"Set {settings.ENV_CACHE_DIR} to a writable folder")


def cache_write_problem(root):
    """None when a build could write into the cache root `root`, else the reason. Creates
    nothing that stays: probes the root, or the nearest folder above it that exists."""
    existing = root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(f"{existing} is not a directory")
        tempfile.NamedTemporaryFile(dir=existing, prefix=".write-probe-").close()
    except OSError as e:
        return _unwritable(root, e)
    return None


def _writable_cache(directory):
    """Creates the cache root; BuildError naming the variable to set when it cannot."""
    root = directory.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=root, prefix=".write-probe-").close()
    except OSError as e:
        raise BuildError(_unwritable(root, e)) from None


@contextlib.contextmanager
def _locked(path, on_wait=None):
    """Holds an exclusive `flock` on `path` (released by the kernel if the process dies);
    calls `on_wait()` first when another process holds it."""
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _remove_leftovers(directory):
    """Removes the temporary build directories of `directory` that a killed process left
    (called under the lock, so no live build of this key owns one)."""
    for leftover in directory.parent.glob(f".{directory.name}.*"):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)


class _Progress:
    """Progress lines of one build: `say(line)` per finished step, with the elapsed time."""

    def __init__(self, say, start):
        self._say = say
        self._start = start
        self._lock = threading.Lock()
        self.done = 0
        self.total = 0

    def add(self, steps):
        self.total += steps

    def say(self, line):
        with self._lock:
            self._say(f"[{time.monotonic() - self._start:5.1f} s] {line}")

    def step(self, what, seconds):
        with self._lock:
            self.done += 1
            self._say(f"[{time.monotonic() - self._start:5.1f} s] {what} "
                      f"({self.done}/{self.total}, {seconds:.1f} s)")


def _compiler_path(config):
    """The compiler to run for `config` (which records its file name only): the one
    `find_compiler` picks ($CXX may be a path off PATH), else the name on PATH."""
    found, _ = toolchain.find_compiler()
    if found and os.path.basename(found) == config.compiler:
        return found
    return shutil.which(config.compiler) or config.compiler


def build(config=None, force=False, verbose=False, progress=None, first_use=False,
          seen_failure=None):
    """Builds the library for `config` unless a verified one is cached; returns its path.

    `progress(line)` receives the progress lines (none when the cache serves).
    `first_use`: the build of a layer call, which does not compile again when another
    process's build of the same key failed while this one waited for the lock (a failure
    record other than `seen_failure`, the one `plan` saw before).

    Raises:
        BuildInterrupted: a compiler was stopped by a signal; nothing is recorded.
        BuildError: no compiler, a failed compilation (the log says why; recorded in
            `<dir>.failed.log`), or a cached library whose stamp does not match (without
            `force`).
        KeyboardInterrupt: Ctrl-C; the compilers are killed and nothing is recorded.
    """
    config = config or current_config()
    if not config.compiler:
        raise BuildError(toolchain.missing_compiler_reason())
    directory = config.directory()
    _writable_cache(directory)
    say = progress or (lambda line: None)
    with _locked(directory.with_name(directory.name + ".lock"), on_wait=lambda: say(
            f"another process is building {directory}; waiting for it")):
        if directory.exists():
            if not force:
                return find_library(config)
            shutil.rmtree(directory)
        failure = recorded_failure(directory)
        if first_use and failure is not None and (
                seen_failure is None or failure["mtime"] != seen_failure["mtime"]):
            # Another process tried while this one waited: its failure is this one's.
            raise BuildError(f"another process's build failed just now: {failure['message']}")
        _remove_leftovers(directory)
        failed = failed_log(directory)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        log = _Log(tmp / LOG_NAME, echo=verbose)
        log(f"# tf_proxynorm build of {directory.name}\n# config: "
            + json.dumps(config.fields(), sort_keys=True))
        start = time.monotonic()
        try:
            cuda_stamp = _compile_and_link(config, _compiler_path(config), tmp, log,
                                           _Progress(say, start))
            log(f"# built in {time.monotonic() - start:.1f} s")
            stamp = {"config": config.fields(), "cuda_build": cuda_stamp,
                     "library_sha256": _sha256_file(tmp / LIBRARY_NAME),
                     "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            (tmp / STAMP_NAME).write_text(json.dumps(stamp, indent=1, sort_keys=True))
        except BuildInterrupted as e:
            log.close()
            shutil.rmtree(tmp, ignore_errors=True)
            raise BuildInterrupted(
                f"the build was interrupted ({e}); it is not recorded as failed, and the "
                "next use of the fused op builds again (or run `python -m "
                "tf_proxynorm.build`)") from None
        except Exception as e:
            log.close()
            message = (f"{e}\nFull build log: {failed}" if isinstance(e, BuildError) else
                       f"the build failed: {type(e).__name__}: {e}\nFull build log: {failed}")
            _record_failure(directory, tmp / LOG_NAME, message)
            shutil.rmtree(tmp, ignore_errors=True)
            raise BuildError(message) from (None if isinstance(e, BuildError) else e)
        except BaseException:  # Ctrl-C, SystemExit: stopped, not failed; nothing recorded
            log.close()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.close()
        os.replace(tmp, directory)
        failed.unlink(missing_ok=True)
    return directory / LIBRARY_NAME


# -- what first use does ------------------------------------------------------------------

@dataclasses.dataclass
class Plan:
    """What the first use of the fused op would do here, decided without compiling:
    load `path`; or nothing, because of `reason` (the warning's reason); or build `config`
    (both None), retrying the recorded `failure` when there is one."""

    config: object = None
    path: Path = None
    reason: str = None
    failure: dict = None

    @property
    def builds(self):
        return self.path is None and self.reason is None

    def pending_reason(self):
        """Why there is no library yet when first use would build it (info's reason)."""
        directory = self.config.directory()
        if self.failure is None:
            return (f"not built yet: no library for this TensorFlow is cached in "
                    f"{directory.parent}; the first layer call in a process compiles it "
                    "(about a minute), or build it now with `python -m tf_proxynorm.build`")
        return (f"the last build, at {self.failure['at']}, failed: {self.failure['message']}\n"
                "The first use of the fused op in the next process retries it once (fix the "
                "cause first), or retry now with `python -m tf_proxynorm.build`.")


def plan(allow_build=None):
    """What first use would do (a `Plan`); never compiles and never raises BuildError.

    `allow_build=None` follows TF_PROXYNORM_NO_BUILD. This is the one place where the
    reason the fused op is unavailable is decided: the loader's warning and
    `python -m tf_proxynorm.info` both report `Plan.reason`.
    """
    try:
        config = current_config()
        path = find_library(config)
    except BuildError as e:
        return Plan(reason=str(e))
    if path is not None:
        return Plan(config, path=path)
    directory = config.directory()
    if allow_build is None and not settings.build_allowed():
        value = os.environ.get(settings.ENV_NO_BUILD, "").strip()
        return Plan(config, reason=(
            f"no library built for this TensorFlow is cached in {directory.parent}, and "
            f"{settings.ENV_NO_BUILD}={value!r} forbids building it on first use; build it "
            f"with `python -m tf_proxynorm.build`, or unset {settings.ENV_NO_BUILD}"))
    if allow_build is False:
        return Plan(config, reason=(
            f"no library built for this TensorFlow is cached in {directory.parent} (and this "
            "call does not build); build it with `python -m tf_proxynorm.build`"))
    if not config.compiler:
        return Plan(config, reason=(
            f"{toolchain.missing_compiler_reason()}. No library built for this TensorFlow "
            f"is cached in {directory.parent}"))
    problem = cache_write_problem(directory.parent)
    if problem is not None:
        return Plan(config, reason=problem)
    failure = recorded_failure(directory)
    if failure is not None and config.key() in _ATTEMPTED:
        return Plan(config, failure=failure, reason=(
            f"the build failed in this process: {failure['message']}\n{RETRY_NOTE}"))
    return Plan(config, failure=failure)


def _log_progress(line):
    _LOGGER.warning("tf_proxynorm: %s", line)


def ensure_library(allow_build=None, progress=None):
    """The path of a verified library, building it first when `plan` says so
    (`allow_build=None`: unless TF_PROXYNORM_NO_BUILD is set). Progress lines go to
    `progress(line)`, by default the `tf_proxynorm` logger (a warning: shown on stderr by
    Python's default logging).

    Raises BuildError with the reason when there is none (BuildInterrupted when the build
    was interrupted), KeyboardInterrupt on Ctrl-C.
    """
    step = plan(allow_build)
    if step.path is not None:
        return step.path
    if step.reason is not None:
        raise BuildError(step.reason)
    say = progress or _log_progress
    config = step.config
    directory = config.directory()
    if step.failure is None:
        say(f"compiling the fused op once for this TensorFlow into {directory} (about a "
            f"minute; set {settings.ENV_NO_BUILD}=1 to skip)")
    else:
        say(f"retrying the build that failed at {step.failure['at']} (log: "
            f"{step.failure['log']}; retried once per process): compiling into {directory} "
            f"(about a minute; set {settings.ENV_NO_BUILD}=1 to skip)")
    _ATTEMPTED.add(config.key())
    start = time.monotonic()
    try:
        path = build(config, progress=say, first_use=True, seen_failure=step.failure)
    except BuildInterrupted:
        raise
    except BuildError as e:
        if recorded_failure(directory) is None:
            raise
        raise BuildError(f"{e}\n{RETRY_NOTE}") from None
    say(f"built in {time.monotonic() - start:.1f} s: {path}")
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tf_proxynorm.build",
                                     description="Build the tf_proxynorm fused op library.")
    parser.add_argument("--force", action="store_true", help="rebuild even if cached")
    parser.add_argument("--verbose", action="store_true", help="echo the build log")
    args = parser.parse_args(argv)

    def say(line):
        print(f"tf_proxynorm: {line}", file=sys.stderr, flush=True)

    start = time.monotonic()
    try:
        config = current_config()
        cached = not args.force and config.directory().exists()
        if not cached:   # what stops a build is said before any "building" line
            if not config.compiler:
                raise BuildError(toolchain.missing_compiler_reason())
            problem = cache_write_problem(config.directory().parent)
            if problem is not None:
                raise BuildError(problem)
            say(f"building the fused op library into {config.directory()}")
        path = build(config, force=args.force, verbose=args.verbose, progress=say)
    except KeyboardInterrupt:
        print("tf_proxynorm: interrupted; nothing was recorded (run this command again to "
              "build)", file=sys.stderr)
        return 130
    except BuildError as e:
        print(f"tf_proxynorm: the fused op was not built: {e}\n"
              "The package still works, with the reference (pure TensorFlow) path.",
              file=sys.stderr)
        return 1
    if cached:
        print(f"tf_proxynorm: fused op library already built: {path}")
    else:
        print(f"tf_proxynorm: fused op library ready in {time.monotonic() - start:.1f} s: "
              f"{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
