"""The product as users install it: the distributions built from this checkout, installed
into a fresh virtual environment with only the declared dependencies, used from a directory
outside the checkout.

`python -m build` makes the sdist and, from it, the wheel (offline: --no-isolation with the
test environment's setuptools); both carry every C++/CUDA source of `custom_ops/` and pass
`twine check`. The fresh environment installs the wheel with pip (the package index cache
makes TensorFlow fast; versions are pinned to this environment's so the cache serves them),
then a script run outside the checkout checks: scipy is absent and `import tf_proxynorm`
works; the fused op builds from the installed sources into a temporary cache, never writing
into site-packages; a GN+PN layer on the fused path equals the reference path;
`python -m tf_proxynorm.info` names the installed sources; a SavedModel export loads.
"""

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
OP_SOURCE_SUFFIXES = {".cc", ".h", ".cu", ".cuh"}

pytestmark = pytest.mark.slow


def _run(command, cwd, env=None, timeout=1200):
    result = subprocess.run(command, cwd=str(cwd), env=env, capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, (f"{' '.join(map(str, command))} failed:\n"
                                    f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
    return result


def _op_sources():
    return sorted(str(p.relative_to(ROOT / "custom_ops")) for p in (ROOT / "custom_ops").rglob("*")
                  if p.is_file() and p.suffix in OP_SOURCE_SUFFIXES)


@pytest.fixture(scope="module")
def dists(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(ROOT)],
         cwd=ROOT)
    wheels, sdists = list(out.glob("*.whl")), list(out.glob("*.tar.gz"))
    assert len(wheels) == 1 and len(sdists) == 1, list(out.iterdir())
    return wheels[0], sdists[0]


def test_distributions_carry_the_op_sources_and_valid_metadata(dists):
    wheel, sdist = dists
    sources = _op_sources()
    assert len(sources) >= 12 and "cc/activations.h" in sources and "cuda/gna_common.cuh" in sources
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        meta = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    missing = [s for s in sources if f"tf_proxynorm/fused/custom_ops/{s}" not in names]
    assert missing == []
    assert not any(n.endswith((".so", ".o")) for n in names)
    assert "tf_proxynorm/data.py" not in names   # the examples' loaders: examples/data.py
    with tarfile.open(sdist) as t:
        top = t.getnames()[0].split("/")[0]
        sdist_names = set(t.getnames())
    assert [s for s in sources if f"{top}/custom_ops/{s}" not in sdist_names] == []
    # Core dependencies: exactly what import and the layers need (no scipy).
    requires = [line.split(":", 1)[1].strip() for line in meta.splitlines()
                if line.startswith("Requires-Dist:") and "extra ==" not in line]
    assert sorted(r.split(">")[0].split("=")[0].split("<")[0].strip() for r in requires) == [
        "keras", "numpy", "tensorflow"]
    assert "License-Expression: Apache-2.0" in meta
    _run([sys.executable, "-m", "twine", "check", "--strict", str(wheel), str(sdist)], cwd=ROOT)


USER_SCRIPT = r"""
import importlib.util, io, json, os, runpy, contextlib, sys, warnings
import numpy as np
assert importlib.util.find_spec("scipy") is None, "scipy is installed"
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import tensorflow as tf
    import tf_proxynorm as tfpn
    available = tfpn.fused_op_available()
x = np.random.default_rng(0).standard_normal((2, 6, 6, 16)).astype("float32")
layers = {}
for impl in ("fused", "reference"):
    layer = tfpn.GroupNormAct(groups=4, proxy_norm=True, activation="silu", implementation=impl)
    layer.build(x.shape)
    for w, v in zip(layer.weights, (1.3, -0.2, 0.3, -0.1)):
        w.assign(np.full(w.shape, v, np.float32))
    layers[impl] = layer
y = {impl: layer(x).numpy() for impl, layer in layers.items()}
info = io.StringIO()
with contextlib.redirect_stdout(info):
    try:
        runpy.run_module("tf_proxynorm.info", run_name="__main__")
    except SystemExit as e:
        assert e.code == 0, e.code
import keras
inputs = keras.Input((6, 6, 3))
h = tfpn.GroupNormAct(groups=2, proxy_norm=True)(keras.layers.Conv2D(8, 3, padding="same")(inputs))
model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(h))
xm = np.random.default_rng(1).standard_normal((3, 6, 6, 3)).astype("float32")
tfpn.export_saved_model(model, os.environ["SAVE_PATH"])
loaded = tf.saved_model.load(os.environ["SAVE_PATH"])
print(json.dumps(dict(
    package=os.path.dirname(tfpn.__file__), available=available,
    library=str(tfpn.fused.library_path()),
    warnings=[str(w.message) for w in caught if "tf_proxynorm" in str(w.message)],
    max_diff=float(np.max(np.abs(y["fused"] - y["reference"]))),
    scale=float(np.max(np.abs(y["reference"]))),
    info=info.getvalue(),
    export_diff=float(np.max(np.abs(loaded.serve(xm).numpy() - model(xm).numpy()))))))
"""


def _tree(path):
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")
                  if "__pycache__" not in p.parts)


def test_wheel_in_a_fresh_environment_builds_and_runs_the_fused_op(dists, tmp_path):
    wheel, _ = dists
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path)
    python = venv / "bin" / "python"
    pins = tmp_path / "constraints.txt"
    pins.write_text("".join(f"{name}=={metadata.version(name)}\n"
                            for name in ("tensorflow", "keras", "numpy")))
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TF_PROXYNORM_", "PYTHON", "VIRTUAL_ENV"))}
    _run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check",
          str(wheel), "-c", str(pins)], cwd=tmp_path, env=env)
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                     cwd=tmp_path, env=env).stdout.strip())
    installed = site / "tf_proxynorm"
    before = _tree(installed)
    assert "fused/custom_ops/cc/activations.h" in before

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    cache = tmp_path / "cache"
    # Generic CPU kernels only: the ISA variants compile the same source with other flags,
    # and the build takes half the time (TF_PROXYNORM_CPU_ISAS).
    env.update({"TF_CPP_MIN_LOG_LEVEL": "2", "TF_PROXYNORM_CACHE_DIR": str(cache),
                "TF_PROXYNORM_CPU_ISAS": "generic"})
    result = _run([str(python), "-c", USER_SCRIPT], cwd=outside,
                  env=dict(env, SAVE_PATH=str(tmp_path / "saved")))
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert Path(out["package"]) == installed
    assert out["available"] is True, out["warnings"]
    assert out["warnings"] == []
    assert Path(out["library"]).parent.parent == cache
    assert out["max_diff"] <= 1e-5 * max(1.0, out["scale"]), out
    assert f"sources:      {installed / 'fused' / 'custom_ops'} (installed with the package)" in (
        out["info"]), out["info"]
    assert "fused op library: AVAILABLE" in out["info"]
    assert out["export_diff"] < 1e-5
    # The build wrote into the cache only: site-packages is unchanged.
    assert _tree(installed) == before
    # `python -m tf_proxynorm.build` from site-packages finds the same cached library.
    rebuilt = _run([str(python), "-m", "tf_proxynorm.build"], cwd=outside, env=env)
    assert out["library"] in rebuilt.stdout
