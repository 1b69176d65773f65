"""convert_model(..., calibration_steps=n): calibrated norms refined on the BN model's outputs."""

import keras
import numpy as np
import pytest

from calibration_cases import exact_case, random_resnet, relative_error
import tf_proxynorm as tfpn
from tf_proxynorm._backend import all_layers
from tf_proxynorm.layers.channel_affine import ChannelAffine


@pytest.fixture(scope="module")
def resnet_case():
    model, x = random_resnet(1, 16, 128)
    model.get_layer("stage2_block1_norm1").trainable = False     # a frozen BN stays frozen
    calibrated, _ = tfpn.convert_model(model, "gn+pn", groups=4, calibration_data=x)
    distilled, report = tfpn.convert_model(model, "gn+pn", groups=4, calibration_data=x,
                                           calibration_steps=60)
    return model, calibrated, distilled, report, x


def test_distillation_lowers_the_output_error(resnet_case):
    model, calibrated, distilled, report, x = resnet_case
    before, after = report[-2], report[-1]
    assert before.action.startswith("calibrated on 128 inputs")
    assert after.action.startswith("distilled 60 steps on 128 inputs")
    # Each error is the float64 relative error of the logits on the calibration data.
    assert before.error == pytest.approx(relative_error(calibrated(x), model(x)), rel=1e-3)
    assert after.error == pytest.approx(relative_error(distilled(x), model(x)), rel=1e-3)
    # Random-weight ResNet-8, Gaussian inputs: 0.19 after calibration, 0.14 after 60 steps.
    print(f"logits relative error: calibrated {before.error:.3f}, distilled {after.error:.3f}")
    assert after.error < 0.85 * before.error


def test_distillation_trains_only_what_calibration_set(resnet_case):
    model, calibrated, distilled, _, _ = resnet_case
    changed = set()
    for a, b in zip(all_layers(calibrated), all_layers(distilled)):
        assert a.name == b.name and a.trainable == b.trainable, a.name   # flags restored
        for wa, wb in zip(a.weights, b.weights):
            if not np.array_equal(keras.ops.convert_to_numpy(wa), keras.ops.convert_to_numpy(wb)):
                changed.add(b.name)
    norms = {l.name for l in all_layers(distilled) if isinstance(l, tfpn.GroupNormAct)}
    affines = {l.name for l in all_layers(distilled) if isinstance(l, ChannelAffine)}
    assert changed and changed <= norms | affines, changed - norms - affines
    assert "stage1_block1_norm1" in changed
    assert not distilled.get_layer("stage2_block1_norm1").trainable
    assert all(l.trainable for l in all_layers(distilled) if l.name != "stage2_block1_norm1")
    assert getattr(distilled, "optimizer", None) is None     # the model is not compiled


def test_an_exact_calibration_stays_exact():
    """Where the layer-wise fit already reproduces the BN model (InstanceNorm on images
    whose per-channel statistics are the population's), distillation keeps it."""
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    model, x, held_out = exact_case(rng, 64, 16)
    new, report = tfpn.convert_model(model, "in+pn", calibration_data=x, calibration_steps=40)
    assert report[-2].error < 1e-4
    assert report[-1].error < 1e-3, report[-1].error
    assert relative_error(new(held_out), model(held_out)) < 1e-3


@pytest.mark.parametrize("kwargs, match", [
    ({"calibration_steps": -1}, "Received: calibration_steps=-1"),
    ({"calibration_steps": 2.5}, "Received: calibration_steps=2.5"),
    ({"calibration_steps": True}, "Received: calibration_steps=True"),
    ({"calibration_steps": 10, "calibration_data": None}, "calibration_data=None"),
])
def test_bad_calibration_steps(kwargs, match):
    inputs = keras.Input((4, 4, 3))
    model = keras.Model(inputs, keras.layers.BatchNormalization()(inputs))
    kwargs.setdefault("calibration_data", np.zeros((2, 4, 4, 3), "float32"))
    with pytest.raises(ValueError, match=match):
        tfpn.convert_model(model, "gn+pn", groups=1, **kwargs)


def test_nested_frozen_backbone_is_distilled_and_stays_frozen():
    """A frozen nested backbone (`backbone.trainable = False`, the usual fine-tuning setup):
    distillation trains its norms all the same and gives back the flags as they were."""
    model, x = random_resnet(3, 8, 32, num_classes=3)
    model.trainable = False
    outer = keras.Sequential([keras.Input((8, 8, 3)), model, keras.layers.Dense(2, name="head")],
                             name="outer")
    calibrated, _ = tfpn.convert_model(outer, "gn+pn", groups=4, calibration_data=x)
    new, report = tfpn.convert_model(outer, "gn+pn", groups=4, calibration_data=x,
                                     calibration_steps=10)
    assert report[-1].error < report[-2].error
    inner, inner_calibrated = new.layers[0], calibrated.layers[0]
    assert not inner.trainable and new.trainable and new.get_layer("head").trainable
    gamma = inner.get_layer("stage1_block1_norm1").gamma
    assert not np.array_equal(keras.ops.convert_to_numpy(gamma), keras.ops.convert_to_numpy(
        inner_calibrated.get_layer("stage1_block1_norm1").gamma))
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(new.get_layer("head").kernel),
                                  keras.ops.convert_to_numpy(calibrated.get_layer("head").kernel))
