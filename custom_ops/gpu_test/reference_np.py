"""Float64 NumPy reference of the fused op, written from docs/fused_op_contract.md.

Forward and backward of TfProxyNorm>GroupNormAct / GroupNormActGrad on arrays of any rank
>= 2 with the channels on axis -1 (channels_last) or 1. Independent of TensorFlow and of the
kernels; used by run_harness.py (GPU or emulator) and tests/test_gpu_build.py.
"""

import math

import numpy as np

ACTIVATIONS = {"identity": 0, "relu": 1, "silu": 2, "gelu": 3, "leaky_relu": 4}
LEAKY_RELU_SLOPE = 0.2

try:  # vectorized erf when SciPy is there
    from scipy.special import erf as _erf
except ImportError:  # pragma: no cover - exercised only without SciPy
    _erf = np.vectorize(math.erf, otypes=[np.float64])


def act_and_grad(name, a):
    """Returns (act(a), act'(a)) in float64, with the kernels' conventions at a == 0."""
    a = np.asarray(a, np.float64)
    if name == "identity":
        return a, np.ones_like(a)
    if name == "relu":
        return np.where(a < 0, 0.0, a), np.where(a > 0, 1.0, 0.0)
    if name == "leaky_relu":
        return (np.where(a < 0, LEAKY_RELU_SLOPE * a, a),
                np.where(a > 0, 1.0, LEAKY_RELU_SLOPE))
    if name == "silu":
        with np.errstate(over="ignore"):
            s = 1.0 / (1.0 + np.exp(-a))
        return a * s, s * (1.0 + a * (1.0 - s))
    if name == "gelu":
        cdf = 0.5 * (1.0 + _erf(a / math.sqrt(2.0)))
        pdf = np.exp(-0.5 * a * a) / math.sqrt(2.0 * math.pi)
        return a * cdf, cdf + a * pdf
    raise ValueError(f"unknown activation {name!r}")


def to_npc(x, channels_last):
    """Views x as (N, P, C) float64 (a copy when channels_first)."""
    x = np.asarray(x, np.float64)
    if x.ndim < 2:
        raise ValueError("rank must be >= 2")
    if not channels_last:
        x = np.moveaxis(x, 1, -1)
    return x.reshape(x.shape[0], -1, x.shape[-1])


def from_npc(v, shape, channels_last):
    """Inverse of to_npc for an array of the original `shape`."""
    if channels_last:
        return v.reshape(shape)
    moved = (shape[0],) + tuple(shape[2:]) + (shape[1],)
    return np.moveaxis(v.reshape(moved), -1, 1)


def _stats(x3, groups, epsilon):
    n, p, c = x3.shape
    xg = x3.reshape(n, p, groups, c // groups)
    if p * (c // groups) == 0:
        mean = np.zeros((n, groups))
        var = np.zeros((n, groups))
    else:
        mean = xg.mean(axis=(1, 3))
        var = ((xg - mean[:, None, :, None]) ** 2).mean(axis=(1, 3))
    return mean, 1.0 / np.sqrt(var + epsilon)


def _per_channel(v, groups, c):
    """(N, G) -> (N, 1, C) broadcast over the group's channels."""
    return np.repeat(v, c // groups, axis=1)[:, None, :]


def forward(x, gamma, beta, proxy_mean, proxy_inv_std, *, groups, epsilon, activation,
            channels_last=True, use_proxy=False):
    """Returns (y, mean, inv_std, aux) in float64; aux holds a, h for the backward."""
    shape = np.shape(x)
    x3 = to_npc(x, channels_last)
    c = x3.shape[-1]
    if c % groups:
        raise ValueError(f"channels {c} not divisible by groups {groups}")
    mean, inv_std = _stats(x3, groups, epsilon)
    xhat = (x3 - _per_channel(mean, groups, c)) * _per_channel(inv_std, groups, c)
    a = np.asarray(gamma, np.float64) * xhat + np.asarray(beta, np.float64)
    h, _ = act_and_grad(activation, a)
    if use_proxy:
        y = (h - np.asarray(proxy_mean, np.float64)) * np.asarray(proxy_inv_std, np.float64)
    else:
        y = h
    return from_npc(y, shape, channels_last), mean, inv_std, {"a": a, "xhat": xhat}


def backward(dy, x, gamma, beta, proxy_mean, proxy_inv_std, *, groups, epsilon, activation,
             channels_last=True, use_proxy=False, mean=None, inv_std=None):
    """Returns dict(dx, dgamma, dbeta, dproxy_mean, dproxy_inv_std) in float64, plus the
    per-element pre-activation `a` (N, P, C) and per-term magnitudes used to scale
    tolerances (`dx_scale`: |inv_std * dxhat|, `abs_sums`: sums of |terms| per output).

    mean / inv_std default to the float64 statistics of x (as the forward computes them).
    """
    shape = np.shape(x)
    x3 = to_npc(x, channels_last)
    dy3 = to_npc(dy, channels_last)
    n, p, c = x3.shape
    if mean is None or inv_std is None:
        mean, inv_std = _stats(x3, groups, epsilon)
    mean = np.asarray(mean, np.float64).reshape(n, groups)
    inv_std = np.asarray(inv_std, np.float64).reshape(n, groups)
    gamma = np.asarray(gamma, np.float64)
    beta = np.asarray(beta, np.float64)
    istd_c = _per_channel(inv_std, groups, c)
    xhat = (x3 - _per_channel(mean, groups, c)) * istd_c
    a = gamma * xhat + beta
    h, dact = act_and_grad(activation, a)
    if use_proxy:
        pm = np.asarray(proxy_mean, np.float64)
        pinv = np.asarray(proxy_inv_std, np.float64)
        dh = dy3 * pinv
        dproxy_mean = -pinv * dy3.sum(axis=(0, 1))
        dproxy_inv_std = (dy3 * (h - pm)).sum(axis=(0, 1))
        abs_dpm = np.abs(pinv) * np.abs(dy3).sum(axis=(0, 1))
        abs_dpinv = np.abs(dy3 * (h - pm)).sum(axis=(0, 1))
    else:
        dh = dy3
        dproxy_mean = np.zeros(c)
        dproxy_inv_std = np.zeros(c)
        abs_dpm = np.zeros(c)
        abs_dpinv = np.zeros(c)
    da = dh * dact
    dgamma = (da * xhat).sum(axis=(0, 1))
    dbeta = da.sum(axis=(0, 1))
    dxhat = da * gamma
    d = c // groups
    dxg = dxhat.reshape(n, p, groups, d)
    xg = xhat.reshape(n, p, groups, d)
    if p * d == 0:
        m1 = np.zeros((n, groups))
        m2 = np.zeros((n, groups))
    else:
        m1 = dxg.mean(axis=(1, 3))
        m2 = (dxg * xg).mean(axis=(1, 3))
    dx = istd_c * (dxhat - _per_channel(m1, groups, c) - xhat * _per_channel(m2, groups, c))
    return {
        "dx": from_npc(dx, shape, channels_last),
        "dgamma": dgamma,
        "dbeta": dbeta,
        "dproxy_mean": dproxy_mean,
        "dproxy_inv_std": dproxy_inv_std,
        "a": a,
        "dx_scale": from_npc(np.abs(istd_c * dxhat), shape, channels_last),
        "abs_sums": {
            "dgamma": np.abs(da * xhat).sum(axis=(0, 1)),
            "dbeta": np.abs(da).sum(axis=(0, 1)),
            "dproxy_mean": abs_dpm,
            "dproxy_inv_std": abs_dpinv,
        },
    }


# ---------------------------------------------------------------------------------------
# bfloat16 storage helpers (NumPy has no bfloat16): uint16 bit patterns, round to nearest
# even like the kernels.

def float_to_bf16_bits(f):
    u = np.ascontiguousarray(f, np.float32).view(np.uint32).astype(np.uint64)
    nan = (u & 0x7FFFFFFF) > 0x7F800000
    r = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    r[nan] = ((u[nan] >> 16) | 0x40).astype(np.uint16)
    return r


def bf16_bits_to_float(b):
    return (np.asarray(b, np.uint16).astype(np.uint32) << 16).view(np.float32)
