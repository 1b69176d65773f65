"""BatchNorm statistics under `keras.distribution.DataParallel` on JAX (4 CPU devices).

On JAX, Keras' data parallelism is one SPMD program over the global batch: a mean over the
batch axis is a mean over every device's examples (XLA inserts the all-reduce). So
`BatchNormAct` (with `synchronized` True or False) and Keras' `BatchNormalization` alike
measure global-batch statistics there, and the README's backend table says so. Checked on
the moving mean after one fit step, against the float64 NumPy mean of the global batch
(each quarter of the batch has its own offset, so local statistics would differ by ~3).
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("jax")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import json
    import numpy as np
    import jax
    import keras
    import tf_proxynorm as tfpn

    devices = jax.devices()
    assert len(devices) == 4, devices
    x = np.load({x!r})
    y = np.zeros_like(x)
    out = {{}}
    for mode in ("single", "data_parallel"):
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=devices) if mode != "single" else None)
        for kind in ("BatchNormAct", "BatchNormAct(synchronized=True)", "keras"):
            if kind == "keras":
                norm = keras.layers.BatchNormalization(momentum=0.5)
            else:
                norm = tfpn.layers.BatchNormAct(activation=None, momentum=0.5,
                                                synchronized="synchronized" in kind)
            model = keras.Sequential([keras.Input(x.shape[1:]), norm])
            model.compile(optimizer="sgd", loss="mse")
            model.fit(x, y, batch_size=len(x), epochs=1, verbose=0, shuffle=False)
            out[mode + "/" + kind] = np.asarray(norm.moving_mean).tolist()
    print("RESULT" + json.dumps(out))
""")


@pytest.mark.slow
def test_data_parallel_batch_norm_statistics_are_global(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 4, 3)) + 3.0 * np.repeat(np.arange(4.0), 2)[:, None, None]
    x = x.astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    env = dict(os.environ, KERAS_BACKEND="jax",
               XLA_FLAGS="--xla_force_host_platform_device_count=4")
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(x=str(tmp_path / "x.npy"))],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT")]
    assert line, out.stderr[-3000:]
    result = json.loads(line[0][len("RESULT"):])
    global_mean = 0.5 * x.astype(np.float64).mean(axis=(0, 1))    # momentum 0.5 from 0
    local_mean = 0.5 * x[:2].astype(np.float64).mean(axis=(0, 1))  # the first device's
    assert np.abs(global_mean - local_mean).min() > 1.0
    assert len(result) == 6
    for key, moving_mean in result.items():
        np.testing.assert_allclose(moving_mean, global_mean, rtol=1e-5, atol=1e-6,
                                   err_msg=key)
