"""VMI-FGSM, variance-tuned momentum iterative FGSM (Wang & He 2021, "Enhancing the transferability of
adversarial attacks through variance tuning", CVPR), L-inf. Each step's gradient is corrected by the
previous step's gradient variance: the mean gradient over n_samples points drawn uniformly from the
beta*eps L-inf neighbourhood, minus the gradient at the point itself."""

from __future__ import annotations

import torch
from torch import nn

from robustprune.attacks.base import check_image_range, frozen_eval
from robustprune.attacks.nifgsm import mean_abs_normalised
from robustprune.attacks.pgd import (
    check_count,
    check_eps,
    check_nonneg,
    check_seed,
    input_grad,
    linf_box,
    make_generator,
    uniform_like,
)
from robustprune.attacks.registry import ATTACKS

CHUNK_IMAGES = 1024  # small batches: stack neighbour samples up to this many images per pass


@ATTACKS.register("vmi_fgsm")
class VMIFGSM:
    """VMI-FGSM L-inf (Wang & He 2021): momentum iterative FGSM with gradient-variance tuning."""

    def __init__(
        self,
        eps: float,
        steps: int = 10,
        alpha: float | None = None,
        decay: float = 1.0,
        n_samples: int = 20,
        beta: float = 1.5,
        seed: int = 0,
    ):
        self.eps = check_eps("VMI-FGSM", eps)
        self.steps = check_count("VMI-FGSM", "steps", steps, 10)
        self.alpha = self.eps / self.steps if alpha is None else check_nonneg("VMI-FGSM", "alpha", alpha)
        self.decay = check_nonneg("VMI-FGSM", "decay", decay)
        self.n_samples = check_count("VMI-FGSM", "n_samples", n_samples, 20)
        self.beta = check_nonneg("VMI-FGSM", "beta", beta)
        self.seed = check_seed("VMI-FGSM", seed)

    def _neighbour_grad(self, model, x_adv, y, gen) -> torch.Tensor:
        """Mean gradient over n_samples uniform neighbours, several samples per forward pass."""
        radius = self.beta * self.eps
        per_chunk = max(1, min(self.n_samples, CHUNK_IMAGES // max(len(x_adv), 1)))
        total = torch.zeros_like(x_adv)
        done = 0
        while done < self.n_samples:
            k = min(per_chunk, self.n_samples - done)
            xs = x_adv.repeat(k, *([1] * (x_adv.dim() - 1)))
            # neighbours are not clipped to [0, 1], as in the authors' code
            xs = xs + uniform_like(xs, -radius, radius, gen)
            _, _, grad = input_grad(model, xs, y.repeat(k))
            total += grad.view(k, *x_adv.shape).sum(0)
            done += k
        return total / self.n_samples

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        check_image_range(x)
        x = x.detach()
        lo, hi = linf_box(x, self.eps)
        gen = make_generator(x.device, self.seed)
        x_adv, g, v = x.clone(), torch.zeros_like(x), torch.zeros_like(x)
        with frozen_eval(model), torch.enable_grad():
            for _ in range(self.steps):
                _, _, grad = input_grad(model, x_adv, y)
                g = self.decay * g + mean_abs_normalised(grad + v)
                v = self._neighbour_grad(model, x_adv, y, gen) - grad
                x_adv = torch.clamp(x_adv + self.alpha * g.sign(), lo, hi)
        return x_adv
