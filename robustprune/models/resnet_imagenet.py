"""ResNet-34 and ResNet-50 (He et al. 2016, Table 1) with two input variants.

Four stages of blocks ([3, 4, 6, 3] for both) with 64, 128, 256, 512 filters (stride 1, 2, 2, 2),
global average pooling and a linear classifier. ResNet-34 uses the basic block of resnet_cifar
(two 3x3 convs); ResNet-50 the bottleneck block (1x1 reduce, 3x3, 1x1 expand to 4x the width),
with the stride on the 3x3 conv as in torchvision ("ResNet v1.5"; the parameter count is the same).
Where a block changes the shape, its shortcut is a 1x1 conv with the block's stride and a
BatchNorm (the paper's option B); every other block has an identity shortcut, which layer
pruning may remove.

Stems:
- "imagenet": 7x7 conv with stride 2, BN, ReLU, 3x3 max-pool with stride 2 (32x downsampling);
- "cifar": 3x3 conv with stride 1, BN, ReLU, no max-pool (8x downsampling), the usual variant
  for 32x32 CIFAR and 64x64 Tiny-ImageNet images (as resnet18 here);
- "auto" (default): "imagenet" when the smaller image side is at least 128 pixels, else "cifar".

With 1000 classes and the ImageNet stem the parameter counts are torchvision's: 21,797,672
(ResNet-34) and 25,557,032 (ResNet-50). `width` (default 64) sets the stem and stage-1 filters,
the later stages double it."""

from __future__ import annotations

from collections import OrderedDict

from torch import nn

from robustprune.errors import UserError
from robustprune.models.blocks import ResidualBlock, StridedPointwiseConv
from robustprune.models.registry import MODELS, Normalize, whole
from robustprune.models.resnet_cifar import CIFAR10_MEAN, CIFAR10_STD, BasicBlock, StagedResNet, add_head, conv3x3

STEMS = ("auto", "imagenet", "cifar")
IMAGENET_STEM_MIN_SIDE = 128  # smaller images (CIFAR 32, Tiny-ImageNet 64) get the CIFAR stem


def projection(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(OrderedDict([("conv", StridedPointwiseConv(cin, cout, stride)), ("bn", nn.BatchNorm2d(cout))]))


class Bottleneck(ResidualBlock):
    """relu(bn(1x1 expand(relu(bn(3x3(relu(bn(1x1 reduce(x))))))))) + shortcut(x)); the 3x3 conv
    carries the stride; projection shortcut when the stride or the width changes."""

    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1):
        super().__init__()
        cout = width * self.expansion
        self.body = nn.Sequential(
            OrderedDict(
                [
                    ("conv1", nn.Conv2d(cin, width, 1, bias=False)),
                    ("bn1", nn.BatchNorm2d(width)),
                    ("relu1", nn.ReLU(inplace=True)),
                    ("conv2", conv3x3(width, width, stride)),
                    ("bn2", nn.BatchNorm2d(width)),
                    ("relu2", nn.ReLU(inplace=True)),
                    ("conv3", nn.Conv2d(width, cout, 1, bias=False)),
                    ("bn3", nn.BatchNorm2d(cout)),
                ]
            )
        )
        self.shortcut = projection(cin, cout, stride) if stride != 1 or cin != cout else nn.Identity()
        self.act = nn.ReLU()


def resolve_stem(stem: str, image_shape) -> str:
    if stem not in STEMS:
        raise UserError(f"unknown stem {stem!r}; use one of {', '.join(STEMS)}")
    if stem == "auto":
        return "imagenet" if min(image_shape[1:]) >= IMAGENET_STEM_MIN_SIDE else "cifar"
    return stem


def make_stem(kind: str, cin: int, cout: int) -> nn.Sequential:
    if kind == "imagenet":
        return nn.Sequential(
            OrderedDict(
                [
                    ("conv", nn.Conv2d(cin, cout, 7, stride=2, padding=3, bias=False)),
                    ("bn", nn.BatchNorm2d(cout)),
                    ("relu", nn.ReLU(inplace=True)),
                    ("pool", nn.MaxPool2d(3, stride=2, padding=1)),
                ]
            )
        )
    return nn.Sequential(
        OrderedDict(
            [
                ("conv", conv3x3(cin, cout)),
                ("bn", nn.BatchNorm2d(cout)),
                ("relu", nn.ReLU(inplace=True)),
            ]
        )
    )


class ResNet(StagedResNet):
    """Stem, stages layer1..layer4 of `block`s, adaptive average pooling, linear classifier."""

    def __init__(
        self,
        block: str,
        blocks_per_stage,
        num_classes=10,
        image_shape=(3, 32, 32),
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        width: int = 64,
        stem: str = "auto",
        zero_init_residual: bool = False,
    ):
        super().__init__()
        whole(width=width)
        self.stem_kind = resolve_stem(stem, image_shape)
        self.normalize = Normalize(mean, std)
        self.stem = make_stem(self.stem_kind, image_shape[0], width)
        cin = width
        for i, n in enumerate(blocks_per_stage, start=1):
            w, s = width * 2 ** (i - 1), 1 if i == 1 else 2
            if block == "bottleneck":
                stage = [Bottleneck(cin, w, s)] + [Bottleneck(w * 4, w) for _ in range(n - 1)]
                cin = w * 4
            else:
                stage = [BasicBlock(cin, w, s)] + [BasicBlock(w, w) for _ in range(n - 1)]
                cin = w
            self.add_module(f"layer{i}", nn.Sequential(*stage))
        self.num_stages = len(blocks_per_stage)
        add_head(self, cin, num_classes, zero_init_residual)


@MODELS.register("resnet34")
def resnet34(**kwargs) -> nn.Module:
    """ResNet-34 (basic blocks [3, 4, 6, 3]); 7x7/2 + max-pool stem from 128 px, else 3x3/1 (`stem`); `width`."""
    return ResNet("basic", [3, 4, 6, 3], **kwargs)


@MODELS.register("resnet50")
def resnet50(**kwargs) -> nn.Module:
    """ResNet-50 (bottlenecks [3, 4, 6, 3], expansion 4); 7x7/2 + max-pool stem from 128 px, else 3x3/1; `width`."""
    return ResNet("bottleneck", [3, 4, 6, 3], **kwargs)
