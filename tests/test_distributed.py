"""tf.distribute: MirroredStrategy on 2 logical CPUs, synchronized BN, 2 worker processes.

Batch-independent norms (GN+PN) need no cross-replica synchronization: one step with 2
replicas of batch b equals one step on one device with batch 2b up to float32 summation
order (tolerance `ATOL` on the weights, which move by ~1e-2 in that step), whether Keras
splits the global batches or the input comes as per-replica batches from
`distribute_datasets_from_function` (as in examples/train.py). BN needs
`synchronized=True` for that, and then its statistics are those of the global batch.
Two worker processes of examples/train.py (`MultiWorkerMirroredStrategy`, `TF_CONFIG` on
loopback ports) end with bit-identical weights.
"""

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL = 2e-6          # on weights after one SGD step (float32, different summation order)
BATCH_PER_REPLICA = 4

SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import tf_proxynorm as tfpn

    b = {b}
    rng = np.random.default_rng(0)
    # Examples of very different scales, so per-replica and global statistics differ.
    x = (rng.standard_normal((2 * b, 8, 8, 3)) * np.arange(1, 2 * b + 1)[:, None, None, None]
         ).astype("float32")
    y = np.eye(3, dtype="float32")[np.arange(2 * b) % 3]

    def gn_pn():
        return tfpn.models.cifar_resnet(8, 1, norm="gn+pn", norm_kwargs={{"groups": 4}},
                                        input_shape=(8, 8, 3), num_classes=3,
                                        classifier_activation=None)

    def bn(synchronized):
        return keras.Sequential([
            keras.Input((8, 8, 3)),
            tfpn.BatchNormAct(synchronized=synchronized, momentum=0.0, name="bn"),
            keras.layers.Conv2D(4, 3, use_bias=False, name="conv"),
            keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3, name="dense")])

    def one_step(build, strategy, init=None, per_replica_input=False):
        with strategy.scope():
            keras.utils.set_random_seed(1)
            model = build()
            if init is not None:
                model.set_weights(init)
            model.compile(optimizer=keras.optimizers.SGD(0.5),
                          loss=keras.losses.CategoricalCrossentropy(from_logits=True))
        init = [w.numpy() for w in model.weights]
        source = tf.data.Dataset.from_tensor_slices((x, y))
        if per_replica_input:   # as examples/train.py: per-replica batches from a function
            data = strategy.distribute_datasets_from_function(
                lambda context: source.batch(context.get_per_replica_batch_size(2 * b)))
            model.fit(data, epochs=1, steps_per_epoch=1, verbose=0)
        else:                   # Keras splits each global batch of 2b
            model.fit(source.batch(2 * b), epochs=1, verbose=0, shuffle=False)
        return init, [w.numpy() for w in model.weights]

    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert mirrored.num_replicas_in_sync == 2
    single = tf.distribute.get_strategy()
    out = {{}}
    for name, build in (("gnpn", gn_pn), ("bn_sync", lambda: bn(True)),
                        ("bn_local", lambda: bn(False))):
        init, out[name + "_mirrored"] = one_step(build, mirrored)
        _, out[name + "_single"] = one_step(build, single, init)
        out[name + "_init"] = init
    _, out["gnpn_from_function"] = one_step(gn_pn, mirrored, out["gnpn_init"], True)
    flat = {{f"{{k}}/{{i}}": w for k, v in out.items() if isinstance(v, list)
             for i, w in enumerate(v)}}
    np.savez(sys.argv[1], x=x, **flat)
    print("OK")
""").format(b=BATCH_PER_REPLICA)


@pytest.fixture(scope="module")
def mirrored_results(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("mirrored") / "results.npz")
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, path], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-4000:]
    results = {}
    with np.load(path) as saved:
        for key in sorted(saved.files, key=lambda k: (k.split("/")[0], int(k.split("/")[-1])
                                                       if "/" in k else 0)):
            name, _, index = key.partition("/")
            if index:
                results.setdefault(name, []).append(saved[key])
            else:
                results[name] = saved[key]
    return results


def _max_diff(a, b):
    return max(float(np.max(np.abs(u - v))) for u, v in zip(a, b))


@pytest.mark.slow
def test_gn_pn_two_replicas_of_b_equal_one_device_with_2b(mirrored_results):
    r = mirrored_results
    assert _max_diff(r["gnpn_mirrored"], r["gnpn_single"]) < ATOL
    assert _max_diff(r["gnpn_from_function"], r["gnpn_single"]) < ATOL
    # The step moved the weights far more than the tolerance.
    assert _max_diff(r["gnpn_single"], r["gnpn_init"]) > 1e3 * ATOL


@pytest.mark.slow
def test_synchronized_bn_uses_the_global_batch(mirrored_results):
    r = mirrored_results
    x = r["x"].astype(np.float64)
    names = ["gamma", "beta", "moving_mean", "moving_variance"]
    synced = dict(zip(names, r["bn_sync_mirrored"][:4]))
    # momentum=0: the moving statistics are the batch statistics of the one step.
    np.testing.assert_allclose(synced["moving_mean"], x.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(synced["moving_variance"], x.var((0, 1, 2)), rtol=1e-5)
    assert _max_diff(r["bn_sync_mirrored"], r["bn_sync_single"]) < ATOL * 10
    # Without synchronization each replica normalizes with its own half of the batch.
    local = dict(zip(names, r["bn_local_mirrored"][:4]))
    half = x[:BATCH_PER_REPLICA]
    np.testing.assert_allclose(local["moving_mean"], half.mean((0, 1, 2)), rtol=1e-5, atol=1e-6)
    assert _max_diff(r["bn_local_mirrored"], r["bn_local_single"]) > 1e-3


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.mark.slow
def test_two_workers_on_loopback_end_with_identical_weights(tmp_path):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    model_dir = tmp_path / "run"
    args = [sys.executable, os.path.join(ROOT, "examples", "train.py"),
            "--strategy=multi_worker", "--dataset=synthetic", "--depth=8", "--norm=gn+pn",
            '--norm_kwargs={"groups": 4}', "--batch_size=16", "--epochs=1",
            "--steps_per_epoch=3", "--eval_steps=2", "--novalidate", "--verbose=2",
            f"--model_dir={model_dir}"]
    procs = []
    try:
        for index in range(2):
            config = {"cluster": cluster, "task": {"type": "worker", "index": index}}
            env = {**os.environ, "TF_CONFIG": json.dumps(config), "TF_CPP_MIN_LOG_LEVEL": "2"}
            procs.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE,
                                          stderr=subprocess.STDOUT, text=True))
        outputs = [p.communicate(timeout=300)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for p, output in zip(procs, outputs):
        assert p.returncode == 0, output[-4000:]
    assert "2 replica(s)" in outputs[0]
    chief = tf.train.load_checkpoint(str(model_dir / "checkpoints" / "ckpt-1"))
    other = tf.train.load_checkpoint(str(model_dir / "worker_1" / "checkpoints" / "ckpt-1"))
    names = [n for n in chief.get_variable_to_shape_map() if n != "_CHECKPOINTABLE_OBJECT_GRAPH"]
    assert len(names) > 20 and sorted(names) == sorted(
        n for n in other.get_variable_to_shape_map() if n != "_CHECKPOINTABLE_OBJECT_GRAPH")
    for name in names:
        np.testing.assert_array_equal(chief.get_tensor(name), other.get_tensor(name), err_msg=name)
    # The chief (worker 0) writes the outputs; the other worker keeps its own copies apart.
    metrics = json.loads((model_dir / "metrics.json").read_text())
    assert (metrics["replicas"], metrics["optimizer_steps"]) == (2, 3)
    assert list((model_dir / "logs").rglob("events.out.tfevents*"))
    assert sorted(p.name for p in (model_dir / "worker_1").iterdir()) == [
        "checkpoints", "metrics.json"]
    # Training and evaluation metrics are reduced over both workers: the same numbers.
    other_metrics = json.loads((model_dir / "worker_1" / "metrics.json").read_text())
    for key in ("history", "test_loss", "test_accuracy", "optimizer_steps"):
        assert other_metrics[key] == metrics[key], key
