"""Model builders with a pluggable norm: `tfpn.models.resnet50(norm="gn+pn")`."""

from tf_proxynorm.models.blocks import LayerMaker
from tf_proxynorm.models.resnet import (VERSIONS, cifar_resnet, resnet, resnet18, resnet34,
                                        resnet50, resnet101, resnet152, resnext50_32x4d)
