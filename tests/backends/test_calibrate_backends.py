"""Calibrated conversion (`convert_model(..., calibration_data=...)`) on every backend."""

import keras
import numpy as np

import tf_proxynorm as tfpn
from backend_helpers import to_numpy

L = keras.layers


def _exact_model():
    """IN+PN reproduces it exactly on spatial permutations of one image: 1x1 convs before
    every BN; PN's affine goes into a bias-free 1x1 conv, a zero-padded 3x3 conv (a shift
    layer in front) and an addition (an inverse ChannelAffine); b5 is linear."""
    x = inputs = keras.Input((6, 6, 4))
    a1 = L.ReLU(name="r1")(L.BatchNormalization(name="b1")(
        L.Conv2D(8, 1, use_bias=False, name="c1")(x)))
    a2 = L.Activation("relu", name="r2")(L.BatchNormalization(name="b2")(
        L.Conv2D(8, 1, use_bias=False, name="c2")(a1)))
    c3 = L.Conv2D(8, 3, padding="same", name="c3")(a2)
    a4 = L.ReLU(name="r4")(L.BatchNormalization(name="b4")(L.Conv2D(8, 1, name="c4")(x)))
    b5 = L.BatchNormalization(name="b5")(L.Conv2D(8, 1, name="c5")(x))
    s = L.Add(name="add")([a4, b5])
    f = L.Concatenate(name="cat")([L.GlobalAveragePooling2D(name="g3")(c3),
                                   L.GlobalAveragePooling2D(name="gs")(s)])
    return keras.Model(inputs, L.Dense(3, name="fc")(f), name="exact")


def _permutations(rng, n, base):
    flat = base.reshape(-1, base.shape[-1])
    return np.stack([flat[rng.permutation(len(flat))].reshape(base.shape) for _ in range(n)])


def _relative_error(a, b):
    a, b = to_numpy(a).astype(np.float64), to_numpy(b).astype(np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def test_calibrated_conversion_reproduces_the_bn_model():
    rng = np.random.default_rng(0)
    keras.utils.set_random_seed(0)
    base = rng.standard_normal((6, 6, 4)).astype("float32")
    x, held_out = _permutations(rng, 48, base), _permutations(rng, 8, base)
    model = _exact_model()
    for layer in model.layers:
        if isinstance(layer, L.BatchNormalization):
            c = layer.gamma.shape[0]
            layer.gamma.assign(1.0 + 0.3 * rng.standard_normal(c))
            layer.beta.assign(0.3 * rng.standard_normal(c))
            layer.momentum = 0.0
    model(x, training=True)              # moving statistics = the data's
    batches = (x[i:i + 16] for i in range(0, len(x), 16))   # a generator of batches
    new, report = tfpn.convert_model(model, "in+pn", calibration_data=batches)
    errors = {s.old: s.error for s in report if s.error is not None}
    assert set(errors) == {"b1", "b2", "b4", "b5", "exact"}
    assert max(errors.values()) < 1e-4, errors
    assert _relative_error(new(held_out), model(held_out)) < 1e-4
    plain, _ = tfpn.convert_model(model, "in+pn")
    assert _relative_error(plain(held_out), model(held_out)) > 0.1
    # GN+PN (groups mix channels): not exact, far better than plain conversion.
    gn, gn_report = tfpn.convert_model(model, "gn+pn", groups=2, calibration_data=x)
    gn_plain, _ = tfpn.convert_model(model, "gn+pn", groups=2)
    assert (_relative_error(gn(held_out), model(held_out))
            < _relative_error(gn_plain(held_out), model(held_out)) / 2)
