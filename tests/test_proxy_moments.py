"""Proxy statistics against the numbers of docs/spec/proxy_norm.md section 6 and NumPy."""

import numpy as np
import pytest
import tensorflow as tf

import reference as R
from tf_proxynorm.ops import gaussian_quantiles, proxy_moments


def _moments(act, gamma=1.0, beta=0.0, pb=0.0, pg=0.0):
    c = lambda v: tf.constant([v], tf.float32)  # noqa: E731
    m, v = proxy_moments(c(gamma), c(beta), c(pb), c(pg), act)
    return float(m[0]), float(v[0])


def test_quantiles_equal_ndtri_to_1e12():
    """The library computes the mid-point quantiles without scipy (standard library); they
    equal scipy's ndtri, the spec's definition, to 1e-12."""
    from scipy.special import ndtri

    from tf_proxynorm.ops.proxy import gaussian_quantiles
    for n in (200, 7, 1000):
        q = gaussian_quantiles(n, dtype="float64").numpy()
        expected = ndtri((np.arange(n, dtype=np.float64) + 0.5) / n)
        np.testing.assert_allclose(q, expected, rtol=0, atol=1e-12)
    q = gaussian_quantiles(dtype="float64").numpy()
    assert q.var() == pytest.approx(0.993596, abs=5e-7)
    assert q.max() == pytest.approx(2.807034, abs=5e-7)


def test_quantiles_match_spec():
    q = gaussian_quantiles().numpy().astype(np.float64)
    assert q.shape == (200,)
    assert abs(q.mean()) < 1e-7
    assert q.var() == pytest.approx(0.993596, abs=2e-6)
    assert q.max() == pytest.approx(2.807034, abs=2e-6)
    np.testing.assert_allclose(q, -q[::-1], atol=1e-6)


@pytest.mark.parametrize("act, params, mean, var, scale", [
    ("relu", {}, 0.398451, 0.338035, 1.648373),
    ("swish", {}, 0.206048, 0.310004, 1.714977),
    ("relu", {"gamma": 2.0, "beta": 0.5}, 1.071703, 1.768828, None),
    ("relu", {"gamma": 0.5, "beta": -1.0}, 0.003985, 0.001119, 5.6687),
    ("relu", {"gamma": 1.5, "beta": -0.3, "pg": 0.2, "pb": 0.5}, 0.964533, 1.432750, 0.826827),
])
def test_spec_section6_values(act, params, mean, var, scale):
    m, v = _moments(act, **params)
    assert m == pytest.approx(mean, abs=2e-6)
    assert v == pytest.approx(var, abs=2e-6)
    if scale is not None:
        assert 1.0 / np.sqrt(v + 0.03) == pytest.approx(scale, abs=2e-4)


def test_dmean_dbeta_is_half_at_init():
    beta = tf.Variable([0.0])
    with tf.GradientTape() as tape:
        m, _ = proxy_moments(tf.ones(1), beta, tf.zeros(1), tf.zeros(1), "relu")
    assert float(tape.gradient(m, beta)[0]) == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("act", ["relu", "silu", "gelu", "leaky_relu", "linear"])
def test_against_numpy(rng, act):
    gamma, beta, pb, pg = (rng.normal(s, 0.4, 7).astype("float32") for s in (1, 0, 0, 0))
    m, v = proxy_moments(gamma, beta, pb, pg, act)
    m_ref, v_ref = R.proxy_moments(gamma, beta, pb, pg, act)
    np.testing.assert_allclose(m.numpy(), m_ref, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(v.numpy(), v_ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("act", ["relu", "leaky_relu", "linear"])
def test_piecewise_linear_extremes(act):
    """relu, leaky_relu and linear sum over the quantiles from prefix sums (the count of
    quantiles below each kink in closed form). Over scales 0 and 1e-6..1e2 of either sign,
    and kinks on and between quantiles and one float32 ulp either side of every quantile
    (where the closed-form count may differ by one from a search), they equal the float64
    sums to float32 precision: errors at most 5e-7 of the largest |u| (mean) and of its
    square (variance)."""
    q = R.quantiles()
    mags = [0.0, 1e-6, 1e-3, 0.1, 1.0, 7.0, 100.0]
    signed = np.array(mags + [-m for m in mags[1:]])
    gamma, beta = (g.ravel() for g in np.meshgrid(signed, signed))
    on_kink = -np.concatenate([q[[0, 57, 100, 150, 199]], [q[99:101].mean(), q[170:172].mean()]])
    q32 = q.astype("float32")
    near = -np.concatenate([q32, np.nextafter(q32, np.float32(-np.inf)),
                            np.nextafter(q32, np.float32(np.inf))]).astype(np.float64)
    gamma = np.concatenate([gamma, np.ones(len(near)), np.ones(7), -2.0 * np.ones(7)])
    beta = np.concatenate([beta, near, on_kink, 2.0 * on_kink])
    pb, pg = np.zeros_like(gamma), np.zeros_like(gamma)
    pg[-7:] = 0.25  # the kink through proxy_gamma: scale -2.5, shift 2 * on_kink
    m, v = (t.numpy() for t in proxy_moments(*(p.astype("float32") for p in (gamma, beta, pb, pg)),
                                           act))
    m_ref, v_ref = R.proxy_moments(gamma, beta, pb, pg, act)
    size = np.abs(beta) + np.abs(gamma * (1 + pg)) * q.max()  # the largest |pre-activation|
    assert np.all(np.abs(m - m_ref) <= 5e-7 * size + 1e-30)
    assert np.all(np.abs(v - v_ref) <= 5e-7 * size ** 2 + 1e-30)
    assert np.all(v >= 0)


@pytest.mark.parametrize("act", ["relu", "silu", "gelu", "leaky_relu", "linear"])
@pytest.mark.parametrize("gamma_sign", [1, -1])
def test_gradients_into_all_four_parameters(rng, act, gamma_sign):
    """Theoretical (autodiff) vs numerical Jacobians of (m, v) w.r.t. the four parameters."""
    params = [tf.constant(rng.normal(s, 0.3, 3), tf.float64) for s in (gamma_sign, 0, 0, 0)]

    def f(g, b, pb, pg):
        m, v = proxy_moments(g, b, pb, pg, act)
        return tf.concat([m, v], 0)

    # proxy_moments computes in float32; compare autodiff with float64 central differences
    # of the float64 NumPy reference.
    theoretical, _ = tf.test.compute_gradient(f, params)
    base = [p.numpy() for p in params]
    for k, jac in enumerate(theoretical):
        num = np.zeros_like(jac)
        for j in range(3):
            hi, lo = [b.copy() for b in base], [b.copy() for b in base]
            hi[k][j] += 1e-6
            lo[k][j] -= 1e-6
            num[:, j] = (np.concatenate(R.proxy_moments(*hi, act))
                         - np.concatenate(R.proxy_moments(*lo, act))) / 2e-6
        np.testing.assert_allclose(jac, num, atol=2e-4, rtol=2e-3)


@pytest.mark.parametrize("num_samples", [0, -3, 2.5, "200", True])
def test_num_samples_must_be_a_positive_int(num_samples):
    """0 quantiles gave NaN moments; floats, strings and bools are not counts."""
    c = tf.constant([1.0])
    with pytest.raises(ValueError, match=r"`num_samples` must be a positive int.*"
                                         rf"Received: num_samples={num_samples!r}"):
        proxy_moments(c, c, c, c, "relu", num_samples=num_samples)
    with pytest.raises(ValueError, match="Received: num_samples="):
        gaussian_quantiles(num_samples)


def test_one_sample_is_the_median():
    """n = 1: the one mid-point quantile is 0, so the proxy is constant act(beta)."""
    m, v = proxy_moments(tf.constant([2.0]), tf.constant([0.5]), None, None, "relu",
                         num_samples=1)
    assert float(m[0]) == pytest.approx(0.5) and float(v[0]) == 0.0
