"""The model registry and what the architecture modules share (the normalisation layer, argument
checks), in a module of their own: the architectures import it instead of the package __init__,
which imports them to register them.

Importing this module runs robustprune/models/__init__.py first, which imports every architecture,
so MODELS is complete whenever it is used from outside the package."""

from __future__ import annotations

import torch
from torch import nn

from robustprune.errors import UserError, excerpt
from robustprune.registry import Registry

MODELS: Registry = Registry("model")


class Normalize(nn.Module):
    """(x - mean) / std per channel, as a layer so attacks see [0, 1] inputs."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x):
        return (x - self.mean) / self.std


def whole(low: int = 1, high: int = 1 << 16, **values) -> None:
    """Arguments that count something (channels, a kernel side) are whole numbers in [low, high]."""
    for key, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
            raise UserError(f"{key} must be a whole number from {low} to {high}, got {excerpt(v)}")


def positive(high: float = 64.0, **values) -> None:
    """Multipliers (width_mult) are finite numbers in (0, high]."""
    for key, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= high:
            raise UserError(f"{key} must be a number above 0 and at most {high:g}, got {excerpt(v)}")


def fraction(**values) -> None:
    """Probabilities such as dropout lie in [0, 1)."""
    for key, v in values.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < 1:
            raise UserError(f"{key} must be a number from 0 up to (not including) 1, got {excerpt(v)}")
