"""Threat-model geometry every attack shares: the norms, per-example distances, the projection onto
the eps-ball intersected with the [0, 1] image box, the margin losses of AutoAttack (DLR), and the
fp32 check that an adversarial example really is one."""

from __future__ import annotations

import math

import torch
from torch import nn

from robustprune.attacks.base import frozen_eval
from robustprune.errors import UserError

NORMS = ("Linf", "L2")
# AutoAttack's own check allows this much float error on the radius (pixels are in [0, 1])
EPS_TOLERANCE = 1e-5


def check_norm(attack: str, norm) -> str:
    """'Linf' or 'L2' (also accepted: linf, inf, l2), as AutoAttack and torchattacks spell them."""
    canonical = {"linf": "Linf", "inf": "Linf", "l2": "L2"}
    if isinstance(norm, str) and norm.lower() in canonical:
        return canonical[norm.lower()]
    raise UserError(f"{attack} norm must be 'Linf' or 'L2', got {norm!r}")


def check_radius(attack: str, eps, norm: str) -> float:
    """An L-inf radius lies in [0, 1] (pixel scale); an L2 radius is any finite number >= 0."""
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise UserError(f"{attack} eps must be a finite number >= 0, got {eps!r}; use e.g. 8/255 (Linf) or 0.5 (L2)")
    if norm == "Linf" and eps > 1:
        raise UserError(
            f"{attack} eps must be in [0, 1] for the Linf norm (pixels are in [0, 1]), got {eps!r}; "
            f"use e.g. 0.3 or 8/255"
        )
    return float(eps)


def distance(a: torch.Tensor, b: torch.Tensor, norm: str) -> torch.Tensor:
    """Per-example ||a - b|| in the given norm, computed in fp32 (shape (n,))."""
    d = (a.float() - b.float()).flatten(1)
    return d.abs().amax(1) if norm == "Linf" else d.norm(p=2, dim=1)


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float | torch.Tensor, norm: str) -> torch.Tensor:
    """The point of the eps-ball around x (intersected with [0, 1]) nearest to x_adv for L-inf; for L2
    the radial projection followed by the box clamp, which never leaves the ball again since x itself
    is inside the box. eps: a number or one radius per example."""
    if not torch.is_tensor(eps):
        eps = torch.full((len(x),), float(eps), device=x.device, dtype=x.dtype)
    shape = (len(x),) + (1,) * (x.dim() - 1)
    r = eps.to(x.dtype).view(shape)
    delta = x_adv - x
    if norm == "Linf":
        delta = torch.maximum(torch.minimum(delta, r), -r)
    else:
        n = delta.flatten(1).norm(p=2, dim=1).view(shape)
        delta = delta * torch.clamp(r / n.clamp_min(1e-12), max=1.0)
    return (x + delta).clamp_(0.0, 1.0)


def random_start(x: torch.Tensor, eps: float, norm: str, gen: torch.Generator) -> torch.Tensor:
    """A uniform point of the L-inf ball, or a point on the L2 sphere in a Gaussian direction."""
    if norm == "Linf":
        u = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype).mul_(2 * eps).sub_(eps)
        return project(x + u, x, eps, norm)
    t = torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    t = t / t.flatten(1).norm(p=2, dim=1).clamp_min(1e-12).view((len(x),) + (1,) * (x.dim() - 1))
    return project(x + eps * t, x, eps, norm)


def ascent_direction(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """The steepest-ascent direction of unit norm: sign for L-inf, the normalised gradient for L2."""
    if norm == "Linf":
        return grad.sign()
    n = grad.flatten(1).norm(p=2, dim=1).view((len(grad),) + (1,) * (grad.dim() - 1))
    return grad / (n + 1e-12)


def dlr_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Difference of logits ratio (Croce & Hein 2020, Eq. 6), per example: the margin of the true class
    over the best other class, scaled by z_pi1 - z_pi3 so that it does not change when logits are scaled."""
    z, _ = logits.sort(dim=1, descending=True)
    zy = logits.gather(1, y[:, None]).squeeze(1)
    top_is_y = logits.argmax(1) == y
    best_other = torch.where(top_is_y, z[:, 1], z[:, 0])
    return -(zy - best_other) / (z[:, 0] - z[:, 2] + 1e-12)


def dlr_targeted_loss(logits: torch.Tensor, y: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Targeted DLR (Croce & Hein 2020, Eq. 7): -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2)."""
    z, _ = logits.sort(dim=1, descending=True)
    zy = logits.gather(1, y[:, None]).squeeze(1)
    zt = logits.gather(1, target[:, None]).squeeze(1)
    return -(zy - zt) / (z[:, 0] - 0.5 * (z[:, 2] + z[:, 3]) + 1e-12)


@torch.no_grad()
def verified(
    model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, eps: float, norm: str
) -> torch.Tensor:
    """x_adv where it is misclassified by the fp32 model, inside the eps-ball (float tolerance
    EPS_TOLERANCE) and inside [0, 1]; x elsewhere. Whatever the attack did inside (bf16, any
    iterate), a point counts as broken only if this check says so."""
    x32, adv32 = x.float(), x_adv.float()
    # fp32 unless the model's own weights are in another float type (a model cast to bf16 by its user)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    with frozen_eval(model), torch.autocast(x.device.type, enabled=False):
        wrong = model(adv32.to(dtype)).argmax(1) != y
    inside = (
        (distance(adv32, x32, norm) <= eps + EPS_TOLERANCE)
        & (adv32.flatten(1).amin(1) >= 0)
        & (adv32.flatten(1).amax(1) <= 1)
    )
    ok = (wrong & inside).view((len(x),) + (1,) * (x.dim() - 1))
    return torch.where(ok, x_adv, x)
