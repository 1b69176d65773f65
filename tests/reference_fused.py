"""References for the fused op, written from docs/fused_op_contract.md and the specs.

- `forward` / `backward`: float64 NumPy versions of the raw op pair, including the side
  outputs (per-(example, group) mean and inverse std) and every gradient output.
- `layer_tf64`: GroupNorm -> affine -> activation -> proxy normalization written inline in
  TensorFlow float64 ops from docs/spec/proxy_norm.md, so that TF autodiff gives float64
  reference gradients for gamma, beta, proxy_beta and proxy_gamma through the proxy
  statistics. Nothing here imports tf_proxynorm.
"""

import numpy as np
import tensorflow as tf
from scipy.special import erf

from reference import LEAKY_SLOPE, PROXY_EPSILON, act, quantiles

ACTIVATIONS = ("identity", "relu", "silu", "gelu", "leaky_relu")


def act_grad(name, a):
    """d act(a) / da in float64 (relu and leaky_relu: the a > 0 branch at a = 0 is 0/slope)."""
    a = np.asarray(a, np.float64)
    if name == "identity":
        return np.ones_like(a)
    if name == "relu":
        return (a > 0).astype(np.float64)
    if name == "leaky_relu":
        return np.where(a > 0, 1.0, LEAKY_SLOPE)
    if name == "silu":
        s = 1.0 / (1.0 + np.exp(-a))
        return s * (1.0 + a * (1.0 - s))
    if name == "gelu":
        return 0.5 * (1.0 + erf(a / np.sqrt(2.0))) + a * np.exp(-0.5 * a * a) / np.sqrt(2 * np.pi)
    raise ValueError(name)


def _grouped(x, groups, channels_last):
    """(N, ..., C) or (N, C, ...) -> (N, G, C/G, P) float64 view plus the inverse mapping."""
    x = np.asarray(x, np.float64)
    xm = x if channels_last else np.moveaxis(x, 1, -1)
    n, c = xm.shape[0], xm.shape[-1]
    moved_shape = xm.shape
    positions = int(np.prod(xm.shape[1:-1], dtype=np.int64))
    v = np.moveaxis(xm.reshape(n, positions, c), 1, 2).reshape(n, groups, c // groups, positions)

    def back(t):
        t = np.moveaxis(t.reshape(n, c, positions), 1, 2).reshape(moved_shape)
        return t if channels_last else np.moveaxis(t, -1, 1)

    return v, back


def _per_channel(v, groups):
    v = np.asarray(v, np.float64)
    return v.reshape(1, groups, -1, 1)


def forward(x, gamma, beta, proxy_mean, proxy_inv_std, *, groups, epsilon, activation,
            channels_last=True, use_proxy=False):
    """Returns float64 `(y, mean, inv_std)` of TfProxyNorm>GroupNormAct."""
    v, back = _grouped(x, groups, channels_last)
    if v.shape[-1] == 0 or v.shape[2] == 0:
        mean = np.zeros(v.shape[:2])
        var = np.zeros(v.shape[:2])
    else:
        mean = v.mean(axis=(2, 3))
        var = ((v - mean[..., None, None]) ** 2).mean(axis=(2, 3))
    inv_std = 1.0 / np.sqrt(var + epsilon)
    xhat = (v - mean[..., None, None]) * inv_std[..., None, None]
    h = act(activation, _per_channel(gamma, groups) * xhat + _per_channel(beta, groups))
    if use_proxy:
        h = (h - _per_channel(proxy_mean, groups)) * _per_channel(proxy_inv_std, groups)
    return back(h), mean, inv_std


def backward(dy, x, gamma, beta, proxy_mean, proxy_inv_std, *, groups, epsilon, activation,
             channels_last=True, use_proxy=False):
    """Returns float64 `(dx, dgamma, dbeta, dproxy_mean, dproxy_inv_std)` of
    TfProxyNorm>GroupNormActGrad (the contract's formulas, statistics recomputed here)."""
    v, back = _grouped(x, groups, channels_last)
    dyv, _ = _grouped(dy, groups, channels_last)
    c = v.shape[1] * v.shape[2]
    values = v.shape[2] * v.shape[3]
    if values == 0:
        mean = var = np.zeros(v.shape[:2])
    else:
        mean = v.mean(axis=(2, 3))
        var = ((v - mean[..., None, None]) ** 2).mean(axis=(2, 3))
    inv_std = (1.0 / np.sqrt(var + epsilon))[..., None, None]
    xhat = (v - mean[..., None, None]) * inv_std
    a = _per_channel(gamma, groups) * xhat + _per_channel(beta, groups)
    h = act(activation, a)
    red = (0, 3)
    if use_proxy:
        dh = dyv * _per_channel(proxy_inv_std, groups)
        dpm = -np.asarray(proxy_inv_std, np.float64) * dyv.sum(red).reshape(c)
        dpis = (dyv * (h - _per_channel(proxy_mean, groups))).sum(red).reshape(c)
    else:
        dh = dyv
        dpm = dpis = np.zeros(c)
    da = dh * act_grad(activation, a)
    dgamma = (da * xhat).sum(red).reshape(c)
    dbeta = da.sum(red).reshape(c)
    dxhat = da * _per_channel(gamma, groups)
    if values == 0:
        dx = np.zeros_like(v)
    else:
        m1 = dxhat.mean(axis=(2, 3), keepdims=True)
        m2 = (dxhat * xhat).mean(axis=(2, 3), keepdims=True)
        dx = inv_std * (dxhat - m1 - xhat * m2)
    return back(dx), dgamma, dbeta, dpm, dpis


# -- TensorFlow float64 version, for autodiff through the proxy statistics ---------------

def _act_tf(name, a):
    if name == "identity":
        return a
    if name == "relu":
        return tf.maximum(a, tf.zeros_like(a))
    if name == "leaky_relu":
        return tf.where(a >= 0, a, LEAKY_SLOPE * a)
    if name == "silu":
        return a / (1.0 + tf.exp(-a))
    if name == "gelu":
        return 0.5 * a * (1.0 + tf.math.erf(a / np.sqrt(2.0)))
    raise ValueError(name)


def layer_tf64(x, gamma, beta, proxy_beta, proxy_gamma, *, groups, axis, epsilon, activation,
               proxy_epsilon=PROXY_EPSILON):
    """float64 GN -> affine -> act -> optional PN-Act (proxy_beta None: no PN).

    All arguments are float64 tensors (gamma / beta may be None: 1 / 0).
    """
    shape = x.shape.as_list()
    rank = len(shape)
    axis = axis % rank
    perm = [0] + [i for i in range(1, rank) if i != axis] + [axis]
    xm = tf.transpose(x, perm)
    n, c = shape[0], shape[axis]
    positions = int(np.prod([shape[i] for i in perm[1:-1]], dtype=np.int64))
    v = tf.reshape(xm, [n, positions, groups, c // groups])
    mean = tf.reduce_mean(v, axis=[1, 3], keepdims=True)
    var = tf.reduce_mean(tf.square(v - mean), axis=[1, 3], keepdims=True)
    y = tf.reshape((v - mean) / tf.sqrt(var + epsilon), tf.shape(xm))
    gamma = tf.ones([c], tf.float64) if gamma is None else gamma
    beta = tf.zeros([c], tf.float64) if beta is None else beta
    h = _act_tf(activation, gamma * y + beta)
    if proxy_beta is not None:
        q = tf.constant(quantiles(), tf.float64)[:, None]
        u = _act_tf(activation, gamma * (proxy_beta + (1.0 + proxy_gamma) * q) + beta)
        m = tf.reduce_mean(u, axis=0)
        var_u = tf.reduce_mean(tf.square(u - m), axis=0)
        h = (h - m) / tf.sqrt(var_u + proxy_epsilon)
    return tf.transpose(h, np.argsort(perm))
