"""The per-user cache of built libraries, read only: what a library is built from and for
(its key), whether a cached one may be loaded, why a build failed, what first use would do,
and the description `python -m tf_proxynorm.info` prints.

Every load reads this module; the compiler driver (`tf_proxynorm.fused.build`) is imported
only when a build runs. A library lives in

    $TF_PROXYNORM_CACHE_DIR or ~/.cache/tf_proxynorm / tf<version>-<key> /
        _tf_proxynorm_ops.so   the op library
        stamp.json             what it was built for (checked before every load)
        build.log              compiler commands and output

`<key>` hashes the TensorFlow version and build, the compiler and its version, every flag,
and the contents of the sources, so a change of any of them selects a new directory. A
build that failed leaves `<dir>.failed.log` (its log, ending with the error), which the
build on first use retries once per process. `plan()` says what first use would do, or why
the fused op is unavailable: the one place the reason of the loader's warning and of
`python -m tf_proxynorm.info` is computed. The settings (cache, sources, CUDA, compiler)
are those of `tf_proxynorm.fused.settings`.
"""

import dataclasses
import hashlib
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from tf_proxynorm.fused import cuda, settings, toolchain
from tf_proxynorm.fused.errors import BuildError

LIBRARY_NAME = "_tf_proxynorm_ops.so"
STAMP_NAME = "stamp.json"
LOG_NAME = "build.log"

# Bump when the recipe of `tf_proxynorm.fused.build` changes in a way that the flags do not
# show.
RECIPE_VERSION = 1

# The sources of the library under `custom_ops/`: the TensorFlow op and its CPU wrapper,
# and the CPU kernels, compiled once per ISA variant.
TF_SOURCES = ("cc/ops/group_norm_act_ops.cc", "cc/kernels/group_norm_act_cpu.cc")
ISA_SOURCE = "cc/kernels/cpu/kernels_isa.cc"
_HASHED_SUFFIXES = (".cc", ".h", ".cu", ".cuh", ".py")

# The line that starts the error in a `<dir>.failed.log` (the build writes it).
FAILED_MARK = "# tf_proxynorm: BUILD FAILED at "
RETRY_NOTE = ("A failed build is retried once per process, by the first use of the fused op "
              f"(set {settings.ENV_NO_BUILD}=1 to stop that); after fixing the cause, "
              "`python -m tf_proxynorm.build` builds it at once.")

# The cache keys whose build the first-use path has attempted in this process: a recorded
# failure is retried at most once per process.
_ATTEMPTED = set()


# -- what a library is built from ---------------------------------------------------------

def checked_source_dir():
    """The `custom_ops/` folder to build from (`settings.source_dir`); BuildError when it
    holds no sources."""
    src, origin = settings.source_dir()
    if not (src / ISA_SOURCE).is_file():
        hint = (f"Point {settings.ENV_SOURCE_DIR} at a folder holding cc/ and cuda/ (a "
                "checkout's custom_ops/)" if settings.ENV_SOURCE_DIR in origin else
                f"Reinstall tf-proxynorm, or set {settings.ENV_SOURCE_DIR} to a checkout's "
                "custom_ops/ folder")
        raise BuildError(f"the C++ sources were not found in {src} ({origin}). {hint}.")
    return src


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
        return settings.cache_root() / f"tf{self.tf_version}-{self.key()}"


def current_config():
    """The BuildConfig of this environment (compiler fields empty when there is none)."""
    import tensorflow as tf

    src = checked_source_dir()
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

def sha256_file(path):
    """The sha256 of the file `path` (a library's checksum in its stamp)."""
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
    if stamp.get("library_sha256") != sha256_file(library):
        return f"{library} does not match the checksum recorded in {stamp_path}"
    return None


def failed_log(directory):
    """Where a failed build of `directory` leaves its log."""
    return directory.with_name(directory.name + ".failed.log")


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
        if line.startswith(FAILED_MARK):
            at, lines = line[len(FAILED_MARK):].split(" (pid")[0], []
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
        for candidate in sorted(settings.cache_root().glob(prefix + "*")):
            if candidate.is_dir() and check_stamp(candidate, config, with_compiler=False) is None:
                return candidate / LIBRARY_NAME
    return None


def unwritable_reason(root, error):
    """Why a build cannot write into the cache root `root` (`error`: the OSError)."""
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
        return unwritable_reason(root, e)
    return None


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


def record_attempt(config):
    """Notes that first use in this process builds `config`: `plan` then reports a failure
    it records instead of retrying it."""
    _ATTEMPTED.add(config.key())


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


# -- what `python -m tf_proxynorm.info` reports --------------------------------------------

def describe_files(outcome=None):
    """What `python -m tf_proxynorm.info` reports about the fused op library, as a dict,
    from the settings and the cache's files only: never builds, loads or remembers anything.

    Args:
        outcome: what to describe: the loader's outcome in this process (its `Library`,
            read for `path` and `reason`), a `Plan`, or None for `plan()` (what the first
            layer call would do; a report on a Keras backend other than TensorFlow).

    Returns:
        A dict: `path` (the library) or `reason` (why there is none); `pending_build`
        ("build", or "retry" after a recorded failure, when the first layer call would
        build it; else False); `cache_root`; `sources`; the `cache_files` of the library's
        directory (`stamp`, `build_log`, `failed_log`); `config_error` when this
        environment's BuildConfig could not be computed; and `available` (False) and
        `kernels` ({}), which the loader sets when it loaded the library.
    """
    src, origin = settings.source_dir()
    out = {"available": False, "path": None, "reason": None, "pending_build": False,
           "cache_root": settings.cache_root(), "sources": f"{src} ({origin})",
           "stamp": None, "build_log": None, "failed_log": None, "kernels": {}}
    config = None
    try:
        step = plan() if outcome is None else outcome
        if isinstance(step, Plan):
            # A plan without a config has its reason: the error of `current_config`.
            config = step.config
            out["path"] = step.path
            out["reason"] = None if step.path else step.reason or step.pending_reason()
            out["pending_build"] = step.builds and ("retry" if step.failure else "build")
        else:
            out["path"], out["reason"] = outcome.path, outcome.reason
            if outcome.path is None:
                config = current_config()
    except Exception as e:  # noqa: BLE001 - reported, never raised
        out["config_error"] = f"{type(e).__name__}: {e}"
    if out["path"] is not None:
        out.update(cache_files(Path(out["path"]).parent))
    elif config is not None:
        out.update(cache_files(config.directory()))
    return out
