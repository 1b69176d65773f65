"""Instance Enhancement Batch Normalization (IEBN): BatchNorm with a per-example gate."""

import keras
from keras import ops

from tf_proxynorm.layers.affine import ChannelWeight
from tf_proxynorm.layers.norm_act import BatchNormAct
from tf_proxynorm.ops.masked import expand_mask
from tf_proxynorm.ops.stats import channel_axis, moments

IEBN_EPSILON = 1e-5
IEBN_MOMENTUM = 0.9


@keras.saving.register_keras_serializable(package="tf_proxynorm")
class InstanceEnhancementBatchNormalization(BatchNormAct):
    """IEBN: BatchNorm whose scale is gated per example by the input's channel means.

    The BatchNorm part (no affine of its own) uses the batch statistics and updates the
    moving averages when `training=True` and the layer is `trainable`, and the moving
    averages otherwise, exactly as Keras' `BatchNormalization`. The gate is computed per
    example from the mean over the positions of the RAW input (as the official code), in
    training and inference alike. As every `...Normalization` layer (Keras' naming), no
    activation follows by default; the factory name `"iebn"` builds IEBN + ReLU, as
    `"bn"` builds BN + ReLU.

    ```python
    x_hat = (x - mean) / sqrt(var + epsilon)        # batch or moving statistics
    g     = mean of x over the positions            # (batch, channels)
    a     = sigmoid(gate_weight * g + gate_bias)
    out   = act(x_hat * gamma * a + beta)
    ```

    At initialization (`gate_weight = 0`, `gate_bias = -1`) the gate is the constant
    `sigmoid(-1) = 0.2689414`, so the output scale starts at 0.27 rather than 1.

    Args:
        activation: activation applied after the affine. Defaults to None.
        axis: the channel axis.
        momentum: momentum of the moving averages. Defaults to 0.9 (PyTorch's 0.1).
        epsilon: added to the variance. Defaults to 1e-5.
        center, scale: whether the layer owns `beta` / `gamma`.
        synchronized: compute the batch statistics across the replicas of a
            `tf.distribute` strategy.
        {beta,gamma,moving_mean,moving_variance}_initializer: as `BatchNormAct`.
        gate_weight_initializer, gate_bias_initializer: zeros and -1 (a number is a
            constant initializer).
        {beta,gamma,gate_weight,gate_bias}_regularizer, *_constraint: optional.
        **kwargs: base layer arguments (`name`, `dtype`, `trainable`).

    Call arguments:
        inputs: a tensor of rank >= 3 (batch, positions..., channels).
        training: whether to use (and update) the batch statistics.
        mask: optional Keras mask (as `BatchNormAct`): masked entries are left out of
            the batch statistics, the moving averages and the gate's mean over the
            positions (an all-masked example's is 0); every entry is normalized.

    Returns:
        A tensor of the input's shape in the layer's compute dtype.

    Reference:
        - [Liang et al., 2020](https://arxiv.org/abs/1908.04008), Instance Enhancement
          Batch Normalization: an Adaptive Regulator of Batch Noise.

    Example:

    >>> layer = InstanceEnhancementBatchNormalization()
    >>> layer(np.random.normal(size=(4, 8, 8, 16)), training=True).shape
    TensorShape([4, 8, 8, 16])
    """

    def __init__(self, activation=None, axis=-1, momentum=IEBN_MOMENTUM, epsilon=IEBN_EPSILON,
                 gate_weight_initializer="zeros", gate_bias_initializer=-1.0,
                 gate_weight_regularizer=None, gate_bias_regularizer=None,
                 gate_weight_constraint=None, gate_bias_constraint=None, **kwargs):
        super().__init__(activation=activation, axis=axis, momentum=momentum, epsilon=epsilon,
                         **kwargs)
        self._gate = (
            ChannelWeight("gate_weight", _constant(gate_weight_initializer),
                          gate_weight_regularizer, gate_weight_constraint),
            ChannelWeight("gate_bias", _constant(gate_bias_initializer),
                          gate_bias_regularizer, gate_bias_constraint))
        self.gate_weight = self.gate_bias = None

    def build(self, input_shape):
        if len(input_shape) < 3:
            raise ValueError(
                "InstanceEnhancementBatchNormalization pools over positions and expects an "
                f"input of rank >= 3. Received: input_shape={tuple(input_shape)}")
        super().build(input_shape)
        axis, channels = self._channels(input_shape)
        self._broadcast = [1] * len(input_shape)
        self._broadcast[axis] = channels
        for weight in self._gate:
            weight.build(self, channels)

    def _normalize_act(self, inputs, training, mask=None):
        rank = len(inputs.shape)
        axis = channel_axis(rank, self.axis)
        x_hat = self._normalize(inputs, training, update=True, mask=mask)
        if mask is not None:
            mask = expand_mask(mask, tuple(inputs.shape), axis)
        pooled, _ = moments(inputs, [a for a in range(1, rank) if a != axis], keepdims=True,
                            mask=mask)
        weight, bias = (ops.reshape(ops.cast(w, pooled.dtype), self._broadcast)
                        for w in (self.gate_weight, self.gate_bias))
        gate = ops.sigmoid(weight * pooled + bias)
        return self.affine.apply(x_hat * ops.cast(gate, x_hat.dtype))

    def get_config(self):
        config_ = super().get_config()
        for weight in self._gate:
            config_.update(weight.config())
        return config_


def _constant(initializer):
    """Numbers are accepted as constant initializers (`gate_bias_initializer=-1.0`)."""
    if isinstance(initializer, (int, float)) and not isinstance(initializer, bool):
        return keras.initializers.Constant(float(initializer))
    return initializer
