"""Models and data of the calibrated-conversion tests (tests/test_convert_calibrate.py,
tests/test_convert_distill.py and tests/backends/test_calibrate_backends.py):
backend-neutral, `keras` and NumPy only."""

import keras
import numpy as np

import tf_proxynorm as tfpn
from tf_proxynorm._backend import all_layers

L = keras.layers


def set_statistics(model, x, rng):
    """Random gamma/beta and moving statistics equal to the statistics of `x`'s batch."""
    for layer in all_layers(model):
        if isinstance(layer, (L.BatchNormalization, tfpn.BatchNormAct)):
            c = layer.gamma.shape[0]
            layer.gamma.assign(1.0 + 0.3 * rng.standard_normal(c))
            layer.beta.assign(0.3 * rng.standard_normal(c))
            if isinstance(layer, tfpn.BatchNormAct):
                layer.moving_statistics.momentum = 0.0
            else:
                layer.momentum = 0.0
    model(x, training=True)


def random_resnet(seed, size, n, num_classes=5, statistics_of=None):
    """`(model, x)`: a BN CIFAR ResNet-8 with random weights on `size`x`size`x3 inputs, `n`
    Gaussian inputs `x`, moving statistics those of `x[:statistics_of]` (all by default)."""
    rng = np.random.default_rng(seed)
    keras.utils.set_random_seed(seed)
    model = tfpn.models.cifar_resnet(8, norm="bn", input_shape=(size, size, 3),
                                     num_classes=num_classes, classifier_activation=None)
    x = rng.standard_normal((n, size, size, 3)).astype("float32")
    set_statistics(model, x[:statistics_of], rng)
    return model, x


def exact_model():
    """A model IN+PN reproduces exactly on spatial permutations of one image (every
    example's per-channel statistics are the population's): 1x1 convs before every BN;
    PN's affine goes into a bias-free 1x1 conv (bias added), a zero-padded 3x3 conv (shift
    layer) and an addition (inverse affine); b5 is a linear BN before the addition."""
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


def exact_case(rng, n, n_held_out):
    """`(model, x, held_out)`: `exact_model()` with moving statistics those of `x`, `n` and
    `n_held_out` spatial permutations of one random 6x6x4 image."""
    base = rng.standard_normal((6, 6, 4)).astype("float32")
    x, held_out = permutations(rng, n, base), permutations(rng, n_held_out, base)
    model = exact_model()
    set_statistics(model, x, rng)
    return model, x, held_out


def permutations(rng, n, base):
    flat = base.reshape(-1, base.shape[-1])
    return np.stack([flat[rng.permutation(len(flat))].reshape(base.shape) for _ in range(n)])


def relative_error(a, b):
    a, b = (np.asarray(keras.ops.convert_to_numpy(t), np.float64) for t in (a, b))
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
