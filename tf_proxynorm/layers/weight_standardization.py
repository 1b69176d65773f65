"""Weight Standardization (WS): a Conv2D whose filters are standardized in every call.

WS is a choice of convolution, not a normalization layer: the "GN+WS" and "LN+WS"
baselines of the Proxy Normalization paper are `WSConv2D` followed by `GroupNormAct` /
`LayerNormAct`. Model builders expose it as a convolution option.
"""

import keras
from keras import ops

from tf_proxynorm.ops.stats import moments

WS_EPSILON = 1e-5


def standardize_kernel(kernel, epsilon=WS_EPSILON):
    """`(W - mean) / (std + epsilon)` per output filter (last axis) of a conv kernel.

    Mean and biased std are taken over all the other axes, `(kh, kw, C_in)` for a Keras
    `Conv2D` kernel, in float32 at least. Gradients flow through the standardization; the
    std of a constant filter has a zero (not NaN) gradient.
    """
    kernel = ops.convert_to_tensor(kernel)
    axes = list(range(len(kernel.shape) - 1))
    mean, var = moments(kernel, axes, keepdims=True)
    positive = var > 0
    safe_var = ops.where(positive, var, ops.ones_like(var))
    std = ops.where(positive, ops.sqrt(safe_var), ops.zeros_like(var))
    return (ops.cast(kernel, mean.dtype) - mean) / (std + epsilon)


@keras.saving.register_keras_serializable(package="tf_proxynorm")
class WSConv2D(keras.layers.Conv2D):
    """2D convolution with Weight Standardization.

    Every call standardizes each output filter of the kernel to mean 0 and std 1 before
    convolving, so the output is invariant to `W_i -> a * W_i + b` (per filter, a > 0).
    Use it before a normalization layer (GN+WS, LN+WS). The kernel variable is kept in
    float32 and standardized in float32 under mixed precision.

    ```python
    W_hat[..., i] = (W[..., i] - mean(W[..., i])) / (std(W[..., i]) + epsilon)
    out = activation(conv2d(x, W_hat) + bias)     # mean/std over (kh, kw, C_in)
    ```

    Args:
        filters, kernel_size, ...: every argument of `keras.layers.Conv2D`.
        epsilon: added to the std of each filter. Defaults to 1e-5.

    Call arguments:
        inputs: a 4D tensor, as `keras.layers.Conv2D`.

    Returns:
        The convolution output in the layer's compute dtype.

    Reference:
        - [Qiao et al., 2019](https://arxiv.org/abs/1903.10520), Micro-Batch Training
          with Batch-Channel Normalization and Weight Standardization.

    Example:

    >>> conv = WSConv2D(16, 3, padding="same", use_bias=False)
    >>> conv(np.random.normal(size=(2, 8, 8, 3))).shape
    TensorShape([2, 8, 8, 16])
    """

    def __init__(self, filters, kernel_size, *args, epsilon=WS_EPSILON, **kwargs):
        super().__init__(filters, kernel_size, *args, **kwargs)
        if not epsilon > 0:
            raise ValueError(f"`epsilon` must be > 0. Received: epsilon={epsilon}")
        self.epsilon = float(epsilon)

    def add_weight(self, *args, **kwargs):
        # The standardization needs the float32 kernel, not its float16 copy.
        if kwargs.get("name") == "kernel":
            kwargs["autocast"] = False
        return super().add_weight(*args, **kwargs)

    @property
    def standardized_kernel(self):
        """The kernel the convolution uses (float32), e.g. to export a plain Conv2D."""
        return standardize_kernel(ops.convert_to_tensor(self.kernel), self.epsilon)

    def convolution_op(self, inputs, kernel):
        kernel = standardize_kernel(kernel, self.epsilon)
        return super().convolution_op(inputs, ops.cast(kernel, inputs.dtype))

    def get_config(self):
        return {**super().get_config(), "epsilon": self.epsilon}
