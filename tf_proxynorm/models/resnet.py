"""ResNet v1.5 / v2, ResNeXt and CIFAR ResNets with a pluggable norm + activation.

All builders return functional `keras.Model`s with deterministic layer names
(`stem_conv`, `stem_norm`, `stage2_block1_conv1`, `stage2_block1_norm1`,
`stage2_block1_shortcut_conv`, `final_norm`, `predictions`, ...), so weights can be
matched by name and `.keras` files round trip (every norm layer is registered).

- v1.5: torchvision's ResNet (the stride of a bottleneck sits in its 3x3 conv). With
  `norm="bn"` ResNet-50 has torchvision's 25,557,032 trainable parameters.
- v2: pre-activation ResNet (He et al., 2016, "Identity Mappings"): every block starts
  with norm-act, and a final norm-act precedes the pooling. As Keras' `ResNet50V2` and
  timm's `ResNetV2`, the stem is conv 7x7/2 + max-pool without a norm: the first block's
  pre-activation normalizes the stem's output. Strides sit in the 3x3 convs (as v1.5).
- `cifar_resnet`: the pre-activation ResNets of He et al. for 28x28 / 32x32 inputs,
  depth 6n+2 (20, 56, 110, ...), stages of 16, 32, 64 channels times `width`.

Where the norms go, and what a "+PN" norm becomes before a residual addition, is
described in `tf_proxynorm.models.blocks`.
"""

import functools

import keras

from tf_proxynorm.models import blocks

_DEPTHS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
VERSIONS = ("v1.5", "v2")
_BLOCKS = {
    ("basic", "v1.5"): blocks.basic_block_v1, ("bottleneck", "v1.5"): blocks.bottleneck_v1,
    ("basic", "v2"): blocks.basic_block_v2, ("bottleneck", "v2"): blocks.bottleneck_v2,
}

_COMMON_ARGS_DOC = """
        norm: the norm + activation: a registered name (`"bn"`, `"gn"`, `"gn+pn"`,
            `"ln+pn"`, `"evonorm_s0"`, `"cbn"`, ...; see
            `tf_proxynorm.available_norm_acts()`), optionally with a `"+ws"` suffix for
            weight-standardized convs (`"gn+ws"`), a layer class, or a callable returning
            a layer (see `blocks.LayerMaker`). `"cbn"` needs post-activation blocks
            (v1.5): its statistics are compensated through the kernel of its own conv.
        norm_kwargs: extra arguments of every norm layer, e.g. `{"groups": 8}`.
        activation: the activation of the network. Defaults to `"relu"`.
        weight_standardization: weight-standardized convs (`WSConv2D`): "GN+WS", "LN+WS".
        include_top: whether to end with global average pooling and a dense classifier.
        num_classes: number of classes of the classifier (with `include_top`).
        input_shape: the shape of one input image, without the batch axis.
        pooling: without `include_top`: None (4D output), `"avg"` or `"max"`.
        classifier_activation: activation of the classifier; None returns logits. Under a
            mixed-precision policy the classifier runs in float32.
        data_format: `"channels_last"` (NHWC) or `"channels_first"` (NCHW); sets the
            axis of every norm.
        name: name of the model."""


def _validate(include_top, num_classes, pooling, input_shape, data_format):
    if include_top and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError("`num_classes` must be a positive int when `include_top=True`. "
                         f"Received: num_classes={num_classes!r}")
    if pooling not in (None, "avg", "max"):
        raise ValueError(f"`pooling` must be None, 'avg' or 'max'. Received: pooling={pooling!r}")
    if input_shape is None:
        return (None, None, 3) if data_format == "channels_last" else (3, None, None)
    input_shape = tuple(input_shape)
    if len(input_shape) != 3:
        raise ValueError("`input_shape` must be (height, width, channels) or, channels first, "
                         f"(channels, height, width). Received: input_shape={input_shape}")
    return input_shape


def _stages(m, x, block, version, filters_per_stage, blocks_per_stage):
    """The residual stages (stride 2 in the first block of every stage but the first),
    then the final norm + activation of a pre-activation (v2) network."""
    for stage, (filters, count) in enumerate(zip(filters_per_stage, blocks_per_stage), 1):
        for b in range(1, count + 1):
            strides = 2 if b == 1 and stage > 1 else 1
            x = block(m, x, filters, strides, name=f"stage{stage}_block{b}")
    if version == "v2":
        x = m.norm_act(x, name="final_norm")
    return x


def _head(m, x, include_top, num_classes, pooling, classifier_activation):
    if include_top:
        x = keras.layers.GlobalAveragePooling2D(data_format=m.data_format, name="avg_pool")(x)
        mixed = keras.config.dtype_policy().name.startswith("mixed")
        return keras.layers.Dense(num_classes, activation=classifier_activation,
                                  dtype="float32" if mixed else None, name="predictions")(x)
    if pooling == "avg":
        return keras.layers.GlobalAveragePooling2D(data_format=m.data_format, name="avg_pool")(x)
    if pooling == "max":
        return keras.layers.GlobalMaxPooling2D(data_format=m.data_format, name="max_pool")(x)
    return x


def resnet(depth=50, version="v1.5", *, norm="bn", norm_kwargs=None, activation="relu",
           weight_standardization=False, groups=1, base_width=64, include_top=True,
           num_classes=1000, input_shape=None, pooling=None, classifier_activation="softmax",
           data_format="channels_last", name=None):
    """ResNet v1.5 or pre-activation v2 (ImageNet layout) with a pluggable norm.

    Args:
        depth: 18, 34, 50, 101 or 152.
        version: `"v1.5"` (torchvision) or `"v2"` (pre-activation).
        groups, base_width: ResNeXt's cardinality and width per group (bottlenecks
            only); `groups=32, base_width=4` is ResNeXt-50 32x4d.{common}

    Returns:
        A functional `keras.Model`.

    Reference:
        - [He et al., 2016](https://arxiv.org/abs/1512.03385), Deep Residual Learning.
        - [He et al., 2016](https://arxiv.org/abs/1603.05027), Identity Mappings (v2).
        - [Xie et al., 2017](https://arxiv.org/abs/1611.05431), ResNeXt.

    Example:

    >>> model = resnet(50, "v2", norm="gn+pn", num_classes=10, input_shape=(64, 64, 3))
    >>> model.get_layer("stage1_block1_norm1").proxy_norm
    True
    """
    if depth not in _DEPTHS:
        raise ValueError(f"`depth` must be one of {sorted(_DEPTHS)}. Received: depth={depth!r}")
    if version not in VERSIONS:
        raise ValueError(f"`version` must be one of {VERSIONS}. Received: version={version!r}")
    kind, layers_per_stage = _DEPTHS[depth]
    if kind == "basic" and (groups != 1 or base_width != 64):
        raise ValueError("Basic blocks (depth 18/34) support neither `groups` nor `base_width`. "
                         f"Received: groups={groups}, base_width={base_width}")
    m = blocks.LayerMaker(norm, norm_kwargs, activation, weight_standardization, data_format)
    input_shape = _validate(include_top, num_classes, pooling, input_shape, data_format)
    block = _BLOCKS[(kind, version)]
    if kind == "bottleneck":
        block = functools.partial(block, groups=groups, base_width=base_width)

    inputs = keras.Input(input_shape, name="images")
    if version == "v1.5":
        x = m.conv_norm_act(inputs, 64, 7, 2, name="stem_conv", norm_name="stem_norm")
    else:
        x = m.conv(inputs, 64, 7, 2, name="stem_conv")
    x = keras.layers.MaxPooling2D(3, 2, padding="same", data_format=data_format,
                                  name="stem_pool")(x)
    x = _stages(m, x, block, version, (64, 128, 256, 512), layers_per_stage)
    outputs = _head(m, x, include_top, num_classes, pooling, classifier_activation)
    if name is None:
        name = f"resnet{depth}" + ("v2" if version == "v2" else "")
    return keras.Model(inputs, outputs, name=name)


def cifar_resnet(depth=20, width=1, *, version="v2", norm="bn", norm_kwargs=None,
                 activation="relu", weight_standardization=False, include_top=True,
                 num_classes=10, input_shape=(32, 32, 3), pooling=None,
                 classifier_activation="softmax", data_format="channels_last", name=None):
    """CIFAR ResNet (depth 6n+2) for small images, with a pluggable norm.

    A 3x3 stem conv with `16 * width` channels, three stages of n basic blocks with
    `16, 32, 64` times `width` channels (strides 1, 2, 2), global pooling and the
    classifier. 28x28 (Fashion-MNIST) and 32x32 (CIFAR) inputs. `version="v2"`
    (pre-activation, the default) ends with a norm-act before the pooling; `"v1"`
    (post-activation, He et al. 2016a) has a conv-norm-act stem and blocks that end with
    a norm before the addition, the layout norms bound to their conv (CBN) need.

    Args:
        depth: 6n+2: 20, 32, 44, 56, 110, ...
        width: channel multiplier (positive int).
        version: `"v2"` (pre-activation) or `"v1"` (post-activation).{common}

    Returns:
        A functional `keras.Model`.

    Reference:
        - [He et al., 2016](https://arxiv.org/abs/1603.05027), Identity Mappings in Deep
          Residual Networks (section 4.1, CIFAR).

    Example:

    >>> model = cifar_resnet(20, norm="gn+pn", norm_kwargs={"groups": 8},
    ...                      input_shape=(28, 28, 1))
    >>> model.count_params() > 0
    True
    """
    if not isinstance(depth, int) or depth < 8 or (depth - 2) % 6:
        raise ValueError(f"`depth` must be 6n+2 with n >= 1 (20, 56, 110, ...). Received: depth={depth!r}")
    if not isinstance(width, int) or width < 1:
        raise ValueError(f"`width` must be a positive int. Received: width={width!r}")
    if version not in ("v1", "v2"):
        raise ValueError(f"`version` must be 'v1' or 'v2'. Received: version={version!r}")
    m = blocks.LayerMaker(norm, norm_kwargs, activation, weight_standardization, data_format)
    input_shape = _validate(include_top, num_classes, pooling, input_shape, data_format)
    per_stage = (depth - 2) // 6

    inputs = keras.Input(input_shape, name="images")
    if version == "v1":
        x = m.conv_norm_act(inputs, 16 * width, 3, name="stem_conv", norm_name="stem_norm")
    else:
        x = m.conv(inputs, 16 * width, 3, name="stem_conv")
    block = blocks.basic_block_v1 if version == "v1" else blocks.basic_block_v2
    x = _stages(m, x, block, version, (16 * width, 32 * width, 64 * width), (per_stage,) * 3)
    outputs = _head(m, x, include_top, num_classes, pooling, classifier_activation)
    return keras.Model(inputs, outputs, name=name or f"cifar_resnet{depth}")


def _named(depth):
    def builder(version="v1.5", **kwargs):
        return resnet(depth, version, **kwargs)

    builder.__name__ = builder.__qualname__ = f"resnet{depth}"
    builder.__doc__ = (f"ResNet-{depth}, v1.5 or pre-activation v2: `resnet({depth}, version, "
                       "**kwargs)`. See `resnet` for the arguments.")
    return builder


resnet18, resnet34, resnet50, resnet101, resnet152 = (_named(d) for d in (18, 34, 50, 101, 152))


def resnext50_32x4d(version="v1.5", **kwargs):
    """ResNeXt-50 32x4d (32 groups of 4 channels in the first stage's 3x3 convs).

    With `norm="bn"` and v1.5 it has torchvision's 25,028,904 trainable parameters. See
    `resnet` for the arguments.
    """
    kwargs.setdefault("name", "resnext50_32x4d")
    return resnet(50, version, groups=32, base_width=4, **kwargs)


resnet.__doc__ = resnet.__doc__.replace("{common}", _COMMON_ARGS_DOC)
cifar_resnet.__doc__ = cifar_resnet.__doc__.replace("{common}", _COMMON_ARGS_DOC)
