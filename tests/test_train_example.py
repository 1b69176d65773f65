"""examples/train.py: weight decay on the right variables, the learning-rate schedule, and
an end-to-end run (synthetic data) that checkpoints, resumes, logs and exports."""

import json
import math
import os
import sys
import types

import keras
import numpy as np
import pytest
import tensorflow as tf
from tf_proxynorm._backend import all_layers


sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "examples"))
import train  # noqa: E402


def _cfg(**overrides):
    """The flags' defaults, overridden: what `train.run` receives from absl."""
    values = {f.name: f.default for f in train.FLAGS.get_flags_for_module(train)}
    unknown = set(overrides) - set(values)
    assert not unknown, unknown
    return types.SimpleNamespace(**{**values, **overrides})


def _small_model(cfg):
    info = types.SimpleNamespace(num_classes=3, image_shape=(8, 8, 1), mean=(100.0,),
                                 std=(50.0,))
    return train.build_model(cfg, info)


def _decayed(variable):
    return variable.path.rsplit("/", 1)[-1] in ("kernel", "proxy_beta", "proxy_gamma")


def test_sgd_weight_decay_is_an_l2_loss_on_kernels_and_proxy_parameters_only(rng):
    cfg = _cfg(norm="gn+pn", norm_kwargs='{"groups": 4}', depth=8, weight_decay=0.01)
    model = _small_model(cfg)
    for layer in all_layers(model):
        for name in ("proxy_beta", "proxy_gamma", "gamma", "beta"):
            if getattr(layer, name, None) is not None:   # away from their zero/one init
                getattr(layer, name).assign(rng.standard_normal(getattr(layer, name).shape))
    optimizer = train.make_optimizer(cfg, model, steps_per_epoch=10)
    assert isinstance(optimizer, keras.optimizers.SGD)
    names = {v.path.rsplit("/", 1)[-1] for v in model.trainable_variables}
    assert {"kernel", "proxy_beta", "proxy_gamma", "gamma", "beta", "bias"} <= names
    # SGD's coupled decay (PyTorch's): gradient += wd * w, i.e. a loss wd / 2 * ||w||^2.
    expected = sum(0.5 * 0.01 * np.sum(v.numpy().astype(np.float64) ** 2)
                   for v in model.trainable_variables if _decayed(v))
    np.testing.assert_allclose(float(sum(model.losses)), expected, rtol=1e-5)


def test_adamw_decays_kernels_and_proxy_parameters_only():
    cfg = _cfg(norm="gn+pn", norm_kwargs='{"groups": 4}', depth=8, optimizer="adamw",
               learning_rate=0.1, weight_decay=0.5, lr_schedule="constant")
    model = _small_model(cfg)
    for v in model.trainable_variables:
        v.assign(tf.fill(v.shape, 2.0))
    optimizer = train.make_optimizer(cfg, model, steps_per_epoch=10)
    variables = model.trainable_variables
    # Zero gradients: Adam's step is 0, what moves is the decoupled decay w -= lr * wd * w.
    optimizer.apply([tf.zeros_like(v) for v in variables], variables)
    for v in variables:
        expected = 2.0 * (1 - 0.1 * 0.5) if _decayed(v) else 2.0
        np.testing.assert_allclose(v.numpy(), expected, rtol=1e-6, err_msg=v.path)


def test_learning_rate_schedules():
    warm = train.WarmupSchedule(0.4, total_steps=100, warmup_steps=10, kind="cosine")
    for step, expected in ((0, 0.04), (4, 0.2), (10, 0.4),
                           (55, 0.2 * (1 + math.cos(math.pi * 0.5))), (100, 0.0)):
        np.testing.assert_allclose(float(warm(step)), expected, atol=1e-6)
    steps = train.WarmupSchedule(0.4, total_steps=100, kind="step", boundaries=(50, 75))
    for step, expected in ((0, 0.4), (49, 0.4), (50, 0.04), (80, 0.004)):
        np.testing.assert_allclose(float(steps(step)), expected, rtol=1e-5)
    restored = train.WarmupSchedule.from_config(steps.get_config())
    np.testing.assert_allclose(float(restored(80)), 0.004, rtol=1e-5)


def test_sync_bn_needs_bn():
    with pytest.raises(ValueError, match="Received: norm='gn'"):
        _small_model(_cfg(norm="gn", sync_bn=True))


@pytest.mark.slow
def test_trains_checkpoints_resumes_and_exports(tmp_path):
    model_dir = tmp_path / "run"
    common = dict(dataset="synthetic", depth=8, norm="gn+pn", norm_kwargs='{"groups": 4}',
                  batch_size=32, steps_per_epoch=3, eval_steps=2, verbose=0,
                  learning_rate=0.05, model_dir=str(model_dir))
    model, metrics, test_ds = train.run(_cfg(epochs=2, export_dir=str(tmp_path / "export"),
                                             **common))
    saved = json.loads((model_dir / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(metrics))
    assert (saved["optimizer_steps"], saved["initial_epoch"], saved["test_examples"]) == (6, 0, 64)
    assert len(saved["history"]["loss"]) == 2 and all(map(math.isfinite, saved["history"]["loss"]))
    assert sorted(p.name for p in (model_dir / "checkpoints").glob("*.index")) == [
        "ckpt-1.index", "ckpt-2.index"]
    assert list((model_dir / "logs").rglob("events.out.tfevents*"))
    # The exported SavedModel takes raw pixels and reproduces the trained model's logits.
    images = next(iter(test_ds))[0]
    exported = tf.saved_model.load(str(tmp_path / "export"))
    served = exported.serve(images).numpy()
    np.testing.assert_allclose(served, model.predict(images, verbose=0), rtol=1e-4, atol=1e-4)
    trained = [w.numpy() for w in model.weights]

    # Rerunning the same command finds every epoch done: the weights are the trained ones.
    again, metrics, _ = train.run(_cfg(epochs=2, **common))
    assert (metrics["initial_epoch"], metrics["optimizer_steps"]) == (2, 6)
    for u, v in zip(trained, again.weights):
        np.testing.assert_array_equal(u, v.numpy(), err_msg=v.path)
    # With more epochs it trains from there.
    _, metrics, _ = train.run(_cfg(epochs=3, **common))
    assert (metrics["initial_epoch"], metrics["optimizer_steps"]) == (2, 9)
    assert sorted(p.name for p in (model_dir / "checkpoints").glob("*.index"))[-1] == "ckpt-3.index"
