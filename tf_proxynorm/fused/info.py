"""What this installation of tf_proxynorm can run: `python -m tf_proxynorm.info`.

Prints the TensorFlow / Keras versions, the implementation setting, the fused op library
(path and status, or why it is unavailable), what it was built for (its stamp), the kernels
registered per device, TensorFlow's logical devices, and where the build log is. Paste its
output into bug reports.

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
from tf_proxynorm.fused import loader
from tf_proxynorm.fused.abi import OP_NAME
from tf_proxynorm.version import __version__

_ENV_PREFIX = "TF_PROXYNORM_"
_PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


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


def path_lines(info, implementation, devices):
    """Which path GroupNorm/LayerNorm/InstanceNorm (+PN) layers take here, per situation.

    `info` is `loader.describe()`, `devices` the logical device types ("CPU", "GPU", "TPU").
    """
    kernels = info["kernels"].get(OP_NAME, {}) if info["available"] else {}

    def fused(device):
        if implementation == "reference":
            return f"reference path (implementation={implementation!r})"
        if device in kernels:
            return f"fused {device} kernel"
        why = ("the fused op is unavailable, see above" if not info["available"]
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


def report(allow_build=False):
    """The report as a list of lines."""
    env = os.environ.get(config.ENV_VAR)
    try:
        implementation = config.get_implementation()
    except ValueError as e:
        implementation = f"invalid ({e})"
    lines = [
        f"tf_proxynorm {__version__} ({_PACKAGE_DIR})",
        f"TensorFlow   {tf.__version__} (git {tf.version.GIT_VERSION})",
        f"Keras        {keras.__version__} (backend {keras.config.backend()})",
        f"Python       {platform.python_version()} on {platform.platform()}",
        f"implementation: {implementation} ("
        + (f"{config.ENV_VAR}={env!r})" if env is not None else f"{config.ENV_VAR} unset)"),
        "",
    ]
    info = loader.describe(allow_build=allow_build)
    if info["available"]:
        lines.append("fused op library: AVAILABLE")
        lines.append(f"  path:         {info['path']}")
    else:
        lines.append("fused op library: UNAVAILABLE (layers use the reference path)")
        lines.append(f"  reason:       {info['reason']}")
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
        lines.append("  none")
    for op, devices in info["kernels"].items():
        for device, dtypes in devices.items():
            lines.append(f"  {op:32s} {device}: {', '.join(dtypes)}")
    lines.append("")
    devices = tf.config.list_logical_devices()
    lines += path_lines(info, implementation, {d.device_type for d in devices})
    lines.append("")
    lines.append("logical devices: " + ", ".join(f"{d.name} ({d.device_type})" for d in devices))
    threads = tf.config.threading.get_intra_op_parallelism_threads()
    lines.append(f"intra-op threads: {threads or 'default'} (CPU cores: {os.cpu_count()})")
    settings = sorted((k, v) for k, v in os.environ.items() if k.startswith(_ENV_PREFIX))
    lines.append("environment: " + (", ".join(f"{k}={v}" for k, v in settings) or "no "
                                    f"{_ENV_PREFIX}* variable set"))
    if not info["available"]:
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
