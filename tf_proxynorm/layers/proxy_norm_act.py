"""Proxy Normalization for the layers that have it: `ProxyNorm` and `ProxyNormAct`.

Only the layers with a "+PN" form (`GroupNormAct`, `LayerNormAct`, `InstanceNormAct`) and
PN-Act alone (`ProxyNormAct`) take the proxy arguments and own `proxy_beta` and
`proxy_gamma`; the other norm layers never see them.
"""

import keras
from keras import ops

from tf_proxynorm.layers._base import AffineActBase
from tf_proxynorm.layers.affine import ChannelWeight
from tf_proxynorm.ops.proxy import NUM_PROXY_SAMPLES, PROXY_EPSILON, proxy_moments


class ProxyNorm:
    """PN-Act's proxy step of a layer with an `AffineAct`: arguments, weights, statistics.

    A component, as `AffineAct` and `MovingStatistics`: the layer creates it in
    `__init__`, calls `build(channels)` after the affine's (the weights `proxy_beta` and
    `proxy_gamma` are created on the layer after `gamma` and `beta`, in that order) and
    passes `statistics()`, the per-channel `(proxy_mean, proxy_inv_std)` (formula in
    `ProxyNormAct`, spec section 3), to `affine.apply`.

    Args:
        affine: the layer's `AffineAct` (its layer, gamma, beta and activation).
        enabled: whether the proxy step is on (`proxy_norm`); off, it owns no weights and
            `statistics()` is `(None, None)`.
        proxy_epsilon: added to the proxy variance (0.03 as in the paper; not negligible).
        {proxy_beta,proxy_gamma}_initializer: defaults zeros.
        {proxy_beta,proxy_gamma}_regularizer: optional; the paper decays only the proxy
            parameters.
        {proxy_beta,proxy_gamma}_constraint: optional.
    """

    def __init__(self, affine, enabled=True, proxy_epsilon=PROXY_EPSILON,
                 proxy_beta_initializer="zeros", proxy_gamma_initializer="zeros",
                 proxy_beta_regularizer=None, proxy_gamma_regularizer=None,
                 proxy_beta_constraint=None, proxy_gamma_constraint=None):
        if enabled and not proxy_epsilon > 0:
            raise ValueError(
                f"`proxy_epsilon` must be > 0. Received: proxy_epsilon={proxy_epsilon}")
        self._affine = affine
        self.enabled = enabled
        self.epsilon = float(proxy_epsilon)
        self.weights = (
            ChannelWeight("proxy_beta", proxy_beta_initializer, proxy_beta_regularizer,
                          proxy_beta_constraint),
            ChannelWeight("proxy_gamma", proxy_gamma_initializer, proxy_gamma_regularizer,
                          proxy_gamma_constraint))
        affine.layer.proxy_beta = affine.layer.proxy_gamma = None

    def build(self, channels):
        """Creates `proxy_beta` then `proxy_gamma`, `(channels,)`, when enabled."""
        if self.enabled:
            for weight in self.weights:
                weight.build(self._affine.layer, channels)

    def statistics(self):
        """Per-channel `(proxy_mean, proxy_inv_std)` of PN-Act, or `(None, None)`."""
        if not self.enabled:
            return None, None
        layer = self._affine.layer
        mean, var = proxy_moments(layer.gamma, layer.beta, layer.proxy_beta, layer.proxy_gamma,
                                  self._affine.activation_fn, NUM_PROXY_SAMPLES)
        return mean, ops.rsqrt(var + self.epsilon)

    def config(self):
        """The Keras config entries: `proxy_epsilon` and the weights' options."""
        out = {"proxy_epsilon": self.epsilon}
        for weight in self.weights:
            out.update(weight.config())
        return out


def is_proxy_layer(layer):
    """Whether `layer` applies Proxy Normalization (what `fold_for_inference` folds)."""
    proxy = getattr(layer, "proxy", None)
    return isinstance(proxy, ProxyNorm) and proxy.enabled


@keras.saving.register_keras_serializable(package="tf_proxynorm")
class ProxyNormAct(AffineActBase):
    """PN-Act: per-channel affine + activation + Proxy Normalization, no normalization.

    Use it after a layer that already normalizes without an affine (e.g.
    `keras.layers.GroupNormalization(center=False, scale=False)`).

    ```python
    m, v = mean, population variance over the 200 mid-point quantiles Q of N(0, 1) of
           act(gamma * (proxy_beta + (1 + proxy_gamma) * Q) + beta)
    z = (act(gamma * y + beta) - m) / sqrt(v + proxy_epsilon)
    ```

    Args:
        activation, axis, center, scale, proxy_epsilon, initializers, regularizers,
            constraints: as `GroupNormAct`.

    Reference:
        - [Labatie et al., 2021](https://arxiv.org/abs/2106.03743).
    """

    # tf_proxynorm 0.x wrote `proxy_norm: True` (the only value it took).
    _dropped_config_keys = ("proxy_norm",)
    proxy_norm = True     # always on (`is_proxy_layer`)

    def __init__(self, activation="relu", axis=-1, proxy_epsilon=PROXY_EPSILON,
                 proxy_beta_initializer="zeros", proxy_gamma_initializer="zeros",
                 proxy_beta_regularizer=None, proxy_gamma_regularizer=None,
                 proxy_beta_constraint=None, proxy_gamma_constraint=None, **kwargs):
        super().__init__(activation=activation, axis=axis, **kwargs)
        self.proxy = ProxyNorm(
            self.affine, proxy_epsilon=proxy_epsilon,
            proxy_beta_initializer=proxy_beta_initializer,
            proxy_gamma_initializer=proxy_gamma_initializer,
            proxy_beta_regularizer=proxy_beta_regularizer,
            proxy_gamma_regularizer=proxy_gamma_regularizer,
            proxy_beta_constraint=proxy_beta_constraint,
            proxy_gamma_constraint=proxy_gamma_constraint)

    @property
    def proxy_epsilon(self):
        return self.proxy.epsilon

    def proxy_statistics(self):
        """Per-channel `(proxy_mean, proxy_inv_std)` of the proxy step."""
        return self.proxy.statistics()

    def build(self, input_shape):
        super().build(input_shape)
        self.proxy.build(self._channels(input_shape)[1])

    def _normalize_act(self, inputs, training, mask=None):
        # Elementwise: a mask changes nothing here; `compute_mask` passes it on.
        proxy_mean, proxy_inv_std = self.proxy.statistics()
        return self.affine.apply(keras.ops.cast(inputs, "float32"), proxy_mean=proxy_mean,
                                 proxy_inv_std=proxy_inv_std)

    def get_config(self):
        return {**super().get_config(), **self.proxy.config()}
