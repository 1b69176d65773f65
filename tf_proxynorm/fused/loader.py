"""The one load of the op library per process: lazily, after checking its stamp.

The library is loaded the first time the fused path is considered (never at
`import tf_proxynorm`). First use builds it when none is cached (about a minute on two
cores, with progress lines on the `tf_proxynorm` logger), unless `TF_PROXYNORM_NO_BUILD=1`.
When it cannot be built or loaded (no compiler, missing sources, an unwritable cache, a
failed or interrupted build, a stale or mismatched library), one warning is issued per
process, with the reason `cache.plan` gives (the one `python -m tf_proxynorm.info`
reports), and every call uses the reference path. Ctrl-C during the build interrupts the
call (KeyboardInterrupt) and records nothing: the next process builds again.

Loading a cached library reads `cache` only: the compiler driver (`build`) is imported
when a build runs.
"""

import threading
import warnings

import tensorflow as tf

from tf_proxynorm.fused import abi, cache
from tf_proxynorm.fused.errors import BuildError


class Library:
    """Outcome of one load attempt: the loaded module and its op functions, or a reason."""

    def __init__(self, module=None, path=None, reason=None):
        self.module = module
        self.path = path
        self.reason = reason
        self.devices = frozenset()
        self.forward = self.backward = None
        if module is not None:
            self.forward = _op_function(module, abi.OP_NAME)
            self.backward = _op_function(module, abi.GRAD_OP_NAME)
            self.devices = frozenset(registered_kernels(abi.OP_NAME))


_lock = threading.Lock()
_library = None


def _op_function(module, op_name):
    """The Python wrapper `tf.load_op_library` generated for `op_name`
    ("TfProxyNorm>GroupNormAct" -> `tf_proxy_norm_group_norm_act`)."""
    namespace, name = op_name.split(">")
    snake = lambda s: "".join("_" + c.lower() if c.isupper() else c for c in s).lstrip("_")  # noqa: E731
    return getattr(module, f"{snake(namespace)}_{snake(name)}")


def registered_kernels(op_name):
    """{device type ("CPU", "GPU"): sorted dtype names} of the registered kernels of `op_name`."""
    try:
        from tensorflow.python.framework import kernels
        registered = kernels.get_registered_kernels_for_op(op_name).kernel
    except Exception:  # noqa: BLE001 - private API moved: assume the CPU kernel only
        return {"CPU": list(abi.KERNEL_DTYPES)}
    out = {}
    for kernel in registered:
        names = out.setdefault(kernel.device_type, set())
        for constraint in kernel.constraint:
            names.update(tf.as_dtype(t).name for t in constraint.allowed_values.list.type)
    return {device: sorted(names) for device, names in sorted(out.items())}


def attempt_load(allow_build=None):
    """One load attempt, not remembered (tests call it after changing the environment).

    `allow_build=None` follows TF_PROXYNORM_NO_BUILD. Never raises: returns a `Library`
    with `module=None` and the reason when the library cannot be had.
    """
    try:
        step = cache.plan(allow_build)
        if step.reason is not None:
            raise BuildError(step.reason)
        path = step.path
        if step.builds:
            from tf_proxynorm.fused import build   # the compiler driver: only to compile
            path = build.build_on_first_use(step)
    except BuildError as e:
        return Library(reason=str(e))
    except Exception as e:  # noqa: BLE001 - an unexpected failure still means the reference path
        return Library(reason=f"building the library failed: {type(e).__name__}: {e}")
    try:
        return Library(tf.load_op_library(str(path)), path=path)
    except Exception as e:  # noqa: BLE001 - any load failure means the reference path
        return Library(reason=f"loading {path} failed: {type(e).__name__}: {e}")


def load(allow_build=None, warn=True):
    """The library of this process: loads (building when allowed) on the first call, warns
    once (when `warn`) if it is unavailable, and returns the same outcome afterwards."""
    global _library
    if _library is None:
        with _lock:
            if _library is None:
                library = attempt_load(allow_build)
                if library.module is None and warn:
                    warnings.warn(
                        "tf_proxynorm: the fused op is unavailable, so the reference "
                        f"(pure TensorFlow) path is used. Reason: {library.reason}",
                        RuntimeWarning, stacklevel=3)
                _library = library
    return _library


def load_attempted():
    """Whether this process has tried to load the library yet (import never does)."""
    return _library is not None


def fused_op_available():
    """Whether the fused op library is loaded (builds or loads it on the first call)."""
    return load().module is not None


def unavailable_reason():
    """Why the fused op library is not available, or None when it is."""
    return load().reason


def library_path():
    """The path of the loaded library, or None."""
    return load().path


def describe(allow_build=False):
    """What `python -m tf_proxynorm.info` reports about the library, as a dict (the keys of
    `cache.describe_files`; here `available` and `kernels` say what this process loaded).

    The reason it gives is the one the first layer call's warning gives (`cache.plan`
    decides both). Without `allow_build` it never compiles: when no load was attempted in
    this process it loads a cached library, or reports why there is none (`pending_build`:
    "build", or "retry" after a recorded failure, when the first layer call would build
    it) without remembering that outcome, so that a later
    layer call of this process still builds. With `allow_build` it builds first when
    needed (unless TF_PROXYNORM_NO_BUILD is set).
    """
    if not (allow_build or load_attempted()):
        step = cache.plan()
        if step.path is None:
            return cache.describe_files(step)
    library = load(warn=False)
    out = cache.describe_files(library)
    if library.module is not None:
        out["available"] = True
        out["kernels"] = {name: registered_kernels(name)
                          for name in (abi.OP_NAME, abi.GRAD_OP_NAME)}
    return out
