"""APGD-CE, the step-size-free PGD of AutoAttack (Croce & Hein 2020, "Reliable evaluation of adversarial
robustness with an ensemble of diverse parameter-free attacks", Algorithm 1), L-inf, cross-entropy.

Step size 2*eps, momentum 0.75; at the checkpoints w_j the step of an example is halved, and it restarts
from its best-loss point, when (1) its loss went up in fewer than rho of the steps since the last
checkpoint or (2) neither its step size nor its best loss changed since the last checkpoint."""
from __future__ import annotations

import math

import torch
from torch import nn

from robustprune.attacks.base import ATTACKS, check_image_range, frozen_eval
from robustprune.attacks.pgd import (check_count, check_eps, check_seed, input_grad, linf_box, make_generator,
                                     uniform_like)
from robustprune.errors import UserError

MOMENTUM = 0.75


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


@ATTACKS.register("apgd_ce")
class APGDCE:
    """APGD-CE L-inf (Croce & Hein 2020): PGD with momentum and an automatic step size schedule."""

    def __init__(self, eps: float, steps: int = 100, restarts: int = 1, seed: int = 0, rho: float = 0.75):
        self.eps = check_eps("APGD-CE", eps)
        self.steps = check_count("APGD-CE", "steps", steps, 100)
        self.restarts = check_count("APGD-CE", "restarts", restarts, 1)
        self.seed = check_seed("APGD-CE", seed)
        if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not 0 < rho <= 1:
            raise UserError(f"APGD-CE rho must be a number in (0, 1], got {rho!r}; the paper uses 0.75")
        self.rho = float(rho)
        self.checks = set(checkpoints(self.steps))

    def _run(self, model, x, y, gen):
        """One run from a random start. Returns (point, loss, fooled): per example the misclassified
        iterate with the highest loss if there was one, else the highest-loss iterate."""
        n, eps = len(x), self.eps
        shape = (n,) + (1,) * (x.dim() - 1)
        lo, hi = linf_box(x, eps)
        x_cur = torch.clamp(x + uniform_like(x, -eps, eps, gen), lo, hi)
        loss, logits, grad = input_grad(model, x_cur, y)
        x_best, loss_best, grad_best = x_cur.clone(), loss.clone(), grad.clone()
        fooled = logits.argmax(1) != y
        x_adv, loss_adv = x_cur.clone(), torch.where(fooled, loss, -math.inf)
        step = torch.full(shape, 2 * eps, device=x.device, dtype=x.dtype)
        x_prev = x_cur
        ups = torch.zeros(n, device=x.device)          # loss increases since the last checkpoint
        last_w = 0
        best_at_last = loss_best.clone()               # best loss at the last checkpoint
        reduced_at_last = torch.zeros(n, dtype=torch.bool, device=x.device)
        for k in range(1, self.steps + 1):
            z = torch.clamp(x_cur + step * grad.sign(), lo, hi)
            if k == 1:  # no momentum on the first step
                x_new = z
            else:
                x_new = torch.clamp(x_cur + MOMENTUM * (z - x_cur) + (1 - MOMENTUM) * (x_cur - x_prev), lo, hi)
            x_prev = x_cur
            loss_new, logits, grad = input_grad(model, x_new, y)
            ups += loss_new > loss
            x_cur, loss = x_new, loss_new

            better = loss > loss_best
            x_best = torch.where(better.view(shape), x_cur, x_best)
            grad_best = torch.where(better.view(shape), grad, grad_best)
            loss_best = torch.where(better, loss, loss_best)
            wrong = (logits.argmax(1) != y) & (loss > loss_adv)
            x_adv = torch.where(wrong.view(shape), x_cur, x_adv)
            loss_adv = torch.where(wrong, loss, loss_adv)
            fooled |= wrong

            if k in self.checks:
                oscillating = ups < self.rho * (k - last_w)
                stalled = ~reduced_at_last & (loss_best <= best_at_last)
                halve = oscillating | stalled
                step = torch.where(halve.view(shape), step / 2, step)
                # restart the halved examples from their best point (its gradient is already known)
                x_cur = torch.where(halve.view(shape), x_best, x_cur)
                grad = torch.where(halve.view(shape), grad_best, grad)
                loss = torch.where(halve, loss_best, loss)
                reduced_at_last, best_at_last, last_w = halve, loss_best.clone(), k
                ups.zero_()
        out = torch.where(fooled.view(shape), x_adv, x_best)
        return out, torch.where(fooled, loss_adv, loss_best), fooled

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        check_image_range(x)
        x = x.detach()
        gen = make_generator(x.device, self.seed)
        with frozen_eval(model), torch.enable_grad():
            with torch.no_grad():  # a misclassified input is its own adversarial example: attack the others
                fooled = model(x).argmax(1) != y
            best, best_loss = x.clone(), torch.full((len(x),), -math.inf, device=x.device)
            for _ in range(self.restarts):
                left = (~fooled).nonzero().squeeze(1)
                if len(left) == 0:
                    break
                x_r, loss_r, fooled_r = self._run(model, x[left], y[left], gen)
                take = fooled_r | (loss_r > best_loss[left])
                idx = left[take]
                best[idx], best_loss[idx], fooled[idx] = x_r[take], loss_r[take], fooled_r[take]
        return best
