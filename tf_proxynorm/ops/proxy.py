"""Proxy statistics of Proxy Normalization (Labatie et al., NeurIPS 2021).

See `shared/spec/proxy_norm.md` section 3. For each channel c the proxy variable is
`Y~_c = proxy_beta_c + (1 + proxy_gamma_c) * Q` with `Q ~ N(0, 1)`; PN uses the mean and
population variance of `act(gamma_c * Y~_c + beta_c)`, computed deterministically over
the `num_samples` mid-point quantiles of N(0, 1). They depend on parameters only.
"""

import functools
import statistics

import numpy as np
from keras import ops

from tf_proxynorm.ops import activations

NUM_PROXY_SAMPLES = 200
PROXY_EPSILON = 0.03


@functools.lru_cache(maxsize=8)
def _quantiles_np(num_samples):
    # The standard library's inverse normal CDF (Wichura's AS241, ~1e-16 relative error).
    inv_cdf = statistics.NormalDist().inv_cdf
    return np.array([inv_cdf((i + 0.5) / num_samples) for i in range(num_samples)],
                    dtype=np.float64)


def gaussian_quantiles(num_samples=NUM_PROXY_SAMPLES, dtype="float32"):
    """The `num_samples` standard-normal quantiles at mid-points, `ndtri((i + 0.5) / n)`."""
    return ops.convert_to_tensor(_quantiles_np(int(num_samples)), dtype=dtype)


def proxy_moments(gamma, beta, proxy_beta, proxy_gamma, activation="relu",
                  num_samples=NUM_PROXY_SAMPLES):
    """Per-channel mean and population variance of the activated proxy variable.

    ```python
    q = ndtri((arange(n) + 0.5) / n)                          # (n,)
    u = act(gamma * (proxy_beta + (1 + proxy_gamma) * q[:, None]) + beta)   # (n, C)
    mean, var = mean(u, 0), mean((u - mean)**2, 0)
    ```

    Args:
        gamma, beta: the per-channel affine applied before the activation, shape `(C,)`.
            `None` means ones / zeros.
        proxy_beta, proxy_gamma: the proxy distribution parameters, shape `(C,)`.
            `None` means zeros (a standard normal proxy).
        activation: an activation name or callable (see `tf_proxynorm.ops.activations`).
        num_samples: number of quantiles (200 in the paper's official code).

    Returns:
        `(mean, var)`, float32 tensors of shape `(C,)`. Gradients flow into all four
        parameters.
    """
    params = [p for p in (gamma, beta, proxy_beta, proxy_gamma) if p is not None]
    if not params:
        raise ValueError("proxy_moments needs at least one per-channel parameter.")
    params = [ops.cast(p, "float32") for p in params]
    zeros = ops.zeros_like(params[0])
    as_f32 = lambda p, default: default if p is None else ops.cast(p, "float32")  # noqa: E731
    gamma, beta = as_f32(gamma, zeros + 1.0), as_f32(beta, zeros)
    proxy_beta, proxy_gamma = as_f32(proxy_beta, zeros), as_f32(proxy_gamma, zeros)
    _, fn = activations.get(activation)
    q = gaussian_quantiles(num_samples)[:, None]
    # gamma * (proxy_beta + (1 + proxy_gamma) * q) + beta as one (n, C) multiply-add of
    # per-channel vectors: the (n, C) work dominates the cost for wide layers.
    scale = gamma * (1.0 + proxy_gamma)
    shift = gamma * proxy_beta + beta
    u = fn(q * scale + shift)
    mean = ops.mean(u, axis=0)
    var = ops.mean(ops.square(u - mean), axis=0)
    return mean, var
