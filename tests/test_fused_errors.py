"""Malformed calls of the raw fused ops raise InvalidArgumentError naming the argument; a
hypothesis fuzz of shapes, attributes and values finds no crash (every call either matches
the float64 reference or raises InvalidArgumentError)."""


import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reference_fused as RF
import tf_proxynorm as tfpn
from conftest import require_fused
from helpers import assert_close
from test_fused_op import TOL, quantize

C = 6


@pytest.fixture(scope="module")
def raw():
    require_fused()
    return tfpn.fused.raw_ops()


def _good():
    """Keyword arguments of a valid forward call on x of shape (2, 3, C)."""
    ones, zeros = np.ones(C, np.float32), np.zeros(C, np.float32)
    return dict(x=np.random.default_rng(0).standard_normal((2, 3, C)).astype(np.float32),
                gamma=ones, beta=zeros, proxy_mean=zeros, proxy_inv_std=ones, groups=2,
                epsilon=1e-3, activation="relu", channels_last=True, use_proxy=True)


FORWARD_ERRORS = [
    ("x rank 1", dict(x=np.ones(C, np.float32)), r"`x` must have rank >= 2.*x\.shape=\[6\]"),
    ("x rank 0", dict(x=np.float32(1.0)), r"`x` must have rank >= 2"),
    ("gamma size", dict(gamma=np.ones(C + 1, np.float32)),
     r"`gamma` must have shape \(6,\).*gamma\.shape=\[7\]"),
    ("gamma rank", dict(gamma=np.ones((1, C), np.float32)), r"`gamma` must have shape \(6,\)"),
    ("beta size", dict(beta=np.ones(2, np.float32)), r"`beta` must have shape"),
    ("proxy_mean size", dict(proxy_mean=np.ones(1, np.float32)), r"`proxy_mean` must have shape"),
    ("proxy_inv_std size", dict(proxy_inv_std=np.ones(0, np.float32)),
     r"`proxy_inv_std` must have shape"),
    ("groups not dividing", dict(groups=4), r"`groups` must divide.*groups=4, channels=6"),
    ("groups > channels", dict(groups=12), r"groups=12"),
    ("groups 0", dict(groups=0), r"attr 'groups' of 0 must be at least minimum 1"),
    ("groups negative", dict(groups=-3), r"attr 'groups' of -3"),
    ("activation", dict(activation="tanh"), r"attr 'activation' of \"tanh\" is not in the list"),
    ("epsilon negative", dict(epsilon=-1e-3),
     r"`epsilon` must be a finite number >= 0.*epsilon=-0\.001"),
    ("epsilon nan", dict(epsilon=float("nan")), r"`epsilon`.*epsilon=nan"),
    ("epsilon inf", dict(epsilon=float("inf")), r"`epsilon`.*epsilon=inf"),
    ("x float64", dict(x=np.ones((2, 3, C))), r"attr 'T' of double is not in the list"),
    ("channels-first groups", dict(channels_last=False), r"`groups` must divide.*channels=3"),
]


@pytest.mark.parametrize("change, match", [c[1:] for c in FORWARD_ERRORS],
                         ids=[c[0] for c in FORWARD_ERRORS])
def test_forward_malformed_eager(raw, change, match):
    with pytest.raises(tf.errors.InvalidArgumentError, match=match):
        raw[0](**{**_good(), **change})


def _good_grad():
    kwargs = _good()
    mean = np.zeros((2, 2), np.float32)
    return dict(dy=kwargs["x"], mean=mean, inv_std=mean + 1, **kwargs)


GRAD_ERRORS = [
    ("dy shape", dict(dy=np.ones((2, 4, C), np.float32)), r"`dy` must have the shape of `x`"),
    ("mean shape", dict(mean=np.zeros((2, 3), np.float32)),
     r"`mean` must have shape \(N, groups\)"),
    ("inv_std shape", dict(inv_std=np.zeros((2,), np.float32)), r"`inv_std` must have shape"),
    ("gamma size", dict(gamma=np.ones(C + 1, np.float32)), r"`gamma` must have shape \(6,\)"),
    ("proxy_inv_std size", dict(proxy_inv_std=np.ones(2, np.float32)), r"`proxy_inv_std`"),
    ("groups not dividing", dict(groups=4, mean=np.zeros((2, 4), np.float32),
                                 inv_std=np.zeros((2, 4), np.float32)), r"`groups` must divide"),
    ("activation", dict(activation="elu"), r"attr 'activation'"),
    ("epsilon", dict(epsilon=-1.0), r"`epsilon`"),
    ("x rank", dict(x=np.ones(C, np.float32), dy=np.ones(C, np.float32)), r"`x` must have rank"),
]


@pytest.mark.parametrize("change, match", [c[1:] for c in GRAD_ERRORS],
                         ids=[c[0] for c in GRAD_ERRORS])
def test_gradient_malformed_eager(raw, change, match):
    with pytest.raises(tf.errors.InvalidArgumentError, match=match):
        raw[1](**{**_good_grad(), **change})


@pytest.mark.parametrize("name, change, match", [
    ("gamma", dict(gamma=np.ones(C + 1, np.float32)), r"`gamma` must have shape"),
    ("groups", dict(groups=4), r"`groups` must divide"),
    ("x", dict(x=np.ones(C, np.float32)), r"rank"),
])
def test_forward_malformed_in_graphs(raw, name, change, match):
    """Static shapes: the shape function rejects the call while tracing (TensorFlow turns
    its InvalidArgument into a ValueError). Unknown shapes: the kernel raises at run time."""
    kwargs = {**_good(), **change}
    names = ("x", "gamma", "beta", "proxy_mean", "proxy_inv_std")
    tensors = [kwargs.pop(k) for k in names]
    call = lambda *t: raw[0](*t, **kwargs)  # noqa: E731
    with pytest.raises(ValueError, match=match):
        tf.function(call)(*tensors)
    dynamic = tf.function(call, input_signature=[tf.TensorSpec(None, tf.float32)] * 5)
    with pytest.raises(tf.errors.InvalidArgumentError, match=match):
        dynamic(*tensors)


# -- fuzz ----------------------------------------------------------------------------------

@st.composite
def calls(draw):
    rank = draw(st.integers(2, 4))
    channels = draw(st.integers(1, 8))
    dims = [draw(st.integers(0, 4)) for _ in range(rank - 1)]
    channels_last = draw(st.booleans())
    shape = dims + [channels] if channels_last else dims[:1] + [channels] + dims[1:]
    dtype = draw(st.sampled_from(["float32", "float16", "bfloat16"]))
    offset = draw(st.sampled_from([0.0, 3.0, 1e4] if dtype == "float32" else [0.0, 3.0]))
    spread = draw(st.sampled_from([1e-2, 1.0, 30.0] if offset < 1e4 else [1.0]))
    param_sizes = [draw(st.sampled_from([channels] * 6 + [channels + 1, max(channels - 1, 0)]))
                   for _ in range(4)]
    return dict(
        shape=shape, dtype=dtype, offset=offset, spread=spread, param_sizes=param_sizes,
        groups=draw(st.integers(-1, 9)), channels_last=channels_last,
        activation=draw(st.sampled_from(list(RF.ACTIVATIONS) + ["tanh"])),
        use_proxy=draw(st.booleans()), epsilon=draw(st.sampled_from([1e-5, 1e-3, 0.5, -1.0])),
        nan=draw(st.booleans()) and np.prod(shape) > 0, seed=draw(st.integers(0, 2**16)))


def _valid(call):
    channels = call["shape"][-1 if call["channels_last"] else 1]
    return (call["groups"] >= 1 and channels % call["groups"] == 0
            and all(s == channels for s in call["param_sizes"])
            and call["activation"] in RF.ACTIVATIONS and call["epsilon"] >= 0)


@settings(max_examples=50, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(call=calls())
def test_fuzz_matches_reference_or_raises_invalid_argument(raw, call):
    rng = np.random.default_rng(call["seed"])
    x = call["offset"] + call["spread"] * rng.standard_normal(call["shape"])
    if call["nan"]:
        x.flat[rng.integers(x.size)] = np.nan
    x_t, x_q = quantize(x, call["dtype"])
    params = [(1.0 + 0.5 * rng.standard_normal(s)).astype(np.float32)
              for s in call["param_sizes"]]
    attrs = {k: call[k] for k in ("groups", "epsilon", "activation", "channels_last",
                                  "use_proxy")}
    dy_t, dy_q = quantize(rng.standard_normal(call["shape"]), call["dtype"])
    if not _valid(call):
        with pytest.raises(tf.errors.InvalidArgumentError):
            raw[0](x_t, *params, **attrs)
        stats = np.zeros((call["shape"][0], max(call["groups"], 1)), np.float32)
        with pytest.raises(tf.errors.InvalidArgumentError):
            raw[1](dy_t, x_t, *params, stats, stats, **attrs)
        return
    tol = TOL[call["dtype"]] * (10 if call["offset"] >= 1e4 else 1)
    y, mean, inv_std = raw[0](x_t, *params, **attrs)
    grads = raw[1](dy_t, x_t, *params, mean, inv_std, **attrs)
    with np.errstate(invalid="ignore", over="ignore"):
        ref_y = RF.forward(x_q, *params, **attrs)[0]
        ref_grads = RF.backward(dy_q, x_q, *params, **attrs)
    assert_close(y, ref_y, tol, "y")
    for name, got, ref in zip(("dx", "dgamma", "dbeta", "dproxy_mean", "dproxy_inv_std"),
                              grads, ref_grads):
        assert_close(got, ref, tol if name == "dx" else max(tol, 1e-4), name)
