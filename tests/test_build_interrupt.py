"""The build's life cycle: interrupted builds, failed builds and their retry, progress, and
the reason `python -m tf_proxynorm.info` gives against the first layer call's warning.

Most tests use a fake C++ compiler (a shell script named by CXX) that can sleep, fail, kill
itself or just create its output file, so that they take seconds; the ones that really
compile are marked slow.
"""

import fcntl
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
import warnings
from pathlib import Path

import numpy as np
import pytest

import tf_proxynorm as tfpn
from tf_proxynorm.fused import build, info, loader, settings
from tf_proxynorm.fused import cache as build_cache
from tf_proxynorm.fused.errors import BuildError, BuildInterrupted

TESTS = Path(__file__).resolve().parent

FAKE_CXX = r"""#!/bin/sh
# Fake C++ compiler. `--version` works. A compile appends its arguments to $FAKE_CXX_LOG,
# then: fails when the file $FAKE_CXX_FAIL exists; kills itself with $FAKE_CXX_SIGNAL;
# becomes `sleep $FAKE_CXX_SLEEP` (one process, its pid in $FAKE_CXX_LOG.pids);
# with FAKE_CXX_TOUCH=1 creates its `-o` file; else runs the real g++.
case "$1" in --version) echo "fakecxx 1.0"; exit 0;; esac
[ -n "$FAKE_CXX_LOG" ] && echo "$*" >> "$FAKE_CXX_LOG"
if [ -n "$FAKE_CXX_FAIL" ] && [ -e "$FAKE_CXX_FAIL" ]; then
  echo "fakecxx: error: boom" >&2; exit 1
fi
[ -n "$FAKE_CXX_SIGNAL" ] && kill -"$FAKE_CXX_SIGNAL" $$
if [ -n "$FAKE_CXX_SLEEP" ]; then
  [ -n "$FAKE_CXX_LOG" ] && echo $$ >> "$FAKE_CXX_LOG.pids"
  exec sleep "$FAKE_CXX_SLEEP"
fi
if [ "$FAKE_CXX_TOUCH" = 1 ]; then
  while [ $# -gt 0 ]; do [ "$1" = -o ] && : > "$2"; shift; done; exit 0
fi
exec g++ "$@"
"""


def fake_compiler(tmp_path):
    path = tmp_path / "fakecxx"
    path.write_text(FAKE_CXX)
    path.chmod(0o755)
    return path


def _calls(tmp_path):
    log = tmp_path / "calls"
    return len(log.read_text().splitlines()) if log.exists() else 0


@pytest.fixture
def fake_env(tmp_path, monkeypatch):
    """This process set up for the fake compiler: a private cache, CPU only, no recorded
    attempt, and no library loaded yet (the loader's memo is restored afterwards)."""
    cxx = fake_compiler(tmp_path)
    env = {settings.ENV_CACHE_DIR: str(tmp_path / "cache"), "CXX": str(cxx),
           settings.ENV_BUILD_CUDA: "0", settings.ENV_CPU_ISAS: "generic",
           "FAKE_CXX_LOG": str(tmp_path / "calls")}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    for name in (settings.ENV_NO_BUILD, "FAKE_CXX_FAIL", "FAKE_CXX_SIGNAL", "FAKE_CXX_SLEEP",
                 "FAKE_CXX_TOUCH", "TF_PROXYNORM_IMPLEMENTATION"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(build_cache, "_ATTEMPTED", set(), raising=False)
    monkeypatch.setattr(loader, "_library", None)
    return env


def _subprocess_env(env, **extra):
    out = {k: v for k, v in os.environ.items()
           if k not in ("TF_PROXYNORM_IMPLEMENTATION", settings.ENV_NO_BUILD)
           and not k.startswith("FAKE_CXX_")}
    out.update({"TF_CPP_MIN_LOG_LEVEL": "2", **env, **extra})
    return {k: v for k, v in out.items() if v is not None}


def _leftovers(cache):
    """What a build left in the cache besides its lock files."""
    return sorted(p.name for p in cache.iterdir() if p.suffix != ".lock") if cache.exists() else []


# -- interrupted builds are not failures ---------------------------------------------------

FIRST_USE = """
    import numpy as np
    import tf_proxynorm as tfpn
    tfpn.GroupNormAct(groups=2)(np.ones((2, 4, 4, 8), "float32"))
    print("CALLED", tfpn.fused_op_available(), tfpn.fused.unavailable_reason())
"""


def _start_first_use_and_wait_for_the_compilers(env, tmp_path):
    """A process whose first layer call compiles with sleeping compilers; returns it once
    the compilers run."""
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(FIRST_USE)], cwd=str(TESTS),
                            env=_subprocess_env(env, FAKE_CXX_SLEEP="300"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    pids = tmp_path / "calls.pids"
    while not (pids.exists() and pids.read_text().strip()):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the compilers never started"
        time.sleep(0.2)
    return proc, [int(p) for p in pids.read_text().split()]


@pytest.fixture(autouse=True)
def sigint_acts():
    """SIGINT raises KeyboardInterrupt here and kills the child processes, as in a
    terminal: pytest-xdist's workers ignore SIGINT, and an ignored signal stays ignored
    in every process they start (the fake compilers, a first-use subprocess)."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.fixture
def cleanup():
    """Kills, after the test, the processes it registered that still run (a failing test
    must not leave a process or a sleeping fake compiler behind)."""
    started = []
    yield started
    for item in started:
        if isinstance(item, Path):   # a pids file: compilers that started later
            for pid in (item.read_text().split() if item.exists() else []):
                if not _gone(int(pid)):
                    os.kill(int(pid), signal.SIGKILL)
        elif isinstance(item, subprocess.Popen):
            if item.poll() is None:
                item.kill()
                item.communicate()
        elif not _gone(item):
            os.kill(item, signal.SIGKILL)


def _gone(pid):
    """Whether process `pid` ended (a zombie waiting for a reaper counts as ended)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().split(") ")[-1][0]
    except OSError:
        return True
    return state in "ZX"


def _plan_in(env, tmp_path):
    """`python -m tf_proxynorm.info` and `build_cache.plan()` in a fresh process (no compile)."""
    script = ("import json\nfrom tf_proxynorm.fused import cache as build_cache\nfrom "
              "tf_proxynorm.info import report\nstep = build_cache.plan()\n"
              "print(json.dumps(dict(builds=step.builds, reason=step.reason, "
              "info='\\n'.join(report()))))")
    out = subprocess.run([sys.executable, "-c", script], cwd=str(TESTS),
                         env=_subprocess_env(env), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_ctrl_c_during_the_first_use_build_records_nothing(fake_env, tmp_path, cleanup):
    """Ctrl-C (SIGINT) while the first layer call compiles: the compilers are killed at once
    (they would sleep 300 s), the call raises KeyboardInterrupt, nothing is recorded as
    failed, no temporary directory is left, and the next process would build again."""
    proc, pids = _start_first_use_and_wait_for_the_compilers(fake_env, tmp_path)
    cleanup += [proc, tmp_path / "calls.pids"] + pids
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert time.monotonic() - sent < 30
    assert proc.returncode != 0 and "KeyboardInterrupt" in stderr, stderr[-3000:]
    assert "CALLED" not in stdout
    assert "compiling the fused op once for this TensorFlow" in stderr
    assert all(_gone(pid) for pid in pids)
    assert _leftovers(tmp_path / "cache") == []
    after = _plan_in(fake_env, tmp_path)
    assert after["builds"] and after["reason"] is None
    assert "fused op library: NOT BUILT YET" in after["info"], after["info"]
    assert "failed" not in after["info"].split("kernels registered")[0]


def test_a_killed_process_leaves_no_failure_and_its_leftovers_are_removed(fake_env, tmp_path,
                                                                        cleanup):
    """SIGKILL of the building process: its lock dies with it and only its temporary
    directory stays; the next build takes the lock and removes it."""
    proc, pids = _start_first_use_and_wait_for_the_compilers(fake_env, tmp_path)
    cleanup += [proc, tmp_path / "calls.pids"] + pids
    proc.kill()
    proc.communicate(timeout=60)
    cache = tmp_path / "cache"
    (leftover,) = _leftovers(cache)
    assert leftover.startswith(".tf") and (cache / leftover).is_dir()
    (tmp_path / "fail").write_text("")
    os.environ["FAKE_CXX_FAIL"] = str(tmp_path / "fail")  # restored by fake_env's monkeypatch
    with pytest.raises(BuildError, match="fakecxx: error: boom"):
        build.ensure_library(progress=lambda line: None)
    assert [p for p in _leftovers(cache) if not p.endswith(".failed.log")] == []


@pytest.mark.parametrize("sig", ["KILL", "TERM", "INT"])
def test_a_compiler_killed_by_a_signal_is_not_a_failed_build(fake_env, tmp_path,
                                                              monkeypatch, sig):
    """A compiler ended by SIGKILL (the out-of-memory killer), SIGTERM or SIGINT: the build
    says it was interrupted, records nothing and the next attempt compiles again."""
    monkeypatch.setenv("FAKE_CXX_SIGNAL", sig)
    with pytest.raises(BuildInterrupted, match=f"stopped by SIG{sig} .*not recorded as failed"):
        build.ensure_library(progress=lambda line: None)
    assert _leftovers(tmp_path / "cache") == []
    assert build_cache.plan().builds
    outcome = loader.attempt_load()
    assert outcome.module is None and "the build was interrupted" in outcome.reason
    monkeypatch.delenv("FAKE_CXX_SIGNAL")
    monkeypatch.setenv("FAKE_CXX_TOUCH", "1")
    assert build.ensure_library(progress=lambda line: None).is_file()


# -- a genuine failure is retried once per process ----------------------------------------

def test_a_failed_build_is_retried_once_per_process(fake_env, tmp_path, monkeypatch):
    marker = tmp_path / "fail"
    marker.write_text("")
    monkeypatch.setenv("FAKE_CXX_FAIL", str(marker))
    with pytest.raises(BuildError) as first:
        build.ensure_library(progress=lambda line: None)
    message = str(first.value)
    assert "`fakecxx` failed (exit 1)" in message and "fakecxx: error: boom" in message
    assert build_cache.RETRY_NOTE in message
    directory = build_cache.current_config().directory()
    failed = build_cache.failed_log(directory)
    assert f"Full build log: {failed}" in message and failed.is_file()
    calls = _calls(tmp_path)
    # Not again in this process, even once the cause is gone: the same reason, no compile.
    marker.unlink()
    with pytest.raises(BuildError, match="the build failed in this process: `fakecxx` failed"):
        build.ensure_library(progress=lambda line: None)
    assert _calls(tmp_path) == calls
    # A new process (no attempt recorded) retries it once, says so, and builds.
    monkeypatch.setattr(build_cache, "_ATTEMPTED", set())
    monkeypatch.setenv("FAKE_CXX_TOUCH", "1")
    lines = []
    path = build.ensure_library(progress=lines.append)
    assert _calls(tmp_path) > calls
    assert lines[0].startswith("retrying the build that failed at ") and str(failed) in lines[0]
    assert "retried once per process" in lines[0]
    assert path == directory / build_cache.LIBRARY_NAME and path.is_file()
    assert not failed.exists()
    assert build_cache.check_stamp(directory, build_cache.current_config()) is None


def test_a_failed_log_of_an_interrupted_build_by_an_older_version_is_retried(fake_env,
                                                                             monkeypatch):
    """The issue's leftover: a `.failed.log` holding only `# exit -2` lines (Ctrl-C, recorded
    as a failure by an older version). First use retries it and, built, removes it; `info`
    before that says the first layer call retries it."""
    directory = build_cache.current_config().directory()
    directory.parent.mkdir(parents=True)
    failed = build_cache.failed_log(directory)
    failed.write_text("# tf_proxynorm build of x\n$ g++ -c a.cc\n# exit -2 in 3.1 s\n")
    step = build_cache.plan()
    assert step.builds and step.failure["message"] == f"the build failed (log: {failed})"
    status, reason = _info_reason()
    assert status.startswith("fused op library: NOT BUILT (the last build failed")
    assert "retries it once" in reason
    monkeypatch.setenv("FAKE_CXX_TOUCH", "1")
    assert build.ensure_library(progress=lambda line: None).is_file()
    assert not failed.exists()


def test_a_failure_recorded_while_waiting_for_the_lock_is_not_compiled_again(fake_env, tmp_path):
    """Processes that start together on a broken set-up: the one holding the lock fails and
    records it; the waiting ones report that failure instead of each compiling in turn."""
    config = build_cache.current_config()
    directory = config.directory()
    directory.parent.mkdir(parents=True)
    lines, outcome = [], {}

    def first_use():
        try:
            build.ensure_library(progress=lines.append)
        except BuildError as e:
            outcome["error"] = str(e)

    with open(directory.with_name(directory.name + ".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)   # "another process" builds
        waiter = threading.Thread(target=first_use)
        waiter.start()
        deadline = time.monotonic() + 60
        while not any("another process is building" in line for line in lines):
            assert time.monotonic() < deadline and waiter.is_alive(), lines
            time.sleep(0.05)
        log = directory.parent / "other.log"
        log.write_text("# the other process's log\n")
        build._record_failure(directory, log, "`g++` failed (exit 1) on x.cc:\nbad header")
        fcntl.flock(lock, fcntl.LOCK_UN)
    waiter.join(60)
    assert "another process's build failed just now: `g++` failed" in outcome["error"]
    assert _calls(tmp_path) == 0


# -- progress ------------------------------------------------------------------------------

def _build_command(capsys, *args):
    """`python -m tf_proxynorm.build` run in this process: (exit code, stdout, stderr)."""
    capsys.readouterr()
    code = build.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_build_command_shows_progress_and_is_quiet_when_cached(fake_env, tmp_path,
                                                              monkeypatch, capsys):
    monkeypatch.setenv(settings.ENV_CPU_ISAS, "generic,avx2,avx512")
    monkeypatch.setenv("FAKE_CXX_TOUCH", "1")
    code, out, err = _build_command(capsys)
    assert code == 0, err
    progress = err.splitlines()
    assert all(line.startswith("tf_proxynorm: ") for line in progress), progress
    assert progress[0].startswith("tf_proxynorm: building the fused op library into "
                                  f"{tmp_path / 'cache'}")
    assert "compiling 5 C++ units with fakecxx" in progress[1]
    assert "(CPU kernels: generic, avx2, avx512)" in progress[1]
    steps = progress[2:]
    assert len(steps) == 6, steps
    for unit in ("CPU kernels, generic variant", "CPU kernels, avx2 variant",
                 "CPU kernels, avx512 variant", "op registration (group_norm_act_ops.cc)",
                 "CPU op wrapper (group_norm_act_cpu.cc)"):
        assert sum(f"] compiled {unit} (" in line for line in steps) == 1, (unit, steps)
    assert f"] linked {build_cache.LIBRARY_NAME} (6/6, " in steps[-1]
    for line in steps:
        assert re.match(r"tf_proxynorm: \[ *\d+\.\d s\] .* \(\d/6, \d+\.\d s\)$", line), line
    assert out.startswith("tf_proxynorm: fused op library ready in ")
    code, out, err = _build_command(capsys)
    assert code == 0 and err == ""
    (line,) = out.splitlines()
    assert line.startswith("tf_proxynorm: fused op library already built: ")


def test_build_command_ctrl_c_records_nothing_and_an_unwritable_cache_says_so_first(
        fake_env, tmp_path, monkeypatch, capsys, cleanup):
    """Ctrl-C (SIGINT to this process) while the command's compilers run: they are killed,
    the command exits with 130 and records nothing. An unwritable cache: the reason comes
    first, with no "building" line and no compile."""
    monkeypatch.setenv("FAKE_CXX_SLEEP", "300")
    cleanup.append(tmp_path / "calls.pids")

    def interrupt_once_compiling():
        deadline = time.monotonic() + 120
        while not (tmp_path / "calls.pids").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        if (tmp_path / "calls.pids").exists():   # never interrupt pytest itself
            os.kill(os.getpid(), signal.SIGINT)

    thread = threading.Thread(target=interrupt_once_compiling)
    thread.start()
    sent = time.monotonic()
    code, out, err = _build_command(capsys)
    thread.join()
    assert time.monotonic() - sent < 60
    assert code == 130, err
    assert "tf_proxynorm: interrupted; nothing was recorded" in err
    pids = [int(p) for p in (tmp_path / "calls.pids").read_text().split()]
    assert pids and all(_gone(pid) for pid in pids)
    assert _leftovers(tmp_path / "cache") == []
    monkeypatch.delenv("FAKE_CXX_SLEEP")
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv(settings.ENV_CACHE_DIR, str(tmp_path / "a-file" / "cache"))
    calls = _calls(tmp_path)
    code, out, err = _build_command(capsys)
    assert code == 1
    assert err.startswith(f"tf_proxynorm: the fused op was not built: the cache directory "
                          f"{tmp_path / 'a-file' / 'cache'} is not writable"), err
    assert _calls(tmp_path) == calls


def test_first_use_progress_goes_to_the_logger(fake_env, monkeypatch, caplog):
    monkeypatch.setenv("FAKE_CXX_TOUCH", "1")
    with caplog.at_level(logging.WARNING, logger="tf_proxynorm"):
        path = build.ensure_library()
    lines = [r.getMessage() for r in caplog.records if r.name == "tf_proxynorm"]
    assert lines[0].startswith("tf_proxynorm: compiling the fused op once for this TensorFlow")
    assert any("] compiled CPU kernels, generic variant (" in line for line in lines), lines
    assert lines[-1] == f"tf_proxynorm: built in {lines[-1].split('built in ')[1].split(' s')[0]}" \
                        f" s: {path}"
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="tf_proxynorm"):
        assert build.ensure_library() == path
    assert caplog.records == []


FAKE_NVCC = r"""#!/bin/sh
# Fake nvcc: a version, a toolkit root for `--dryrun`, else creates its `-o` file.
case "$*" in *--version*) echo "Cuda compilation tools, release 12.5, V12.5.82"; exit 0;; esac
case "$*" in *--dryrun*) echo "#\$ TOP=$FAKE_CUDA_ROOT" >&2; exit 0;; esac
[ -n "$FAKE_CXX_LOG" ] && echo "nvcc $*" >> "$FAKE_CXX_LOG"
while [ $# -gt 0 ]; do [ "$1" = -o ] && : > "$2"; shift; done; exit 0
"""


def test_cuda_step_progress_names_each_file_and_its_architectures(fake_env, tmp_path,
                                                                  monkeypatch):
    """The GPU step (with a fake nvcc and toolkit) reports what it compiles: one line with
    the architectures, then one per .cu file and the GPU wrapper, and the link check."""
    from tf_proxynorm.fused import cuda
    nvcc = tmp_path / "nvcc"
    nvcc.write_text(FAKE_NVCC)
    nvcc.chmod(0o755)
    root = tmp_path / "cuda"
    (root / "lib64").mkdir(parents=True)
    (root / "lib64" / "libcudart_static.a").write_text("")
    monkeypatch.setenv("FAKE_CUDA_ROOT", str(root))
    monkeypatch.setenv("FAKE_CXX_TOUCH", "1")
    out = tmp_path / "out"
    out.mkdir()
    lines = []
    progress = build._Progress(lines.append, time.monotonic())
    step = cuda.cuda_build_step({"nvcc": str(nvcc), "sass": ["sm_75", "sm_90"],
                                 "ptx": "compute_90"}, build_cache.checked_source_dir(), [],
                                str(out), lambda line: None, progress=progress)
    targets = "sm_75, sm_90, compute_90 (PTX)"
    cu_files = sorted(p.name for p in (build_cache.checked_source_dir() / "cuda").glob("*.cu"))
    assert f"compiling the CUDA kernels with nvcc 12.5.82 for {targets}: {len(cu_files)} files" \
        in lines[0], lines
    for name in cu_files:
        assert sum(f"] compiled CUDA {name} for {targets} (" in line for line in lines) == 1, lines
    assert sum("] compiled GPU op wrapper (group_norm_act_gpu_kernels.cc) (" in line
               for line in lines) == 1, lines
    total = len(cu_files) + 2
    assert "linked the CUDA kernels alone" in lines[-1] and f"({total}/{total}, " in lines[-1]
    assert sorted(step["stamp"]["compile_seconds"]) == sorted(
        cu_files + ["group_norm_act_gpu_kernels.cc"])


@pytest.mark.parametrize("error, interrupted", [
    (BuildInterrupted("`nvcc` was stopped by SIGKILL on gna_forward.cu"), True),
    (BuildError("`nvcc` failed (exit 1) on gna_forward.cu:\nerror"), False),
])
def test_an_interrupted_gpu_step_is_not_a_cpu_only_fallback(monkeypatch, tmp_path, error,
                                                           interrupted):
    """A failed GPU step falls back to a CPU-only library with a warning; an interrupted
    one interrupts the build (a CPU-only library must not be cached because of Ctrl-C)."""
    from tf_proxynorm.fused import cuda

    def step(*args, **kwargs):
        raise error

    monkeypatch.setattr(cuda, "cuda_build_step", step)
    config = type("Config", (), {"cuda": {"nvcc": "nvcc"}})()
    progress = build._Progress(lambda line: None, time.monotonic())
    if interrupted:
        with pytest.raises(BuildInterrupted):
            build._cuda_step(config, tmp_path, [], tmp_path, lambda line: None, progress)
    else:
        with pytest.warns(RuntimeWarning, match="the GPU kernels failed to build"):
            assert build._cuda_step(config, tmp_path, [], tmp_path, lambda line: None,
                                    progress) == {}


# -- info gives the reason the first layer call's warning gives ----------------------------

def _first_layer_call_warning():
    """The reason of the warning the first layer call of a process issues (None: none)."""
    x = np.ones((2, 4, 4, 8), "float32")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tfpn.GroupNormAct(groups=2)(x)
    reasons = [str(w.message).split("Reason: ", 1)[1] for w in caught
               if "tf_proxynorm: the fused op is unavailable" in str(w.message)]
    assert len(reasons) <= 1, reasons
    return reasons[0] if reasons else None


def _info_reason():
    """(status line, reason) of `python -m tf_proxynorm.info`'s report."""
    lines = "\n".join(info.report()).splitlines()
    (i,) = [i for i, line in enumerate(lines) if line.startswith("fused op library:")]
    reason = [lines[i + 1].removeprefix("  reason:       ")]
    for line in lines[i + 2:]:
        if not line.startswith(" " * 16):
            break
        reason.append(line.strip())
    return lines[i], "\n".join(reason)


def _set_up(monkeypatch, tmp_path, setup):
    if setup == "CXX=/nonexistent":
        monkeypatch.setenv("CXX", "/nonexistent")
    elif setup == "cache under a file":
        (tmp_path / "a-file").write_text("")
        monkeypatch.setenv(settings.ENV_CACHE_DIR, str(tmp_path / "a-file" / "cache"))
    elif setup == "read-only cache":
        if os.geteuid() == 0:
            pytest.skip("root writes into a read-only folder")
        (tmp_path / "ro").mkdir(mode=0o555)
        monkeypatch.setenv(settings.ENV_CACHE_DIR, str(tmp_path / "ro" / "cache"))
    elif setup == "NO_BUILD=1":
        monkeypatch.setenv(settings.ENV_NO_BUILD, "1")
    elif setup == "build failure":
        (tmp_path / "fail").write_text("")
        monkeypatch.setenv("FAKE_CXX_FAIL", str(tmp_path / "fail"))


@pytest.mark.parametrize("setup, phrase", [
    ("CXX=/nonexistent", "no C\\+\\+ compiler: CXX='/nonexistent' is not an executable"),
    ("cache under a file", f"is not writable .*Set {settings.ENV_CACHE_DIR} to a writable"),
    ("read-only cache", f"is not writable .*Set {settings.ENV_CACHE_DIR} to a writable"),
    ("NO_BUILD=1", f"{settings.ENV_NO_BUILD}='1' forbids building it on first use"),
])
def test_info_reports_the_reason_of_the_first_layer_call(fake_env, tmp_path, monkeypatch,
                                                         caplog, setup, phrase):
    """Before any layer call, `info` gives the reason the first layer call then warns with
    (and no compile starts, nor a "compiling" line is printed); afterwards it gives it too."""
    _set_up(monkeypatch, tmp_path, setup)
    status, before = _info_reason()
    assert status.startswith("fused op library: UNAVAILABLE")
    assert re.search(phrase, before), before
    if setup != "NO_BUILD=1":
        assert settings.ENV_NO_BUILD not in before
    with caplog.at_level(logging.WARNING, logger="tf_proxynorm"):
        warned = _first_layer_call_warning()
    assert warned == before
    assert not any("compiling" in r.getMessage() for r in caplog.records)
    assert _calls(tmp_path) == 0
    assert _info_reason() == (status, before)


def test_info_before_and_after_a_failed_first_use_build(fake_env, tmp_path, monkeypatch):
    """No library cached and TF_PROXYNORM_NO_BUILD unset: `info` says the first layer call
    builds it (not that TF_PROXYNORM_NO_BUILD is set). That build fails: the warning says
    why, `info` in the same process repeats it, and in a new process `info` reports the
    recorded failure and that the first layer call retries it."""
    status, before = _info_reason()
    assert status.startswith("fused op library: NOT BUILT YET")
    assert before.startswith("not built yet: no library for this TensorFlow is cached in")
    assert settings.ENV_NO_BUILD not in before
    assert not loader.load_attempted()   # info did not decide this process's outcome
    _set_up(monkeypatch, tmp_path, "build failure")
    warned = _first_layer_call_warning()
    assert "`fakecxx` failed (exit 1)" in warned and "fakecxx: error: boom" in warned
    assert build_cache.RETRY_NOTE in warned
    assert _info_reason() == ("fused op library: UNAVAILABLE (layers use the reference path)",
                              warned)
    # A new process: nothing attempted, nothing loaded.
    monkeypatch.setattr(build_cache, "_ATTEMPTED", set())
    monkeypatch.setattr(loader, "_library", None)
    status, fresh = _info_reason()
    assert status.startswith("fused op library: NOT BUILT (the last build failed")
    recorded = warned.removesuffix("\n" + build_cache.RETRY_NOTE)
    assert fresh.startswith("the last build, at ") and f"failed: {recorded}\n" in fresh
    assert "retries it once" in fresh



# -- the real compiler --------------------------------------------------------------------

@pytest.mark.slow
def test_after_an_interrupted_first_use_the_next_process_builds_and_loads(fake_env, tmp_path,
                                                                          cleanup):
    """The issue's scenario end to end: Ctrl-C during the first compile, then a normal
    process builds (with the real compiler behind the fake one) and loads the library."""
    proc, pids = _start_first_use_and_wait_for_the_compilers(fake_env, tmp_path)
    cleanup += [proc, tmp_path / "calls.pids"] + pids
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(FIRST_USE)], cwd=str(TESTS),
                         env=_subprocess_env(fake_env), capture_output=True, text=True,
                         timeout=1800)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "CALLED True None" in out.stdout, out.stdout + out.stderr[-3000:]
    assert "previous build failed" not in out.stderr and "unavailable" not in out.stderr
    assert "] compiled CPU kernels, generic variant (" in out.stderr
    (directory,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert (directory / build_cache.LIBRARY_NAME).is_file()
    assert _leftovers(tmp_path / "cache") == [directory.name]
