"""The serving form (`InferenceGroupNormAct`, `fold_for_inference(inference_layers=True)`,
`export_saved_model`) against float64 NumPy references, and a smoke run of
benchmarks/bench_serve.py."""

import pathlib

import keras
import numpy as np
import pytest
import tensorflow as tf

import reference as R
import reference_other as RO
import tf_proxynorm as tfpn
from conftest import random_params, set_params
from helpers import load_benchmark
from tf_proxynorm.export import saved_model_op_types
from tf_proxynorm.layers.inference_norm import (InferenceGroupNormAct,
                                                group_norm_act_inference)

L = keras.layers

# name -> (layer factory, groups of the reference with 8 channels)
_KINDS = {
    "gn": (lambda **kw: tfpn.GroupNormAct(groups=2, **kw), 2),
    "ln": (lambda **kw: tfpn.LayerNormAct(**kw), 1),
    "in": (lambda **kw: tfpn.InstanceNormAct(**kw), 8),
}
_ACTIVATIONS = {"gn": "relu", "ln": "silu", "in": "leaky_relu"}


def _norm_model(rng, kind, proxy, consumer, activation=None, offset=False):
    """Input -> norm (-> 1x1 'valid' conv | 3x3 'same' conv), random parameters."""
    activation = activation or _ACTIVATIONS[kind]
    inputs = keras.Input((5, 5, 8))
    if offset:
        norm = tfpn.layers.ShiftedGroupNormAct(groups=4, activation=activation, name="n")
    else:
        norm = _KINDS[kind][0](activation=activation, proxy_norm=proxy, name="n")
    x = norm(inputs)
    if consumer == "1x1":
        x = L.Conv2D(6, 1, name="c")(x)
    elif consumer == "3x3":
        x = L.Conv2D(6, 3, padding="same", name="c")(x)
    model = keras.Model(inputs, x)
    set_params(norm, random_params(rng, 8, proxy=proxy))
    if offset:
        norm.offset.assign((0.5 * rng.standard_normal(8)).astype("float32"))
    if consumer != "out":
        model.get_layer("c").bias.assign((0.3 * rng.standard_normal(6)).astype("float32"))
    return model


def _reference(model, x, kind, proxy, consumer, offset=False):
    norm = model.get_layer("n")
    p = {w.name: w.numpy() for w in norm.weights}
    groups = 4 if offset else _KINDS[kind][1]
    y = R.group_norm_act(x.astype(np.float64), groups, activation=norm.activation,
                         gamma=p["gamma"], beta=p["beta"],
                         proxy=(p["proxy_beta"], p["proxy_gamma"]) if proxy else None)
    if offset:
        y = y + p["offset"].astype(np.float64)
    if consumer == "out":
        return y
    kernel, bias = (w.numpy() for w in model.get_layer("c").weights)
    return RO.conv2d(y, kernel, 1, "valid" if consumer == "1x1" else "same", bias)


_CASES = [(k, pn, c) for k in _KINDS for pn in (False, True) for c in ("out", "1x1", "3x3")]


@pytest.mark.parametrize("inference_layers", [None, True, False])   # None: the default
@pytest.mark.parametrize("kind,proxy,consumer", _CASES)
def test_folded_norm_matches_float64_reference(rng, kind, proxy, consumer, inference_layers):
    model = _norm_model(rng, kind, proxy, consumer)
    x = (rng.standard_normal((3, 5, 5, 8)) * 1.5 + 0.7).astype("float32")
    if inference_layers is None:
        folded, inference_layers = tfpn.fold_for_inference(model), True
    else:
        folded = tfpn.fold_for_inference(model, inference_layers=inference_layers)
    ref = _reference(model, x, kind, proxy, consumer)
    np.testing.assert_allclose(folded(x).numpy(), ref, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(model(x).numpy(), ref, atol=2e-5, rtol=1e-5)
    norms = [l for l in folded.layers if isinstance(l, InferenceGroupNormAct)]
    assert len(norms) == (1 if inference_layers else 0)
    if inference_layers:     # nothing left of the proxy step: no ChannelAffine
        assert [type(l).__name__ for l in folded.layers[1:]] == (
            ["InferenceGroupNormAct"] + ([] if consumer == "out" else ["Conv2D"]))


@pytest.mark.parametrize("activation", ["relu", "silu", "gelu", "leaky_relu", "linear"])
@pytest.mark.parametrize("consumer", ["out", "3x3"])
def test_every_activation_with_output_affine_and_offset(rng, activation, consumer):
    model = _norm_model(rng, "gn", True, consumer, activation=activation)
    x = rng.standard_normal((2, 5, 5, 8)).astype("float32")
    folded = tfpn.fold_for_inference(model, inference_layers=True)
    np.testing.assert_allclose(folded(x).numpy(), _reference(model, x, "gn", True, consumer),
                               atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("inference_layers", [True, False])
def test_shifted_group_norm_act(rng, inference_layers):
    model = _norm_model(rng, "gn", False, "out", activation="relu", offset=True)
    x = rng.standard_normal((2, 5, 5, 8)).astype("float32")
    folded = tfpn.fold_for_inference(model, inference_layers=inference_layers)
    ref = _reference(model, x, "gn", False, "out", offset=True)
    np.testing.assert_allclose(folded(x).numpy(), ref, atol=2e-5, rtol=1e-5)
    assert isinstance(folded.get_layer("n"), InferenceGroupNormAct) == inference_layers


@pytest.mark.parametrize("fold", [True, False])
@pytest.mark.parametrize("kind,proxy", [(k, pn) for k in _KINDS for pn in (False, True)]
                         + [("shifted", False)])
def test_export_and_load_match_float64_reference(rng, tmp_path, kind, proxy, fold):
    offset = kind == "shifted"
    kind = "gn" if offset else kind
    model = _norm_model(rng, kind, proxy, "3x3", offset=offset)
    path = str(tmp_path / "sm")
    traced = tfpn.export_saved_model(model, path, fold=fold)
    if fold:
        assert isinstance(traced.get_layer("n"), InferenceGroupNormAct)
    else:
        assert traced is model
    assert not any(op.startswith("TfProxyNorm>") for op in saved_model_op_types(path))
    loaded = tf.saved_model.load(path)
    x = (rng.standard_normal((4, 5, 5, 8)) - 2.0).astype("float32")
    ref = _reference(model, x, kind, proxy, "3x3", offset=offset)
    np.testing.assert_allclose(loaded.serve(tf.constant(x)).numpy(), ref, atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(loaded.serve(tf.constant(x[:1])).numpy(), ref[:1], atol=2e-5,
                               rtol=1e-5)


def test_folded_export_graph_has_fewer_ops(rng, tmp_path):
    model = _norm_model(rng, "gn", True, "3x3")
    tfpn.export_saved_model(model, str(tmp_path / "f"), fold=True)
    tfpn.export_saved_model(model, str(tmp_path / "u"), fold=False)

    def count(path):
        """Nodes a call can run: not the checkpoint save/restore functions, nor the false
        branch of the serving form's `cond` (the shifted statistics, for inputs whose mean
        exceeds 4 standard deviations)."""
        from tensorflow.core.protobuf import saved_model_pb2
        proto = saved_model_pb2.SavedModel()
        proto.ParseFromString((pathlib.Path(path) / "saved_model.pb").read_bytes())
        graph = proto.meta_graphs[0].graph_def
        skip = ("_traced_save", "_traced_restore", "cond_false")
        return len(graph.node) + sum(len(f.node_def) for f in graph.library.function
                                     if not any(s in f.signature.name for s in skip))
    assert count(tmp_path / "f") < count(tmp_path / "u") / 2


@pytest.mark.parametrize("kind", list(_KINDS))
def test_large_offset_inputs_stay_accurate(rng, kind):
    """Mean 1e4, std 1: the shifted statistics keep the O(1) deviations exact."""
    model = _norm_model(rng, kind, True, "out")
    x = (1e4 + rng.standard_normal((2, 5, 5, 8))).astype("float32")
    folded = tfpn.fold_for_inference(model, inference_layers=True)
    ref = _reference(model, x, kind, True, "out")
    np.testing.assert_allclose(folded(x).numpy(), ref, atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("shape,axis,groups", [((2, 4, 7, 3), 1, 2), ((3, 9, 6), -1, 3),
                                               ((4, 6), -1, 1), ((2, 3, 4, 5, 6), -1, 6),
                                               ((2, 4, 6, 5), 2, 3)])
def test_layouts_and_ranks(rng, shape, axis, groups):
    layer = InferenceGroupNormAct(groups=groups, activation="silu", axis=axis,
                                  use_output_scale=True, use_output_offset=True)
    layer.build(shape)
    c = shape[axis]
    values = {n: rng.standard_normal(c).astype("float32") for n in
              ("gamma", "beta", "output_scale", "output_offset")}
    for n, v in values.items():
        getattr(layer, n).assign(v)
    x = (rng.standard_normal(shape) + 3.0).astype("float32")
    s = [1] * len(shape)
    s[axis] = c
    ref = (R.group_norm_act(x, groups, axis=axis, activation="silu", gamma=values["gamma"],
                            beta=values["beta"]) * values["output_scale"].reshape(s)
           + values["output_offset"].reshape(s))
    np.testing.assert_allclose(layer(x).numpy(), ref, atol=2e-5, rtol=1e-5)
    # Unknown spatial sizes (a reduction instead of the matmul with ones).
    spec = [None] + [None if a not in (0, axis % len(shape)) else d
                     for a, d in enumerate(shape)][1:]
    fn = tf.function(layer, input_signature=[tf.TensorSpec(spec)])
    np.testing.assert_allclose(fn(x).numpy(), ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("mean", [0.0, 1e4])
def test_xla_form_matches_float64_and_keeps_its_cond(rng, mean):
    """Under XLA on a CPU the sums over 32x32 positions add 8 slices of the positions first
    (`inference_norm._sum_positions`), on both branches of the "auto" `cond` (mean 0: raw
    sums; mean 1e4: shifted). XLA would then turn that `cond` into a select that computes
    both branches; the optimization barrier in the shifted one keeps it a conditional."""
    shape = (2, 32, 32, 256)   # over RAW_MIN_SIZE values per example: "auto" has its `cond`
    layer = InferenceGroupNormAct(groups=32, activation="relu", use_output_offset=True)
    layer.build(shape)
    values = {n: (base + 0.3 * rng.standard_normal(256)).astype("float32")
              for n, base in (("gamma", 1.0), ("beta", 0.0), ("output_offset", 0.0))}
    for n, v in values.items():
        getattr(layer, n).assign(v)
    x = (mean + rng.standard_normal(shape)).astype("float32")
    ref = R.group_norm_act(x.astype(np.float64), 32, activation="relu", epsilon=1e-3,
                           gamma=values["gamma"], beta=values["beta"]) + values["output_offset"]
    fn = tf.function(layer, jit_compile=True)
    np.testing.assert_allclose(fn(x).numpy(), ref, atol=5e-5, rtol=1e-5)
    assert " conditional(" in fn.experimental_get_compiler_ir(x)(stage="optimized_hlo")


def test_inference_model_keras_round_trip_and_xla(rng, tmp_path):
    model = tfpn.models.cifar_resnet(8, norm="gn+pn", num_classes=3, input_shape=(8, 8, 3))
    folded = tfpn.fold_for_inference(model, inference_layers=True)
    path = str(tmp_path / "m.keras")
    folded.save(path)
    loaded = keras.saving.load_model(path)
    x = rng.standard_normal((2, 8, 8, 3)).astype("float32")
    want = model(x).numpy()
    np.testing.assert_allclose(loaded(x).numpy(), want, atol=2e-5)
    xla = tf.function(lambda t: folded(t, training=False), jit_compile=True)
    np.testing.assert_allclose(xla(x).numpy(), want, atol=2e-5)
    config = loaded.get_layer(folded.layers[2].name).get_config()
    assert "groups" in config and "use_output_offset" in config


@pytest.mark.slow
def test_bench_serve_quick_mode(capsys):
    bench = load_benchmark("bench_serve")
    rows = bench.main(["--quick", "--size=8", "--markdown"])
    out = capsys.readouterr().out
    got = {(r["variant"], r["path"]) for r in rows}
    for path_ in ("saved_model", "saved_model_xla", "graph", "xla", "tflite"):
        assert ("bn", path_) in got and ("gn+pn_folded", path_) in got
    for r in rows:
        assert r["ms"] > 0 and np.isfinite(r["ratio"])
        assert r["variant"] != "bn" or r["ratio"] == 1.0
    assert "| cifar_resnet20 | gn+pn_folded | saved_model |" in out
    with pytest.raises(SystemExit):
        bench.main(["--variants=gn+bn"])


@pytest.mark.parametrize("statistics", ["auto", "shifted"])
def test_shared_and_nested_layers(rng, statistics):
    """A norm layer called twice and a nested functional model, in the serving form (with
    `statistics` passed to every inference layer, nested ones too)."""
    shared = tfpn.GroupNormAct(groups=2, proxy_norm=True, name="shared")
    inner_in = keras.Input((4, 4, 8))
    inner = keras.Model(inner_in, tfpn.LayerNormAct(activation="gelu", proxy_norm=True,
                                                    name="ln")(inner_in), name="inner")
    inputs = keras.Input((4, 4, 8))
    x = L.Add()([shared(inputs), shared(L.Conv2D(8, 1)(inputs))])
    model = keras.Model(inputs, L.Conv2D(3, 3, padding="same")(inner(x)))
    set_params(shared, random_params(rng, 8))
    set_params(inner.get_layer("ln"), random_params(rng, 8))
    folded = tfpn.fold_for_inference(model, inference_layers=True, statistics=statistics)
    x = rng.standard_normal((2, 4, 4, 8)).astype("float32")
    np.testing.assert_allclose(folded(x).numpy(), model(x).numpy(), atol=2e-5)
    ln = folded.get_layer("inner").get_layer("ln")
    assert isinstance(ln, InferenceGroupNormAct) and ln.statistics == statistics
    norms = [l for l in folded.layers if isinstance(l, InferenceGroupNormAct)]
    assert [l.statistics for l in norms] == [statistics]


def test_statistics_argument():
    """`statistics` is checked when the layer (or the function) gets it, and serialized."""
    for bad in ("exact", None, 1):
        with pytest.raises(ValueError, match=f"Received: statistics={bad!r}"):
            InferenceGroupNormAct(statistics=bad)
    with pytest.raises(ValueError, match="Received: statistics='Raw'"):
        group_norm_act_inference(np.zeros((1, 4, 2), "float32"), np.ones(2, "float32"),
                                 np.zeros(2, "float32"), groups=1, statistics="Raw")
    layer = InferenceGroupNormAct(groups=2, statistics="shifted")
    assert InferenceGroupNormAct.from_config(layer.get_config()).statistics == "shifted"


def test_bench_serve_layer_quick_mode(capsys):
    """benchmarks/bench_serve_layer.py runs on a tiny tensor through every path, checks that
    its statistics settings agree, and reports finite ratios to the ReLU."""
    bench = load_benchmark("bench_serve_layer")
    rows = bench.main(["--quick", "--calls=1"])
    assert [r["path"] for r in rows] == list(bench.PATHS)
    for r in rows:
        assert r["relu"] == 1.0
        assert all(np.isfinite(r[s]) and r[s] > 0 for s in bench.STATISTICS)
    assert "shifted" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["--shapes=8x8"])
    assert "Received: --shapes=8x8" in capsys.readouterr().err


def test_bench_sum_squares_quick_mode(capsys):
    """benchmarks/bench_sum_squares.py: every candidate's sum of squares matches float64
    (at batch 1, the batch-summing candidates too), and the times are finite ratios to
    `sum`'s on each path."""
    bench = load_benchmark("bench_sum_squares")
    rows = bench.main(["--quick", "--inputs=2"])
    assert [r["path"] for r in rows] == list(bench.PATHS)
    for r in rows:
        assert r["sum"] == (1.0, 0.0)
        candidates = set(bench.candidates(r["path"], 1)) - {"sum", "relu"}
        assert candidates and candidates <= set(r)
        for name in candidates:
            ratio, error = r[name]
            assert np.isfinite(ratio) and ratio > 0
            assert error < 1e-5, (name, error)
    assert "sliced" in rows[1] and "euclidean_norm" in rows[0]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        bench.main(["--paths=tflite"])
    assert "Received: --paths=tflite" in capsys.readouterr().err


def test_profile_serve_quick_mode(capsys):
    """benchmarks/profile_serve.py: per-op-type time of the BN model, the serving form and
    the fused op's model, from real profiler traces (the serving form's sums are batched
    matmuls, the fused model runs the custom op, BN runs neither)."""
    bench = load_benchmark("profile_serve")
    columns = bench.main(["--quick"])
    assert {"bn", "serving"} <= set(columns)
    for ops in columns.values():
        assert ops["Run"] > 0 and ops["Conv2D"] > 0
    assert columns["serving"]["BatchMatMulV2"] > 0
    assert "BatchMatMulV2" not in columns["bn"]
    assert not any(op.startswith("TfProxyNorm>") for op in columns["serving"])
    if tfpn.fused_op_available():
        assert columns["fused"]["TfProxyNorm>GroupNormAct"] > 0
    assert "op type" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        bench.main(["--calls=0"])
    assert "Received: --calls=0" in capsys.readouterr().err
