"""The moving-statistics contract shared by the five batch-statistics layers
(`tf_proxynorm/layers/moving_statistics.py`), against float64 NumPy batch statistics:
Keras BatchNormalization's `training` / `trainable=False` semantics and update rule."""

import numpy as np
import pytest

import tf_proxynorm as tfpn

SHAPE = (4, 3, 3, 8)
MOMENTUM = 0.7


def _per_channel(x):
    return {"moving_mean": x.mean((0, 1, 2)), "moving_variance": x.var((0, 1, 2))}


def _per_group(x, groups=4):     # BGN, channels-last: contiguous channels per group
    view = x.reshape(x.shape[0], -1, groups, x.shape[-1] // groups)
    return {"moving_mean": view.mean((0, 1, 3)), "moving_variance": view.var((0, 1, 3))}


KERNEL = np.random.default_rng(1).standard_normal((1, 1, 8, 6)).astype("float32")

# name -> (make layer, expected batch statistics of a float64 input)
CASES = {
    "BatchNormAct": (lambda: tfpn.BatchNormAct(momentum=MOMENTUM), _per_channel),
    "IEBN": (lambda: tfpn.InstanceEnhancementBatchNormalization(momentum=MOMENTUM),
             _per_channel),
    "BGN": (lambda: tfpn.BatchGroupNormalization(groups=4, momentum=MOMENTUM), _per_group),
    "EvoNormB0": (lambda: tfpn.EvoNormB0(momentum=MOMENTUM),
                  lambda x: {"moving_variance": x.var((0, 1, 2))}),
    # 1x1 conv: the statistics are those of x @ kernel.
    "CBNConv2D": (lambda: tfpn.CBNConv2D(6, 1, window_size=2, momentum=MOMENTUM),
                  lambda x: _per_channel(x @ KERNEL[0, 0].astype(np.float64))),
}


def _built(name, rng):
    make, stats = CASES[name]
    layer = make()
    layer.build(SHAPE)
    if name == "CBNConv2D":
        layer.kernel.assign(KERNEL)
    initial = {}
    for variable in layer.moving_statistics.variables:
        initial[variable.name] = rng.uniform(0.5, 1.5, variable.shape).astype("float32")
        variable.assign(initial[variable.name])
    return layer, stats, initial


def _moving(layer):
    return {v.name: v.numpy() for v in layer.moving_statistics.variables}


@pytest.mark.parametrize("name", sorted(CASES))
def test_training_call_updates_with_the_batch_statistics(rng, name):
    layer, stats, initial = _built(name, rng)
    x = rng.normal(1.0, 2.0, SHAPE).astype("float32")
    layer(x, training=True)
    batch = stats(x.astype(np.float64))
    assert sorted(_moving(layer)) == sorted(batch)
    for key, value in _moving(layer).items():
        expected = MOMENTUM * initial[key] + (1 - MOMENTUM) * batch[key]
        np.testing.assert_allclose(value, expected, rtol=1e-5, err_msg=key)


@pytest.mark.parametrize("name", sorted(CASES))
def test_inference_frozen_and_probe_calls_change_nothing(rng, name):
    layer, _, initial = _built(name, rng)
    x = rng.normal(1.0, 2.0, SHAPE).astype("float32")
    inference = layer(x, training=False).numpy()
    layer.normalized_output(x, training=True)      # what the callbacks read
    layer.trainable = False                        # Keras: a frozen layer runs in inference
    frozen = layer(x, training=True).numpy()
    for key, value in _moving(layer).items():
        np.testing.assert_array_equal(value, initial[key], err_msg=key)
    np.testing.assert_allclose(frozen, inference, rtol=1e-6, atol=1e-6)


def test_momentum_is_validated():
    with pytest.raises(ValueError, match="Received: momentum=1.5"):
        tfpn.BatchNormAct(momentum=1.5)
