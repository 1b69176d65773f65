"""`python -m tf_proxynorm.info` on every Keras backend: it names the backend, and on a
backend other than TensorFlow says that every layer runs the keras.ops reference path and
never builds or loads the fused op library."""

import keras
import pytest

import tf_proxynorm as tfpn
from backend_helpers import BACKEND
from tf_proxynorm import fused
from tf_proxynorm.fused import info, loader   # `python -m tf_proxynorm.info`: info.main
from tf_proxynorm.fused import cache as build_cache

OTHER_BACKEND_PHRASES = (
    "every layer runs the keras.ops reference path",
    "the fused op serves only the TensorFlow backend",
)


def test_report_names_the_backend_and_its_path(capsys):
    assert info.main([]) == 0
    printed = capsys.readouterr().out
    lines = printed.splitlines()
    assert f"Keras        {keras.__version__} (backend {BACKEND})" in lines
    assert any(line.startswith(f"Keras backend: {BACKEND}") for line in lines), printed
    assert "fused op library:" in printed and "logical devices:" in printed
    if BACKEND == "tensorflow":
        assert not any(phrase in printed for phrase in OTHER_BACKEND_PHRASES), printed
        assert "CPU model.fit (Keras leaves XLA off on CPU)" in printed
        # The report loads a cached library; with none cached it says the first layer call
        # builds it, and leaves that to the layer call.
        assert fused.load_attempted() or "fused op library: NOT BUILT" in printed, printed
    else:
        for phrase in OTHER_BACKEND_PHRASES:
            assert phrase in printed, (phrase, printed)
        if BACKEND == "jax":
            assert "any jax.jit or jit_compile=True function   -> keras.ops reference path, " \
                   "compiled by XLA" in printed, printed
        assert f"fused op library: NOT USED on the '{BACKEND}' backend" in printed
        assert "fused CPU kernel" not in printed
        # Neither `import tf_proxynorm`, a layer call, nor the report loads the library.
        tfpn.GroupNormAct(groups=2, proxy_norm=True)(keras.ops.ones((2, 4, 4, 4)))
        assert not fused.load_attempted()
        assert "--build:      ignored on this backend" in "\n".join(info.report(allow_build=True))
        assert not fused.load_attempted()


@pytest.mark.parametrize("setup, phrase", [
    ({"CXX": "/nonexistent"}, "no C++ compiler: CXX='/nonexistent' is not an executable"),
    ({}, "not built yet: no library for this TensorFlow is cached in"),
])
def test_report_gives_the_first_layer_calls_reason(tmp_path, monkeypatch, setup, phrase):
    """With an empty cache the report says why there is no library (as the first layer call
    on TensorFlow would): the compiler named by CXX, or that the first layer call builds
    it; never TF_PROXYNORM_NO_BUILD, which is not set. It compiles nothing."""
    monkeypatch.setenv("TF_PROXYNORM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("TF_PROXYNORM_NO_BUILD", raising=False)
    for name, value in setup.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(loader, "_library", None)   # as in a fresh process
    monkeypatch.setattr(build_cache, "_ATTEMPTED", set())
    printed = " ".join("\n".join(info.report()).split())
    assert phrase in printed, printed
    assert "TF_PROXYNORM_NO_BUILD" not in printed.split("environment:")[0]
    assert not (tmp_path / "cache").exists() or not any((tmp_path / "cache").iterdir())
    assert not loader.load_attempted()


def test_path_lines_per_backend():
    """The path table: TensorFlow's rows depend on the library's kernels, the other
    backends always take the reference path."""
    library = {"available": True, "kernels": {fused.OP_NAME: {"CPU": ["float32"]}}}
    tf_rows = "\n".join(info.path_lines(library, "auto", {"CPU"}))
    assert "CPU model.fit (Keras leaves XLA off on CPU)" in tf_rows
    assert "-> fused CPU kernel" in tf_rows
    forced = "\n".join(info.path_lines(library, "reference", {"CPU"}))
    assert "reference path (implementation='reference')" in forced
    for backend in ("jax", "torch"):
        rows = "\n".join(info.path_lines(library, "auto", {"CPU"}, backend))
        assert f"Keras backend '{backend}'" in rows and "fused CPU kernel" not in rows
        assert "it serves only the TensorFlow backend" in rows
    assert "keras.ops reference path, compiled by XLA" in "\n".join(
        info.path_lines(library, "auto", {"CPU"}, "jax"))
