"""The host C++ compiler and the flags every translation unit of the library shares."""

import concurrent.futures
import os
import shutil
import signal
import subprocess
import threading
import time

from tf_proxynorm.fused import settings
from tf_proxynorm.fused.errors import BuildError, BuildInterrupted

# Common flags on top of TensorFlow's. -fno-trapping-math lets the compiler vectorize the
# select-based math of the kernels; -fopenmp-simd honours `#pragma omp simd` without
# linking an OpenMP runtime. Never -march=native: the library may be loaded on another CPU
# (a shared cache); CPU-specific code is built per ISA and chosen at run time.
CXXFLAGS = ("-O3", "-DNDEBUG", "-fPIC", "-fvisibility=hidden", "-fopenmp-simd",
            "-fno-trapping-math", "-Wno-deprecated-declarations")


# A compiler that ends by one of these signals was stopped, not failed (Ctrl-C reaches the
# whole foreground process group; SIGKILL is also what the out-of-memory killer sends).
_STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGKILL, signal.SIGHUP, signal.SIGQUIT)
# The driver's own words when the OOM killer (or a user) kills cc1plus under it.
_KILLED_MARKERS = ("Killed signal terminated program", "killed signal terminated program")


def _version_line(path):
    """The first line of `path --version`, or None when it does not run."""
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True,
                             timeout=60, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return (out.splitlines() or ["unknown"])[0].strip()


def find_compiler():
    """(path, first line of `--version`) of the C++ compiler, or (None, None)."""
    for name in settings.compiler_candidates():
        path = shutil.which(name)
        if path is None:
            continue
        version = _version_line(path)
        if version is not None:
            return path, version
    return None, None


def missing_compiler_reason():
    """Why `find_compiler` found none, naming $CXX when it is set (the start of a reason)."""
    cxx = os.environ.get(settings.ENV_CXX, "").strip()
    if not cxx:
        return ("no C++ compiler was found (none of g++, c++, clang++ is on PATH and runs "
                "`--version`); install g++ or set CXX to a C++ compiler")
    if shutil.which(cxx) is None:
        return (f"no C++ compiler: CXX={cxx!r} is not an executable file or a command on "
                "PATH; set CXX to a C++ compiler, or unset it to use g++, c++ or clang++")
    return (f"no C++ compiler: `{cxx} --version` (CXX={cxx!r}) failed; set CXX to a "
            "working C++ compiler, or unset it to use g++, c++ or clang++")


_running = set()
_running_lock = threading.Lock()


def stop_all(stop=None):
    """Sets `stop` (a threading.Event that `run` checks before it starts a compiler) and
    kills every compiler `run` has started and not yet reaped: after a failure or Ctrl-C
    nothing keeps compiling, or keeps the build waiting."""
    with _running_lock:
        if stop is not None:
            stop.set()
        processes = list(_running)
    for process in processes:
        try:
            process.kill()
        except OSError:
            pass


def _signal_name(returncode):
    try:
        return signal.Signals(-returncode).name
    except ValueError:
        return f"signal {-returncode}"


def run(command, log, stop=None):
    """Runs one compiler command, logging it and its output; returns the seconds it took.

    Raises BuildInterrupted when the compiler was stopped by a signal (Ctrl-C, SIGTERM,
    SIGKILL, the out-of-memory killer) or `stop` (a threading.Event) is set, BuildError
    with the tail of the output when it failed.
    """
    start = time.monotonic()
    with _running_lock:
        if stop is not None and stop.is_set():
            raise BuildInterrupted(f"not started: {command[-1]}")
        log("$ " + " ".join(command))
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   text=True, errors="replace")
        _running.add(process)
    try:
        output, _ = process.communicate()
    except BaseException:
        process.kill()
        process.wait()
        raise
    finally:
        with _running_lock:
            _running.discard(process)
    elapsed = time.monotonic() - start
    returncode = process.returncode
    if output:
        log(output.rstrip())
    log(f"# exit {returncode} in {elapsed:.1f} s")
    if returncode == 0:
        return elapsed
    name = os.path.basename(command[0])
    if returncode < 0 and -returncode in _STOP_SIGNALS:
        raise BuildInterrupted(f"`{name}` was stopped by {_signal_name(returncode)} on "
                               f"{command[-1]}")
    if any(marker in output for marker in _KILLED_MARKERS):
        raise BuildInterrupted(f"`{name}` was killed on {command[-1]} (out of memory?): "
                               + output.strip().splitlines()[-1])
    tail = "\n".join(output.strip().splitlines()[-15:])
    how = (f"was ended by {_signal_name(returncode)}" if returncode < 0 else
           f"failed (exit {returncode})")
    raise BuildError(f"`{name}` {how} on {command[-1]}:\n{tail}")


def run_parallel(jobs, log, progress, workers):
    """Runs `jobs` ({description: compiler command}) `workers` at a time, reporting each as
    it finishes; returns {description: seconds}. On the first failure or an interrupt
    (Ctrl-C) the queued jobs are cancelled and the running compilers are killed, so the
    build ends at once; the exception is re-raised."""
    seconds = {}
    stop = threading.Event()
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {pool.submit(run, command, log, stop): name
                   for name, command in jobs.items()}
        try:
            for future in concurrent.futures.as_completed(futures):
                name = futures[future]
                seconds[name] = future.result()
                progress.step(f"compiled {name}", seconds[name])
        except BaseException:
            log("# stopping the other compiler jobs")
            stop_all(stop)
            pool.shutdown(wait=True, cancel_futures=True)
            raise
    return seconds
