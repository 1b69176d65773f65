"""tf_proxynorm: batch-independent normalization that trains like BatchNorm.

Proxy Normalization (Labatie et al., NeurIPS 2021) with LayerNorm / GroupNorm, the other
normalizations of the field, a fused C++/CUDA kernel and an XLA-compilable reference path.
"""

from tf_proxynorm import config, layers, ops
from tf_proxynorm._custom_op import fused_op_available
from tf_proxynorm.config import get_implementation, set_implementation
from tf_proxynorm.layers import (BatchNormAct, GroupNormAct, InstanceNormAct, LayerNormAct,
                                 ProxyNormAct, available_norm_acts, get_norm_act_layer,
                                 register_norm_act, resolve_norm_act)
from tf_proxynorm.version import __version__
