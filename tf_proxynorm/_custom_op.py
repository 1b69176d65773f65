"""The only module aware of the compiled op library (`custom_ops/`, built by `build.py`).

It loads the library lazily, the first time the fused path is considered (never at
`import tf_proxynorm`), after checking the library's stamp against this TensorFlow; wraps
the ops; registers the gradient; and answers "can the fused op run this call?".

First use builds the library when none is cached (about a minute on two cores), unless
`TF_PROXYNORM_NO_BUILD=1`. When it cannot be built or loaded (no compiler, a failed
build, a stale or mismatched library), one warning is issued per process and every call
uses the reference path.
"""

import contextlib
import json
import os
import threading
import warnings

import tensorflow as tf

from tf_proxynorm.ops.activations import FUSED_ACTIVATIONS

OP_NAME = "TfProxyNorm>GroupNormAct"
GRAD_OP_NAME = "TfProxyNorm>GroupNormActGrad"
FUSED_DTYPES = (tf.float32, tf.float16, tf.bfloat16)


class _Library:
    """Outcome of the one load attempt of this process."""

    def __init__(self, module=None, path=None, reason=None):
        self.module = module
        self.path = path
        self.reason = reason
        self.devices = frozenset()
        if module is not None:
            self.forward = _op_function(module, OP_NAME)
            self.backward = _op_function(module, GRAD_OP_NAME)
            self.devices = _kernel_devices(OP_NAME)


_lock = threading.Lock()
_library = None


def _op_function(module, op_name):
    """The Python wrapper `tf.load_op_library` generated for `op_name`
    ("TfProxyNorm>GroupNormAct" -> `tf_proxy_norm_group_norm_act`)."""
    namespace, name = op_name.split(">")
    snake = lambda s: "".join("_" + c.lower() if c.isupper() else c for c in s).lstrip("_")  # noqa: E731
    return getattr(module, f"{snake(namespace)}_{snake(name)}")


def _kernel_devices(op_name):
    """Device types ("CPU", "GPU") with a registered kernel of `op_name`."""
    try:
        from tensorflow.python.framework import kernels
        return frozenset(k.device_type for k in kernels.get_registered_kernels_for_op(op_name).kernel)
    except Exception:  # noqa: BLE001 - private API moved: assume the CPU kernel only
        return frozenset({"CPU"})


def _load():
    global _library
    if _library is None:
        with _lock:
            if _library is None:
                _library = _try_load()
                if _library.module is None:
                    warnings.warn(
                        "tf_proxynorm: the fused op is unavailable, so the reference "
                        f"(pure TensorFlow) path is used. Reason: {_library.reason}",
                        RuntimeWarning, stacklevel=3)
    return _library


def _try_load():
    try:
        from tf_proxynorm import build  # not at import: `python -m tf_proxynorm.build` runs it

        allow_build = os.environ.get(build.ENV_NO_BUILD, "").strip() not in ("1", "true", "yes")
        path = build.ensure_library(allow_build=allow_build)
    except Exception as e:  # noqa: BLE001 - no compiler, a failed build, an unwritable cache...
        if type(e).__name__ == "BuildError":
            return _Library(reason=str(e))
        return _Library(reason=f"building the library failed: {type(e).__name__}: {e}")
    try:
        return _Library(tf.load_op_library(str(path)), path=path)
    except Exception as e:  # noqa: BLE001 - any load failure means the reference path
        return _Library(reason=f"loading {path} failed: {type(e).__name__}: {e}")


def describe(allow_build=False):
    """What `python -m tf_proxynorm.info` reports about the library, as a dict.

    Loads the library if no load was attempted yet in this process; builds it only when
    `allow_build` (and `TF_PROXYNORM_NO_BUILD` is unset).
    """
    global _library
    from tf_proxynorm import build

    if _library is None and not allow_build:
        with _lock:
            if _library is None:
                with _env(build.ENV_NO_BUILD, "1"):
                    _library = _try_load()
    library = _load()
    out = {"available": library.module is not None, "path": library.path,
           "reason": library.reason, "cache_root": build.cache_root(), "stamp": None,
           "build_log": None, "failed_log": None, "kernels": {}}
    try:
        directory = build.current_config().directory()
    except Exception as e:  # noqa: BLE001 - reported, never raised
        directory = None
        out["config_error"] = f"{type(e).__name__}: {e}"
    if library.path is not None:
        directory = library.path.parent
    if directory is not None:
        stamp, log = directory / build.STAMP_NAME, directory / build.LOG_NAME
        out["build_log"] = log if log.is_file() else None
        failed = build._failed_log(directory)
        out["failed_log"] = failed if failed.is_file() else None
        try:
            out["stamp"] = json.loads(stamp.read_text()) if stamp.is_file() else None
        except (OSError, ValueError) as e:
            out["stamp"] = {"error": f"unreadable {stamp}: {e}"}
    if library.module is not None:
        out["kernels"] = {name: _kernel_dtypes(name) for name in (OP_NAME, GRAD_OP_NAME)}
    return out


@contextlib.contextmanager
def _env(name, value):
    previous = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = previous


def _kernel_dtypes(op_name):
    """{device type: sorted dtype names} of the registered kernels of `op_name`."""
    try:
        from tensorflow.python.framework import kernels
        registered = kernels.get_registered_kernels_for_op(op_name).kernel
    except Exception:  # noqa: BLE001 - private API moved
        return {}
    out = {}
    for kernel in registered:
        names = out.setdefault(kernel.device_type, set())
        for constraint in kernel.constraint:
            names.update(tf.as_dtype(t).name for t in constraint.allowed_values.list.type)
    return {device: sorted(names) for device, names in sorted(out.items())}


# -- public predicates ---------------------------------------------------------------------

def fused_op_available():
    """Whether the fused op library is loaded (builds or loads it on the first call)."""
    return _load().module is not None


def unavailable_reason():
    """Why the fused op library is not available, or None when it is."""
    return _load().reason


def library_path():
    """The path of the loaded library, or None."""
    return _load().path


def in_xla_context():
    """True while tracing for XLA (jit_compile), where the custom op cannot run."""
    if tf.executing_eagerly():
        return False
    try:
        from tensorflow.python.ops import control_flow_util
        return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))
    except Exception:  # noqa: BLE001 - private API moved: assume XLA, the safe answer
        return True


def in_save_context():
    """True while `tf.saved_model.save` (or `model.export`) traces the functions to save."""
    try:
        from tensorflow.python.saved_model import save_context
        return bool(save_context.in_save_context())
    except Exception:  # noqa: BLE001 - private API moved: assume not saving
        return False


_default_device_type = None


def _call_device_type(x):
    """The device type the op would be placed on: the innermost `tf.device` scope, the
    tensor's device, else GPU when one is visible (TensorFlow's default placement)."""
    global _default_device_type
    spec = ""
    try:
        if tf.executing_eagerly():
            from tensorflow.python.eager import context
            spec = context.context().device_name or getattr(x, "device", "") or ""
        else:
            functions = tf.compat.v1.get_default_graph()._device_functions_outer_to_inner
            names = [getattr(f, "display_name", None) for f in functions]
            names = [n for n in names if isinstance(n, str) and n]
            spec = names[-1] if names else (getattr(x, "device", "") or "")
    except Exception:  # noqa: BLE001 - private API moved: fall back to the default
        spec = ""
    if spec:
        device_type = tf.DeviceSpec.from_string(spec).device_type
        if device_type:
            return device_type.upper()
    if _default_device_type is None:
        _default_device_type = "GPU" if tf.config.list_logical_devices("GPU") else "CPU"
    return _default_device_type


def why_not_fused(x, activation_name, axis=-1):
    """A human-readable reason why the fused op cannot compute this call, or None if it can."""
    if activation_name not in FUSED_ACTIVATIONS:
        shown = getattr(activation_name, "__name__", activation_name)
        return (f"the activation {shown!r} has no fused kernel (fused: "
                f"{', '.join(FUSED_ACTIVATIONS)})")
    dtype = tf.as_dtype(x.dtype)
    if dtype not in FUSED_DTYPES:
        return f"x.dtype={dtype.name} has no fused kernel (float32, float16, bfloat16)"
    rank = x.shape.rank
    if rank is None or rank < 2:
        return f"x must have a known rank >= 2. Received: x.shape={x.shape}"
    axis = axis % rank
    if axis not in (1, rank - 1):
        return f"the fused op needs the channel axis at 1 or -1. Received: axis={axis}"
    if x.shape[axis] is None:
        return f"the number of channels (axis {axis}) must be static. Received: x.shape={x.shape}"
    if in_xla_context():
        return "inside an XLA (jit_compile) context, which cannot compile the custom op"
    if in_save_context():
        return "a SavedModel is being written, which keeps exports free of the custom op"
    library = _load()
    if library.module is None:
        return library.reason
    device_type = _call_device_type(x)
    if device_type not in library.devices:
        return (f"the library has no {device_type} kernel (it has: "
                f"{', '.join(sorted(library.devices)) or 'none'})")
    return None


def can_use_fused(x, activation_name, axis=-1):
    """Whether `group_norm_act` below can compute this call (see `why_not_fused`)."""
    return why_not_fused(x, activation_name, axis) is None


# -- the op wrappers -------------------------------------------------------------------------

def _attrs(x, groups, axis, epsilon, activation, use_proxy):
    rank = x.shape.rank
    return dict(groups=int(groups), epsilon=float(epsilon), activation=activation,
                channels_last=(axis % rank) == rank - 1, use_proxy=bool(use_proxy))


def group_norm_act(x, gamma, beta, proxy_mean, proxy_inv_std, *, groups, axis, epsilon,
                   activation):
    """The fused GroupNorm -> affine -> activation [-> proxy norm] (contract in
    docs/fused_op_contract.md). Call only when `can_use_fused` holds. Returns y in x.dtype.

    `proxy_mean` / `proxy_inv_std` None mean no proxy normalization; gamma and beta are
    `(C,)` tensors (ones / zeros when the layer has no scale / center).
    """
    library = _load()
    channels = x.shape[axis]
    use_proxy = proxy_mean is not None
    as_f32 = lambda v: tf.cast(v, tf.float32)  # noqa: E731
    if not use_proxy:
        proxy_mean = proxy_inv_std = tf.zeros([channels], tf.float32)
    y, _, _ = library.forward(
        x, as_f32(gamma), as_f32(beta), as_f32(proxy_mean), as_f32(proxy_inv_std),
        **_attrs(x, groups, axis, epsilon, activation, use_proxy))
    return y


def raw_ops():
    """(forward, backward) generated op functions, for tests and benchmarks of the raw ops."""
    library = _load()
    if library.module is None:
        raise RuntimeError(f"the fused op is unavailable: {library.reason}")
    return library.forward, library.backward


def _op_attrs(op):
    attrs = {name: op.get_attr(name)
             for name in ("groups", "epsilon", "channels_last", "use_proxy")}
    attrs["activation"] = op.get_attr("activation")
    if isinstance(attrs["activation"], bytes):
        attrs["activation"] = attrs["activation"].decode()
    return attrs


@tf.RegisterGradient(OP_NAME)
def _group_norm_act_grad(op, dy, unused_dmean, unused_dinv_std):
    """Gradient through y only: `mean` and `inv_std` are side outputs for this function."""
    x = op.inputs[0]
    if dy is None:
        dy = tf.zeros_like(x)
    dx, dgamma, dbeta, dproxy_mean, dproxy_inv_std = _load().backward(
        dy, x, *op.inputs[1:5], op.outputs[1], op.outputs[2], **_op_attrs(op))
    return [dx, dgamma, dbeta, dproxy_mean, dproxy_inv_std]


@tf.RegisterGradient(GRAD_OP_NAME)
def _group_norm_act_grad_grad(op, *upstream):
    """Second order (e.g. gradient penalties): differentiates the reference path's first
    gradient, recomputed here in TensorFlow ops. `mean` / `inv_std` get no gradient: the
    reference recomputes them from x, so their dependence on x is included."""
    from tf_proxynorm.ops.norm_act import group_norm_act_reference  # imports this module

    attrs = _op_attrs(op)
    dy, x, gamma, beta, proxy_mean, proxy_inv_std = op.inputs[:6]
    inputs = [dy, x, gamma, beta, proxy_mean, proxy_inv_std]
    with tf.GradientTape() as outer:
        outer.watch(inputs)
        with tf.GradientTape() as inner:
            inner.watch(inputs[1:])
            use_proxy = attrs["use_proxy"]
            y = group_norm_act_reference(
                x, gamma, beta, groups=attrs["groups"], axis=-1 if attrs["channels_last"] else 1,
                epsilon=attrs["epsilon"], activation=attrs["activation"],
                proxy_mean=proxy_mean if use_proxy else None,
                proxy_inv_std=proxy_inv_std if use_proxy else None)
        first = inner.gradient(y, inputs[1:], output_gradients=tf.cast(dy, y.dtype),
                               unconnected_gradients=tf.UnconnectedGradients.ZERO)
        total = tf.add_n([tf.reduce_sum(tf.cast(g, tf.float32) * tf.cast(u, tf.float32))
                          for g, u in zip(first, upstream) if u is not None] or [tf.constant(0.0)])
    return outer.gradient(total, inputs) + [None, None]
