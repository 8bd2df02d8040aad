"""CIFAR ResNets. ResNet-20/32/56 follow He et al. (2016) §4.2: a 3x3 conv stem with 16 filters,
then 3 stages of n basic blocks with 16, 32 and 64 filters (stride 1, 2, 2), global average
pooling and a linear layer; n = 3, 5, 9 gives 6n + 2 = 20, 32, 56 layers. ResNet-18 is the common
CIFAR variant of the ImageNet network: a 3x3 stem with 64 filters and no max-pool, then 4 stages
of 2 basic blocks with 64, 128, 256, 512 filters (stride 1, 2, 2, 2).

Where a block changes the shape, its shortcut is the projection of §3.3 option B (1x1 conv with
the block's stride, then BN) rather than option A (strided identity padded with zero channels):
option A ties channels to fixed zero padding, which Torch-Pruning cannot prune, while option B
is an ordinary conv that prunes like any other. It adds 2 752 parameters to ResNet-20/32/56."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from robustprune.models.blocks import ResidualBlock, StridedPointwiseConv
from robustprune.models.registry import MODELS, Normalize, whole

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal convs (fan_out, ReLU gain, He et al. 2015), BN at (1, 0); linear layers keep
    PyTorch's default uniform init."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def add_head(model: nn.Module, channels: int, num_classes: int, zero_init_residual: bool) -> None:
    """Global average pooling and the classifier, then the initialisation of every layer; with
    zero_init_residual each block's last BN starts at 0, so the block starts as the identity
    (Goyal et al. 2017)."""
    model.pool = nn.AdaptiveAvgPool2d(1)
    model.classifier = nn.Linear(channels, num_classes)
    init_weights(model)
    if zero_init_residual:
        for m in model.modules():
            if isinstance(m, ResidualBlock) and isinstance(m.body[-1], nn.BatchNorm2d):
                nn.init.zeros_(m.body[-1].weight)


class BasicBlock(ResidualBlock):
    """relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)), 3x3 convs; projection shortcut (option B)
    when the stride or the width changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            OrderedDict(
                [
                    ("conv1", conv3x3(cin, cout, stride)),
                    ("bn1", nn.BatchNorm2d(cout)),
                    ("relu", nn.ReLU(inplace=True)),
                    ("conv2", conv3x3(cout, cout)),
                    ("bn2", nn.BatchNorm2d(cout)),
                ]
            )
        )
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                OrderedDict(
                    [
                        ("conv", StridedPointwiseConv(cin, cout, stride)),
                        ("bn", nn.BatchNorm2d(cout)),
                    ]
                )
            )
        else:
            self.shortcut = nn.Identity()
        self.act = nn.ReLU()


class StagedResNet(nn.Module):
    """normalize, stem, layer1..layerN, pooling, classifier: the forward pass of every ResNet here."""

    def forward(self, x):
        x = self.stem(self.normalize(x))
        for i in range(1, self.num_stages + 1):
            x = getattr(self, f"layer{i}")(x)
        return self.classifier(torch.flatten(self.pool(x), 1))


class CifarResNet(StagedResNet):
    """Stem conv-BN-ReLU, stages of BasicBlocks (attributes layer1, layer2, ...), adaptive average
    pooling (so any image size works) and a linear classifier."""

    def __init__(
        self,
        blocks_per_stage,
        widths,
        strides,
        num_classes=10,
        image_shape=(3, 32, 32),
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        zero_init_residual: bool = False,
    ):
        super().__init__()
        c = image_shape[0]
        self.normalize = Normalize(mean, std)
        self.stem = nn.Sequential(
            OrderedDict(
                [
                    ("conv", conv3x3(c, widths[0])),
                    ("bn", nn.BatchNorm2d(widths[0])),
                    ("relu", nn.ReLU(inplace=True)),
                ]
            )
        )
        cin = widths[0]
        for i, (n, w, s) in enumerate(zip(blocks_per_stage, widths, strides), start=1):
            stage = [BasicBlock(cin, w, s)] + [BasicBlock(w, w) for _ in range(n - 1)]
            self.add_module(f"layer{i}", nn.Sequential(*stage))
            cin = w
        self.num_stages = len(widths)
        add_head(self, cin, num_classes, zero_init_residual)


def _he_resnet(n: int, width: int, **kwargs) -> CifarResNet:
    whole(width=width)
    return CifarResNet([n] * 3, [width, 2 * width, 4 * width], [1, 2, 2], **kwargs)


@MODELS.register("resnet20")
def resnet20(width: int = 16, **kwargs) -> nn.Module:
    """CIFAR ResNet-20 (He et al. 2016 §4.2, n=3, projection shortcuts); `width` = stage-1 filters."""
    return _he_resnet(3, width, **kwargs)


@MODELS.register("resnet32")
def resnet32(width: int = 16, **kwargs) -> nn.Module:
    """CIFAR ResNet-32 (He et al. 2016 §4.2, n=5, projection shortcuts); `width` = stage-1 filters."""
    return _he_resnet(5, width, **kwargs)


@MODELS.register("resnet56")
def resnet56(width: int = 16, **kwargs) -> nn.Module:
    """CIFAR ResNet-56 (He et al. 2016 §4.2, n=9, projection shortcuts); `width` = stage-1 filters."""
    return _he_resnet(9, width, **kwargs)


@MODELS.register("resnet18")
def resnet18(width: int = 64, **kwargs) -> nn.Module:
    """ResNet-18, CIFAR variant (3x3 stem, no max-pool, 4 stages of 2 basic blocks); `width` = stem filters."""
    whole(width=width)
    return CifarResNet([2, 2, 2, 2], [width, 2 * width, 4 * width, 8 * width], [1, 2, 2, 2], **kwargs)
