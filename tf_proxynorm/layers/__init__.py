"""Keras layers of tf_proxynorm."""

from tf_proxynorm.layers.factory import (available_norm_acts, get_norm_act_layer,
                                         register_norm_act, resolve_norm_act)
from tf_proxynorm.layers.norm_act import (BatchNormAct, GroupNormAct, InstanceNormAct,
                                          LayerNormAct)
from tf_proxynorm.layers.proxy_norm_act import ProxyNormAct
