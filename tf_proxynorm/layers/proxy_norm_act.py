"""Proxy Normalization for the layers that have it: `ProxyNormMixin` and `ProxyNormAct`.

Only the layers with a "+PN" form (`GroupNormAct`, `LayerNormAct`, `InstanceNormAct`) and
PN-Act alone (`ProxyNormAct`) take the proxy arguments and own `proxy_beta` and
`proxy_gamma`; the other norm layers never see them.
"""

import keras
from keras import ops

from tf_proxynorm.layers._base import AffineActBase, per_channel_options, serialize_options
from tf_proxynorm.ops.proxy import NUM_PROXY_SAMPLES, PROXY_EPSILON, proxy_moments

_PROXY_WEIGHTS = ("proxy_beta", "proxy_gamma")


class ProxyNormMixin:
    """PN-Act's arguments, weights and statistics for an `AffineActBase` layer.

    Put it before the base class (`class GroupNormAct(ProxyNormMixin, _GroupNormAct)`).
    The proxy step (formula in `ProxyNormAct`, spec section 3) is on when
    `self.proxy_norm` is True; the weights `proxy_beta` and `proxy_gamma` are created
    after `gamma` and `beta`, in that order. `proxy_statistics()` returns the per-channel
    `(proxy_mean, proxy_inv_std)` the layer applies after its activation.

    Args:
        proxy_epsilon: added to the proxy variance (0.03 as in the paper; not negligible).
        {proxy_beta,proxy_gamma}_initializer: defaults zeros.
        {proxy_beta,proxy_gamma}_regularizer: optional; the paper decays only the proxy
            parameters.
        {proxy_beta,proxy_gamma}_constraint: optional.
    """

    proxy_norm = True

    def __init__(self, *args, proxy_epsilon=PROXY_EPSILON,
                 proxy_beta_initializer="zeros", proxy_gamma_initializer="zeros",
                 proxy_beta_regularizer=None, proxy_gamma_regularizer=None,
                 proxy_beta_constraint=None, proxy_gamma_constraint=None, **kwargs):
        super().__init__(*args, **kwargs)
        if self.proxy_norm and not proxy_epsilon > 0:
            raise ValueError(
                f"`proxy_epsilon` must be > 0. Received: proxy_epsilon={proxy_epsilon}")
        self.proxy_epsilon = float(proxy_epsilon)
        self._proxy_options = per_channel_options(locals(), _PROXY_WEIGHTS)
        self.proxy_beta = self.proxy_gamma = None

    def build(self, input_shape):
        super().build(input_shape)
        if self.proxy_norm:
            _, channels = self._channels(input_shape)
            self._add_channel_weights(_PROXY_WEIGHTS, channels, self._proxy_options)

    def proxy_statistics(self):
        """Per-channel `(proxy_mean, proxy_inv_std)` of PN-Act, or `(None, None)`."""
        if not self.proxy_norm:
            return None, None
        mean, var = proxy_moments(self.gamma, self.beta, self.proxy_beta, self.proxy_gamma,
                                  self._activation_fn, NUM_PROXY_SAMPLES)
        return mean, ops.rsqrt(var + self.proxy_epsilon)

    def get_config(self):
        return {**super().get_config(), "proxy_epsilon": self.proxy_epsilon,
                **serialize_options(*self._proxy_options)}


def is_proxy_layer(layer):
    """Whether `layer` applies Proxy Normalization (what `fold_for_inference` folds)."""
    return isinstance(layer, ProxyNormMixin) and layer.proxy_norm


@keras.saving.register_keras_serializable(package="tf_proxynorm")
class ProxyNormAct(ProxyNormMixin, AffineActBase):
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

    def __init__(self, activation="relu", axis=-1, **kwargs):
        super().__init__(activation=activation, axis=axis, **kwargs)

    def _normalize_act(self, inputs, training, mask=None):
        # Elementwise: a mask changes nothing here; `compute_mask` passes it on.
        proxy_mean, proxy_inv_std = self.proxy_statistics()
        return self._affine_act(keras.ops.cast(inputs, "float32"), proxy_mean=proxy_mean,
                                proxy_inv_std=proxy_inv_std)
