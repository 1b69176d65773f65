"""PN-Act alone, for inputs that another layer already normalized."""

import keras

from tf_proxynorm.layers._base import NormActBase
from tf_proxynorm.ops import norm_act as norm_act_ops


@keras.saving.register_keras_serializable(package="tf_proxynorm")
class ProxyNormAct(NormActBase):
    """PN-Act: per-channel affine + activation + Proxy Normalization, no normalization.

    Use it after a layer that already normalizes without an affine (e.g.
    `keras.layers.GroupNormalization(center=False, scale=False)`).

    ```python
    m, v = mean, population variance over the 200 mid-point quantiles Q of N(0, 1) of
           act(gamma * (proxy_beta + (1 + proxy_gamma) * Q) + beta)
    z = (act(gamma * y + beta) - m) / sqrt(v + proxy_epsilon)
    ```

    Args:
        activation, axis, proxy_epsilon, center, scale, initializers, regularizers,
            constraints: as `GroupNormAct`.

    Reference:
        - [Labatie et al., 2021](https://arxiv.org/abs/2106.03743).
    """

    def __init__(self, activation="relu", axis=-1, **kwargs):
        if not kwargs.pop("proxy_norm", True):
            raise ValueError("ProxyNormAct always applies proxy normalization. "
                             "Received: proxy_norm=False")
        super().__init__(activation=activation, proxy_norm=True, axis=axis, **kwargs)

    def _normalize_act(self, inputs, training, gamma, beta, proxy_mean, proxy_inv_std):
        return norm_act_ops.affine_act_proxy(
            keras.ops.cast(inputs, "float32"), gamma, beta, axis=self.axis,
            activation=self._act_arg(), proxy_mean=proxy_mean, proxy_inv_std=proxy_inv_std)

    def get_config(self):
        config_ = super().get_config()
        for key in ("epsilon", "implementation"):
            config_.pop(key)
        return config_
