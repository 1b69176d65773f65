"""Portable SavedModel export: loads with `tf.saved_model.load` and no tf_proxynorm.

See docs/export.md for what is and is not portable.
"""

import contextlib
import os

import keras
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

from tf_proxynorm import _backend, _graph, config
from tf_proxynorm.fold import fold_for_inference
from tf_proxynorm.layers._args import check_bool
from tf_proxynorm.layers.inference_norm import check_statistics
from tf_proxynorm.layers.norm_act import GroupNormAct, ShiftedGroupNormAct
from tf_proxynorm.layers.proxy_norm_act import is_proxy_layer

# Namespace of the fused op (docs/fused_op_contract.md): graphs holding such ops need the
# compiled library at load time.
CUSTOM_OP_PREFIX = "TfProxyNorm>"


@contextlib.contextmanager
def _all_layers_on_reference(model):
    """Sets every layer's `implementation` to "reference" for the block, then restores it."""
    changed = []
    for layer in _backend.all_layers(model):
        if getattr(layer, "implementation", None) in ("auto", "fused"):
            changed.append((layer, layer.implementation))
            layer.implementation = "reference"
    try:
        with config.use_implementation("reference"):
            yield
    finally:
        for layer, implementation in changed:
            layer.implementation = implementation


def _export_jit_compiled(model, path, verbose):
    """`model.export(path, format="tf_saved_model")` with an XLA-compiled `serve` endpoint
    (also the `serving_default` signature)."""
    archive = keras.export.ExportArchive()
    archive.track(model)
    serve = tf.function(lambda *args: model(*args, training=False), jit_compile=True)
    archive.add_endpoint("serve", serve, input_signature=_backend.export_input_signature(model))
    archive.write_out(path, verbose=verbose)


def saved_model_op_types(path):
    """The set of op types in a SavedModel directory's graphs and function library."""
    proto = saved_model_pb2.SavedModel()
    with open(os.path.join(path, "saved_model.pb"), "rb") as f:
        proto.ParseFromString(f.read())
    ops = set()
    for meta_graph in proto.meta_graphs:
        ops.update(node.op for node in meta_graph.graph_def.node)
        for function in meta_graph.graph_def.library.function:
            ops.update(node.op for node in function.node_def)
    return ops


_SAVE_ROUTE = ("Save the model as a `.keras` file and run `tfpn.export_saved_model` on "
               "`keras.saving.load_model(path, compile=False)` in a KERAS_BACKEND=tensorflow "
               "process. ")
# What works instead of export_saved_model on another Keras backend (each route is tested
# under that backend in tests/backends/test_export_message_backends.py).
_OTHER_BACKEND_ROUTE = {
    "jax": ("With JAX, `tfpn.fold_for_inference(model).export(path, "
            "format=\"tf_saved_model\")` writes a SavedModel through Keras' own export "
            "(jax2tf: the model as one XlaCallModule op, which `tf.saved_model.load` reads), "
            "or save a `.keras` file and export it from a KERAS_BACKEND=tensorflow process. "),
    "torch": ("With PyTorch, save the model (`model.save(\"model.keras\")`) and run "
              "`tfpn.export_saved_model(keras.saving.load_model(\"model.keras\", "
              "compile=False), path)` in a KERAS_BACKEND=tensorflow process (Keras' own "
              "`model.export(path, format=\"tf_saved_model\")` fails on PyTorch inside "
              "torch.export). "),
}


def export_saved_model(model, path, fold=True, verbose=False, statistics="auto",
                       jit_compile=False):
    """Exports a model for serving as a TensorFlow SavedModel.

    Every norm layer is traced on the pure-TensorFlow reference path, whatever its
    `implementation` argument or the global default says (both are restored afterwards),
    and the written graph is checked to hold no fused-op (`TfProxyNorm>...`) node. The
    SavedModel has an endpoint `serve` and a `serving_default` signature taking any
    batch size (the other dimensions are the model's input shape). It loads with
    `tf.saved_model.load(path)` in a process that never imports tf_proxynorm, in TF
    Serving, and converts with `tf.lite.TFLiteConverter.from_saved_model(path)`: for
    TFLite, export with `statistics="shifted"` (the same outputs, no `If` op, which
    TFLite's delegates leave to the interpreter: XNNPACK splits its partitions there).

    Args:
        model: a built Keras model (functional or Sequential to fold; any model otherwise).
        path: the directory to write.
        fold: run `fold_for_inference(model, inference_layers=True)` first (when the model
            has Proxy Norm layers, or GN/LN/IN layers in a functional or Sequential model),
            so the served graph has no proxy-statistics computation and every GN/LN/IN
            layer runs in its inference form (`InferenceGroupNormAct`: one-pass shifted
            statistics, one multiply-add and the activation). Folding a model with Proxy
            Norm layers requires a functional or Sequential model. Defaults to True.
        verbose: print Keras' export summary.
        statistics: the folded norm layers' `statistics` (`InferenceGroupNormAct`):
            "auto" (the default: exact at any input offset, one scalar `cond` per layer;
            fastest for TensorFlow's graph executor, TF Serving and XLA), "shifted" (the
            same outputs, no control flow: for TFLite and other converters) or "raw"
            (fastest, for inputs whose group means stay within a few standard deviations
            of zero). Needs `fold`.
        jit_compile: compile the `serve` endpoint with XLA (`tf.function(jit_compile=True)`
            in the SavedModel). Under XLA the serving form's statistics take about one read
            of each normalized activation, and XLA fuses the rest: ResNet-50 224x224 on a
            2-core CPU served at 0.90x the time of BN's plain `model.export` at batch 1
            (1.13x at batch 8, where XLA:CPU is slower than TensorFlow's graph executor for
            BN too). The price: the first call for each new input shape compiles (12-15 s
            for ResNet-50), the loading TensorFlow must have XLA (TF Serving on CPU only
            with `--xla_cpu_compilation_enabled`), and TFLite cannot convert it. Defaults
            to False (the portable graph).

    Returns:
        The model that was traced (the folded model when `fold` folded something).

    Raises:
        RuntimeError: on a Keras backend other than TensorFlow; the message names what
            works there. With JAX, `tfpn.fold_for_inference(model).export(path,
            format="tf_saved_model")` (Keras' own export, through jax2tf) writes a
            SavedModel that `tf.saved_model.load` reads without tf_proxynorm; its graph is
            one `XlaCallModule` op (StableHLO) rather than TensorFlow ops. With PyTorch
            (where Keras' own SavedModel export fails), save a `.keras` file and call
            `export_saved_model` on it in a TensorFlow-backend process.
        ValueError: when `fold` is set for a subclassed model that holds Proxy Norm layers;
            for an unknown `statistics`, or `statistics` other than "auto" with
            `fold=False`; for a `jit_compile` that is not a bool.
        RuntimeError: if the written graph still holds a fused-op node.

    Example:

    >>> tfpn.export_saved_model(model, "/tmp/served")
    >>> served = tf.saved_model.load("/tmp/served")      # no tf_proxynorm needed
    >>> served.serve(images)
    """
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise RuntimeError(
            "export_saved_model needs the TensorFlow backend (it traces the model into "
            "TensorFlow ops and checks the graph). "
            f"{_OTHER_BACKEND_ROUTE.get(backend, _SAVE_ROUTE)}"
            f"Received: backend={backend!r}")
    check_statistics(statistics)
    check_bool("jit_compile", jit_compile)
    if statistics != "auto" and not fold:
        raise ValueError("`statistics` chooses how the folded norm layers compute their "
                         f"statistics and needs `fold=True`. Received: statistics={statistics!r}"
                         f", fold={fold!r}")
    layers = _backend.all_layers(model)
    if fold and (any(map(is_proxy_layer, layers)) or (_graph.is_graph_model(model) and any(
            isinstance(layer, (GroupNormAct, ShiftedGroupNormAct)) for layer in layers))):
        model = fold_for_inference(model, inference_layers=True, statistics=statistics)
    with _all_layers_on_reference(model):
        if jit_compile:
            _export_jit_compiled(model, str(path), verbose)
        else:
            model.export(str(path), format="tf_saved_model", verbose=verbose)
    custom = sorted(op for op in saved_model_op_types(str(path)) if op.startswith(CUSTOM_OP_PREFIX))
    if custom:
        raise RuntimeError(
            f"The SavedModel at {str(path)!r} holds fused-op nodes {custom}; it would not load "
            "without the tf_proxynorm op library.")
    return model

