"""The compiler driver: builds the fused op library from `custom_ops/` into the per-user
cache that `tf_proxynorm.fused.cache` reads.

```
python -m tf_proxynorm.build            # build (or reuse) the library; `make build` runs this
python -m tf_proxynorm.build --force    # rebuild even if a good library is cached
```

The package itself stays pure Python: the C++ sources (carried in the wheel, or the
checkout's `custom_ops/`) are compiled on this machine, with the compiler flags that
`tf.sysconfig.get_compile_flags()` / `get_link_flags()` report (so the C++ standard and
`_GLIBCXX_USE_CXX11_ABI` always match the installed TensorFlow), into the cache directory
of their `cache.BuildConfig` (its layout and key: `tf_proxynorm.fused.cache`).

Nothing is ever written next to the sources (site-packages stays read-only). A build
happens in a temporary directory that is renamed into place only when complete, under an
`fcntl` lock (`<dir>.lock`), so concurrent processes never see a half-written library and
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
Whether first use builds at all is `cache.plan()`'s decision: the loader imports this module
only when it does.
The settings (cache, sources, CUDA, compiler) are those of `tf_proxynorm.fused.settings`.
"""

import argparse
import contextlib
import fcntl
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import time
import traceback
import warnings
from pathlib import Path

from tf_proxynorm.fused import cache, cuda, settings, toolchain
from tf_proxynorm.fused.errors import BuildError, BuildInterrupted

_ISA_FLAGS = {
    "generic": [],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma",
               "-mf16c"],
}
_ISA_GETTERS = {"generic": "GenericKernels", "avx2": "Avx2Kernels", "avx512": "Avx512Kernels"}

_LOGGER = logging.getLogger("tf_proxynorm")


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
    """Compiles every source into out_dir and links the library; returns the CUDA stamp."""
    src = cache.checked_source_dir()
    tf_compile, tf_link = config.compile_flags, config.link_flags
    have = [f"-DTFPN_HAVE_{isa.upper()}" for isa in config.isas if isa != "generic"]
    base = [compiler] + tf_compile + list(toolchain.CXXFLAGS)
    jobs = {}
    objects = []
    for rel in cache.TF_SOURCES:
        obj = out_dir / f"{Path(rel).stem}.o"
        jobs[f"{_UNIT_NAMES.get(rel, rel)} ({Path(rel).name})"] = (
            base + have + ["-c", "-o", str(obj), str(src / rel)])
        objects.append(obj)
    isa_source = src / cache.ISA_SOURCE
    for isa in config.isas:
        defines = [f"-DTFPN_ISA={isa}", f"-DTFPN_ISA_GETTER={_ISA_GETTERS[isa]}"]
        obj = out_dir / f"{isa_source.stem}.{isa}.o"
        jobs[f"CPU kernels, {isa} variant"] = (base + _ISA_FLAGS[isa] + defines
                                              + ["-c", "-o", str(obj), str(isa_source)])
        objects.append(obj)
    workers = max(1, min(len(jobs), os.cpu_count() or 1))
    progress.add(len(jobs) + 1)   # the CUDA step adds its own steps when it starts
    gpu = _cuda_step(config, src, tf_compile, out_dir, log, progress)
    progress.say(f"compiling {len(jobs)} C++ units with {os.path.basename(compiler)}, "
                 f"{workers} at a time (CPU kernels: {', '.join(config.isas)}), then linking")
    toolchain.run_parallel(jobs, log, progress, workers)
    link = ([compiler, "-shared", "-o", str(out_dir / cache.LIBRARY_NAME)]
            + [str(o) for o in objects] + list(gpu.get("objects", []))
            + tf_link + list(gpu.get("link_flags", [])))
    progress.step(f"linked {cache.LIBRARY_NAME}", toolchain.run(link, log))
    for obj in objects + [Path(o) for o in gpu.get("objects", [])]:
        obj.unlink()
    return gpu.get("stamp")


def _record_failure(directory, log_path, message):
    """Writes `<dir>.failed.log`: the build log, then the error (read by
    `cache.recorded_failure`)."""
    failed = cache.failed_log(directory)
    try:
        text = log_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    when = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    text += f"{cache.FAILED_MARK}{when} (pid {os.getpid()}):\n"
    text += "".join(f"# | {line}\n" for line in message.splitlines())
    partial = failed.with_name(f".{failed.name}.{os.getpid()}")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, failed)


def _writable_cache(directory):
    """Creates the cache root; BuildError naming the variable to set when it cannot."""
    root = directory.parent
    try:
        root.mkdir(parents=True, exist_ok=True)
        tempfile.NamedTemporaryFile(dir=root, prefix=".write-probe-").close()
    except OSError as e:
        raise BuildError(cache.unwritable_reason(root, e)) from None


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
    config = config or cache.current_config()
    if not config.compiler:
        raise BuildError(toolchain.missing_compiler_reason())
    directory = config.directory()
    _writable_cache(directory)
    say = progress or (lambda line: None)
    with _locked(directory.with_name(directory.name + ".lock"), on_wait=lambda: say(
            f"another process is building {directory}; waiting for it")):
        if directory.exists():
            if not force:
                return cache.find_library(config)
            shutil.rmtree(directory)
        failure = cache.recorded_failure(directory)
        if first_use and failure is not None and (
                seen_failure is None or failure["mtime"] != seen_failure["mtime"]):
            # Another process tried while this one waited: its failure is this one's.
            raise BuildError(f"another process's build failed just now: {failure['message']}")
        _remove_leftovers(directory)
        failed = cache.failed_log(directory)
        tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", dir=directory.parent))
        log = _Log(tmp / cache.LOG_NAME, echo=verbose)
        log(f"# tf_proxynorm build of {directory.name}\n# config: "
            + json.dumps(config.fields(), sort_keys=True))
        start = time.monotonic()
        try:
            cuda_stamp = _compile_and_link(config, _compiler_path(config), tmp, log,
                                           _Progress(say, start))
            log(f"# built in {time.monotonic() - start:.1f} s")
            stamp = {"config": config.fields(), "cuda_build": cuda_stamp,
                     "library_sha256": cache.sha256_file(tmp / cache.LIBRARY_NAME),
                     "built_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
            (tmp / cache.STAMP_NAME).write_text(json.dumps(stamp, indent=1, sort_keys=True))
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
            _record_failure(directory, tmp / cache.LOG_NAME, message)
            shutil.rmtree(tmp, ignore_errors=True)
            raise BuildError(message) from (None if isinstance(e, BuildError) else e)
        except BaseException:  # Ctrl-C, SystemExit: stopped, not failed; nothing recorded
            log.close()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.close()
        os.replace(tmp, directory)
        failed.unlink(missing_ok=True)
    return directory / cache.LIBRARY_NAME


# -- what first use does ------------------------------------------------------------------

def _log_progress(line):
    _LOGGER.warning("tf_proxynorm: %s", line)


def ensure_library(allow_build=None, progress=None):
    """The path of a verified library, building it first when `cache.plan` says so
    (`allow_build=None`: unless TF_PROXYNORM_NO_BUILD is set): what the loader does on
    first use. Progress lines go to `progress(line)` (see `build_on_first_use`).

    Raises BuildError with the reason when there is none (BuildInterrupted when the build
    was interrupted), KeyboardInterrupt on Ctrl-C.
    """
    step = cache.plan(allow_build)
    if step.path is not None:
        return step.path
    if step.reason is not None:
        raise BuildError(step.reason)
    return build_on_first_use(step, progress)


def build_on_first_use(step, progress=None):
    """Builds the library of `step` (a `cache.Plan` that builds) and returns its path: the
    build of a first use, retrying the failure `step` saw, once per process. Progress lines
    go to `progress(line)`, by default the `tf_proxynorm` logger (a warning: shown on stderr
    by Python's default logging).

    Raises BuildError (BuildInterrupted when the build was interrupted), KeyboardInterrupt
    on Ctrl-C.
    """
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
    cache.record_attempt(config)
    start = time.monotonic()
    try:
        path = build(config, progress=say, first_use=True, seen_failure=step.failure)
    except BuildInterrupted:
        raise
    except BuildError as e:
        if cache.recorded_failure(directory) is None:
            raise
        raise BuildError(f"{e}\n{cache.RETRY_NOTE}") from None
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
        config = cache.current_config()
        cached = not args.force and config.directory().exists()
        if not cached:   # what stops a build is said before any "building" line
            if not config.compiler:
                raise BuildError(toolchain.missing_compiler_reason())
            problem = cache.cache_write_problem(config.directory().parent)
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
