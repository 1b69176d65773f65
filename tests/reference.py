"""Float64 NumPy references written from the specs (docs/spec/*.md), independent of the package.

Every test compares the package against these functions (or against a number quoted in a
spec), never against the package itself.
"""

import numpy as np
from scipy.special import erf, ndtri

PROXY_SAMPLES = 200
PROXY_EPSILON = 0.03
LEAKY_SLOPE = 0.2


def act(name, a):
    a = np.asarray(a, np.float64)
    if name in (None, "linear", "identity"):
        return a
    if name == "relu":
        return np.maximum(a, 0.0)
    if name in ("silu", "swish"):
        return a / (1.0 + np.exp(-a))
    if name == "gelu":
        return 0.5 * a * (1.0 + erf(a / np.sqrt(2.0)))
    if name == "leaky_relu":
        return np.where(a >= 0, a, LEAKY_SLOPE * a)
    raise ValueError(name)


def quantiles(n=PROXY_SAMPLES):
    return ndtri((np.arange(n) + 0.5) / n)


def proxy_moments(gamma, beta, proxy_beta, proxy_gamma, activation="relu", n=PROXY_SAMPLES):
    """Spec section 3: mean and population variance of act(gamma*(b~ + (1+g~) q) + beta)."""
    gamma, beta, proxy_beta, proxy_gamma = (np.asarray(v, np.float64) for v in
                                            (gamma, beta, proxy_beta, proxy_gamma))
    q = quantiles(n)[:, None]
    u = act(activation, gamma * (proxy_beta + (1.0 + proxy_gamma) * q) + beta)
    return u.mean(0), u.var(0)


def channel_shape(rank, axis):
    """The shape a per-channel vector takes to broadcast along `axis` of a rank-`rank` tensor."""
    shape = [1] * rank
    shape[axis] = -1
    return shape


def affine_act_proxy(y, gamma, beta, axis, activation, proxy=None, proxy_epsilon=PROXY_EPSILON):
    """PN-Act (spec section 3) or plain affine + activation when `proxy` is None.

    `proxy` is `(proxy_beta, proxy_gamma)`; gamma/beta None mean 1/0.
    """
    y = np.asarray(y, np.float64)
    axis = axis % y.ndim
    c = y.shape[axis]
    gamma = np.ones(c) if gamma is None else np.asarray(gamma, np.float64)
    beta = np.zeros(c) if beta is None else np.asarray(beta, np.float64)
    s = channel_shape(y.ndim, axis)
    h = act(activation, gamma.reshape(s) * y + beta.reshape(s))
    if proxy is None:
        return h
    m, v = proxy_moments(gamma, beta, proxy[0], proxy[1], activation)
    return (h - m.reshape(s)) / np.sqrt(v.reshape(s) + proxy_epsilon)


def group_normalize(x, groups, axis=-1, epsilon=1e-3):
    """Per example, per group of contiguous channels: (x - mean) / sqrt(var + eps)."""
    x = np.asarray(x, np.float64)
    axis = axis % x.ndim
    xm = np.moveaxis(x, axis, -1)  # (N, ..., C)
    n, c = xm.shape[0], xm.shape[-1]
    g = xm.reshape(n, -1, groups, c // groups)
    mean = g.mean(axis=(1, 3), keepdims=True)
    var = g.var(axis=(1, 3), keepdims=True)
    y = ((g - mean) / np.sqrt(var + epsilon)).reshape(xm.shape)
    return np.moveaxis(y, -1, axis)


def group_norm_act(x, groups, axis=-1, epsilon=1e-3, activation="relu", gamma=None, beta=None,
                   proxy=None, proxy_epsilon=PROXY_EPSILON):
    """GN (LN: groups=1, IN: groups=C) -> per-channel affine -> act -> optional PN."""
    y = group_normalize(x, groups, axis, epsilon)
    return affine_act_proxy(y, gamma, beta, axis, activation, proxy, proxy_epsilon)


def batch_norm_act(x, axis=-1, epsilon=1e-3, activation="relu", gamma=None, beta=None,
                   mean=None, var=None):
    """BN with batch statistics (mean/var None) or the given per-channel statistics."""
    x = np.asarray(x, np.float64)
    axis = axis % x.ndim
    red = tuple(a for a in range(x.ndim) if a != axis)
    if mean is None:
        mean, var = x.mean(red), x.var(red)
    s = channel_shape(x.ndim, axis)
    y = (x - np.reshape(mean, s)) / np.sqrt(np.reshape(var, s) + epsilon)
    return affine_act_proxy(y, gamma, beta, axis, activation)
