"""What this installation of tf_proxynorm can run: `python -m tf_proxynorm.info`.

Prints the TensorFlow / Keras versions and the Keras backend, the implementation setting,
the fused op library (path and status, or why it is unavailable), what it was built for
(its stamp), the kernels registered per device, the logical devices, and where the build
log is. Paste its output into bug reports.

On a Keras backend other than TensorFlow (JAX, PyTorch) every layer runs the `keras.ops`
reference path and the fused op (a TensorFlow op) is never built or loaded: the report
then describes the cached library from its files only.

```
python -m tf_proxynorm.info            # never compiles; says how to build when needed
python -m tf_proxynorm.info --build    # builds the library first when none is cached
```
"""

import argparse
import os
import platform
import sys

import keras
import tensorflow as tf

from tf_proxynorm import config
from tf_proxynorm.fused import cache, loader
from tf_proxynorm.fused.abi import OP_NAME
from tf_proxynorm.version import __version__

_ENV_PREFIX = "TF_PROXYNORM_"
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _indented(text, width=16):
    """A multi-line reason under its label: continuation lines indented to `width`."""
    return str(text).replace("\n", "\n" + " " * width)


def _stamp_lines(stamp):
    if not stamp:
        return ["  stamp:        none"]
    if "error" in stamp:
        return [f"  stamp:        {stamp['error']}"]
    built = stamp.get("config", {})
    cuda = stamp.get("cuda_build") or built.get("cuda")
    return [
        f"  built at:     {stamp.get('built_at', '?')}",
        f"  built for:    TensorFlow {built.get('tf_version', '?')} "
        f"({built.get('tf_git_version', '?')}), CXX11_ABI={built.get('cxx11_abi', '?')}, "
        f"{built.get('machine', '?')}",
        f"  compiler:     {built.get('compiler', '?')} ({built.get('compiler_version', '?')})",
        f"  CPU ISAs:     {', '.join(built.get('isas', [])) or '?'}",
        f"  CUDA:         {cuda if cuda else 'not built (CPU kernels only)'}",
        f"  source hash:  sha256 {str(built.get('source_hash', '?'))[:16]}...",
        f"  library hash: sha256 {str(stamp.get('library_sha256', '?'))[:16]}...",
    ]


def _other_backend_path_lines(backend):
    """`path_lines` on a Keras backend other than TensorFlow: always the reference path."""
    reference = "keras.ops reference path"
    if backend == "jax":
        rows = [("model.fit, default jit_compile (jax.jit)", f"{reference}, compiled by XLA"),
                ("any jax.jit or jit_compile=True function", f"{reference}, compiled by XLA"),
                ("eager calls (layer(x), jit_compile=False)", f"{reference}, op by op")]
    else:
        rows = [("every call (model.fit, eager)", f"{reference} ({backend} ops)")]
    rows.append(("the fused op (TensorFlow only)",
                 "never used here: it serves only the TensorFlow backend "
                 "(KERAS_BACKEND=tensorflow)"))
    width = max(len(r[0]) for r in rows)
    return [f"which path GN/LN/IN(+PN) layers take here (Keras backend {backend!r}: every "
            "layer runs the keras.ops reference path):"] + [
        f"  {situation:{width}s}  -> {path}" for situation, path in rows]


def path_lines(info, implementation, devices, backend="tensorflow"):
    """Which path GroupNorm/LayerNorm/InstanceNorm (+PN) layers take here, per situation.

    `info` is `loader.describe()`, `devices` the logical device types ("CPU", "GPU", "TPU"),
    `backend` the Keras backend: on any other than "tensorflow" every layer runs the
    `keras.ops` reference path (compiled by XLA under `jax.jit` / `jit_compile=True`) and
    the fused op is never used.
    """
    if backend != "tensorflow":
        return _other_backend_path_lines(backend)
    kernels = info["kernels"].get(OP_NAME, {}) if info["available"] else {}

    def fused(device):
        if implementation == "reference":
            return f"reference path (implementation={implementation!r})"
        if device in kernels:
            return f"fused {device} kernel"
        why = ("the fused op is not built yet, see above" if info.get("pending_build") else
               "the fused op is unavailable, see above" if not info["available"]
               else f"the library has no {device} kernel")
        return f"reference path ({why})"

    rows = [("CPU model.fit (Keras leaves XLA off on CPU)", fused("CPU"))]
    accelerators = [d for d in ("GPU", "TPU") if d in devices]
    for device in accelerators:
        rows.append((f"{device} model.fit, default jit_compile (XLA on)",
                     "reference path, compiled by XLA (a custom op cannot run inside XLA)"))
    if "GPU" in accelerators:
        rows.append(("GPU model.fit(jit_compile=False) or under a tf.distribute strategy",
                     fused("GPU")))
    if not accelerators:
        rows.append(("GPU/TPU model.fit (none visible here)", "XLA: reference path; GPU "
                     "without XLA: fused CUDA kernels when built"))
    rows.append(("any jit_compile=True function", "reference path, compiled by XLA"))
    rows.append(("SavedModel export (export_saved_model, model.export)",
                 "reference path (exports hold no custom op)"))
    width = max(len(r[0]) for r in rows)
    return ["which path GN/LN/IN(+PN) layers take here:"] + [
        f"  {situation:{width}s}  -> {path}" for situation, path in rows]


def _backend_versions(backend):
    """The version line of a Keras backend other than TensorFlow."""
    try:
        if backend == "jax":
            import jax
            import jaxlib
            return f"JAX          {jax.__version__} (jaxlib {jaxlib.__version__})"
        if backend == "torch":
            import torch
            return f"PyTorch      {torch.__version__}"
    except ImportError as e:
        return f"{backend}: not importable ({e})"
    return None


def _backend_devices(backend):
    """`(device types, description)` of the devices the Keras backend computes on."""
    if backend == "tensorflow":
        devices = tf.config.list_logical_devices()
        return ({d.device_type for d in devices},
                ", ".join(f"{d.name} ({d.device_type})" for d in devices))
    try:
        if backend == "jax":
            import jax
            devices = jax.devices()
            return ({d.platform.upper() for d in devices},
                    ", ".join(f"{d} ({d.platform})" for d in devices) + " [jax]")
        if backend == "torch":
            import torch
            names = ["cpu"] + [f"cuda:{i} ({torch.cuda.get_device_name(i)})"
                               for i in range(torch.cuda.device_count())]
            return set(), ", ".join(names) + " [torch]"
    except Exception as e:  # noqa: BLE001 - reported, never raised
        return set(), f"unknown ({type(e).__name__}: {e})"
    return set(), f"see the {backend} backend"


def report(allow_build=False):
    """The report as a list of lines.

    On the TensorFlow backend it loads the fused op library (and builds it first when
    `allow_build` and none is cached); on the other Keras backends it neither builds nor
    loads it.
    """
    backend = keras.backend.backend()
    env = os.environ.get(config.ENV_VAR)
    try:
        implementation = config.get_implementation()
    except ValueError as e:
        implementation = f"invalid ({e})"
    lines = [
        f"tf_proxynorm {__version__} ({_PACKAGE_DIR})",
        f"TensorFlow   {tf.__version__} (git {tf.version.GIT_VERSION})",
        f"Keras        {keras.__version__} (backend {backend})",
    ]
    backend_version = _backend_versions(backend)
    if backend_version:
        lines.append(backend_version)
    lines += [
        f"Python       {platform.python_version()} on {platform.platform()}",
        f"Keras backend: {backend}" + ("" if backend == "tensorflow" else
                                       " (every layer runs the keras.ops reference path; "
                                       "the fused op serves only the TensorFlow backend)"),
        f"implementation: {implementation} ("
        + (f"{config.ENV_VAR}={env!r})" if env is not None else f"{config.ENV_VAR} unset)"),
        "",
    ]
    if backend == "tensorflow":
        info = loader.describe(allow_build=allow_build)
        if info["available"]:
            lines.append("fused op library: AVAILABLE")
            lines.append(f"  path:         {info['path']}")
        elif info.get("pending_build") == "retry":
            lines.append("fused op library: NOT BUILT (the last build failed; the first layer "
                         "call in a process retries it once, and uses the reference path if "
                         "it fails again)")
            lines.append(f"  reason:       {_indented(info['reason'])}")
        elif info.get("pending_build"):
            lines.append("fused op library: NOT BUILT YET (the first layer call in a process "
                         "builds it, about a minute; layers use the reference path if that "
                         "fails)")
            lines.append(f"  reason:       {_indented(info['reason'])}")
        else:
            lines.append("fused op library: UNAVAILABLE (layers use the reference path)")
            lines.append(f"  reason:       {_indented(info['reason'])}")
    else:
        info = cache.describe_files()   # from the cache's files: never built or loaded here
        lines.append(f"fused op library: NOT USED on the {backend!r} backend (a TensorFlow "
                     "op; not built or loaded here)")
        if info["path"] is not None:
            lines.append(f"  cached:       {info['path']} (used under "
                         "KERAS_BACKEND=tensorflow)")
        elif info["reason"]:
            lines.append(f"  cached:       none ({info['reason']})")
        if allow_build:
            lines.append("  --build:      ignored on this backend; build with "
                         "`python -m tf_proxynorm.build`")
    lines.append(f"  sources:      {info['sources']}")
    lines += _stamp_lines(info["stamp"])
    lines.append(f"  cache root:   {info['cache_root']}")
    lines.append(f"  build log:    {info['build_log'] or 'none'}")
    if info["failed_log"]:
        lines.append(f"  failed build: {info['failed_log']}")
    if "config_error" in info:
        lines.append(f"  config error: {info['config_error']}")
    lines.append("")
    lines.append("kernels registered per device:")
    if not info["kernels"]:
        lines.append("  none" if backend == "tensorflow" else
                     f"  none (the library is not loaded on the {backend!r} backend)")
    for op, devices in info["kernels"].items():
        for device, dtypes in devices.items():
            lines.append(f"  {op:32s} {device}: {', '.join(dtypes)}")
    lines.append("")
    device_types, device_names = _backend_devices(backend)
    lines += path_lines(info, implementation, device_types, backend)
    lines.append("")
    lines.append("logical devices: " + device_names)
    if backend == "tensorflow":
        threads = tf.config.threading.get_intra_op_parallelism_threads()
        lines.append(f"intra-op threads: {threads or 'default'} (CPU cores: {os.cpu_count()})")
    else:
        lines.append(f"CPU cores: {os.cpu_count()}")
    variables = sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIX))
    lines.append("environment: " + (", ".join(f"{k}={v}" for k, v in variables) or "no "
                                    f"{_ENV_PREFIX}* variable set"))
    if not info["available"] and backend == "tensorflow":
        lines.append("")
        lines.append("To build the fused op: python -m tf_proxynorm.build --verbose (this "
                     "report never compiles unless run with --build)")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m tf_proxynorm.info",
                                     description="Report what tf_proxynorm can run here.")
    parser.add_argument("--build", action="store_true",
                        help="build the fused op library first when none is cached")
    args = parser.parse_args(argv)
    print("\n".join(report(allow_build=args.build)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
