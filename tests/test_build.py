"""Building, checking and loading the fused op library, and choosing the path that runs.

A stale, tampered or mismatched library is never loaded; concurrent builds into one cache
both end with a working library; no compiler means one warning and the reference path;
exports contain no custom op; `auto` leaves XLA contexts to the reference path.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2

import reference as R
import reference_fused as RF
import tf_proxynorm as tfpn
from tf_proxynorm import fused
from tf_proxynorm.fused import build, settings
from tf_proxynorm.fused import cache as build_cache
from tf_proxynorm.fused.errors import BuildError

TESTS = Path(__file__).resolve().parent
OP_PREFIX = "TfProxyNorm>"
PARAMS = {"gamma": 1.2, "beta": -0.1, "proxy_beta": 0.2, "proxy_gamma": -0.15}


def _run_python(script, env_changes, timeout=600):
    """Runs `script` in a fresh interpreter (cwd tests/, so `reference` imports)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_PROXYNORM_IMPLEMENTATION", "TF_PROXYNORM_NO_BUILD")}
    env.update({"TF_CPP_MIN_LOG_LEVEL": "2", **env_changes})
    env = {k: v for k, v in env.items() if v is not None}  # None: unset the variable
    return subprocess.run([sys.executable, "-c", textwrap.dedent(script)], cwd=str(TESTS),
                          env=env, capture_output=True, text=True, timeout=timeout)


def _words(text):
    """`text` with its line breaks and indentation collapsed (a reason spans lines in the
    info report)."""
    return " ".join(text.split())


def _require_library():
    if not tfpn.fused_op_available():
        message = f"fused op unavailable: {fused.unavailable_reason()}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return Path(fused.library_path())


def _expected_layer(x, groups, axis=-1, activation="relu"):
    p = {k: np.full(x.shape[axis], v) for k, v in PARAMS.items()}
    return R.group_norm_act(x, groups, axis=axis, activation=activation, gamma=p["gamma"],
                            beta=p["beta"], proxy=(p["proxy_beta"], p["proxy_gamma"]))


def _set_params(layer):
    for w in layer.weights:
        w.assign(np.full(w.shape, PARAMS[w.name], np.float32))


# -- the stamp: stale, tampered or mismatched libraries are refused --------------------------

@pytest.fixture
def cache_copy(tmp_path, monkeypatch):
    """A copy of the loaded library's cache directory under a fresh TF_PROXYNORM_CACHE_DIR,
    and the BuildConfig it was built for."""
    library = _require_library()
    stamp = json.loads((library.parent / build_cache.STAMP_NAME).read_text())
    config = build_cache.BuildConfig(**stamp["config"])
    monkeypatch.setenv(settings.ENV_CACHE_DIR, str(tmp_path / "cache"))
    # "This environment" is the one the library was built for, even if a C++ source was
    # edited since (which would select another cache key, and a build).
    monkeypatch.setattr(build_cache, "current_config", lambda: config)
    shutil.copytree(library.parent, config.directory())
    return config


def _tamper_stamp(directory, **fields):
    path = directory / build_cache.STAMP_NAME
    stamp = json.loads(path.read_text())
    stamp["config"].update(fields)
    path.write_text(json.dumps(stamp))


def test_intact_copy_is_accepted(cache_copy):
    assert (build_cache.find_library(cache_copy)
            == cache_copy.directory() / build_cache.LIBRARY_NAME)
    assert build_cache.check_stamp(cache_copy.directory(), cache_copy) is None


@pytest.mark.parametrize("field, value", [
    ("tf_version", "2.0.0"), ("tf_git_version", "v0"), ("cxx11_abi", 0),
    ("compile_flags", ["-D_GLIBCXX_USE_CXX11_ABI=0"]), ("source_hash", "0" * 64),
    ("compiler_version", "g++ 1.0"), ("isas", ["generic"]),
])
def test_mismatched_stamp_is_refused(cache_copy, field, value):
    _tamper_stamp(cache_copy.directory(), **{field: value})
    with pytest.raises(BuildError, match=f"records {field}=.*refusing|refusing.*{field}"):
        build_cache.find_library(cache_copy)
    # The lazy path neither loads nor silently rebuilds over it: one reason, no library.
    outcome = fused.attempt_load()
    assert outcome.module is None and f"{field}=" in outcome.reason
    assert "--force" in outcome.reason


def test_tampered_library_is_refused(cache_copy):
    with open(cache_copy.directory() / build_cache.LIBRARY_NAME, "ab") as f:
        f.write(b"\0")
    with pytest.raises(BuildError, match="does not match the checksum"):
        build_cache.find_library(cache_copy)
    outcome = fused.attempt_load()
    assert outcome.module is None and "checksum" in outcome.reason


def test_stale_library_under_a_new_key_is_refused(cache_copy):
    """A library copied under the key of another TensorFlow (e.g. a cache carried across an
    upgrade) is detected by its stamp, not trusted by its directory name."""
    upgraded = build_cache.BuildConfig(**{**cache_copy.fields(), "tf_version": "2.99.0"})
    shutil.copytree(cache_copy.directory(), upgraded.directory())
    match = rf"records tf_version='{re.escape(tf.__version__)}' .* has tf_version='2\.99\.0'"
    with pytest.raises(BuildError, match=match):
        build_cache.find_library(upgraded)


def test_without_compiler_only_a_library_matching_everything_else_is_used(cache_copy):
    no_compiler = build_cache.BuildConfig(**{**cache_copy.fields(), "compiler": "",
                                       "compiler_version": ""})
    assert (build_cache.find_library(no_compiler)
            == cache_copy.directory() / build_cache.LIBRARY_NAME)
    _tamper_stamp(cache_copy.directory(), cxx11_abi=1 - cache_copy.cxx11_abi)
    assert build_cache.find_library(no_compiler) is None
    with pytest.raises(BuildError, match="no C\\+\\+ compiler"):
        build.build(no_compiler)


def test_no_build_and_unusable_cache_give_a_reason(tmp_path, monkeypatch):
    monkeypatch.setenv(settings.ENV_CACHE_DIR, str(tmp_path / "empty"))
    monkeypatch.setenv(settings.ENV_NO_BUILD, "1")
    outcome = fused.attempt_load()
    assert outcome.module is None and settings.ENV_NO_BUILD in outcome.reason
    # A cache root that is a file: the build fails on mkdir; a reason, not an exception.
    (tmp_path / "file").write_text("")
    monkeypatch.setenv(settings.ENV_CACHE_DIR, str(tmp_path / "file"))
    monkeypatch.delenv(settings.ENV_NO_BUILD)
    outcome = fused.attempt_load()
    assert outcome.module is None
    assert str(tmp_path / "file") in outcome.reason or "compiler" in outcome.reason


# -- fresh processes: no compiler, one thread, info ----------------------------------------

LOAD_ONLY_SCRIPT = """
    import json, os, sys, warnings
    import numpy as np
    import tf_proxynorm as tfpn
    from tf_proxynorm import fused
    from tf_proxynorm.fused import cache
    from tf_proxynorm.info import report
    out = {{}}
    # A warm cache: `info` loads the library, the first layer call and `describe` use it.
    info = "\\n".join(report())
    tfpn.GroupNormAct(groups=2)(np.ones((2, 4, 4, 8), "float32"))
    out["warm"] = dict(available=tfpn.fused_op_available(), info=info,
                       reason=fused.describe()["reason"])
    # An empty cache and TF_PROXYNORM_NO_BUILD=1: a load attempt and the description of
    # the cache (what `info` reports) give the reason.
    os.environ.update({{"{cache_dir}": {empty!r}, "{no_build}": "1"}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out["no_build"] = dict(reason=fused.attempt_load().reason,
                               described=cache.describe_files()["reason"])
    out["build_imported"] = "tf_proxynorm.fused.build" in sys.modules
    print(json.dumps(out))
"""


def test_loading_and_describing_never_import_the_compiler_driver(tmp_path):
    """With a warm cache, or with TF_PROXYNORM_NO_BUILD=1, `info`, the first layer call and
    `describe` read `fused.cache` only: the compiler driver `fused.build` is not imported."""
    _require_library()
    empty = tmp_path / "cache"
    script = LOAD_ONLY_SCRIPT.format(cache_dir=settings.ENV_CACHE_DIR, empty=str(empty),
                                     no_build=settings.ENV_NO_BUILD)
    out = _run_python(script, {})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    warm, no_build = result["warm"], result["no_build"]
    assert warm["available"] and warm["reason"] is None
    assert "fused op library: AVAILABLE" in warm["info"]
    for reason in no_build.values():
        assert f"{settings.ENV_NO_BUILD}='1' forbids building it" in reason, no_build
        assert str(empty) in reason
    assert result["build_imported"] is False
    assert not empty.exists()


NO_COMPILER_SCRIPT = """
    import json, warnings
    import numpy as np
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        import tensorflow as tf
        import tf_proxynorm as tfpn
        from tf_proxynorm import fused
        from tf_proxynorm.info import report
        loaded_at_import = fused.load_attempted()
        at_import = len(caught)
        info_before = "\\n".join(report())  # before any layer call: never builds
        x = np.random.default_rng(0).standard_normal((2, 5, 5, 8)).astype("float32")
        layer = tfpn.GroupNormAct(groups=2, proxy_norm=True)
        layer.build(x.shape)
        for w in layer.weights:
            w.assign(np.full(w.shape, {params}[w.name], np.float32))
        y = layer(x).numpy()
        y_fn = tf.function(lambda t: layer(t))(x).numpy()
        tfpn.LayerNormAct(activation="silu")(x)
        available = tfpn.fused_op_available()
    try:
        tfpn.GroupNormAct(groups=2, implementation="fused").build(x.shape)
        fused_error = None
    except ValueError as e:
        fused_error = str(e)
    info = "\\n".join(report())  # what `python -m tf_proxynorm.info` prints
    print(json.dumps(dict(
        loaded_at_import=loaded_at_import, at_import=at_import, available=available,
        warnings=[(w.category.__name__, str(w.message)) for w in caught
                  if "tf_proxynorm" in str(w.message)],
        fused_error=fused_error, x=x.tolist(), y=y.tolist(), y_fn=y_fn.tolist(),
        info=info, info_before=info_before)))
"""


BAD_SETUPS = {
    # name: (environment changes, given tmp_path; a phrase of the reason)
    "CXX points nowhere": (lambda tmp: {"CXX": "/nonexistent/c++"}, r"no C\+\+ compiler"),
    "no compiler on PATH": (lambda tmp: {"CXX": None, "PATH": str(tmp)}, r"no C\+\+ compiler"),
    "unwritable cache": (lambda tmp: {settings.ENV_CACHE_DIR: str(tmp / "a-file" / "cache")},
                         f"not writable .* Set {settings.ENV_CACHE_DIR} to a writable folder"),
    "missing source dir": (lambda tmp: {settings.ENV_SOURCE_DIR: str(tmp / "no-such-folder")},
                           f"sources were not found in .*no-such-folder .*{settings.ENV_SOURCE_DIR}"),
    "unknown CPU ISA": (lambda tmp: {settings.ENV_CPU_ISAS: "avx2,sse4"},
                        f"{settings.ENV_CPU_ISAS} must list some of generic, avx2, avx512. "
                        f"Received: {settings.ENV_CPU_ISAS}='avx2,sse4'"),
}


@pytest.mark.parametrize("machine, value, expected", [
    ("x86_64", None, ["generic", "avx2", "avx512"]),
    ("x86_64", "", ["generic", "avx2", "avx512"]),
    ("x86_64", "generic", ["generic"]),
    ("AMD64", "AVX512", ["generic", "avx512"]),
    ("x86_64", "avx512, avx2", ["generic", "avx2", "avx512"]),
    ("aarch64", "avx2", ["generic"]),
])
def test_cpu_isas_setting(monkeypatch, machine, value, expected):
    if value is None:
        monkeypatch.delenv(settings.ENV_CPU_ISAS, raising=False)
    else:
        monkeypatch.setenv(settings.ENV_CPU_ISAS, value)
    assert settings.cpu_isas(machine) == expected


@pytest.mark.slow
@pytest.mark.parametrize("setup", sorted(BAD_SETUPS))
def test_bad_setup_means_one_warning_and_the_reference_path(tmp_path, setup):
    """Each broken set-up gives exactly one warning that says why, the reference path's
    numbers, a clear error for implementation='fused', and an info report; no library."""
    make_env, reason = BAD_SETUPS[setup]
    (tmp_path / "a-file").write_text("")
    cache = tmp_path / "cache"
    out = _run_python(NO_COMPILER_SCRIPT.format(params=PARAMS),
                      {settings.ENV_CACHE_DIR: str(cache), **make_env(tmp_path)})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert not result["loaded_at_import"] and result["at_import"] == 0
    assert result["available"] is False
    assert len(result["warnings"]) == 1, result["warnings"]
    category, message = result["warnings"][0]
    assert category == "RuntimeWarning"
    assert "reference" in message and re.search(reason, message), message
    expected = _expected_layer(np.array(result["x"]), 2)
    np.testing.assert_allclose(result["y"], expected, atol=1e-5)
    np.testing.assert_allclose(result["y_fn"], expected, atol=1e-5)
    assert "implementation='fused'" in result["fused_error"]
    assert re.search(reason, result["fused_error"])
    assert "UNAVAILABLE" in result["info"] and re.search(reason, result["info"])
    # `info`, before and after the layer call, gives the warning's reason word for word.
    said = message.split("Reason: ", 1)[1]
    for report in (result["info_before"], result["info"]):
        assert "UNAVAILABLE" in report
        assert _words(said) in _words(report), (said, report)
    assert not list(tmp_path.rglob(build_cache.LIBRARY_NAME))


ONE_THREAD_SCRIPT = """
    import json
    import numpy as np
    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(1)
    import reference_fused as RF
    from tf_proxynorm import fused
    from tf_proxynorm.info import report
    info = "\\n".join(report())  # what `python -m tf_proxynorm.info` prints
    forward, backward = fused.raw_ops()
    rng = np.random.default_rng(1)
    errors = {{}}
    for shape, last in (((2, 12, 12, 64), True), ((1, 32, 20, 20), False)):
        x = (3 + 2 * rng.standard_normal(shape)).astype("float32")
        dy = rng.standard_normal(shape).astype("float32")
        c = shape[-1] if last else shape[1]
        p = [(1 + 0.3 * rng.standard_normal(c)).astype("float32") for _ in range(4)]
        attrs = dict(groups=8, epsilon=1e-3, activation="gelu", channels_last=last,
                     use_proxy=True)
        y, mean, inv_std = forward(x, *p, **attrs)
        got = [y] + list(backward(dy, x, *p, mean, inv_std, **attrs))
        ref = [RF.forward(x, *p, **attrs)[0]] + list(RF.backward(dy, x, *p, **attrs))
        errors[str(shape)] = max(float(np.max(np.abs(g.numpy() - r)) / max(1, np.max(np.abs(r))))
                                 for g, r in zip(got, ref))
    print(json.dumps(dict(info=info, errors=errors, path=str(fused.library_path()),
                          threads=tf.config.threading.get_intra_op_parallelism_threads())))
"""


@pytest.mark.slow
def test_one_intra_op_thread_and_info_in_a_fresh_process():
    """The kernels run on TensorFlow's intra-op pool: with it set to one thread (a single
    slab/tile schedule) they still match the reference; `python -m tf_proxynorm.info`
    reports the library."""
    library = _require_library()
    out = _run_python(ONE_THREAD_SCRIPT.format(), {})
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["threads"] == 1 and result["path"] == str(library)
    assert max(result["errors"].values()) < 1e-4, result["errors"]
    info = result["info"]
    assert f"TensorFlow   {tf.__version__}" in info and f"Keras        {keras.__version__}" in info
    assert "fused op library: AVAILABLE" in info and str(library) in info
    assert "TfProxyNorm>GroupNormAct" in info and "CPU: bfloat16, float16, float32" in info
    assert "build log:" in info and "intra-op threads: 1" in info
    assert "implementation: auto" in info


def test_info_main_in_process(capsys):
    from tf_proxynorm import info
    assert info.main([]) == 0
    printed = capsys.readouterr().out
    assert "fused op library:" in printed and "logical devices:" in printed


@pytest.mark.slow
def test_two_processes_building_at_once_both_end_with_a_working_library(tmp_path):
    """An ahead-of-time build (`python -m tf_proxynorm.build`) and a first use that builds
    lazily start together on an empty cache: the file lock makes one of them compile, the
    other waits and loads the same verified library."""
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_PROXYNORM_IMPLEMENTATION", "TF_PROXYNORM_NO_BUILD")}
    # The generic CPU kernels only (TF_PROXYNORM_CPU_ISAS): the locking is what is tested,
    # and the build takes half the time.
    env.update({"TF_CPP_MIN_LOG_LEVEL": "2", settings.ENV_CACHE_DIR: str(cache),
                settings.ENV_CPU_ISAS: "generic"})
    lazy = textwrap.dedent("""
        import json
        import numpy as np
        import reference_fused as RF
        import tf_proxynorm as tfpn
        from tf_proxynorm import fused
        assert tfpn.fused_op_available(), fused.unavailable_reason()
        x = np.random.default_rng(2).standard_normal((3, 4, 4, 8)).astype("float32")
        p = [np.ones(8, np.float32)] * 4
        attrs = dict(groups=4, epsilon=1e-3, activation="relu")
        y = fused.raw_ops()[0](x, *p, **attrs)[0].numpy()
        err = float(np.max(np.abs(y - RF.forward(x, *p, **attrs)[0])))
        print(json.dumps(dict(path=str(fused.library_path()), err=err)))
    """)
    procs = [subprocess.Popen([sys.executable, "-m", "tf_proxynorm.build"], cwd=str(TESTS),
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
             subprocess.Popen([sys.executable, "-c", lazy], cwd=str(TESTS), env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    outs = [p.communicate(timeout=900) for p in procs]
    for proc, (stdout, stderr) in zip(procs, outs):
        assert proc.returncode == 0, stderr[-3000:]
    result = json.loads(outs[1][0].strip().splitlines()[-1])
    assert result["err"] < 1e-5
    built = Path(result["path"])
    assert str(built) in outs[0][0] and built.parent.parent == cache
    config = json.loads((built.parent / build_cache.STAMP_NAME).read_text())["config"]
    assert build_cache.check_stamp(built.parent, build_cache.BuildConfig(**config)) is None
    assert config["isas"] == ["generic"]
    # One compilation, nothing half-written left behind.
    log = (built.parent / build_cache.LOG_NAME).read_text()
    assert log.count("# tf_proxynorm build of") == 1
    leftovers = [p.name for p in cache.iterdir() if p != built.parent and p.suffix != ".lock"]
    assert leftovers == []


# -- which path runs ----------------------------------------------------------------------

def _op_types(concrete):
    graph = concrete.graph
    types = {op.type for op in graph.get_operations()}
    for function in graph._functions.values():
        types |= {node.op for node in function.definition.node_def}
    return types


def _layer(x_shape, **kwargs):
    layer = tfpn.GroupNormAct(groups=2, proxy_norm=True, **kwargs)
    layer.build(x_shape)
    _set_params(layer)
    return layer


def test_environment_variable_and_setting_force_the_reference_path(monkeypatch, rng):
    _require_library()
    x = rng.standard_normal((2, 4, 4, 8)).astype("float32")
    layer = _layer(x.shape)
    spec = tf.TensorSpec(x.shape)

    def ops():
        return _op_types(tf.function(lambda t: layer(t)).get_concrete_function(spec))

    assert OP_PREFIX + "GroupNormAct" in ops()
    monkeypatch.setenv("TF_PROXYNORM_IMPLEMENTATION", "reference")
    assert not any(op.startswith(OP_PREFIX) for op in ops())
    np.testing.assert_allclose(layer(x).numpy(), _expected_layer(x, 2), atol=1e-5)
    monkeypatch.setenv("TF_PROXYNORM_IMPLEMENTATION", "Fused ")
    assert tfpn.get_implementation() == "fused"
    monkeypatch.setenv("TF_PROXYNORM_IMPLEMENTATION", "xla")
    with pytest.raises(ValueError, match="TF_PROXYNORM_IMPLEMENTATION='xla'"):
        layer(x)
    monkeypatch.delenv("TF_PROXYNORM_IMPLEMENTATION")
    with tfpn.use_implementation("reference"):
        assert not any(op.startswith(OP_PREFIX) for op in ops())
    assert OP_PREFIX + "GroupNormAct" in ops()


@pytest.mark.parametrize("make, call, match", [
    (dict(), "jit", "XLA"),
    (dict(activation="tanh"), "eager", "activation 'tanh' has no fused kernel"),
    (dict(dtype="float64"), "eager", "float64 has no fused kernel"),
    (dict(axis=2), "eager", "channel axis at 1 or -1. Received: axis=2"),
], ids=["jit", "activation", "float64", "middle-axis"])
def test_fused_raises_a_clear_error_when_it_cannot_run(rng, make, call, match):
    _require_library()
    x = rng.standard_normal((2, 4, 6, 8))
    layer = tfpn.GroupNormAct(groups=2, implementation="fused", **make)
    fn = tf.function(layer, jit_compile=True) if call == "jit" else layer
    with pytest.raises(ValueError, match=match):
        fn(tf.constant(x, tf.float64 if "dtype" in make else tf.float32))


def test_auto_with_a_middle_channel_axis_uses_the_reference_path(rng):
    """The fused op takes channels on axis 1 or -1; any other axis goes to the reference."""
    _require_library()
    x = rng.standard_normal((2, 3, 8, 5)).astype("float32")
    layer = _layer(x.shape, axis=2)
    fn = tf.function(lambda t: layer(t))
    assert not any(op.startswith(OP_PREFIX)
                   for op in _op_types(fn.get_concrete_function(tf.TensorSpec(x.shape))))
    np.testing.assert_allclose(fn(x).numpy(), _expected_layer(x, 2, axis=2), atol=1e-5)


def test_auto_under_jit_compile_uses_the_reference_path_and_compiles(rng):
    _require_library()
    x = rng.standard_normal((3, 5, 5, 8)).astype("float32")
    layer = _layer(x.shape, activation="silu")
    w = rng.standard_normal(x.shape).astype("float32")

    def step(t):
        with tf.GradientTape() as tape:
            tape.watch(t)
            loss = tf.reduce_sum(layer(t) * w)
        return loss, tape.gradient(loss, [t] + layer.trainable_weights)

    jit = tf.function(step, jit_compile=True)
    assert not any(op.startswith(OP_PREFIX)
                   for op in _op_types(jit.get_concrete_function(tf.TensorSpec(x.shape))))
    assert OP_PREFIX + "GroupNormAct" in _op_types(
        tf.function(step).get_concrete_function(tf.TensorSpec(x.shape)))
    loss, grads = jit(tf.constant(x))
    p = {name: tf.constant(np.full(8, PARAMS[name]), tf.float64) for name in PARAMS}
    x64 = tf.constant(x, tf.float64)
    with tf.GradientTape() as tape:
        tape.watch([x64] + list(p.values()))
        ref_loss = tf.reduce_sum(RF.layer_tf64(
            x64, p["gamma"], p["beta"], p["proxy_beta"], p["proxy_gamma"], groups=2, axis=-1,
            epsilon=1e-3, activation="silu") * w)
    names = [v.name for v in layer.trainable_weights]
    ref_grads = tape.gradient(ref_loss, [x64] + [p[n] for n in names])
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-4, atol=1e-4)
    for name, got, ref in zip(["x"] + names, grads, ref_grads):
        np.testing.assert_allclose(got.numpy(), ref.numpy(), rtol=1e-4, atol=1e-4, err_msg=name)


# -- exports --------------------------------------------------------------------------------

def _saved_model_ops(path):
    proto = saved_model_pb2.SavedModel()
    proto.ParseFromString((Path(path) / "saved_model.pb").read_bytes())
    ops = set()
    for meta_graph in proto.meta_graphs:
        ops |= {node.op for node in meta_graph.graph_def.node}
        for function in meta_graph.graph_def.library.function:
            ops |= {node.op for node in function.node_def}
    return ops


def test_saved_model_has_no_custom_op_although_training_used_it(rng, tmp_path):
    _require_library()
    inputs = keras.Input((6, 6, 3))
    h = keras.layers.Conv2D(8, 3, padding="same")(inputs)
    h = tfpn.GroupNormAct(groups=2, proxy_norm=True, activation="gelu")(h)
    h = tfpn.LayerNormAct(axis=-1)(keras.layers.Conv2D(8, 1)(h))
    model = keras.Model(inputs, keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(h)))
    optimizer = keras.optimizers.SGD(0.1)
    x = rng.standard_normal((4, 6, 6, 3)).astype("float32")
    target = rng.standard_normal((4, 2)).astype("float32")

    @tf.function
    def train_step(xb, yb):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(xb, training=True) - yb))
        optimizer.apply(tape.gradient(loss, model.trainable_variables),
                        model.trainable_variables)
        return loss

    losses = [float(train_step(x, target)) for _ in range(3)]
    assert losses[-1] < losses[0]
    assert OP_PREFIX + "GroupNormActGrad" in _op_types(train_step.get_concrete_function(x, target))
    expected = model(x, training=False).numpy()

    tf.saved_model.save(model, str(tmp_path / "tf_saved"))
    model.export(str(tmp_path / "exported"), verbose=False)
    for path in ("tf_saved", "exported"):
        ops = _saved_model_ops(tmp_path / path)
        assert "Conv2D" in ops, path  # the parse sees the model's graph
        assert not any(op.startswith(OP_PREFIX) for op in ops), (path, ops)
    loaded = tf.saved_model.load(str(tmp_path / "exported"))
    np.testing.assert_allclose(loaded.serve(x).numpy(), expected, rtol=1e-5, atol=1e-5)
    # The fused path is still used after exporting.
    assert OP_PREFIX + "GroupNormAct" in _op_types(
        tf.function(lambda t: model(t)).get_concrete_function(tf.TensorSpec(x.shape)))
