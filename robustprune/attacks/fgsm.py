"""Fast Gradient Sign Method (Goodfellow et al. 2015), L-inf, one step of size eps."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from robustprune.attacks.base import check_image_range, frozen_eval
from robustprune.attacks.registry import ATTACKS
from robustprune.errors import UserError
from robustprune.tensors import to_float


@ATTACKS.register("fgsm")
class FGSM:
    """FGSM: x + eps * sign(grad of the cross-entropy), clipped to [0, 1]."""

    def __init__(self, eps: float):
        if eps < 0:
            raise UserError(f"FGSM eps must be >= 0, got {eps}; use a value in [0, 1]")
        self.eps = eps

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        check_image_range(x)
        with frozen_eval(model), torch.enable_grad():
            x = x.detach().clone().requires_grad_(True)
            loss = F.cross_entropy(model(x), y)
            (grad,) = torch.autograd.grad(loss, x)
        return (x.detach() + self.eps * grad.sign()).clamp_(0.0, 1.0)


def fgsm_dataset(
    model: nn.Module, x_u8: torch.Tensor, y: torch.Tensor, eps: float, batch_size: int = 1000
) -> torch.Tensor:
    """A fixed FGSM data set, stored as uint8 images like any image data set."""
    attack = FGSM(eps)
    device = next(model.parameters()).device
    out = []
    for i in range(0, len(x_u8), batch_size):
        xb = to_float(x_u8[i : i + batch_size].to(device))
        out.append((attack(model, xb, y[i : i + batch_size].to(device)) * 255).round_().to(torch.uint8).cpu())
    return torch.cat(out).contiguous() if out else x_u8.clone()
