"""tf_proxynorm: batch-independent normalization that trains like BatchNorm.

Proxy Normalization (Labatie et al., NeurIPS 2021) with LayerNorm / GroupNorm, the other
normalizations of the field, a fused C++/CUDA kernel and an XLA-compilable reference path.

Importing the package never compiles or loads the fused op library: that happens the first
time a layer considers the fused path (see `tf_proxynorm.fused`).
"""

from tf_proxynorm import callbacks, config, fused, layers, models, ops
from tf_proxynorm.fused import fused_op_available
from tf_proxynorm.config import get_implementation, set_implementation, use_implementation
from tf_proxynorm.convert import convert_model
from tf_proxynorm.export import export_saved_model
from tf_proxynorm.fold import fold_for_inference
from tf_proxynorm.layers import (BatchGroupNormalization, BatchNormAct, CBNConv2D,
                                 CrossIterationBatchNormalization, EvoNormB0, EvoNormS0,
                                 GroupNormAct, InferenceGroupNormAct,
                                 InstanceEnhancementBatchNormalization, InstanceNormAct,
                                 LayerNormAct, ProxyNormAct, WSConv2D,
                                 available_norm_acts, conv_norm_layers, get_norm_act_layer,
                                 register_norm_act, resolve_norm_act)
from tf_proxynorm.version import __version__

