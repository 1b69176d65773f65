"""Test helpers shared by several test files (here and in `tests/backends`).

Backend-neutral: only `keras`, `keras.ops` and NumPy, so the tests of `tests/backends`
use them on every Keras backend (`tests/backends/backend_helpers.py` keeps what depends
on the backend: the backend's autodiff, `JIT_COMPILE`). Fixtures and the per-layer
`random_params` / `set_params` stay in `conftest.py`.
"""

import gzip
import importlib.util
import pathlib

import keras
import numpy as np

from tf_proxynorm._backend import all_layers
from tf_proxynorm.layers._base import NormActBase

# The values of `conftest.random_params`: `offset + scale * N(0, 1)` for each per-channel
# weight of a norm, in this order.
NORM_WEIGHT_VALUES = (("gamma", 1.0, 0.3), ("beta", 0.0, 0.3), ("proxy_beta", 0.0, 0.2),
                      ("proxy_gamma", 0.0, 0.2))
NORM_WEIGHTS = tuple(name for name, _, _ in NORM_WEIGHT_VALUES)


def randomize_norm_weights(model, rng, types=(NormActBase,), names=NORM_WEIGHTS,
                           bias_std=None, draw_all=False):
    """Gives non-trivial values to the per-channel weights of every norm of `model`.

    Args:
        model: a Keras model; its layers are walked recursively, in order.
        rng: a `np.random.Generator`; one draw per weight set, in the order of
            `NORM_WEIGHT_VALUES`, so a weight that a layer lacks (`center=False`, no proxy)
            draws nothing, unless `draw_all`.
        types: the layer classes that count as norms (their weights `gamma`, `beta`,
            `proxy_beta`, `proxy_gamma`, those that are not None).
        names: the weights to set (others keep their values, e.g. BN's copies after a
            conversion).
        bias_std: if given, the `bias` of every other layer that has one gets
            `bias_std * N(0, 1)` (biases away from 0 show a misplaced offset).
        draw_all: if True, every norm draws a value for each of `names`, whether it has
            the weight or not (as `conftest.random_params`; the random values some tests
            were written with).
    """
    for layer in all_layers(model):
        if isinstance(layer, types):
            for name, offset, scale in NORM_WEIGHT_VALUES:
                weight = getattr(layer, name, None)
                if name in names and (weight is not None or draw_all):
                    draw = rng.standard_normal(layer.gamma.shape if weight is None else
                                               weight.shape)
                    if weight is not None:
                        weight.assign(offset + scale * draw)
        elif bias_std is not None and getattr(layer, "bias", None) is not None:
            layer.bias.assign(bias_std * rng.standard_normal(layer.bias.shape))


def as_float64(x):
    """`x` (NumPy, a Python number or list, or a tensor of the running backend) as float64
    NumPy."""
    if keras.ops.is_tensor(x):
        x = keras.ops.convert_to_numpy(x)
    return np.asarray(x, np.float64)


def assert_close(actual, expected, tol, what):
    """`actual` matches the float64 `expected` to `tol` relative, and to `tol` times
    `max(1, max |expected|)` absolute (over the finite values of `expected`): the error of
    an output rounded to a dtype whose relative precision is `tol`."""
    actual, expected = as_float64(actual), as_float64(expected)
    assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
    finite = expected[np.isfinite(expected)]
    scale = max(1.0, float(np.max(np.abs(finite)))) if finite.size else 1.0
    np.testing.assert_allclose(actual, expected, rtol=tol, atol=tol * scale, err_msg=what)


# IDX element type codes (third byte of the magic number) this writer knows.
_IDX_TYPES = {np.uint8: 0x08, np.int32: 0x0C}


def write_idx(path, array, dtype=np.uint8):
    """Writes `array` as `dtype` (uint8 or int32) in the IDX format of MNIST, from its
    definition (yann.lecun.com/exdb/mnist): 0, 0, type, ndim, big-endian dims, then the
    big-endian values. Gzipped when `path` ends with `.gz`."""
    array = np.asarray(array).astype(dtype)
    header = bytes([0, 0, _IDX_TYPES[array.dtype.type], array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape)
    raw = header + array.astype(array.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(raw)


def load_benchmark(name):
    """The script `benchmarks/<name>.py` as a module (the benchmarks are not a package)."""
    path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
