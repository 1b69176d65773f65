"""Shared fixtures: both implementations, dtype policies, seeds."""

import os

import keras
import numpy as np
import pytest
from keras.src.testing import TestCase

import tf_proxynorm as tfpn


def require_fused():
    """Skips the calling test when the fused op library could not be built here; fails it
    instead in CI (CI=true), where the library must build."""
    if not tfpn.fused_op_available():
        message = f"fused op unavailable: {tfpn.fused.unavailable_reason()}"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)


@pytest.fixture(params=["reference", "fused"])
def implementation(request):
    """Runs a test once per implementation (the fused one under `require_fused`)."""
    if request.param == "fused":
        require_fused()
    return request.param


@pytest.fixture
def policy(request):
    """Sets a Keras dtype policy for one test (indirect parametrization) and restores it."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(request.param)
    yield request.param
    keras.config.set_dtype_policy(previous)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="module")
def harness():
    """Keras' own layer-test harness (`keras.src.testing.TestCase.run_layer_test`)."""
    class Harness(TestCase):
        def runTest(self):
            pass

    return Harness()


def random_params(rng, channels, proxy=True):
    """Non-trivial per-channel parameters (float32) for gamma, beta, proxy_beta, proxy_gamma."""
    out = {
        "gamma": 1.0 + 0.3 * rng.standard_normal(channels),
        "beta": 0.3 * rng.standard_normal(channels),
    }
    if proxy:
        out["proxy_beta"] = 0.2 * rng.standard_normal(channels)
        out["proxy_gamma"] = 0.2 * rng.standard_normal(channels)
    return {k: v.astype("float32") for k, v in out.items()}


def set_params(layer, params):
    for name, value in params.items():
        weight = getattr(layer, name, None)
        if weight is not None:
            weight.assign(value)
