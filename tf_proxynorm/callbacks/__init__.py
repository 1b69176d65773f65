"""Statistics callbacks: the failure modes of batch-independent normalization and the scale
of activations and gradients, logged to Keras `logs`, TensorBoard, JSON and PNG plots.

- `FailureModeMonitor` / `power_decomposition`: power decomposition of every normalized
  activation (Labatie et al. 2021, Fig. 2): collapse ratio, instance-mean and instance-scale
  variability.
- `GradientScaleMonitor` / `gradient_scale`: activation growth, gradient scale and tails,
  per-example gradient alignment, relative loss after one step, output concentration and
  channel conditioning (Bjorck et al. 2018).

The measurements are `keras.ops` code on the model's own calls: `FailureModeMonitor` and
`power_decomposition` run on every Keras backend (compiled with `tf.function` on
TensorFlow, `jax.jit` on JAX, eagerly on PyTorch); the gradient measurements run on the
TensorFlow and JAX backends.
"""

from tf_proxynorm.callbacks.probe import (LayerProbe, normalized_output,
                                          register_normalized_output)
from tf_proxynorm.callbacks.failure_modes import (FailureModeMonitor, PowerProbe,
                                                  power_decomposition)
from tf_proxynorm.callbacks.grad_scale import GradientScaleMonitor, ScaleProbe, gradient_scale
from tf_proxynorm.callbacks.power import POWER_METRICS, PowerAccumulator, instance_statistics
