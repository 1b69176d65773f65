"""Calibrated conversion (`convert_model(..., calibration_data=...)`) on every backend."""

import keras
import numpy as np
import pytest

from calibration_cases import exact_case, random_resnet, relative_error
import tf_proxynorm as tfpn



def test_calibrated_conversion_reproduces_the_bn_model():
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    model, x, held_out = exact_case(rng, 48, 8)        # moving statistics = the data's
    batches = (x[i:i + 16] for i in range(0, len(x), 16))   # a generator of batches
    new, report = tfpn.convert_model(model, "in+pn", calibration_data=batches)
    errors = {s.old: s.error for s in report if s.error is not None}
    assert set(errors) == {"b1", "b2", "b4", "b5", "exact"}
    assert max(errors.values()) < 1e-4, errors
    assert relative_error(new(held_out), model(held_out)) < 1e-4
    plain, _ = tfpn.convert_model(model, "in+pn")
    assert relative_error(plain(held_out), model(held_out)) > 0.1
    # GN+PN (groups mix channels): not exact, far better than plain conversion.
    gn, gn_report = tfpn.convert_model(model, "gn+pn", groups=2, calibration_data=x)
    gn_plain, _ = tfpn.convert_model(model, "gn+pn", groups=2)
    assert (relative_error(gn(held_out), model(held_out))
            < relative_error(gn_plain(held_out), model(held_out)) / 2)


def test_distillation_lowers_the_output_error():
    model, x = random_resnet(1, 8, 64, num_classes=3)
    new, report = tfpn.convert_model(model, "gn+pn", groups=4, calibration_data=x,
                                     calibration_steps=30)
    assert report[-1].action.startswith("distilled 30 steps")
    assert report[-1].error == pytest.approx(relative_error(new(x), model(x)), rel=1e-3)
    assert report[-1].error < 0.9 * report[-2].error, (report[-2].error, report[-1].error)
    assert all(layer.trainable for layer in new.layers)
