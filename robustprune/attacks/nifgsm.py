"""NI-FGSM, Nesterov iterative FGSM (Lin et al. 2020, "Nesterov accelerated gradient and scale
invariance for adversarial attacks", ICLR), L-inf. Momentum iterative FGSM whose gradient is taken at
the look-ahead point x_t + alpha * decay * g_t."""

from __future__ import annotations

import torch
from torch import nn

from robustprune.attacks.base import check_image_range, frozen_eval
from robustprune.attacks.pgd import check_count, check_eps, check_nonneg, input_grad, linf_box
from robustprune.attacks.registry import ATTACKS


def mean_abs_normalised(grad: torch.Tensor) -> torch.Tensor:
    """grad / mean(|grad|) per example: the authors' code uses the mean where the paper writes the L1
    norm; the sign of the momentum is the same, but the look-ahead step needs this scale."""
    scale = grad.abs().mean(dim=tuple(range(1, grad.dim())), keepdim=True).clamp_(min=1e-12)
    return grad / scale


@ATTACKS.register("ni_fgsm")
class NIFGSM:
    """NI-FGSM L-inf (Lin et al. 2020): momentum iterative FGSM with a Nesterov look-ahead gradient."""

    def __init__(self, eps: float, steps: int = 10, alpha: float | None = None, decay: float = 1.0):
        self.eps = check_eps("NI-FGSM", eps)
        self.steps = check_count("NI-FGSM", "steps", steps, 10)
        self.alpha = self.eps / self.steps if alpha is None else check_nonneg("NI-FGSM", "alpha", alpha)
        self.decay = check_nonneg("NI-FGSM", "decay", decay)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        check_image_range(x)
        x = x.detach()
        lo, hi = linf_box(x, self.eps)
        x_adv, g = x.clone(), torch.zeros_like(x)
        with frozen_eval(model), torch.enable_grad():
            for _ in range(self.steps):
                # the look-ahead point is not clipped, as in the authors' code
                _, _, grad = input_grad(model, x_adv + (self.alpha * self.decay) * g, y)
                g = self.decay * g + mean_abs_normalised(grad)
                x_adv = torch.clamp(x_adv + self.alpha * g.sign(), lo, hi)
        return x_adv
