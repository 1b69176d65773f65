"""What Python shares with the compiled library in `custom_ops/`: op names, dtypes and the
activation ids of the op's `activation` attribute.

`KERNEL_ACTIVATIONS` must equal the `Activation` enum of `custom_ops/cc/activations.h`
(tests/test_activation_ids.py parses the header and compares). Never renumber.
"""

OP_NAME = "TfProxyNorm>GroupNormAct"
GRAD_OP_NAME = "TfProxyNorm>GroupNormActGrad"

# name -> id used by the kernels. "gelu" is the exact (erf) GELU, as keras.activations.gelu.
KERNEL_ACTIVATIONS = {"identity": 0, "relu": 1, "silu": 2, "gelu": 3, "leaky_relu": 4}

# Slope of `leaky_relu` in the kernels (keras.activations.leaky_relu's default).
LEAKY_RELU_SLOPE = 0.2

# dtypes of x with a kernel (statistics and parameters are always float32).
KERNEL_DTYPES = ("float32", "float16", "bfloat16")
