"""Float64 NumPy references for EvoNorm, CBN, IEBN, BGN and WS, written from
docs/spec/other_methods.md (sections 1-5), independent of the package.

Layouts: `axis` is the channel axis; per-channel vectors have shape (C,).
"""

import math

import numpy as np
from scipy.special import expit

import reference as R


def _channels_last(x, axis):
    return np.moveaxis(np.asarray(x, np.float64), axis % np.ndim(x), -1)


def _back(y, axis):
    return np.moveaxis(y, -1, axis % y.ndim)


def _vec(v, c, default):
    return np.full(c, float(default)) if v is None else np.asarray(v, np.float64)


# ---- 1. EvoNorm --------------------------------------------------------------------------
def official_groups(channels, groups=32):
    """Spec 1: if C is not divisible, the official code lowers G until it divides C."""
    while groups > 1 and channels % groups:
        groups -= 1
    return groups


def evonorm_s0(x, groups, axis=-1, v=None, gamma=None, beta=None, eps=1e-5):
    """out = x * sigmoid(v x) / sqrt(Var_{H,W,C/G}(x) + eps) * gamma + beta."""
    xl = _channels_last(x, axis)
    n, c = xl.shape[0], xl.shape[-1]
    v, gamma, beta = _vec(v, c, 1), _vec(gamma, c, 1), _vec(beta, c, 0)
    grouped = xl.reshape(n, -1, groups, c // groups)
    std = np.sqrt(grouped.var(axis=(1, 3), keepdims=True) + eps)
    std = np.broadcast_to(std, grouped.shape).reshape(xl.shape)
    y = xl * expit(v * xl) / std * gamma + beta
    return _back(y, axis)


def evonorm_b0(x, axis=-1, v=None, gamma=None, beta=None, eps=1e-5, batch_var=None):
    """out = x / max(sqrt(Var_{N,H,W}(x) + eps), v x + sqrt(Var_{H,W}(x) + eps)) * gamma + beta.

    `batch_var` None: the batch's (training); else the moving variance (inference).
    Returns (out, the biased batch variance of x).
    """
    xl = _channels_last(x, axis)
    c = xl.shape[-1]
    v, gamma, beta = _vec(v, c, 1), _vec(gamma, c, 1), _vec(beta, c, 0)
    batch = xl.reshape(-1, c).var(0)
    left = np.sqrt((batch if batch_var is None else np.asarray(batch_var, np.float64)) + eps)
    positions = tuple(range(1, xl.ndim - 1))
    right = v * xl + np.sqrt(xl.var(axis=positions, keepdims=True) + eps)
    y = xl / np.maximum(left, right) * gamma + beta
    return _back(y, axis), batch


# ---- 3. IEBN -----------------------------------------------------------------------------
def iebn(x, axis=-1, w=None, b=None, gamma=None, beta=None, eps=1e-5, mean=None, var=None,
         activation=None):
    """x_hat = BN without affine; a = sigmoid(w mean_HW(x) + b); out = act(x_hat gamma a + beta)."""
    xl = _channels_last(x, axis)
    c = xl.shape[-1]
    w, b, gamma, beta = _vec(w, c, 0), _vec(b, c, -1), _vec(gamma, c, 1), _vec(beta, c, 0)
    flat = xl.reshape(-1, c)
    mean = flat.mean(0) if mean is None else np.asarray(mean, np.float64)
    var = flat.var(0) if var is None else np.asarray(var, np.float64)
    x_hat = (xl - mean) / np.sqrt(var + eps)
    pooled = xl.mean(axis=tuple(range(1, xl.ndim - 1)), keepdims=True)
    gate = expit(w * pooled + b)
    return _back(R.act(activation, x_hat * gamma * gate + beta), axis)


# ---- 4. BGN ------------------------------------------------------------------------------
def bgn(x, groups, axis=-1, gamma=None, beta=None, eps=1e-5, mean=None, var=None,
        activation=None):
    """F (N, C, H, W) -> channel-major flatten -> (N, G, C*H*W/G); statistics over (N, group).

    Returns (out, group means, group variances), statistics of shape (G,).
    """
    xf = np.moveaxis(np.asarray(x, np.float64), axis % np.ndim(x), 1)  # NCHW order
    n, c = xf.shape[:2]
    grouped = xf.reshape(n, groups, -1)
    batch_mean, batch_var = grouped.mean(axis=(0, 2)), grouped.var(axis=(0, 2))
    m = batch_mean if mean is None else np.asarray(mean, np.float64)
    s = batch_var if var is None else np.asarray(var, np.float64)
    y = ((grouped - m[None, :, None]) / np.sqrt(s[None, :, None] + eps)).reshape(xf.shape)
    shape = (1, c) + (1,) * (xf.ndim - 2)
    y = y * _vec(gamma, c, 1).reshape(shape) + _vec(beta, c, 0).reshape(shape)
    return np.moveaxis(R.act(activation, y), 1, axis % np.ndim(x)), batch_mean, batch_var


# ---- 5. WS and a NumPy convolution -------------------------------------------------------
def standardize(kernel, eps=1e-5):
    """Per output filter (last axis): (W - mean) / (std + eps), mean/std over (kh, kw, C_in)."""
    k = np.asarray(kernel, np.float64)
    flat = k.reshape(-1, k.shape[-1])
    return ((flat - flat.mean(0)) / (flat.std(0) + eps)).reshape(k.shape)


def patches(z, kh, kw, stride=1, padding="valid"):
    """im2col of an NHWC input: (N, Ho, Wo, kh*kw*C) in the order of an HWIO kernel."""
    z = np.asarray(z, np.float64)
    n, h, w, c = z.shape
    if padding == "same":
        ho, wo = math.ceil(h / stride), math.ceil(w / stride)
        ph, pw = max((ho - 1) * stride + kh - h, 0), max((wo - 1) * stride + kw - w, 0)
        z = np.pad(z, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    else:
        ho, wo = (h - kh) // stride + 1, (w - kw) // stride + 1
    out = np.empty((n, ho, wo, kh, kw, c))
    for i in range(kh):
        for j in range(kw):
            out[:, :, :, i, j, :] = z[:, i:i + stride * ho:stride, j:j + stride * wo:stride, :]
    return out.reshape(n, ho, wo, kh * kw * c)


def conv2d(z, kernel, stride=1, padding="valid", bias=None):
    kernel = np.asarray(kernel, np.float64)
    p = patches(z, kernel.shape[0], kernel.shape[1], stride, padding)
    y = p @ kernel.reshape(-1, kernel.shape[-1])
    return y if bias is None else y + np.asarray(bias, np.float64)


# ---- 2. CBN ------------------------------------------------------------------------------
def cbn_compensate(entry, kernel, bias, rho):
    """First-order Taylor step of a stored (mu, nu) to the current kernel (and bias)."""
    delta = (np.asarray(kernel, np.float64) - entry["kernel"]).reshape(-1, entry["mu"].size)
    mu = entry["mu"] + rho * (entry["dmu"] * delta).sum(0)
    nu = entry["nu"] + rho * (entry["dnu"] * delta).sum(0)
    if bias is not None:  # d mu / d b = 1, d nu / d b = 2 mu (exact)
        db = np.asarray(bias, np.float64) - entry["bias"]
        mu, nu = mu + rho * db, nu + rho * 2 * entry["mu"] * db
    return mu, nu


def cbn_window(mu, nu, previous):
    """Paper: mu_bar = mean(mu), nu_bar = mean(max(nu, mu^2)), var_bar = nu_bar - mu_bar^2.

    Returns (mu_bar, var_bar, number of entries the max rule changed).
    """
    mus, nus = np.stack([mu] + [p[0] for p in previous]), np.stack([nu] + [p[1] for p in previous])
    clamped = int((nus < mus ** 2).sum())
    mu_bar = mus.mean(0)
    return mu_bar, np.maximum(nus, mus ** 2).mean(0) - mu_bar ** 2, clamped


class CBNReference:
    """Cross-Iteration BN after a conv, step by step (spec section 2).

    Each training step: statistics of x = conv(z, W) + b over (N, H, W); the previous
    `window - 1` post-burn-in steps are compensated with the derivatives stored at their
    own step (d mu_c/dW[..., c] = mean patch, d nu_c/dW[..., c] = 2 mean(x_c patch)); the
    window grows from 1 after `burnin` plain-BN steps. Running statistics: current batch.
    """

    def __init__(self, channels, window=4, rho=1.0, burnin=0, eps=1e-5, momentum=0.9,
                 stride=1, padding="same", groups=1):
        self.window, self.rho, self.burnin = window, rho, burnin
        self.eps, self.momentum = eps, momentum
        self.stride, self.padding, self.groups = stride, padding, groups
        self.buffer = []  # newest first
        self.step = 0
        self.clamped = 0
        self.moving_mean, self.moving_var = np.zeros(channels), np.ones(channels)

    def statistics(self, z, kernel, bias=None):
        """(x, mu, nu, d mu/dW, d nu/dW) of the current batch, x as (M, C) rows."""
        kernel = np.asarray(kernel, np.float64)
        kh, kw, c_in, c = kernel.shape   # c_in per group
        g, per = self.groups, c // self.groups
        p = patches(z, kh, kw, self.stride, self.padding).reshape(-1, kh, kw, g, c_in)
        xs, dmus, dnus = [], [], []
        for j in range(g):   # output channels j * per ... use input channels of group j
            pj = p[:, :, :, j, :].reshape(len(p), -1)
            xj = pj @ kernel[..., j * per:(j + 1) * per].reshape(-1, per)
            if bias is not None:
                xj = xj + np.asarray(bias, np.float64)[j * per:(j + 1) * per]
            xs.append(xj)
            dmus.append(np.repeat(pj.mean(0)[:, None], per, axis=1))
            dnus.append(2.0 * pj.T @ xj / len(p))
        x = np.concatenate(xs, 1)
        return x, x.mean(0), (x ** 2).mean(0), np.concatenate(dmus, 1), np.concatenate(dnus, 1)

    def window_statistics(self, mu, nu, kernel, bias=None):
        previous = [] if self.step < self.burnin else [
            cbn_compensate(e, kernel, bias, self.rho) for e in self.buffer[:self.window - 1]]
        mu_bar, var_bar, clamped = cbn_window(mu, nu, previous)
        return mu_bar, var_bar, clamped

    def train_step(self, z, kernel, bias=None, gamma=None, beta=None, activation=None):
        """One training call; returns the NHWC output."""
        x, mu, nu, dmu, dnu = self.statistics(z, kernel, bias)
        mu_bar, var_bar, clamped = self.window_statistics(mu, nu, kernel, bias)
        self.clamped += clamped
        if self.window > 1 and self.step >= self.burnin:
            self.buffer.insert(0, dict(mu=mu, nu=nu, dmu=dmu, dnu=dnu,
                                       kernel=np.asarray(kernel, np.float64).copy(),
                                       bias=None if bias is None else np.asarray(bias, np.float64)))
        self.step += 1
        self.moving_mean = self.momentum * self.moving_mean + (1 - self.momentum) * mu
        self.moving_var = self.momentum * self.moving_var + (1 - self.momentum) * x.var(0)
        return self._output(z, kernel, x, mu_bar, var_bar, gamma, beta, activation)

    def inference(self, z, kernel, bias=None, gamma=None, beta=None, activation=None):
        x = self.statistics(z, kernel, bias)[0]
        return self._output(z, kernel, x, self.moving_mean, self.moving_var, gamma, beta,
                            activation)

    def _output(self, z, kernel, x, mean, var, gamma, beta, activation):
        c = x.shape[1]
        y = (x - mean) / np.sqrt(var + self.eps) * _vec(gamma, c, 1) + _vec(beta, c, 0)
        n, h, w = np.shape(z)[:3]
        kh, kw = np.shape(kernel)[:2]
        s = self.stride
        if self.padding == "same":
            ho, wo = math.ceil(h / s), math.ceil(w / s)
        else:
            ho, wo = (h - kh) // s + 1, (w - kw) // s + 1
        return R.act(activation, y).reshape(n, ho, wo, c)


def finite_differences(ref_loss, x, params, names=None, h=1e-6):
    """`{name: gradient}` by central finite differences of the float64 scalar
    `ref_loss(x, params)`, for "x" and each of `names` (default: every param)."""
    out = {}
    for target in ["x"] + list(params if names is None else names):
        base = x if target == "x" else params[target]
        numeric = np.zeros(base.shape)
        for idx in np.ndindex(*base.shape):
            hi, lo = base.copy(), base.copy()
            hi[idx] += h
            lo[idx] -= h
            if target == "x":
                numeric[idx] = (ref_loss(hi, params) - ref_loss(lo, params)) / (2 * h)
            else:
                numeric[idx] = (ref_loss(x, {**params, target: hi})
                                - ref_loss(x, {**params, target: lo})) / (2 * h)
        out[target] = numeric
    return out


def assert_matches_finite_differences(grads, names, x, params, ref_loss, h=1e-6):
    """Asserts `grads` (of x, then of `params[name]` for `names`) equal the central finite
    differences of the float64 scalar `ref_loss(x, params)`."""
    numeric = finite_differences(ref_loss, x, params, names, h)
    for target, grad in zip(["x"] + list(names), grads):
        np.testing.assert_allclose(np.asarray(grad), numeric[target], atol=1e-6, rtol=1e-5,
                                   err_msg=target)
