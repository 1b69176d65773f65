"""Functional ops, written in `keras.ops` (every backend; XLA-compilable unless the fused
kernel is chosen).

- `norm_act`: the norm + affine + activation ops; `group_norm_act` dispatches between the
  fused op and `group_norm.group_norm_act_reference`;
- `group_norm`: the reference GroupNorm kernel, with its hand-derived backward;
- `stats`, `masked`, `proxy`, `activations`: statistics, masks, proxy statistics and the
  activations by name.

Importing this package also registers, with TensorFlow, the fused op's second derivative
(`_fused_second_order`).
"""

from tf_proxynorm.ops import _fused_second_order  # noqa: F401 - registers a TF gradient
from tf_proxynorm.ops.activations import FUSED_ACTIVATIONS
from tf_proxynorm.ops.group_norm import group_norm_act_reference
from tf_proxynorm.ops.norm_act import (affine_act_proxy, batch_moments, batch_norm_act,
                                       group_norm_act)
from tf_proxynorm.ops.proxy import (NUM_PROXY_SAMPLES, PROXY_EPSILON, gaussian_quantiles,
                                    proxy_moments)
from tf_proxynorm.ops.stats import group_moments, moments
