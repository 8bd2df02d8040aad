"""A network of your own: any nn.Module that maps images in [0, 1] to logits. This one has a
residual addition and a concatenation, which structured pruning handles through the dependency
graph (the channels tied by the addition are pruned together, once)."""

import torch
from torch import nn


def conv_bn(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU())


class TwoPathNet(nn.Module):
    def __init__(self, width: int = 16, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.stem = nn.Sequential(conv_bn(in_channels, width), nn.MaxPool2d(2))
        self.residual = nn.Sequential(conv_bn(width, width), nn.Conv2d(width, width, 3, padding=1, bias=False))
        self.side = conv_bn(width, width // 2)
        self.deep = nn.Sequential(nn.MaxPool2d(2), conv_bn(width + width // 2, 2 * width))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.relu(x + self.residual(x))  # residual addition
        x = torch.cat([x, self.side(x)], dim=1)  # concatenation
        return self.head(self.deep(x))


def make_net(width: int = 16, num_classes: int = 10, image_shape=(1, 28, 28)) -> nn.Module:
    """The builder a study file names (model.import): it may ask for num_classes and image_shape."""
    return TwoPathNet(width, num_classes, image_shape[0])
