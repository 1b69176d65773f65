"""Keras layers of tf_proxynorm."""

from tf_proxynorm.layers.factory import (available_norm_acts, get_norm_act_layer,
                                         register_norm_act, resolve_norm_act)
from tf_proxynorm.layers.affine import AffineAct, ChannelWeight
from tf_proxynorm.layers.channel_affine import ChannelAffine
from tf_proxynorm.layers.moving_statistics import MovingStatistics
from tf_proxynorm.layers.norm_act import (BatchNormAct, GroupNormAct, InstanceNormAct,
                                          LayerNormAct, ShiftedGroupNormAct)
from tf_proxynorm.layers.proxy_norm_act import ProxyNorm, ProxyNormAct, is_proxy_layer
from tf_proxynorm.layers.batch_group_norm import BatchGroupNormalization
from tf_proxynorm.layers.cross_iteration_bn import (CBNConv2D, CrossIterationBatchNormalization,
                                                    conv_norm_layers)
from tf_proxynorm.layers.evonorm import EvoNormB0, EvoNormS0
from tf_proxynorm.layers.iebn import InstanceEnhancementBatchNormalization
from tf_proxynorm.layers.inference_norm import InferenceGroupNormAct
from tf_proxynorm.layers.weight_standardization import WSConv2D, standardize_kernel
