"""Residual blocks that layer pruning can find and remove. Every architecture with skip connections
builds its blocks from ResidualBlock, so the structured-pruning engine needs no per-model code."""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn


class ResidualBlock(nn.Module):
    """out = act(body(x) + shortcut(x)). Subclasses set `body`, `shortcut` (nn.Identity when the
    block keeps the shape) and `act` (nn.Identity when nothing follows the addition, as in
    MobileNetV2's inverted residuals)."""

    body: nn.Module
    shortcut: nn.Module
    act: nn.Module

    def forward(self, x):
        return self.act(self.body(x) + self.shortcut(x))

    @property
    def removable(self) -> bool:
        """Only a block with an identity shortcut can go: the network then computes act(x), which is
        x itself when x already passed the same activation (ReLU after the previous block)."""
        return isinstance(self.shortcut, nn.Identity)


def residual_blocks(model: nn.Module) -> list[tuple[str, ResidualBlock]]:
    """All residual blocks in forward-definition order, with their qualified names."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ResidualBlock)]


def residual_stages(model: nn.Module) -> dict[str, list[tuple[str, ResidualBlock]]]:
    """Blocks grouped by the container that holds them (a ResNet stage, a MobileNetV2 group)."""
    stages: dict[str, list[tuple[str, ResidualBlock]]] = {}
    for name, block in residual_blocks(model):
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        stages.setdefault(parent, []).append((name, block))
    return stages


class StridedPointwiseConv(nn.Conv2d):
    """A 1x1 convolution with stride s (a projection shortcut), computed as a stride-1 1x1
    convolution of every s-th pixel: the same numbers and parameters, but it avoids oneDNN's
    strided 1x1 backward-weights kernel, which writes out of bounds (a segfault, or wrong weight
    gradients) for channels-last inputs with fewer input channels than its block, e.g. a narrow
    or pruned ResNet trained on an odd-sized batch with 2 threads (oneDNN issue 6035)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x):
        sh, sw = self.stride
        return F.conv2d(x[:, :, ::sh, ::sw], self.weight, self.bias)
