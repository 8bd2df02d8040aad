"""Centre occlusion: a square of zeros over every channel at the centre of each image."""

from __future__ import annotations

import torch

from robustprune.attacks.shifts import SHIFTS
from robustprune.errors import UserError


def _check_size(size) -> int:
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise UserError(f"occlusion size must be a whole number of pixels >= 0, got {size!r}")
    return size


def occlude(x: torch.Tensor, size: int) -> torch.Tensor:
    """x (N, C, H, W) with a size x size square of zeros at the centre; size 0 returns x itself."""
    size = _check_size(size)
    if x.dim() != 4:
        raise UserError(f"occlusion expects images of shape N x C x H x W, got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    if size > min(h, w):
        raise UserError(f"occlusion size {size} is larger than the {h}x{w} image; use a size of at most {min(h, w)}")
    if size == 0:
        return x
    top, left = (h - size) // 2, (w - size) // 2
    out = x.clone()
    out[..., top : top + size, left : left + size] = 0
    return out


@SHIFTS.register("occlusion")
class Occlusion:
    """A square of zeros of side `size` pixels at the image centre (all channels)."""

    def __init__(self, size: int):
        self.size = _check_size(size)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return occlude(x, self.size)
