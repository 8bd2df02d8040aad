"""APGD, the step-size-free PGD of AutoAttack (Croce & Hein 2020, "Reliable evaluation of adversarial
robustness with an ensemble of diverse parameter-free attacks", Algorithm 1), L-inf and L2, with the
cross-entropy (APGD-CE), the DLR (APGD-DLR) and the targeted DLR loss (APGD-T).

Step size 2*eps, momentum 0.75; at the checkpoints w_j the step of an example is halved, and it restarts
from its best-loss point, when (1) its loss went up in fewer than rho of the steps since the last
checkpoint or (2) neither its step size nor its best loss changed since the last checkpoint.

Active set: an example leaves the batch the moment an iterate misclassifies it, and that iterate is
its adversarial example. The others' trajectories do not depend on the batch (the model is in eval
mode), so dropping the broken ones changes no number and saves their gradient rows."""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from robustprune.attacks.base import attack_autocast, check_image_range, check_precision, frozen_eval
from robustprune.attacks.norms import (
    ascent_direction,
    check_norm,
    check_radius,
    dlr_loss,
    dlr_targeted_loss,
    project,
    random_start,
    verified,
)
from robustprune.attacks.pgd import check_count, check_seed, make_generator
from robustprune.attacks.registry import ATTACKS
from robustprune.errors import UserError

MOMENTUM = 0.75
LOSSES = ("ce", "dlr", "dlr_targeted")


def checkpoints(steps: int) -> list[int]:
    """Iterations w_j = ceil(p_j * steps), p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)."""
    p_prev, p = 0.0, 0.22
    out = [0]
    while p <= 1.0:
        w = math.ceil(round(p * steps, 9))  # round: 0.22 * 50 must be 11, not 12
        if out[-1] < w < steps:
            out.append(w)
        p_prev, p = p, p + max(p - p_prev - 0.03, 0.06)
    return out[1:]


def loss_fn(name: str) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]:
    if name == "ce":
        return lambda logits, y, t: F.cross_entropy(logits, y, reduction="none")
    if name == "dlr":
        return lambda logits, y, t: dlr_loss(logits, y)
    return lambda logits, y, t: dlr_targeted_loss(logits, y, t)


class APGD:
    """APGD (Croce & Hein 2020) with a chosen loss; the registered names below fix the loss."""

    searches_ball = True  # robust accuracy at eps is a search of the whole ball (see evaluate/suite.py)

    name = "APGD"
    loss = "ce"

    def __init__(
        self,
        eps: float,
        norm: str = "Linf",
        steps: int = 100,
        restarts: int = 1,
        seed: int = 0,
        rho: float = 0.75,
        eot_iter: int = 1,
        n_target_classes: int = 9,
        precision: str = "fp32",
    ):
        self.norm = check_norm(self.name, norm)
        self.eps = check_radius(self.name, eps, self.norm)
        self.steps = check_count(self.name, "steps", steps, 100)
        self.restarts = check_count(self.name, "restarts", restarts, 1)
        self.seed = check_seed(self.name, seed)
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 < rho <= 1:
            raise UserError(f"{self.name} rho must be a number in (0, 1], got {rho!r}; the paper uses 0.75")
        self.rho = float(rho)
        self.eot_iter = check_count(self.name, "eot_iter", eot_iter, 1)
        self.n_target_classes = check_count(self.name, "n_target_classes", n_target_classes, 9)
        self.precision = check_precision(self.name, precision)
        self.checks = set(checkpoints(self.steps))
        self._loss = loss_fn(self.loss)

    def _grad(self, model, x, y, t):
        """Loss per example, logits and the input gradient of the summed loss (averaged over eot_iter
        passes, for randomised models; one pass for a deterministic one gives the same number)."""
        grad = torch.zeros_like(x)
        for _ in range(self.eot_iter):
            xr = x.detach().requires_grad_(True)
            with attack_autocast(self.precision, x.device):
                logits = model(xr).float()
            loss = self._loss(logits, y, t)
            grad += torch.autograd.grad(loss.sum(), xr)[0]
        if self.eot_iter > 1:
            grad /= self.eot_iter
        return loss.detach(), logits.detach(), grad

    def _run(self, model, x, y, t, gen):
        """One run from a random start on examples not yet broken. Returns (adversarial examples, broken
        mask): a broken example's first misclassifying iterate; the others' entries are x."""
        eps, norm, n = self.eps, self.norm, len(x)
        out = x.clone()
        broken = torch.zeros(n, dtype=torch.bool, device=x.device)
        idx = torch.arange(n, device=x.device)  # active example -> row of the batch
        x0, yy, tt = x, y, t
        x_cur = random_start(x0, eps, norm, gen)
        loss, logits, grad = self._grad(model, x_cur, yy, tt)
        x_best, loss_best, grad_best = x_cur.clone(), loss.clone(), grad.clone()
        shape = (n,) + (1,) * (x.dim() - 1)
        step = torch.full(shape, 2 * eps, device=x.device, dtype=x.dtype)
        x_prev = x_cur
        ups = torch.zeros(n, device=x.device)  # loss increases since the last checkpoint
        last_w = 0
        best_at_last = loss_best.clone()  # best loss at the last checkpoint
        reduced_at_last = torch.zeros(n, dtype=torch.bool, device=x.device)
        for k in range(0, self.steps + 1):
            if k > 0:
                z = project(x_cur + step * ascent_direction(grad, norm), x0, eps, norm)
                x_new = (
                    z
                    if k == 1
                    else project(x_cur + MOMENTUM * (z - x_cur) + (1 - MOMENTUM) * (x_cur - x_prev), x0, eps, norm)
                )
                x_prev = x_cur
                loss_new, logits, grad = self._grad(model, x_new, yy, tt)
                ups += loss_new > loss
                x_cur, loss = x_new, loss_new
                better = loss > loss_best
                x_best = torch.where(better.view(-1, *shape[1:]), x_cur, x_best)
                grad_best = torch.where(better.view(-1, *shape[1:]), grad, grad_best)
                loss_best = torch.where(better, loss, loss_best)
            wrong = logits.argmax(1) != yy
            if wrong.any():  # record and drop the broken examples
                out[idx[wrong]] = x_cur[wrong]
                broken[idx[wrong]] = True
                keep = ~wrong
                if not keep.any():
                    break
                idx, x0, yy = idx[keep], x0[keep], yy[keep]
                tt = tt[keep] if tt is not None else None
                x_cur, x_prev, grad, loss = x_cur[keep], x_prev[keep], grad[keep], loss[keep]
                x_best, grad_best, loss_best = x_best[keep], grad_best[keep], loss_best[keep]
                step, ups = step[keep], ups[keep]
                best_at_last, reduced_at_last = best_at_last[keep], reduced_at_last[keep]
                shape = (len(idx),) + shape[1:]
            if k in self.checks:
                oscillating = ups < self.rho * (k - last_w)
                stalled = ~reduced_at_last & (loss_best <= best_at_last)
                halve = oscillating | stalled
                h = halve.view(-1, *shape[1:])
                step = torch.where(h, step / 2, step)
                # restart the halved examples from their best point (its gradient is already known)
                x_cur = torch.where(h, x_best, x_cur)
                grad = torch.where(h, grad_best, grad)
                loss = torch.where(halve, loss_best, loss)
                reduced_at_last, best_at_last, last_w = halve, loss_best.clone(), k
                ups.zero_()
        return out, broken

    def _targets(self, logits: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor | None]:
        """The target classes, one tensor per pass (None: untargeted, one pass)."""
        return [None]

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Per example the adversarial example that broke it, or x where none did (fp32-verified)."""
        check_image_range(x)
        x = x.detach()
        gen = make_generator(x.device, self.seed)
        out = x.clone()
        with frozen_eval(model):
            with torch.no_grad():  # a misclassified input is its own adversarial example: attack the others
                logits = model(x)
                robust = logits.argmax(1) == y
            targets = self._targets(logits, y)
            with torch.enable_grad():
                for t in targets:
                    for _ in range(self.restarts):
                        left = robust.nonzero().squeeze(1)
                        if len(left) == 0:
                            break
                        x_r, broken = self._run(model, x[left], y[left], None if t is None else t[left], gen)
                        out[left[broken]] = x_r[broken]
                        robust[left[broken]] = False
        return verified(model, x, out, y, self.eps, self.norm)


@ATTACKS.register("apgd_ce")
class APGDCE(APGD):
    """APGD-CE (Croce & Hein 2020): PGD with momentum and an automatic step size, cross-entropy loss."""

    name = "APGD-CE"
    loss = "ce"


@ATTACKS.register("apgd_dlr")
class APGDDLR(APGD):
    """APGD-DLR (Croce & Hein 2020): APGD on the scale-invariant difference-of-logits-ratio loss."""

    name = "APGD-DLR"
    loss = "dlr"

    def _targets(self, logits, y):
        if logits.shape[1] < 3:
            raise UserError(
                f"{self.name} needs at least 3 classes (the DLR loss uses the third-largest logit), "
                f"the model has {logits.shape[1]}; use apgd_ce"
            )
        return [None]


@ATTACKS.register("apgd_t")
class APGDT(APGD):
    """APGD-T (Croce & Hein 2020): targeted DLR loss against each of the top-9 other classes in turn."""

    name = "APGD-T"
    loss = "dlr_targeted"

    def _targets(self, logits, y):
        classes = logits.shape[1]
        if classes < 4:
            raise UserError(
                f"{self.name} needs at least 4 classes (the targeted DLR loss uses the fourth-largest "
                f"logit), the model has {classes}; use apgd_ce"
            )
        order = logits.argsort(dim=1, descending=True)
        # the i-th most likely class other than the top one (the true class of a correctly classified input)
        return [order[:, i] for i in range(1, min(self.n_target_classes, classes - 1) + 1)]
