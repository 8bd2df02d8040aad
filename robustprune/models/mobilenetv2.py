"""MobileNetV2 (Sandler et al. 2018), CIFAR variant.

The network of the paper's Table 2: a 3x3 conv stem with 32 filters, 17 inverted-residual blocks
in 7 groups (expansion t, output channels c, blocks n, first stride s), a 1x1 conv to 1280
channels, global average pooling and a linear classifier. ReLU6 everywhere except after the
projection (the linear bottleneck). For 32x32 images the stem and the first stride-2 group (c=24)
use stride 1, as in the common CIFAR ports (e.g. kuangliu/pytorch-cifar), so the network
downsamples 8x instead of 32x and ends at 4x4 before pooling (8x8 on 64x64 images: pooling is
adaptive, so any image size works).

A block has a residual connection only when it keeps the shape (stride 1 and as many output
channels as input channels), as in the paper; such blocks are ResidualBlocks with nothing after
the addition (act = nn.Identity), which layer pruning may remove. The first block of every group
changes the shape and is a plain module.

`width_mult` scales every width, rounded to a multiple of 8 (never down by more than 10 %); the
1280-channel last conv is only ever scaled up, as in the paper."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from robustprune.models.blocks import ResidualBlock
from robustprune.models.registry import MODELS, Normalize, positive, whole
from robustprune.models.resnet_cifar import CIFAR10_MEAN, CIFAR10_STD, init_weights

# (expansion t, output channels c, blocks n, stride s of the first block), CIFAR strides.
CIFAR_CONFIG = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def round_channels(channels: float, divisor: int = 8) -> int:
    """Nearest multiple of `divisor` (at least `divisor`), bumped up once if that lost over 10 %."""
    rounded = max(divisor, int(channels + divisor / 2) // divisor * divisor)
    return rounded + divisor if rounded < 0.9 * channels else rounded


def conv_bn(cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1, act: bool = True, activation=nn.ReLU6):
    layers = [
        ("conv", nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, groups=groups, bias=False)),
        ("bn", nn.BatchNorm2d(cout)),
    ]
    if act:
        layers.append(("act", activation(inplace=True)))
    return nn.Sequential(OrderedDict(layers))


def inverted_bottleneck(cin: int, cout: int, stride: int, expansion: int, activation=nn.ReLU6) -> nn.Sequential:
    """1x1 expansion (left out when t = 1), 3x3 depthwise with the stride, linear 1x1 projection
    (MobileViT uses the same block with SiLU)."""
    hidden = cin * expansion
    layers = [("expand", conv_bn(cin, hidden, 1, activation=activation))] if expansion != 1 else []
    layers += [
        ("depthwise", conv_bn(hidden, hidden, 3, stride, groups=hidden, activation=activation)),
        ("project", conv_bn(hidden, cout, 1, act=False)),
    ]
    return nn.Sequential(OrderedDict(layers))


class InvertedResidual(ResidualBlock):
    """x + bottleneck(x): stride 1 and as many output channels as input channels."""

    def __init__(self, channels: int, expansion: int, activation=nn.ReLU6):
        super().__init__()
        self.body = inverted_bottleneck(channels, channels, 1, expansion, activation)
        self.shortcut = nn.Identity()
        self.act = nn.Identity()


class InvertedBottleneck(nn.Module):
    """bottleneck(x) without a skip connection: the block that changes the stride or the width."""

    def __init__(self, cin: int, cout: int, stride: int, expansion: int, activation=nn.ReLU6):
        super().__init__()
        self.body = inverted_bottleneck(cin, cout, stride, expansion, activation)

    def forward(self, x):
        return self.body(x)


class MobileNetV2(nn.Module):
    def __init__(
        self,
        num_classes=10,
        image_shape=(3, 32, 32),
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        width_mult: float = 1.0,
        config=CIFAR_CONFIG,
        stem_stride: int = 1,
        last_channels: int = 1280,
    ):
        super().__init__()
        positive(width_mult=width_mult)
        whole(stem_stride=stem_stride, last_channels=last_channels)
        self.normalize = Normalize(mean, std)
        cin = round_channels(32 * width_mult)
        self.stem = conv_bn(image_shape[0], cin, 3, stem_stride)
        groups = []
        for t, c, n, s in config:
            cout = round_channels(c * width_mult)
            if s == 1 and cin == cout:
                blocks = [InvertedResidual(cout, t)]
            else:
                blocks = [InvertedBottleneck(cin, cout, s, t)]
            blocks += [InvertedResidual(cout, t) for _ in range(n - 1)]
            groups.append(nn.Sequential(*blocks))
            cin = cout
        self.stages = nn.Sequential(*groups)  # blocks of one group share a container (residual_stages)
        last = round_channels(last_channels * width_mult) if width_mult > 1.0 else last_channels
        self.head = conv_bn(cin, last, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(last, num_classes)
        init_weights(self)

    def forward(self, x):
        x = self.head(self.stages(self.stem(self.normalize(x))))
        return self.classifier(torch.flatten(self.pool(x), 1))


@MODELS.register("mobilenetv2")
def mobilenetv2(**kwargs) -> nn.Module:
    """MobileNetV2, CIFAR variant (stride-1 stem and first stride-2 group); `width_mult` scales widths."""
    return MobileNetV2(**kwargs)
