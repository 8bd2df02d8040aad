"""Residual blocks that layer pruning can find and remove. Every architecture with skip connections
builds its blocks from ResidualBlock, so the structured-pruning engine needs no per-model code."""
from __future__ import annotations

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
