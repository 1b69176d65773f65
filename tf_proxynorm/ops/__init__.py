"""Functional ops (pure TensorFlow, XLA-compilable unless the fused kernel is chosen)."""

from tf_proxynorm.ops.activations import FUSED_ACTIVATIONS
from tf_proxynorm.ops.norm_act import (affine_act_proxy, batch_moments, batch_norm_act,
                                       group_norm_act, group_norm_act_reference)
from tf_proxynorm.ops.proxy import (NUM_PROXY_SAMPLES, PROXY_EPSILON, gaussian_quantiles,
                                    proxy_moments)
from tf_proxynorm.ops.stats import group_moments, moments
