"""`ChannelAffine`: a per-channel affine + activation with no normalization."""

import keras
from keras import ops

from tf_proxynorm.layers._base import AffineActBase
from tf_proxynorm.ops.stats import stats_dtype


@keras.saving.register_keras_serializable(package="tf_proxynorm")
class ChannelAffine(AffineActBase):
    """Per-channel `act(gamma * x + beta)`: what remains of a folded layer.

    `fold_for_inference` uses it for PN's output affine where no linear layer can absorb
    it, for a per-channel shift in front of a zero-padded convolution, and for a
    `ProxyNormAct` without its proxy step.

    ```python
    y = act(gamma_c * x + beta_c)
    ```

    Args:
        axis: the channel axis. Defaults to -1.
        scale: whether the layer owns the multiplier `gamma` (initialized to ones).
        center: whether the layer owns the offset `beta` (initialized to zeros).
        activation: activation name or callable (see `tf_proxynorm.ops.activations`).
            Defaults to None (identity).
        {beta,gamma}_initializer, {beta,gamma}_regularizer, {beta,gamma}_constraint:
            as `GroupNormAct`.
        **kwargs: base layer arguments (`name`, `dtype`, `trainable`).

    Call arguments:
        inputs: a tensor with channels on `axis`.
        training: ignored (the layer has no training-specific behavior).
        mask: optional Keras mask, passed on unchanged.

    Returns:
        A tensor of the input's shape in the layer's compute dtype.

    tf_proxynorm 0.x named the arguments `use_scale` / `use_offset` and the weights
    `scale` / `offset`: `from_config` maps the old arguments, and the weights of an old
    `.keras` file load in their order (`gamma`, then `beta`).

    Example:

    >>> layer = ChannelAffine(scale=False)
    >>> layer(np.ones((2, 3), "float32")).shape
    TensorShape([2, 3])
    """

    # The 0.x argument names: `from_config` reads them as today's.
    _renamed_config_keys = {"use_scale": "scale", "use_offset": "center"}

    def __init__(self, axis=-1, scale=True, center=True, activation=None, **kwargs):
        super().__init__(activation=activation, axis=axis, center=center, scale=scale,
                         **kwargs)
        # The weights hold what `fold_for_inference` computes: in the variable dtype
        # (float32, also under mixed precision; float64 under a float64 policy, so that a
        # folded float64 model stays exact).
        self.affine.dtype = stats_dtype(self.variable_dtype)

    @classmethod
    def from_config(cls, config):
        config = {cls._renamed_config_keys.get(k, k): v for k, v in config.items()}
        return super().from_config(config)

    def _normalize_act(self, inputs, training, mask=None):
        # Elementwise: a mask changes nothing here; `compute_mask` passes it on.
        return self.affine.apply(ops.cast(inputs, stats_dtype(self.compute_dtype)))
