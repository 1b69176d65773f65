"""Residual blocks with a pluggable norm + activation, shared by the ResNet builders.

`LayerMaker` resolves the norm once (a factory name, a layer class or a callable) and
creates every conv and norm layer of a network with deterministic names. The blocks are
plain functions on Keras tensors, so the builders return functional models.

Placement of the norms (Proxy Normalization paper, section 5 of docs/spec/proxy_norm.md):

- every norm followed by an activation is a norm + activation layer; with a "+PN" norm it
  is norm + PN-Act;
- a norm followed by a residual addition (the last norm of a v1 residual branch and the
  norm of a projection shortcut) has no activation; with a "+PN" norm it is scale-only
  (`center=False`, no proxy: Graphcore's choice for EfficientNet's projection convs),
  otherwise it is the plain norm (for BN: gamma and beta, as torchvision; for EvoNorm:
  its official linear form `x * gamma + beta`, `nonlinearity=False`).

Every conv -> norm pair goes through `tf_proxynorm.layers.conv_norm_layers`, so a norm
that needs its conv's kernel (CBN) becomes one `CBNConv2D` named as the conv. Such a norm
cannot follow a sum of branches, so pre-activation networks refuse it.
"""

import inspect

import keras

from tf_proxynorm.layers import conv_norm_layers, factory
from tf_proxynorm.layers.norm_act import LayerNormAct, InstanceNormAct
from tf_proxynorm.ops.stats import largest_divisor_at_most

_WS_SUFFIX = "+ws"
# Groups of a GroupNorm-like norm without `groups` in `norm_kwargs`, before the group-count
# rule lowers them to a divisor of the channels.
_GROUPS = 32


def _norm_defaults(norm, norm_kwargs):
    """The keyword arguments a norm will receive from its name and `norm_kwargs`."""
    if isinstance(norm, str):
        _, defaults = factory.lookup(norm)
        return {**defaults, **norm_kwargs}
    return dict(norm_kwargs)


def _takes_groups(norm):
    """Whether `norm` names or is a GroupNorm-like layer class with a `groups` argument
    (not LN / IN, whose groups are fixed)."""
    cls = factory.lookup(norm)[0] if isinstance(norm, str) else norm
    if not inspect.isclass(cls) or issubclass(cls, (LayerNormAct, InstanceNormAct)):
        return False
    return any("groups" in inspect.signature(k.__init__).parameters
               for k in cls.__mro__ if "__init__" in k.__dict__)


class LayerMaker:
    """Creates the conv and norm layers of a network, named deterministically.

    Args:
        norm: a registered name (`tf_proxynorm.available_norm_acts()`), optionally with a
            `"+ws"` suffix (`"gn+ws"`, `"ln+ws"`: the norm after weight-standardized
            convs), a norm + activation layer class, or a callable returning a layer.
            Callables receive the keyword arguments `activation`, `axis` and `name` (and
            `center=False, proxy_norm=False` for the norm before a residual addition when
            `norm_kwargs` sets `proxy_norm`).
        norm_kwargs: extra arguments of every norm layer (e.g. `{"groups": 8}`). Without
            `groups`, a GroupNorm gets 32 groups lowered until they divide its channels
            (16 for the 16-channel stage of a CIFAR ResNet), EvoNorm-S0's official rule.
        activation: the activation of the network (applied by the norm layers, and after
            the residual additions of v1 blocks).
        weight_standardization: use `WSConv2D` (weight-standardized convolutions) for every
            conv of the network ("GN+WS", "LN+WS").
        data_format: `"channels_last"` or `"channels_first"`.
        kernel_initializer: initializer of the conv kernels.
    """

    def __init__(self, norm, norm_kwargs=None, activation="relu", weight_standardization=False,
                 data_format="channels_last", kernel_initializer="he_normal"):
        if data_format not in ("channels_last", "channels_first"):
            raise ValueError("`data_format` must be 'channels_last' or 'channels_first'. "
                             f"Received: data_format={data_format!r}")
        norm_kwargs = dict(norm_kwargs or {})
        for reserved in ("activation", "axis", "name"):
            if reserved in norm_kwargs:
                raise ValueError(
                    f"`norm_kwargs` must not set {reserved!r}: the builder sets it for each layer "
                    f"(use the builder's `activation=` / `data_format=`). "
                    f"Received: norm_kwargs={norm_kwargs}")
        if isinstance(norm, str) and factory.canonical_name(norm).endswith(_WS_SUFFIX):
            norm, weight_standardization = norm.strip()[:-len(_WS_SUFFIX)], True
        self.norm = norm
        self.data_format = data_format
        self.axis = -1 if data_format == "channels_last" else 1
        self.activation = activation
        self.kernel_initializer = kernel_initializer
        self.weight_standardization = bool(weight_standardization)
        self.proxy = bool(_norm_defaults(norm, norm_kwargs).get("proxy_norm", False))
        self._make_norm = factory.resolve_norm_act(norm, axis=self.axis, **norm_kwargs)
        self._auto_groups = "groups" not in norm_kwargs and _takes_groups(norm)
        if self.weight_standardization:
            from tf_proxynorm.layers.weight_standardization import WSConv2D
            self._conv_cls = WSConv2D
        else:
            self._conv_cls = keras.layers.Conv2D

    # -- layers --------------------------------------------------------------------------
    def _conv_layer(self, filters, kernel_size, strides, groups, name):
        return self._conv_cls(
            filters, kernel_size, strides=strides, padding="same", groups=groups,
            use_bias=False, data_format=self.data_format,
            kernel_initializer=self.kernel_initializer, name=name)

    def _norm(self, channels, **overrides):
        if self._auto_groups:
            overrides["groups"] = largest_divisor_at_most(channels, _GROUPS)
        return self._make_norm(**overrides)

    def _before_add_norm(self, channels, name):
        overrides = {"activation": None}
        if self.proxy:
            overrides.update(center=False, proxy_norm=False)
        return self._norm(channels, name=name, **overrides)

    def conv(self, x, filters, kernel_size, strides=1, groups=1, *, name):
        """A bias-free conv (weight-standardized when asked), 'same' padding."""
        return self._conv_layer(filters, kernel_size, strides, groups, name)(x)

    def conv_norm_act(self, x, filters, kernel_size, strides=1, groups=1, *, name, norm_name):
        """Conv, then norm + activation (+ PN-Act with a "+PN" norm)."""
        norm = self._norm(filters, activation=self.activation, name=norm_name)
        return self._apply(x, conv_norm_layers(
            self._conv_layer(filters, kernel_size, strides, groups, name), norm))

    def conv_norm(self, x, filters, kernel_size, strides=1, groups=1, *, name, norm_name):
        """Conv, then the norm of a branch that ends in a residual addition (no activation)."""
        return self._apply(x, conv_norm_layers(
            self._conv_layer(filters, kernel_size, strides, groups, name),
            self._before_add_norm(filters, norm_name)))

    def norm_act(self, x, *, name):
        """Norm + activation on a tensor that no conv of its own produced (pre-activation)."""
        norm = self._norm(self.channels(x), activation=self.activation, name=name)
        if callable(getattr(norm, "bind_conv", None)):
            raise ValueError(
                f"Normalization {self.norm!r} needs the convolution that produces its input, "
                "but pre-activation networks (version='v2', cifar_resnet) normalize sums of "
                "residual branches. Use a post-activation network (version='v1.5'). "
                f"Received: norm={self.norm!r}")
        return norm(x)

    def act(self, x, *, name):
        return keras.layers.Activation(self.activation, name=name)(x)

    def channels(self, x):
        return x.shape[self.axis]

    @staticmethod
    def _apply(x, layers):
        for layer in layers:
            x = layer(x)
        return x


def basic_block_v1(m, x, filters, strides, *, name):
    """ResNet v1 basic block: 3x3 conv - norm-act - 3x3 conv - norm, + shortcut, act."""
    shortcut = x
    if strides != 1 or m.channels(x) != filters:
        shortcut = m.conv_norm(x, filters, 1, strides, name=f"{name}_shortcut_conv",
                               norm_name=f"{name}_shortcut_norm")
    x = m.conv_norm_act(x, filters, 3, strides, name=f"{name}_conv1", norm_name=f"{name}_norm1")
    x = m.conv_norm(x, filters, 3, name=f"{name}_conv2", norm_name=f"{name}_norm2")
    x = keras.layers.Add(name=f"{name}_add")([shortcut, x])
    return m.act(x, name=f"{name}_out")


def bottleneck_v1(m, x, filters, strides, *, groups=1, base_width=64, expansion=4, name):
    """ResNet v1.5 bottleneck (stride in the 3x3 conv, as torchvision); ResNeXt with groups."""
    width = int(filters * base_width / 64) * groups
    out = filters * expansion
    shortcut = x
    if strides != 1 or m.channels(x) != out:
        shortcut = m.conv_norm(x, out, 1, strides, name=f"{name}_shortcut_conv",
                               norm_name=f"{name}_shortcut_norm")
    x = m.conv_norm_act(x, width, 1, name=f"{name}_conv1", norm_name=f"{name}_norm1")
    x = m.conv_norm_act(x, width, 3, strides, groups, name=f"{name}_conv2",
                        norm_name=f"{name}_norm2")
    x = m.conv_norm(x, out, 1, name=f"{name}_conv3", norm_name=f"{name}_norm3")
    x = keras.layers.Add(name=f"{name}_add")([shortcut, x])
    return m.act(x, name=f"{name}_out")


def basic_block_v2(m, x, filters, strides, *, name):
    """Pre-activation basic block: norm-act - 3x3 conv - norm-act - 3x3 conv, + shortcut.

    The projection shortcut (when the shape changes) takes the pre-activated input, as in
    He et al. 2016 (identity mappings) and timm's `PreActBasic`.
    """
    preact = m.norm_act(x, name=f"{name}_norm1")
    shortcut = x
    if strides != 1 or m.channels(x) != filters:
        shortcut = m.conv(preact, filters, 1, strides, name=f"{name}_shortcut_conv")
    x = m.conv_norm_act(preact, filters, 3, strides, name=f"{name}_conv1",
                        norm_name=f"{name}_norm2")
    x = m.conv(x, filters, 3, name=f"{name}_conv2")
    return keras.layers.Add(name=f"{name}_add")([shortcut, x])


def bottleneck_v2(m, x, filters, strides, *, groups=1, base_width=64, expansion=4, name):
    """Pre-activation bottleneck, stride in the 3x3 conv (timm `PreActBottleneck`)."""
    width = int(filters * base_width / 64) * groups
    out = filters * expansion
    preact = m.norm_act(x, name=f"{name}_norm1")
    shortcut = x
    if strides != 1 or m.channels(x) != out:
        shortcut = m.conv(preact, out, 1, strides, name=f"{name}_shortcut_conv")
    x = m.conv_norm_act(preact, width, 1, name=f"{name}_conv1", norm_name=f"{name}_norm2")
    x = m.conv_norm_act(x, width, 3, strides, groups, name=f"{name}_conv2",
                        norm_name=f"{name}_norm3")
    x = m.conv(x, out, 1, name=f"{name}_conv3")
    return keras.layers.Add(name=f"{name}_add")([shortcut, x])
