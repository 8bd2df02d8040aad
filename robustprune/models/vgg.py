"""VGG-16 with batch normalisation, CIFAR variant: the 13 3x3 conv layers of Simonyan & Zisserman
(2015) configuration D, each followed by BN and ReLU, with 2x2 max-pooling after each of the five
groups, then global average pooling and a single Linear(512, num_classes).

The single linear classifier is the common CIFAR choice (as in Network Slimming, Liu et al. 2017,
and most CIFAR pruning work): on 32x32 inputs the features are already 1x1x512 after the fifth
pool, and the ImageNet 4096-4096 head would hold most of the parameters for no accuracy gain.
Convs carry no bias since BN follows each one. Average pooling makes larger images (e.g. 64x64)
work unchanged. There are no residual blocks, so layer pruning has nothing to remove here."""

from __future__ import annotations

import torch
from torch import nn

from robustprune.models.registry import MODELS, Normalize, positive
from robustprune.models.resnet_cifar import CIFAR10_MEAN, CIFAR10_STD, init_weights

VGG16_CONFIG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


class VGG(nn.Module):
    def __init__(
        self,
        config=VGG16_CONFIG,
        num_classes=10,
        image_shape=(3, 32, 32),
        mean=CIFAR10_MEAN,
        std=CIFAR10_STD,
        width_mult: float = 1.0,
    ):
        super().__init__()
        positive(width_mult=width_mult)
        self.normalize = Normalize(mean, std)
        layers: list[nn.Module] = []
        cin = image_shape[0]
        for item in config:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            cout = max(1, int(round(item * width_mult)))
            layers += [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
            cin = cout
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(cin, num_classes)
        init_weights(self)

    def forward(self, x):
        x = self.features(self.normalize(x))
        return self.classifier(torch.flatten(self.pool(x), 1))


@MODELS.register("vgg16_bn")
def vgg16_bn(**kwargs) -> nn.Module:
    """VGG-16 with BN, CIFAR variant (13 conv + one linear layer); `width_mult` scales every conv."""
    return VGG(VGG16_CONFIG, **kwargs)
