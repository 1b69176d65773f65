"""Statistics callbacks: gradient measurements against analytic NumPy values, outputs, fit."""

import json
import math
import os
import re
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import scipy.stats
import tensorflow as tf

import tf_proxynorm as tfpn
from tf_proxynorm.callbacks import (FailureModeMonitor, GradientScaleMonitor, ScaleProbe, _output,
                                    gradient_scale, power_decomposition)
from tf_proxynorm.callbacks.grad_scale import tensor_statistics

ALPHAS = (1e-3, 0.1, 1.0)
# What FailureModeMonitor puts into the Keras logs by default.
FM_HEADLINE = {"fm/collapse_max", "fm/mean_var_min", "fm/scale_var_min"}


def _dense_problem(rng, n=12, d=5, k=3):
    x = rng.standard_normal((n, d)).astype("float32")
    y = rng.standard_normal((n, k)).astype("float32")
    model = keras.Sequential([keras.Input((d,)), keras.layers.Dense(k, name="dense")])
    w = rng.normal(0, 0.7, (d, k)).astype("float32")
    b = rng.normal(0, 0.3, k).astype("float32")
    model.layers[0].kernel.assign(w)
    model.layers[0].bias.assign(b)
    return model, x, y, w.astype(np.float64), b.astype(np.float64)


def _dense_reference(x, y, w, b, alphas):
    """Mean squared error of a dense layer: every measurement in closed form, float64."""
    x, y = x.astype(np.float64), y.astype(np.float64)
    k = y.shape[1]
    loss = lambda w_, b_: np.mean((x @ w_ + b_ - y) ** 2)  # noqa: E731
    r = x @ w + b - y                                          # (N, K) residuals
    gw_b = 2.0 / k * x[:, :, None] * r[:, None, :]             # per-example dL_b/dW
    gb_b = 2.0 / k * r
    gw, gb = gw_b.mean(0), gb_b.mean(0)
    flat = [np.concatenate([gw_b[i].ravel(), gb_b[i]]) for i in range(len(x))]
    align = lambda vs: np.linalg.norm(np.sum(vs, 0)) / sum(np.linalg.norm(v) for v in vs)  # noqa
    pred = x @ w + b
    var = pred.var(0)
    return {
        "loss": loss(w, b),
        "grad_norm": np.linalg.norm(gw), "grad_ratio": np.linalg.norm(gw) / np.linalg.norm(w),
        "grad_max": np.abs(gw).max(),
        "kurtosis": scipy.stats.kurtosis(gw.ravel(), fisher=True, bias=True),
        "alignment_kernel": align([g.ravel() for g in gw_b]),
        "alignment": align(flat),
        "relative_loss": {a: loss(w - a * gw, b - a * gb) / loss(w, b) for a in alphas},
        "abs_mean": np.abs(pred.mean(0)).mean(), "var": var.mean(),
        "conditioning": var.max() / var.mean(),
        "concentration": np.bincount(pred.argmax(1), minlength=k).max() / len(x),
    }


def test_gradient_measurements_match_closed_form(rng):
    model, x, y, w, b = _dense_problem(rng)
    record = gradient_scale(model, x, y, loss="mse", per_example=len(x), alphas=ALPHAS)
    want = _dense_reference(x, y, w, b, ALPHAS)
    kernel, = record["kernels"]
    act, = record["activations"]
    assert kernel["name"] == act["name"] == "dense"
    for key in ("grad_norm", "grad_ratio", "grad_max", "kurtosis"):
        np.testing.assert_allclose(kernel[key], want[key], rtol=1e-4, err_msg=key)
    np.testing.assert_allclose(kernel["alignment"], want["alignment_kernel"], rtol=1e-5)
    np.testing.assert_allclose(record["alignment"], want["alignment"], rtol=1e-5)
    np.testing.assert_allclose(record["loss"], want["loss"], rtol=1e-5)
    for alpha in ALPHAS:
        np.testing.assert_allclose(record["relative_loss"][alpha], want["relative_loss"][alpha],
                                   rtol=1e-4, err_msg=alpha)
    for key in ("abs_mean", "var", "conditioning"):
        np.testing.assert_allclose(act[key], want[key], rtol=1e-5, err_msg=key)
    assert record["concentration"] == pytest.approx(want["concentration"])


def test_per_example_alignment_is_one_for_identical_examples(rng):
    model, x, y, *_ = _dense_problem(rng)
    same_x, same_y = np.repeat(x[:1], 6, 0), np.repeat(y[:1], 6, 0)
    record = gradient_scale(model, same_x, same_y, loss="mse", per_example=6, alphas=())
    assert record["alignment"] == pytest.approx(1.0, abs=1e-6)
    assert "relative_loss" not in record


def test_tail_measures_against_scipy(rng):
    g = rng.standard_normal(4000)
    g[:7] = 40.0                         # seven entries far in the tail
    stats = tensor_statistics(g)
    np.testing.assert_allclose(stats["kurtosis"], scipy.stats.kurtosis(g), rtol=1e-10)
    z = np.abs(g - g.mean()) / g.std()
    assert stats["tail5"] == pytest.approx(np.mean(z > 5)) and stats["tail5"] == 7 / 4000


def _cnn(norm="ln+pn", seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((8, 8, 3))
    h = keras.layers.Conv2D(8, 3, padding="same", name="conv1")(inputs)
    h = tfpn.get_norm_act_layer(norm, name="norm1")(h)
    h = keras.layers.Conv2D(8, 3, padding="same", name="conv2")(h)
    h = tfpn.get_norm_act_layer("bn", name="norm2")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return keras.Model(inputs, keras.layers.Dense(4, name="head")(h))


def _data(rng, n=32):
    return (rng.standard_normal((n, 8, 8, 3)).astype("float32"),
            rng.integers(0, 4, n).astype("int32"))


def _logits_ce(y, logits):
    return keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)


def test_gradient_measurements_match_a_per_example_loop(rng):
    """M2/M3 on a CNN with LN+PN and BN (inference mode) against per-example gradients
    taken one example at a time with a plain GradientTape, reduced in float64 NumPy."""
    model = _cnn()
    x, y = _data(rng, 6)
    record = gradient_scale(model, x, y, loss=_logits_ce, per_example=6, alphas=())
    per_example = []
    for b in range(6):
        with tf.GradientTape() as tape:
            logits = model(x[b:b + 1], training=False)
            loss = tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(y[b:b + 1],
                                                                                 logits))
        per_example.append([g.numpy().astype(np.float64)
                            for g in tape.gradient(loss, model.trainable_variables)])
    paths = [v.path for v in model.trainable_variables]
    align = lambda vs: np.linalg.norm(np.sum(vs, 0)) / sum(np.linalg.norm(v) for v in vs)  # noqa
    assert [k["name"] for k in record["kernels"]] == ["conv1", "conv2", "head"]
    for row in record["kernels"]:
        i = paths.index(f"{row['name']}/kernel")
        gs = [g[i].ravel() for g in per_example]
        full = np.mean(gs, axis=0)           # no batch coupling in inference mode
        w = model.trainable_variables[i].numpy().astype(np.float64)
        np.testing.assert_allclose(row["grad_norm"], np.linalg.norm(full), rtol=1e-4)
        np.testing.assert_allclose(row["grad_ratio"], np.linalg.norm(full) / np.linalg.norm(w),
                                   rtol=1e-4)
        np.testing.assert_allclose(row["grad_max"], np.abs(full).max(), rtol=1e-4)
        np.testing.assert_allclose(row["kurtosis"], scipy.stats.kurtosis(full), rtol=1e-3,
                                   atol=1e-4)
        np.testing.assert_allclose(row["alignment"], align(gs), rtol=1e-4)
    flat = [np.concatenate([g.ravel() for g in example]) for example in per_example]
    np.testing.assert_allclose(record["alignment"], align(flat), rtol=1e-4)
    assert 0.0 < record["alignment"] < 1.0


def _bits(model):
    return [v.numpy().copy().view(np.uint8) for v in model.variables]


def test_relative_loss_probe_restores_weights_bit_identically(rng):
    model = _cnn()
    x, y = _data(rng)
    before = _bits(model)
    probe = ScaleProbe(model, _logits_ce, per_example=4,
                       alphas=(1e-3, 0.37, 3.0))
    record, _ = probe.measure(x, y)
    assert abs(record["relative_loss"][3.0] - 1.0) > 1e-3   # the probe did move the weights
    for a, b in zip(before, _bits(model)):
        np.testing.assert_array_equal(a, b)


def _fit(model, x, y, callbacks, epochs=2, jit_compile=True):
    model.compile(keras.optimizers.SGD(0.05), _logits_ce,
                  jit_compile=jit_compile)
    return model.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, verbose=0,
                     callbacks=callbacks)


@pytest.mark.slow
def test_fit_with_jit_logs_history_writes_files_and_leaves_training_unchanged(rng, tmp_path):
    x, y = _data(rng)
    model, twin = _cnn(), _cnn()
    twin.set_weights(model.get_weights())
    fm = FailureModeMonitor(x[:16], log_dir=tmp_path, batch_size=8)
    gs = GradientScaleMonitor((x[:8], y[:8]), log_dir=tmp_path, per_example=4,
                              log_keys=("grad_ratio",))
    csv_path = tmp_path / "log.csv"
    history = _fit(model, x, y, [fm, gs, keras.callbacks.CSVLogger(str(csv_path))])
    _fit(twin, x, y, [])
    for a, b in zip(model.get_weights(), twin.get_weights()):
        np.testing.assert_array_equal(a, b)

    expected = set(FM_HEADLINE)
    expected |= {"gs/loss", "gs/alignment", "gs/concentration"}
    expected |= {f"gs/rel_loss@{a:g}" for a in (1e-3, 1e-2, 1e-1, 1.0)}
    expected |= {f"gs/{n}/grad_ratio" for n in ("conv1", "conv2", "head")}
    assert set(history.history) == expected | {"loss"}
    assert all(len(v) == 2 and all(np.isfinite(v)) for v in history.history.values())
    header = csv_path.read_text().splitlines()[0].split(",")
    assert expected | {"loss", "epoch"} <= set(header)

    records = json.loads((tmp_path / "failure_modes.json").read_text())["records"]
    assert [r["label"] for r in records] == ["init", "epoch 1", "epoch 2"]
    assert [r["step"] for r in records] == [0, 4, 8]
    last = records[-1]["layers"]
    want = power_decomposition(model, x[:16])
    for got, ref in zip(last, want):
        assert got["name"] == ref["name"]
        np.testing.assert_allclose(got["collapse"], ref["collapse"], rtol=1e-5)
    assert history.history["fm/collapse_max"][-1] == pytest.approx(
        max(layer["collapse"] for layer in last))
    grads = json.loads((tmp_path / "gradient_scale.json").read_text())["records"]
    assert len(grads) == 3 and set(grads[0]["relative_loss"]) == {"0.001", "0.01", "0.1", "1"}
    for name in ("power_plot.png", "depth_profiles.png", "relative_loss.png"):
        assert (tmp_path / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", name
    events = os.listdir(tmp_path / "tensorboard")
    assert len([e for e in events if e.startswith("events.out.tfevents")]) == 2


def test_quick_jit_fit_logs_history(rng):
    x, y = _data(rng, 16)
    gs = GradientScaleMonitor((x[:4], y[:4]), per_example=2, alphas=(0.1,))
    history = _fit(_cnn(), x, y, [FailureModeMonitor(x), gs], epochs=1)
    assert {"fm/collapse_max", "fm/scale_var_min", "gs/alignment", "gs/rel_loss@0.1",
            "loss"} <= set(history.history)
    assert history.history["gs/loss"][0] == pytest.approx(gs.records[-1]["loss"])


def test_failure_mode_monitor_puts_three_headline_scalars_in_the_progress_bar(rng, capsys):
    """Whatever the depth, the Keras logs (progress bar, History, CSVLogger) get the worst
    layer of each failure mode, 3 keys; the per-layer values stay in the records (and the
    JSON file and TensorBoard). Before, a ResNet-8 put 21 keys, ~700 characters, in the
    progress bar line (a ResNet-20 57 keys, ~2,760 characters)."""
    x, y = _data(rng, 8)
    model = tfpn.models.cifar_resnet(8, norm="gn+pn", norm_kwargs={"groups": 4},
                                     input_shape=(8, 8, 3), num_classes=4,
                                     classifier_activation=None)
    monitor = FailureModeMonitor(x, at_train_begin=False)
    model.compile(keras.optimizers.SGD(0.05), _logits_ce, jit_compile=False)
    history = model.fit(x, y, batch_size=8, epochs=1, verbose=1, callbacks=[monitor])
    assert set(history.history) == FM_HEADLINE | {"loss"}
    layers = monitor.records[-1]["layers"]
    assert len(layers) == 7
    assert history.history["fm/collapse_max"][0] == pytest.approx(
        max(layer["collapse"] for layer in layers))
    for metric in ("mean_var", "scale_var"):
        assert history.history[f"fm/{metric}_min"][0] == pytest.approx(
            min(layer[metric] for layer in layers))
    assert monitor.records[-1]["summary"] == {
        key[3:]: pytest.approx(history.history[key][0]) for key in FM_HEADLINE}
    shown = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)   # no ANSI colours
    bar = [line for line in shown.replace("\r", "\n").splitlines() if "fm/" in line]
    assert bar and max(len(line) for line in bar) < 160, bar


def test_failure_mode_monitor_per_layer_keys_in_logs_when_asked(rng):
    """`log_keys=(...)` / "all" add `fm/<layer>/<metric>` to the headline, as before."""
    x, _ = _data(rng, 8)
    monitor = FailureModeMonitor(x, log_keys=("collapse",))
    monitor.set_model(_cnn())
    monitor.on_train_begin()
    logs = {}
    monitor.on_epoch_end(0, logs)
    assert set(logs) == FM_HEADLINE | {"fm/norm1/collapse", "fm/norm2/collapse"}


def test_json_and_plots_are_written(rng, tmp_path):
    x, y = _data(rng, 16)
    fm = FailureModeMonitor(x, log_dir=tmp_path, tensorboard=False, plots=True)
    gs = GradientScaleMonitor((x[:4], y[:4]), log_dir=tmp_path, tensorboard=False, plots=True,
                              per_example=2, alphas=(0.01, 1.0))
    _fit(_cnn(), x, y, [fm, gs], epochs=1, jit_compile=False)
    assert sorted(os.listdir(tmp_path)) == ["depth_profiles.png", "failure_modes.json",
                                            "gradient_scale.json", "power_plot.png",
                                            "relative_loss.png"]
    for path in fm.plot_paths + gs.plot_paths:
        data = open(path, "rb").read()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000, path
    saved = json.loads((tmp_path / "failure_modes.json").read_text())
    assert saved["meta"]["callback"] == "FailureModeMonitor"
    assert [r["label"] for r in saved["records"]] == ["init", "epoch 1"]
    layer = saved["records"][-1]["layers"][1]
    assert layer["name"] == "norm2" and layer["kind"] == "norm"
    assert layer["collapse"] == pytest.approx(fm.records[-1]["layers"][1]["collapse"])
    assert saved["records"][-1]["summary"]["collapse_max"] == pytest.approx(
        max(row["collapse"] for row in saved["records"][-1]["layers"]))
    np.testing.assert_allclose(layer["constant"] + layer["instance_mean"] + layer["within"],
                               layer["power"], rtol=1e-5)
    grads = json.loads((tmp_path / "gradient_scale.json").read_text())["records"][-1]
    assert set(grads["relative_loss"]) == {"0.01", "1"}
    assert [k["name"] for k in grads["kernels"]] == ["conv1", "conv2", "head"]


def test_tensorboard_records_scalars_and_histograms(rng, tmp_path):
    x, y = _data(rng, 16)
    fm = FailureModeMonitor(x, log_dir=tmp_path, plots=False)
    _fit(_cnn(), x, y, [fm], epochs=1, jit_compile=False)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0})
    events.Reload()
    tags = set(events.Tags()["tensors"])
    assert {"fm/norm1/collapse", "fm/norm2/power", "fm/norm1/channel_mean"} | FM_HEADLINE <= tags
    values = [tf.make_ndarray(e.tensor_proto) for e in events.Tensors("fm/norm1/collapse")]
    assert [e.step for e in events.Tensors("fm/norm1/collapse")] == [0, 1]
    assert float(values[-1]) == pytest.approx(fm.records[-1]["layers"][0]["collapse"], rel=1e-6)


def test_works_without_tensorboard_and_matplotlib(rng, tmp_path, monkeypatch):
    monkeypatch.setattr(_output, "tensorboard_available", lambda: False)
    monkeypatch.setattr(_output, "matplotlib_available", lambda: False)
    x, y = _data(rng, 16)
    history = _fit(_cnn(), x, y, [FailureModeMonitor(x, log_dir=tmp_path),
                                  GradientScaleMonitor((x[:4], y[:4]), log_dir=tmp_path)],
                   epochs=1, jit_compile=False)
    assert "fm/collapse_max" in history.history
    assert sorted(os.listdir(tmp_path)) == ["failure_modes.json", "gradient_scale.json"]
    with pytest.raises(ValueError, match="Received: tensorboard=True"):
        _fit(_cnn(), x, y, [FailureModeMonitor(x, log_dir=tmp_path, tensorboard=True)],
             epochs=1, jit_compile=False)


def test_every_n_epochs_logs_nan_between_measurements(rng):
    x, y = _data(rng, 16)
    fm = FailureModeMonitor(x, every_n_epochs=2, at_train_begin=False)
    history = _fit(_cnn(), x, y, [fm], epochs=3, jit_compile=False)
    collapse = history.history["fm/collapse_max"]
    assert np.isfinite(collapse[0]) and math.isnan(collapse[1]) and np.isfinite(collapse[2])
    assert [r["label"] for r in fm.records] == ["epoch 1", "epoch 3"]


def test_every_n_steps(rng, tmp_path):
    x, y = _data(rng, 32)
    gs = GradientScaleMonitor((x[:4], y[:4]), every_n_steps=3, at_train_begin=False,
                              per_example=2, alphas=(0.1,))
    history = _fit(_cnn(), x, y, [gs], epochs=2, jit_compile=False)
    assert [r["step"] for r in gs.records] == [3, 6]
    assert history.history["gs/alignment"][-1] == pytest.approx(gs.records[-1]["alignment"])


@pytest.mark.slow
def test_runs_when_tensorboard_and_matplotlib_cannot_be_imported(tmp_path):
    """A fresh interpreter in which both packages are absent (`import` raises ImportError
    and `importlib.util.find_spec` returns None, as for a package not installed)."""
    script = textwrap.dedent(f"""
        import sys
        sys.modules["tensorboard"] = sys.modules["matplotlib"] = None   # import -> ImportError
        import numpy as np, keras, tensorflow as tf
        import tf_proxynorm as tfpn
        from tf_proxynorm.callbacks import _output
        assert not _output.tensorboard_available() and not _output.matplotlib_available()
        rng = np.random.default_rng(0)
        x = rng.standard_normal((16, 8, 8, 3)).astype("float32")
        y = rng.integers(0, 4, 16)
        inputs = keras.Input((8, 8, 3))
        h = keras.layers.Conv2D(8, 3, padding="same")(inputs)
        h = tfpn.get_norm_act_layer("gn+pn", groups=2, name="norm1")(h)
        h = keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(h))
        model = keras.Model(inputs, h)
        model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        cbs = [tfpn.callbacks.FailureModeMonitor(x, log_dir={str(tmp_path)!r}),
               tfpn.callbacks.GradientScaleMonitor((x[:4], y[:4]), log_dir={str(tmp_path)!r},
                                                   per_example=2)]
        history = model.fit(x, y, batch_size=8, epochs=1, verbose=0, callbacks=cbs)
        assert sys.modules["matplotlib"] is None and sys.modules["tensorboard"] is None
        print(sorted(history.history))
    """)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "'fm/collapse_max'" in out.stdout and "'gs/alignment'" in out.stdout
    assert sorted(os.listdir(tmp_path)) == ["failure_modes.json", "gradient_scale.json"]


@pytest.mark.parametrize("make, match", [
    (lambda x: FailureModeMonitor(x, every_n_epochs=0), "Received: every_n_epochs=0"),
    (lambda x: FailureModeMonitor(x, every_n_epochs=None), "every_n_steps=None"),
    (lambda x: FailureModeMonitor(x, log_keys=("nope",)), "Received: log_keys=\\('nope',\\)"),
    (lambda x: FailureModeMonitor(x, plots=True), "Received: log_dir=None"),
    (lambda x: FailureModeMonitor(x, tensorboard="yes"), "Received: tensorboard='yes'"),
    (lambda x: FailureModeMonitor(x, batch_size=0), "Received: batch_size=0"),
    (lambda x: FailureModeMonitor("abc"), "Received: data of type str"),
    (lambda x: GradientScaleMonitor(x), "Received: data of type ndarray"),
    (lambda x: GradientScaleMonitor((x, x), log_keys="some"), "Received: log_keys='some'"),
])
def test_argument_errors(make, match):
    with pytest.raises(ValueError, match=match):
        make(np.zeros((4, 8, 8, 3), "float32"))


def test_probe_argument_errors(rng):
    model = _cnn()
    with pytest.raises(ValueError, match="Received: loss=None"):
        ScaleProbe(model)
    with pytest.raises(ValueError, match="Received: per_example=-1"):
        ScaleProbe(model, "mse", per_example=-1)
    with pytest.raises(ValueError, match="Received: alphas"):
        ScaleProbe(model, "mse", alphas=(0.0,))


@pytest.mark.slow
def test_mirrored_strategy(tmp_path):
    """Two logical CPU replicas: the probes run outside the replica context."""
    script = textwrap.dedent(f"""
        import json, numpy as np, tensorflow as tf, keras
        cpu = tf.config.list_physical_devices("CPU")[0]
        tf.config.set_logical_device_configuration(
            cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
        import tf_proxynorm as tfpn
        rng = np.random.default_rng(0)
        x = rng.standard_normal((32, 8, 8, 3)).astype("float32")
        y = rng.integers(0, 4, 32)
        strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
        with strategy.scope():
            inputs = keras.Input((8, 8, 3))
            h = keras.layers.Conv2D(8, 3, padding="same")(inputs)
            h = tfpn.get_norm_act_layer("ln+pn", name="norm1")(h)
            h = tfpn.get_norm_act_layer("bn", name="norm2")(h)
            h = keras.layers.Dense(4)(keras.layers.GlobalAveragePooling2D()(h))
            model = keras.Model(inputs, h)
            model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        fm = tfpn.callbacks.FailureModeMonitor(x[:16], log_dir={str(tmp_path)!r})
        gs = tfpn.callbacks.GradientScaleMonitor((x[:8], y[:8]), log_dir={str(tmp_path)!r},
                                                 per_example=2)
        history = model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[fm, gs])
        ref = tfpn.callbacks.power_decomposition(model, x[:16])
        print(json.dumps({{"fm": history.history["fm/collapse_max"][-1],
                          "ref": max(layer["collapse"] for layer in ref),
                          "align": history.history["gs/alignment"][-1]}}))
    """)
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["fm"] == pytest.approx(result["ref"], rel=1e-5)
    assert 0.0 < result["align"] <= 1.0
