"""Projected gradient descent, L-inf (Madry et al. 2018, "Towards deep learning models resistant to
adversarial attacks"), and the small pieces the other iterative attacks share: parameter checks,
the projection onto the eps-ball intersected with [0, 1], seeded random starts."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from robustprune.attacks.base import check_image_range, frozen_eval
from robustprune.attacks.norms import ascent_direction, check_norm, check_radius, project, random_start, verified
from robustprune.attacks.registry import ATTACKS
from robustprune.errors import UserError

# ---- shared by the iterative attacks ----------------------------------------------------------------


def check_eps(attack: str, eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not 0 <= eps <= 1:
        raise UserError(
            f"{attack} eps must be a number in [0, 1] (pixels are in [0, 1]), got {eps!r}; use e.g. 0.1 or 8/255"
        )
    return float(eps)


def check_count(attack: str, name: str, value, example: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f"{attack} {name} must be an integer >= 1, got {value!r}; use e.g. {example}")
    return value


def check_nonneg(attack: str, name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (value >= 0 and math.isfinite(value)):
        raise UserError(f"{attack} {name} must be a finite number >= 0, got {value!r}; leave it out for the default")
    return float(value)


def check_seed(attack: str, seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UserError(f"{attack} seed must be an integer, got {seed!r}; use e.g. 0")
    return seed


def make_generator(device: torch.device, seed: int) -> torch.Generator:
    """A generator on the data's device, so random starts need no host-to-device copy."""
    return torch.Generator(device=device).manual_seed(seed)


def uniform_like(x: torch.Tensor, low: float, high: float, gen: torch.Generator) -> torch.Tensor:
    u = torch.rand(x.shape, generator=gen, device=x.device, dtype=x.dtype)
    return u.mul_(high - low).add_(low).contiguous(memory_format=_format(x))


def _format(x: torch.Tensor) -> torch.memory_format:
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def linf_box(x: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-pixel bounds of the eps-ball around x intersected with [0, 1]: projecting is one clamp."""
    return (x - eps).clamp_(min=0.0), (x + eps).clamp_(max=1.0)


def input_grad(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-example cross-entropy, logits and its gradient w.r.t. x (summed loss, so an example's
    gradient does not depend on the batch size). Returns (loss per example, logits, grad)."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    loss = F.cross_entropy(logits, y, reduction="none")
    (grad,) = torch.autograd.grad(loss.sum(), x)
    return loss.detach(), logits.detach(), grad


# ---- PGD --------------------------------------------------------------------------------------------


@ATTACKS.register("pgd")
class PGD:
    """PGD (Madry et al. 2018), L-inf or L2: normalised-gradient steps projected onto the eps-ball, random
    restarts; by default each example keeps the first iterate that misclassifies it."""

    searches_ball = True  # robust accuracy at eps is a search of the whole ball (see evaluate/suite.py)

    def __init__(
        self,
        eps: float,
        steps: int = 10,
        step_size: float | None = None,
        random_start: bool = True,
        restarts: int = 1,
        seed: int = 0,
        norm: str = "Linf",
        early_stop: bool = True,
    ):
        self.norm = check_norm("PGD", norm)
        self.eps = check_radius("PGD", eps, self.norm)
        self.steps = check_count("PGD", "steps", steps, 10)
        self.step_size = (
            2.5 * self.eps / self.steps if step_size is None else check_nonneg("PGD", "step_size", step_size)
        )
        for flag, value in (("random_start", random_start), ("early_stop", early_stop)):
            if not isinstance(value, bool):
                raise UserError(f"PGD {flag} must be true or false, got {value!r}")
        self.random_start = random_start
        self.restarts = check_count("PGD", "restarts", restarts, 1)
        self.seed = check_seed("PGD", seed)
        # early_stop=False is Madry's attack as adversarial training uses it: every step on every
        # example, the last iterate returned (the loss maximiser, not the first point over the boundary)
        self.early_stop = early_stop

    def _start(self, x, gen):
        if not self.random_start:
            return x.clone()
        if self.norm == "Linf":  # the uniform start this attack has always drawn (same numbers as before)
            lo, hi = linf_box(x, self.eps)
            return torch.clamp(x + uniform_like(x, -self.eps, self.eps, gen), lo, hi)
        return random_start(x, self.eps, self.norm, gen)

    def _step(self, x_adv, grad, x):
        if self.norm == "Linf":
            lo, hi = linf_box(x, self.eps)
            return torch.clamp(x_adv.add_(grad.sign_(), alpha=self.step_size), lo, hi)
        return project(x_adv + self.step_size * ascent_direction(grad, self.norm), x, self.eps, self.norm)

    def _run_all(self, model, x, y, gen):
        """Madry's PGD: every step on every example; the last iterate."""
        x_adv = self._start(x, gen)
        for _ in range(self.steps):
            _, _, grad = input_grad(model, x_adv, y)
            x_adv = self._step(x_adv, grad, x)
        return x_adv

    def _run_active(self, model, x, y, gen):
        """PGD on an active set: an example leaves the batch at its first misclassifying iterate, which
        is kept. Returns (adversarial examples, broken mask); unbroken entries are x."""
        out, broken = x.clone(), torch.zeros(len(x), dtype=torch.bool, device=x.device)
        idx, x0, yy = torch.arange(len(x), device=x.device), x, y
        x_adv = self._start(x, gen)
        for k in range(self.steps + 1):
            if k < self.steps:
                _, logits, grad = input_grad(model, x_adv, yy)
            else:  # the last iterate needs a forward pass of its own
                with torch.no_grad():
                    logits = model(x_adv)
            wrong = logits.argmax(1) != yy
            if wrong.any():
                out[idx[wrong]], broken[idx[wrong]] = x_adv[wrong], True
                keep = ~wrong
                if not keep.any():
                    break
                idx, x0, yy, x_adv = idx[keep], x0[keep], yy[keep], x_adv[keep]
                if k < self.steps:
                    grad = grad[keep]
            if k < self.steps:
                x_adv = self._step(x_adv, grad, x0)
        return out, broken

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        check_image_range(x)
        x = x.detach()
        gen = make_generator(x.device, self.seed) if self.random_start else None
        restarts = self.restarts if self.random_start else 1  # without random starts every run is the same
        with frozen_eval(model), torch.enable_grad():
            if not self.early_stop:
                return self._madry(model, x, y, gen, restarts)
            out = x.clone()
            with torch.no_grad():  # a misclassified input is its own adversarial example: attack the others
                robust = model(x).argmax(1) == y
            for _ in range(restarts):
                left = robust.nonzero().squeeze(1)
                if len(left) == 0:
                    break
                x_r, broken = self._run_active(model, x[left], y[left], gen)
                out[left[broken]], robust[left[broken]] = x_r[broken], False
            return verified(model, x, out, y, self.eps, self.norm)

    def _madry(self, model, x, y, gen, restarts):
        best = self._run_all(model, x, y, gen)
        if restarts == 1:
            return best
        with torch.no_grad():
            left = (model(best).argmax(1) == y).nonzero().squeeze(1)  # not fooled yet
        for _ in range(restarts - 1):
            if len(left) == 0:
                break
            x_adv = self._run_all(model, x[left], y[left], gen)
            with torch.no_grad():
                fooled = model(x_adv).argmax(1) != y[left]
            # fooled examples keep this restart's point; the others keep the newest iterate
            best[left] = x_adv
            left = left[~fooled]
        return best
