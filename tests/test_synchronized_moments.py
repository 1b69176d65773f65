"""`ops.stats.moments(..., synchronized=True)`: the one cross-replica statistics path of the
batch-statistics layers (BatchNormAct, IEBN, BGN), on 2 logical CPUs of a
MirroredStrategy, against float64 NumPy statistics of the global batch."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = textwrap.dedent("""
    import json
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import tf_proxynorm as tfpn
    from tf_proxynorm.ops.stats import moments

    rng = np.random.default_rng(0)
    # A large common offset (two-pass variance keeps float32 precision) and replicas of
    # different scales (local and global statistics differ).
    x = (1e4 + rng.standard_normal((4, 3, 5)) * np.array([1, 2, 5, 9])[:, None, None]
         ).astype("float32")
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    per_replica = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(x[2 * ctx.replica_id_in_sync_group:][:2]))

    def step(t, synchronized):
        return moments(t, [0, 1], synchronized=synchronized)

    out = {}
    for synchronized in (True, False):
        mean, var = strategy.run(step, (per_replica, synchronized))
        out[str(synchronized)] = [[v.numpy().tolist() for v in strategy.experimental_local_results(s)]
                                  for s in (mean, var)]

    # A BN layer under the strategy: its moving statistics become the global batch's.
    with strategy.scope():
        bn = tfpn.BatchNormAct(synchronized=True, momentum=0.0, activation=None)
        bn.build((None, 3, 5))
    strategy.run(lambda t: bn(t, training=True), (per_replica,))
    out["bn"] = [bn.moving_mean.numpy().tolist(), bn.moving_variance.numpy().tolist()]
    print("RESULT" + json.dumps(out))
""")


@pytest.mark.slow
def test_synchronized_moments_use_the_global_batch():
    result = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                            cwd=ROOT, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"},
                            timeout=300)
    line = [s for s in result.stdout.splitlines() if s.startswith("RESULT")]
    assert line, result.stderr[-3000:]
    out = json.loads(line[0][len("RESULT"):])
    x = (1e4 + np.random.default_rng(0).standard_normal((4, 3, 5))
         * np.array([1, 2, 5, 9])[:, None, None]).astype("float32").astype(np.float64)
    mean, var = x.mean((0, 1)), x.var((0, 1))
    for replica in range(2):   # every replica gets the global statistics
        np.testing.assert_allclose(out["True"][0][replica], mean, rtol=1e-7)
        np.testing.assert_allclose(out["True"][1][replica], var, rtol=1e-4)
        local = x[2 * replica:2 * replica + 2]
        np.testing.assert_allclose(out["False"][0][replica], local.mean((0, 1)), rtol=1e-7)
        np.testing.assert_allclose(out["False"][1][replica], local.var((0, 1)), rtol=1e-4)
    np.testing.assert_allclose(out["bn"][0], mean, rtol=1e-7)
    np.testing.assert_allclose(out["bn"][1], var, rtol=1e-4)
