"""Proxy statistics of Proxy Normalization (Labatie et al., NeurIPS 2021).

See `docs/spec/proxy_norm.md` section 3. For each channel c the proxy variable is
`Y~_c = proxy_beta_c + (1 + proxy_gamma_c) * Q` with `Q ~ N(0, 1)`; PN uses the mean and
population variance of `act(gamma_c * Y~_c + beta_c)`, computed deterministically over
the `num_samples` mid-point quantiles of N(0, 1). They depend on parameters only.
"""

import statistics

import numpy as np
from keras import ops

from tf_proxynorm.fused.abi import LEAKY_RELU_SLOPE
from tf_proxynorm.ops import activations

NUM_PROXY_SAMPLES = 200
PROXY_EPSILON = 0.03


# NumPy constants by their arguments. A plain dict, not `functools.lru_cache`: torch.compile
# (TorchDynamo) traces through an lru_cache into the standard library's inverse CDF and
# breaks the graph there; a dict lookup of a constant it keeps in the graph.
_CONSTANTS = {}


def _constant(make, *args):
    key = (make.__name__,) + args
    if key not in _CONSTANTS:
        _CONSTANTS[key] = make(*args)
    return _CONSTANTS[key]


def _quantiles_np(num_samples):
    # The standard library's inverse normal CDF (Wichura's AS241, ~1e-16 relative error).
    inv_cdf = statistics.NormalDist().inv_cdf
    return np.array([inv_cdf((i + 0.5) / num_samples) for i in range(num_samples)],
                    dtype=np.float64)


def _checked_num_samples(num_samples):
    if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) \
            or num_samples < 1:
        raise ValueError("`num_samples` must be a positive int (the number of N(0, 1) "
                         f"quantiles). Received: num_samples={num_samples!r}")
    return int(num_samples)


def gaussian_quantiles(num_samples=NUM_PROXY_SAMPLES, dtype="float32"):
    """The `num_samples` standard-normal quantiles at mid-points, `ndtri((i + 0.5) / n)`."""
    return ops.convert_to_tensor(_constant(_quantiles_np, _checked_num_samples(num_samples)),
                                 dtype=dtype)


# The piecewise-linear activations, name -> (slope below 0, slope above 0).
_PIECEWISE_LINEAR = {"identity": (1.0, 1.0), "relu": (0.0, 1.0),
                     "leaky_relu": (LEAKY_RELU_SLOPE, 1.0)}


def _piecewise_linear_tables(num_samples, slopes):
    """Moments of `w * (a * q + b)` over the quantiles `q`, `w` = the slope at `a * q + b`.

    With `a > 0` and the `k` smallest quantiles below the kink `-b / a`, `w_i` is
    `slopes[0]` for `i < k` and `slopes[1]` otherwise, and over the quantiles
    `mean = a * E[wq] + b * E[w]` and
    `var = a^2 Var(wq) + 2ab Cov(wq, w) + b^2 Var(w)`. This returns those five
    coefficients for every `k` in `0..n`, in float64, shape `(n + 1, 5)`: row `k` holds
    the coefficients of `k` quantiles below the kink.
    """
    q = _constant(_quantiles_np, num_samples)
    n = float(num_samples)
    below = [np.arange(num_samples + 1.0)] + [np.concatenate([[0.0], np.cumsum(q ** p)])
                                              for p in (1, 2)]
    total = [b[-1] for b in below]

    def expect(power_w, power_q):  # E[w^power_w * q^power_q] for every k
        lo, hi = (s ** power_w for s in slopes)
        return (lo * below[power_q] + hi * (total[power_q] - below[power_q])) / n

    e_wq, e_w = expect(1, 1), expect(1, 0)
    return np.stack([e_wq, e_w, expect(2, 2) - e_wq ** 2, expect(2, 1) - e_wq * e_w,
                     expect(2, 0) - e_w ** 2], axis=1)


def _quantiles_below(kink, num_samples):
    """How many of the `n` mid-point quantiles lie at or below `kink`, in closed form.

    `q_i <= t` exactly when `(i + 0.5) / n <= Phi(t)`, so the count is
    `floor(n * Phi(t) + 0.5)`, clipped to `0..n`: a few elementwise ops, where a binary
    search is a loop of gathers (on XLA:CPU a while loop of 8 steps, the costliest part of
    the proxy statistics). float32 rounding of `Phi` moves the count by one only for a
    kink within ~1e-6 of a quantile, where the quantile's term `act(a * q + b)` is ~0 on
    both sides of the kink: the moments are continuous there, and stay exact to float32
    rounding.
    """
    count = ops.floor(activations.normal_cdf(kink) * float(num_samples) + 0.5)
    return ops.cast(ops.clip(count, 0.0, float(num_samples)), "int32")


def _piecewise_linear_moments(scale, shift, slopes, num_samples):
    """The moments of `act(q * scale + shift)` for a piecewise-linear `act` in O(C).

    The same sums over the quantiles as the general path, from prefix sums: the quantiles
    are symmetric, so `scale` enters through `|scale|` only, and the number of quantiles
    below each channel's kink selects one row of tabulated coefficients. The result and
    its gradients are polynomials in `|scale|` and `shift`, so autodiff of any order is
    exact.
    """
    a = ops.abs(scale)
    kink = ops.stop_gradient(-shift / ops.maximum(a, 1e-30))
    tables = ops.convert_to_tensor(_constant(_piecewise_linear_tables, num_samples, slopes),
                                   "float32")
    rows = ops.take(tables, _quantiles_below(kink, num_samples), axis=0)   # (C, 5)
    e_wq, e_w, v_wq, c_wq_w, v_w = ops.unstack(rows, axis=-1)
    mean = a * e_wq + shift * e_w
    var = a * a * v_wq + 2.0 * a * shift * c_wq_w + shift * shift * v_w
    return mean, ops.maximum(var, 0.0)


def proxy_moments(gamma, beta, proxy_beta, proxy_gamma, activation="relu",
                  num_samples=NUM_PROXY_SAMPLES):
    """Per-channel mean and population variance of the activated proxy variable.

    ```python
    q = ndtri((arange(n) + 0.5) / n)                          # (n,)
    u = act(gamma * (proxy_beta + (1 + proxy_gamma) * q[:, None]) + beta)   # (n, C)
    mean, var = mean(u, 0), mean((u - mean)**2, 0)
    ```

    For the piecewise-linear activations (relu, leaky_relu, linear) the same sums come from
    prefix sums over the sorted quantiles, in O(C) instead of O(C n): the proxy
    statistics then cost next to nothing beside the normalization, on every backend.

    Args:
        gamma, beta: the per-channel affine applied before the activation, shape `(C,)`.
            `None` means ones / zeros.
        proxy_beta, proxy_gamma: the proxy distribution parameters, shape `(C,)`.
            `None` means zeros (a standard normal proxy).
        activation: an activation name or callable (see `tf_proxynorm.ops.activations`).
        num_samples: number of quantiles, a positive int (200 in the paper's official
            code).

    Returns:
        `(mean, var)`, float32 tensors of shape `(C,)`. Gradients flow into all four
        parameters.
    """
    num_samples = _checked_num_samples(num_samples)
    params = [p for p in (gamma, beta, proxy_beta, proxy_gamma) if p is not None]
    if not params:
        raise ValueError("proxy_moments needs at least one per-channel parameter.")
    params = [ops.cast(p, "float32") for p in params]
    zeros = ops.zeros_like(params[0])
    as_f32 = lambda p, default: default if p is None else ops.cast(p, "float32")  # noqa: E731
    gamma, beta = as_f32(gamma, zeros + 1.0), as_f32(beta, zeros)
    proxy_beta, proxy_gamma = as_f32(proxy_beta, zeros), as_f32(proxy_gamma, zeros)
    name, fn = activations.get(activation)
    # gamma * (proxy_beta + (1 + proxy_gamma) * q) + beta = q * scale + shift.
    scale = gamma * (1.0 + proxy_gamma)
    shift = gamma * proxy_beta + beta
    if name in _PIECEWISE_LINEAR:
        return _piecewise_linear_moments(scale, shift, _PIECEWISE_LINEAR[name], num_samples)
    # One (n, C) multiply-add of per-channel vectors: the (n, C) work dominates the cost
    # for wide layers.
    q = gaussian_quantiles(num_samples)[:, None]
    u = fn(q * scale + shift)
    mean = ops.mean(u, axis=0)
    var = ops.mean(ops.square(u - mean), axis=0)
    return mean, var
