"""FAB, the Fast Adaptive Boundary attack (Croce & Hein, ICML 2020, "Minimally distorted adversarial examples
with a fast adaptive boundary attack"), L-inf and L2, in the two forms AutoAttack runs: FAB-T (targeted at the
9 runner-up classes of the clean input, the standard version) and untargeted FAB (the "plus" version).

Each step linearises the model at the iterate x_k: the decision boundary towards the chosen class becomes a
hyperplane <w, z> = b. Both x_k and the clean input x_0 are projected onto that hyperplane intersected with the
[0, 1] box (minimal L-inf or L2 move), and the next iterate is a convex combination of the two projections,
pulled towards x_0 by alpha <= alpha_max and pushed past the boundary by eta. An iterate that is adversarial is
remembered if it is the smallest so far, then moved back towards x_0 by the factor beta.

FAB looks for the smallest perturbation, not for one inside the eps-ball; as in AutoAttack, a point counts as
broken when the smallest adversarial example found lies within eps, and eps only sizes the random restarts
(uniform direction, radius eps/2 around x_0)."""

from __future__ import annotations

import math

import torch
from torch import nn

from robustprune.attacks.base import attack_autocast, check_image_range, check_precision, frozen_eval
from robustprune.attacks.norms import check_norm, check_radius, verified
from robustprune.attacks.pgd import check_count, check_seed, make_generator
from robustprune.attacks.registry import ATTACKS
from robustprune.errors import UserError

# ---- the projection onto a hyperplane intersected with the [0, 1] box ----------------------------------------


NEWTON_STEPS = 8  # FAB's hyperplanes on MNIST need at most 5; rows still short after 8 are solved by sorting


def _level_crossing(
    weight: torch.Tensor, knot: torch.Tensor, level: torch.Tensor, newton_steps: int = NEWTON_STEPS
) -> torch.Tensor:
    """Per row, the smallest lam >= 0 with F(lam) = sum_i weight_i * min(lam, knot_i) = level (weight, knot,
    level >= 0), or, when no lam reaches the level, one at least as large as every knot of positive weight.

    F is piecewise linear, non-decreasing and concave, with kinks at the knots. Newton's method from lam = 0
    stays below the root and lands on it exactly once it reaches the root's segment: a few steps, each a couple
    of passes over the row, instead of sorting the knots (the bulk of the cost of FAB's projection). The rows
    that have not converged after `newton_steps` are solved exactly by sorting."""
    lam = torch.zeros_like(level)
    short = level
    for _ in range(newton_steps):
        slope = (weight * (knot > lam[:, None])).sum(1)
        step = (short > 1e-5 * level) & (slope > 0)  # slope 0: lam is past every knot, F is flat
        if not bool(step.any()):
            return lam
        lam = torch.where(step, lam + short / slope.clamp_min(1e-30), lam)
        short = torch.where(step, level - (weight * torch.minimum(knot, lam[:, None])).sum(1), 0.0)
    rest = (short > 1e-5 * level).nonzero().squeeze(1)
    if len(rest):
        lam[rest] = _level_crossing_sorted(weight[rest], knot[rest], level[rest])
    return lam


def _level_crossing_sorted(weight: torch.Tensor, knot: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    """_level_crossing by sorting the knots (exact, whatever the row). At the k-th smallest knot F equals
    A_k + knot_k * S_k, where A_k sums weight * knot over the knots before k and S_k sums the weights from k on;
    the root lies on the first segment whose right end reaches the level (else: the largest knot)."""
    knot, order = knot.sort(dim=1)
    weight = weight.gather(1, order)
    wk = weight * knot
    before = wk.cumsum(1) - wk  # A_k
    after = weight.flip(1).cumsum(1).flip(1)  # S_k
    below = (before + knot * after < level[:, None]).sum(1)  # knots where F is still short of the level
    k = below.clamp(max=knot.shape[1] - 1)[:, None]
    lam = (level - before.gather(1, k).squeeze(1)) / after.gather(1, k).squeeze(1).clamp_min(1e-30)
    return torch.where(below == knot.shape[1], knot[:, -1], lam.clamp_min(0.0))


def project_to_hyperplane(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor, norm: str) -> torch.Tensor:
    """The minimal-norm move d (L-inf or L2) that puts each row t of a (n, D) batch on its hyperplane
    <w, t + d> = b while keeping t + d in [0, 1]^D; when the box does not reach the hyperplane, the move to the
    corner of the box nearest to it. t must lie in the box. Returns d, shape (n, D).

    Moving each coordinate only in the direction that closes the gap, the largest move is `room` (the distance to
    the box). For L-inf the optimum moves every coordinate by min(lam, room_i), closing sum |w_i| min(lam, room_i);
    for L2 (KKT) by min(mu |w_i|, room_i), closing sum w_i^2 min(mu, room_i / |w_i|). Both are one level crossing
    of a piecewise linear sum, solved for all rows at once."""
    gap = (w * t).sum(1) - b  # > 0: <w, t> must decrease
    direction = -torch.sign(w) * torch.where(gap >= 0, 1.0, -1.0).to(w.dtype)[:, None]
    room = torch.where(direction > 0, 1.0 - t, t).clamp_min(0.0)
    size = w.abs()
    if norm == "Linf":
        lam = _level_crossing(size, room, gap.abs())
        step = torch.minimum(lam[:, None].expand_as(room), room)
    else:
        knot = torch.where(size > 0, room / size.clamp_min(1e-30), torch.zeros_like(room))
        mu = _level_crossing(size * size, knot, gap.abs())
        step = torch.minimum(mu[:, None] * size, room)
    return direction * step


def _norm(d: torch.Tensor, norm: str) -> torch.Tensor:
    return d.abs().amax(1) if norm == "Linf" else d.norm(p=2, dim=1)


def _dual_norm(g: torch.Tensor, norm: str) -> torch.Tensor:
    """The norm that turns a logit gap into a distance to the linearised boundary: L1 for L-inf, L2 for L2."""
    return g.abs().sum(-1) if norm == "Linf" else g.norm(p=2, dim=-1)


# ---- the gradients of the logit differences -------------------------------------------------------------------


def _target_difference(
    forward, z: torch.Tensor, y: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """f = logit_target - logit_y at each flat point z and its gradient, from one backward of the sum."""
    z = z.detach().requires_grad_(True)
    logits = forward(z)
    diff = logits.gather(1, target[:, None]).squeeze(1) - logits.gather(1, y[:, None]).squeeze(1)
    (grad,) = torch.autograd.grad(diff.sum(), z)
    return diff.detach().float(), grad.float()


def class_differences(forward, z: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logit_k - logit_y for every class k at each flat point z, shape (n, K), and their gradients (K, n, D):
    one forward, then one backward per class on the same graph (forward: flat points -> logits)."""
    z = z.detach().requires_grad_(True)
    logits = forward(z)
    k = logits.shape[1]
    eye = torch.eye(k, device=z.device, dtype=logits.dtype)
    seeds = eye[:, None, :] - eye[y][None, :, :]  # (K, n, K): d(logit_k - logit_y) per class k
    grads = torch.stack([torch.autograd.grad(logits, z, seeds[c], retain_graph=c < k - 1)[0] for c in range(k)])
    diff = (logits - logits.gather(1, y[:, None])).detach()
    return diff.float(), grads.float()


# ---- the attack -----------------------------------------------------------------------------------------------


def _check_fraction(attack: str, name: str, value, low_open: bool, meaning: str, usual: float) -> float:
    number = not isinstance(value, bool) and isinstance(value, (int, float))
    if not (number and (value > 0 if low_open else value >= 0) and value <= 1):
        interval = "(0, 1]" if low_open else "[0, 1]"
        raise UserError(
            f"{attack} {name} ({meaning}) must be a number in {interval}, got {value!r}; AutoAttack uses {usual}"
        )
    return float(value)


class _FABBase:
    """The FAB iteration shared by the targeted and the untargeted attack."""

    NAME = "FAB"
    searches_ball = True  # robust accuracy at eps is a search of the whole ball (see evaluate/suite.py)

    def __init__(
        self,
        eps: float,
        norm: str = "Linf",
        steps: int = 100,
        restarts: int = 1,
        alpha_max: float = 0.1,
        eta: float = 1.05,
        beta: float = 0.9,
        seed: int = 0,
        precision: str = "fp32",
    ):
        name = self.NAME
        self.precision = check_precision(name, precision)
        self.norm = check_norm(name, norm)
        self.eps = check_radius(name, eps, self.norm)
        self.steps = check_count(name, "steps", steps, 100)
        self.restarts = check_count(name, "restarts", restarts, 1)
        self.alpha_max = _check_fraction(name, "alpha_max", alpha_max, False, "the largest pull towards the input", 0.1)
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not (1 <= eta and math.isfinite(eta)):
            raise UserError(
                f"{name} eta (the overshoot past the linearised boundary) must be a finite number >= 1, "
                f"got {eta!r}; AutoAttack uses 1.05"
            )
        self.eta = float(eta)
        self.beta = _check_fraction(name, "beta", beta, True, "the backward step towards the input", 0.9)
        self.seed = check_seed(name, seed)

    # one run: the smallest adversarial example of `steps` iterations, per point
    def _run(self, forward, x0, y, target, start):
        """forward: flat points -> logits; x0: clean points (n, D) in fp32; start: the first iterate; target: the
        class per point, or None (untargeted: the class with the nearest linearised boundary at each step).
        Returns (the smallest adversarial iterate, its norm) per point; norm inf where no iterate was adversarial."""
        n = len(x0)
        best, best_norm = x0.clone(), torch.full((n,), math.inf, device=x0.device)
        x1 = start
        for _ in range(self.steps):
            if target is None:
                diff, grads = class_differences(forward, x1, y)
                dist = diff.abs() / (1e-12 + _dual_norm(grads, self.norm).T)  # (n, K)
                dist.scatter_(1, y[:, None], math.inf)
                k = dist.argmin(1)
                f = diff.gather(1, k[:, None]).squeeze(1)
                w = grads[k, torch.arange(n, device=x0.device)]
            else:
                f, w = _target_difference(forward, x1, y, target)
            # the linearised boundary f(x1) + <w, z - x1> = 0, i.e. <w, z> = b
            b = (w * x1).sum(1) - f
            d = project_to_hyperplane(torch.cat((x1, x0)), torch.cat((w, w)), torch.cat((b, b)), self.norm)
            d1, d2 = d[:n], d[n:]
            a1, a2 = _norm(d1, self.norm).clamp_min(1e-8), _norm(d2, self.norm).clamp_min(1e-8)
            alpha = (a1 / (a1 + a2)).clamp(0.0, self.alpha_max)[:, None]
            x1 = ((x1 + self.eta * d1) * (1 - alpha) + (x0 + self.eta * d2) * alpha).clamp_(0.0, 1.0)
            with torch.no_grad():
                adv = forward(x1).argmax(1) != y
            size = _norm(x1 - x0, self.norm)
            better = adv & (size < best_norm)
            best = torch.where(better[:, None], x1, best)
            best_norm = torch.where(better, size, best_norm)
            x1 = torch.where(adv[:, None], x0 + self.beta * (x1 - x0), x1)
        return best, best_norm

    def _random_start(self, x0: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """x0 plus a random direction scaled to norm eps/2 (as in the original), clamped to the box."""
        if self.norm == "Linf":
            t = torch.rand(x0.shape, generator=gen, device=x0.device).mul_(2).sub_(1)
        else:
            t = torch.randn(x0.shape, generator=gen, device=x0.device)
        t = t / _norm(t, self.norm).clamp_min(1e-12)[:, None]
        return (x0 + 0.5 * self.eps * t).clamp_(0.0, 1.0)

    def _targets(self, logits: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor | None]:
        """The target class of each run, per point (None: untargeted)."""
        return [None]

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        check_image_range(x)
        x = x.detach()
        if y.shape != (len(x),) or y.is_floating_point() or y.is_complex() or y.dtype == torch.bool:
            raise UserError(
                f"{self.NAME} needs one integer label per image, got labels of shape {tuple(y.shape)} "
                f"and dtype {y.dtype} for {len(x)} images"
            )
        y = y.long()
        if self.eps == 0 or len(x) == 0:  # nothing but the input lies within a zero radius
            return x.clone()
        gen = make_generator(x.device, self.seed)
        shape = x.shape
        flat = x.float().flatten(1)
        out = flat.clone()
        with frozen_eval(model), torch.enable_grad():
            with torch.no_grad():
                logits = model(x)
            if int(y.min()) < 0 or int(y.max()) >= logits.shape[1]:
                raise UserError(
                    f"{self.NAME} labels must be in [0, {logits.shape[1] - 1}] for a model with "
                    f"{logits.shape[1]} classes, got values in [{int(y.min())}, {int(y.max())}]"
                )
            left = logits.argmax(1) == y  # misclassified inputs are their own adversarial examples

            def forward(z):  # flat fp32 points -> fp32 logits, the model fed in the images' dtype
                with attack_autocast(self.precision, x.device):
                    return model(z.view((len(z),) + shape[1:]).to(x.dtype)).float()

            for target in self._targets(logits, y):
                for restart in range(self.restarts):
                    idx = left.nonzero().squeeze(1)
                    if len(idx) == 0:
                        break
                    x0 = flat[idx]
                    start = x0 if restart == 0 else self._random_start(x0, gen)
                    best, size = self._run(forward, x0, y[idx], None if target is None else target[idx], start)
                    broken = size <= self.eps
                    out[idx[broken]] = best[broken]
                    left[idx[broken]] = False
        return verified(model, x, out.view(shape).to(x.dtype), y, self.eps, self.norm)


@ATTACKS.register("fab")
class FAB(_FABBase):
    """FAB (Croce & Hein 2020): untargeted minimum-perturbation attack, Linf or L2, 5 restarts as in AutoAttack+."""

    NAME = "FAB"

    def __init__(
        self,
        eps: float,
        norm: str = "Linf",
        steps: int = 100,
        restarts: int = 5,
        alpha_max: float = 0.1,
        eta: float = 1.05,
        beta: float = 0.9,
        seed: int = 0,
        precision: str = "fp32",
    ):
        super().__init__(eps, norm, steps, restarts, alpha_max, eta, beta, seed, precision)


@ATTACKS.register("fab_t")
class FABT(_FABBase):
    """FAB-T (Croce & Hein 2020): targeted minimum-perturbation attack, 9 target classes."""

    NAME = "FAB-T"

    def __init__(
        self,
        eps: float,
        norm: str = "Linf",
        steps: int = 100,
        n_target_classes: int = 9,
        restarts: int = 1,
        alpha_max: float = 0.1,
        eta: float = 1.05,
        beta: float = 0.9,
        seed: int = 0,
        precision: str = "fp32",
    ):
        super().__init__(eps, norm, steps, restarts, alpha_max, eta, beta, seed, precision)
        self.n_target_classes = check_count(self.NAME, "n_target_classes", n_target_classes, 9)

    def _targets(self, logits: torch.Tensor, y: torch.Tensor) -> list[torch.Tensor]:
        """The classes other than y ranked by their clean logit, best first; at most K - 1 of them."""
        others = logits.scatter(1, y[:, None], -math.inf)
        ranked = others.argsort(dim=1, descending=True, stable=True)
        return [ranked[:, j] for j in range(min(self.n_target_classes, logits.shape[1] - 1))]
