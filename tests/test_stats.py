"""The shared statistics helper: float32 accumulation, large offsets, groups, both layouts."""

import numpy as np
import pytest
import tensorflow as tf

from tf_proxynorm.ops import group_moments, moments


def test_large_mean_keeps_precision(rng):
    x = (1e4 + rng.standard_normal((4, 4096))).astype("float32")
    _, var = moments(tf.constant(x), [1])
    np.testing.assert_allclose(var.numpy(), x.astype(np.float64).var(1), rtol=2e-3)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_inputs_accumulate_in_float32(rng, dtype):
    x = rng.uniform(-6e4, 6e4, (2, 64, 8)).astype("float32")
    xt = tf.cast(tf.constant(x), dtype)
    mean, var = moments(xt, [1, 2])
    assert mean.dtype == tf.float32 and np.isfinite(var.numpy()).all()
    x64 = tf.cast(xt, tf.float64).numpy()
    np.testing.assert_allclose(var.numpy(), x64.var((1, 2)), rtol=1e-4)


def test_variance_never_negative():
    x = tf.fill([3, 100], 0.1)
    _, var = moments(x, [1])
    assert (var.numpy() >= 0).all()


@pytest.mark.parametrize("axis", [-1, 1])
@pytest.mark.parametrize("groups", [1, 2, 6])
def test_group_moments(rng, axis, groups):
    x = rng.standard_normal((3, 5, 4, 6)) + 3.0
    if axis == 1:
        x = x.transpose(0, 3, 1, 2)  # same data, channels first
    mean, var, _ = group_moments(tf.constant(x, tf.float32), axis, groups)
    xl = x if axis == -1 else x.transpose(0, 2, 3, 1)
    g = xl.reshape(3, -1, groups, 6 // groups)
    np.testing.assert_allclose(mean.numpy(), g.mean((1, 3)), rtol=1e-5)
    np.testing.assert_allclose(var.numpy(), g.var((1, 3)), rtol=1e-4)


def test_unknown_batch_and_spatial_sizes_under_xla(rng):
    f = tf.function(lambda x: group_moments(x, -1, 2)[1], jit_compile=True,
                    input_signature=[tf.TensorSpec([None, None, None, 4])])
    x = rng.standard_normal((2, 3, 5, 4)).astype("float32")
    np.testing.assert_allclose(f(x).numpy(), x.reshape(2, -1, 2, 2).var((1, 3)), rtol=1e-5)
