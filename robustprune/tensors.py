"""Small tensor conversions shared from the attacks up to the study runner; kept at the bottom of the
package so that nothing low (an attack, a metric) has to import the training loop for them."""

from __future__ import annotations

import torch


def to_float(x_u8: torch.Tensor) -> torch.Tensor:
    """uint8 images -> float in [0, 1] (channels-last: ~1.5x faster convolutions on CPU)."""
    x = x_u8.float().div_(255.0) if x_u8.dtype == torch.uint8 else x_u8.float()
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x
