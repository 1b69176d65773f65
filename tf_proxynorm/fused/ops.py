"""The fused op as TensorFlow sees it: the wrapper, its gradient, and "can it run here?".

`fused_group_norm_act` calls the forward kernel; the registered gradient calls the backward
kernel. The second derivative (the gradient of the backward op) is the reference path's; it
is registered by `tf_proxynorm.ops._fused_second_order`, which knows both paths.
"""

import keras
import tensorflow as tf

from tf_proxynorm.fused import abi, loader


def _xla_context():
    """Whether the graph being traced compiles with XLA; None when that cannot be told
    (eager execution: False)."""
    if tf.executing_eagerly():
        return False
    try:
        from tensorflow.python.ops import control_flow_util
        return bool(control_flow_util.GraphOrParentsInXlaContext(tf.compat.v1.get_default_graph()))
    except Exception:  # noqa: BLE001 - private API moved
        return None


def in_xla_context():
    """True while tracing for XLA (jit_compile), where the custom op cannot run."""
    known = _xla_context()
    return True if known is None else known       # unknown: assume XLA, the safe answer


def xla_optimization_barrier(t):
    """`t` through XLA's optimization barrier while tracing for XLA, else `t` unchanged (the
    op has no kernel outside XLA: an unknown context gets no barrier, which only steers
    XLA)."""
    if not _xla_context():
        return t
    try:
        from tensorflow.compiler.tf2xla.python import xla
    except ImportError:  # private API moved
        return t
    return xla.optimization_barrier(t)[0]


def in_save_context():
    """True while `tf.saved_model.save` (or `model.export`) traces the functions to save."""
    try:
        from tensorflow.python.saved_model import save_context
        return bool(save_context.in_save_context())
    except Exception:  # noqa: BLE001 - private API moved: assume not saving
        return False


_default_device_type = None


def call_device_type(x):
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
    backend = keras.backend.backend()
    if backend != "tensorflow":
        return f"the Keras backend is {backend!r} (the fused op is a TensorFlow op)"
    if activation_name not in abi.KERNEL_ACTIVATIONS:
        shown = getattr(activation_name, "__name__", activation_name)
        return (f"the activation {shown!r} has no fused kernel (fused: "
                f"{', '.join(abi.KERNEL_ACTIVATIONS)})")
    dtype = tf.as_dtype(x.dtype)
    if dtype.name not in abi.KERNEL_DTYPES:
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
    library = loader.load()
    if library.module is None:
        return library.reason
    device_type = call_device_type(x)
    if device_type not in library.devices:
        return (f"the library has no {device_type} kernel (it has: "
                f"{', '.join(sorted(library.devices)) or 'none'})")
    return None


def can_use_fused(x, activation_name, axis=-1):
    """Whether `fused_group_norm_act` below can compute this call (see `why_not_fused`)."""
    return why_not_fused(x, activation_name, axis) is None


# -- the op wrappers -------------------------------------------------------------------------

def _attrs(x, groups, axis, epsilon, activation, use_proxy):
    rank = x.shape.rank
    return dict(groups=int(groups), epsilon=float(epsilon), activation=activation,
                channels_last=(axis % rank) == rank - 1, use_proxy=bool(use_proxy))


def fused_group_norm_act(x, gamma, beta, proxy_mean, proxy_inv_std, *, groups, axis, epsilon,
                         activation):
    """The fused GroupNorm -> affine -> activation [-> proxy norm] (contract in
    docs/fused_op_contract.md). Call only when `can_use_fused` holds. Returns y in x.dtype.

    `proxy_mean` / `proxy_inv_std` None mean no proxy normalization; gamma and beta are
    `(C,)` tensors (ones / zeros when the layer has no scale / center).
    """
    library = loader.load()
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
    library = loader.load()
    if library.module is None:
        raise RuntimeError(f"the fused op is unavailable: {library.reason}")
    return library.forward, library.backward


def op_attrs(op):
    """The attributes of a GroupNormAct / GroupNormActGrad op, as the wrappers take them."""
    attrs = {name: op.get_attr(name)
             for name in ("groups", "epsilon", "channels_last", "use_proxy")}
    attrs["activation"] = op.get_attr("activation")
    if isinstance(attrs["activation"], bytes):
        attrs["activation"] = attrs["activation"].decode()
    return attrs


@tf.RegisterGradient(abi.OP_NAME)
def _group_norm_act_grad(op, dy, unused_dmean, unused_dinv_std):
    """Gradient through y only: `mean` and `inv_std` are side outputs for this function."""
    x = op.inputs[0]
    if dy is None:
        dy = tf.zeros_like(x)
    dx, dgamma, dbeta, dproxy_mean, dproxy_inv_std = loader.load().backward(
        dy, x, *op.inputs[1:5], op.outputs[1], op.outputs[2], **op_attrs(op))
    return [dx, dgamma, dbeta, dproxy_mean, dproxy_inv_std]
