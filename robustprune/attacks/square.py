"""Square Attack (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020, "Square Attack: a query-efficient
black-box adversarial attack via random search"), the score-based attack of AutoAttack: no gradients, only
the margin z_y - max_{j != y} z_j of the model's logits (a point is broken once it is < 0).

Random search over the vertices of the threat model. Each iteration proposes, for every surviving point, a
change confined to a random s x s window and keeps it when it lowers the margin. The side s shrinks at
fixed fractions of the query budget (the paper's schedule for 10 000 queries, rescaled to n_queries).

- L-inf: start from vertical stripes (every column of every channel at x - eps or x + eps); a proposal sets
  the window of each channel to x + eps or x - eps (one sign per channel). A proposal that would leave the
  point as it is flips the sign of one random channel, so that no query is spent on a copy of the current
  point (the paper's reference code resamples the signs there; AutoAttack's code spends the query).
- L2: start from a 5 x 5 grid of 'centre' patterns (two nested-square bumps of opposite signs) scaled to
  norm eps; a proposal moves the perturbation mass of a second window W2 into the window W1, reshaped by a
  fresh centre pattern, so that the perturbation keeps norm eps (Algorithm 3 of the paper).

Each point draws its own windows, signs and pattern orientations from a torch.Generator seeded by `seed`.
A point leaves the working batch as soon as it is misclassified, keeping that adversarial example.
`n_queries` counts the random-search iterations after the initial point, as AutoAttack does."""

from __future__ import annotations

import math

import torch
from torch import nn

from robustprune.attacks.base import attack_autocast, check_image_range, check_precision, frozen_eval
from robustprune.attacks.norms import check_norm, check_radius, verified
from robustprune.attacks.pgd import check_count, check_seed, make_generator
from robustprune.attacks.registry import ATTACKS
from robustprune.errors import UserError

# Iterations (of 10 000) after which the window area p halves (Andriushchenko et al. 2020, Sec. 4)
HALVINGS = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


def window_fraction(p_init: float, it: int, n_queries: int) -> float:
    """The fraction p of the image a window covers at iteration `it`: p_init halved at each of HALVINGS
    passed, the schedule rescaled from 10 000 to n_queries iterations."""
    scaled = int(it / n_queries * 10000)
    return p_init / 2 ** sum(scaled > b for b in HALVINGS)


def centre_pattern(s: int) -> torch.Tensor:
    """The s x s 'centre' pattern of the L2 attack, unit L2 norm (float64): the upper rows hold a bump of
    nested squares around their centre, a pixel at Chebyshev distance d from it weighing sum_{k>=d} 1/(k+1)^2;
    the lower rows hold the negated bump of their own centre; both halves have the same energy."""

    def bump(rows: int, cols: int) -> torch.Tensor:
        if rows == 0:
            return torch.zeros(0, cols, dtype=torch.float64)
        r = (torch.arange(rows) - rows // 2).abs()
        c = (torch.arange(cols) - cols // 2).abs()
        d = torch.maximum(r[:, None], c[None, :])
        k = max(rows // 2, cols // 2) + 1
        weights = 1.0 / torch.arange(1, k + 1, dtype=torch.float64) ** 2
        tail = weights.flip(0).cumsum(0).flip(0)  # tail[d] = sum_{k >= d} 1/(k+1)^2
        b = tail[d]
        return b / b.norm()

    pattern = torch.cat([bump(s // 2, s), -bump(s - s // 2, s)])
    return pattern / pattern.norm()


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """z_y - max_{j != y} z_j per example, in fp32 (< 0: misclassified)."""
    logits = logits.float()
    zy = logits.gather(1, y[:, None])
    other = logits.scatter(1, y[:, None], -math.inf).amax(1)
    return zy.squeeze(1) - other


def window_index(top: torch.Tensor, left: torch.Tensor, shape: torch.Size, s: int) -> torch.Tensor:
    """Flat indices into a contiguous (n, c, h, w) tensor of the s x s window of every example and channel
    whose top-left corner is (top[i], left[i]); shape (n * c * s * s,), example-major, then channel, row, col."""
    n, c, h, w = shape
    dev = top.device
    base = torch.arange(n, device=dev)[:, None] * (c * h * w) + torch.arange(c, device=dev)[None, :] * (h * w)
    ar = torch.arange(s, device=dev)
    offset = (top * w + left)[:, None, None] + (ar[:, None] * w + ar[None, :])  # (n, s, s)
    return (base[:, :, None, None] + offset[:, None]).view(-1)


def random_window(shape: torch.Size, s: int, gen: torch.Generator, device) -> torch.Tensor:
    """window_index of one random s x s window per example, its top-left corner uniform in
    [0, h - s) x [0, w - s) (0 when s spans the side), as in the paper's and AutoAttack's code: the window
    never reaches the last row or column. A uniform corner in [0, h - s] was weaker on two MNIST CNNs with
    'valid' convolutions, whose border pixels weigh little (L2 eps 2, 1000 queries: 1.5 and 4 points more
    robust accuracy)."""
    n, _, h, w = shape
    top = torch.randint(0, max(h - s, 1), (n,), generator=gen, device=device)
    left = torch.randint(0, max(w - s, 1), (n,), generator=gen, device=device)
    return window_index(top, left, shape, s)


@ATTACKS.register("square")
class Square:
    """Square Attack (Andriushchenko et al. 2020): score-based random search, no gradients."""

    searches_ball = True  # robust accuracy at eps is a search of the whole ball (see evaluate/suite.py)

    def __init__(
        self,
        eps: float,
        norm: str = "Linf",
        n_queries: int = 5000,
        p_init: float = 0.8,
        restarts: int = 1,
        seed: int = 0,
        precision: str = "fp32",
    ):
        self.norm = check_norm("Square", norm)
        self.precision = check_precision("Square", precision)
        self.eps = check_radius("Square", eps, self.norm)
        self.n_queries = check_count("Square", "n_queries", n_queries, 5000)
        if isinstance(p_init, bool) or not isinstance(p_init, (int, float)) or not 0 < p_init <= 1:
            raise UserError(
                f"Square p_init must be a number in (0, 1] (the share of the image the first squares "
                f"cover), got {p_init!r}; AutoAttack uses 0.8"
            )
        self.p_init = float(p_init)
        self.restarts = check_count("Square", "restarts", restarts, 1)
        self.seed = check_seed("Square", seed)
        self._patterns: dict[tuple, torch.Tensor] = {}

    # ---- the search -----------------------------------------------------------------------------------

    def _pattern_pair(self, s: int, device, dtype) -> torch.Tensor:
        """(2, s, s): the centre pattern of side s and its transpose (cached)."""
        key = (s, str(device), dtype)
        if key not in self._patterns:
            p = centre_pattern(s)
            self._patterns[key] = torch.stack([p, p.t()]).to(device=device, dtype=dtype)
        return self._patterns[key]

    def _side(self, it: int, h: int, w: int) -> int:
        p = window_fraction(self.p_init, it, self.n_queries)
        s = max(round(math.sqrt(p * h * w)), 1)
        if self.norm == "L2":
            s = max(s, 3)
            s += 1 - s % 2  # odd, so that the centre pattern has a centre
        return min(s, h, w)

    def _linf_start(self, lo, hi, gen):
        """Vertical stripes: every column of every channel at x - eps or x + eps (clipped to [0, 1])."""
        n, c, _, w = lo.shape
        up = torch.randint(0, 2, (n, c, 1, w), generator=gen, device=lo.device, dtype=torch.bool)
        return torch.where(up, hi, lo)

    def _linf_step(self, x_best, lo, hi, s, gen):
        """A proposal: the window of each channel set to x + eps or x - eps. Returns (candidate, flat window
        index, the window's new values)."""
        n, c = x_best.shape[:2]
        dev = x_best.device
        win = random_window(x_best.shape, s, gen, dev)
        lo_w, hi_w = lo.view(-1).take(win).view(n, c, s, s), hi.view(-1).take(win).view(n, c, s, s)
        up = torch.randint(0, 2, (n, c, 1, 1), generator=gen, device=dev, dtype=torch.bool)
        new = torch.where(up, hi_w, lo_w)
        # where the window already holds these values, flip the sign of one random channel
        same = (new == x_best.view(-1).take(win).view(n, c, s, s)).view(n, -1).all(1)
        ch = torch.randint(0, c, (n,), generator=gen, device=dev)
        flip = (torch.arange(c, device=dev)[None, :] == ch[:, None]) & same[:, None]
        new = torch.where(up ^ flip[:, :, None, None], hi_w, lo_w)
        cand = x_best.clone()
        cand.view(-1).index_copy_(0, win, new.view(-1))
        return cand, win, new

    def _l2_start(self, x, gen):
        """A grid of centre patterns of side min(h, w) // 5, each with a random sign per channel and a random
        orientation, scaled to norm eps."""
        n, c, h, w = x.shape
        b = max(min(h, w) // 5, 1)
        nh, nw = h // b, w // b
        top, left = (h - nh * b) // 2, (w - nw * b) // 2
        pair = self._pattern_pair(b, x.device, x.dtype)
        turn = torch.randint(0, 2, (n, 1, nh, nw), generator=gen, device=x.device)
        sign = torch.randint(0, 2, (n, c, nh, nw), generator=gen, device=x.device, dtype=x.dtype).mul_(2).sub_(1)
        blocks = pair[turn] * sign[..., None, None]  # (n, c, nh, nw, b, b)
        delta = torch.zeros_like(x)
        delta[:, :, top : top + nh * b, left : left + nw * b] = blocks.permute(0, 1, 2, 4, 3, 5).reshape(
            n, c, nh * b, nw * b
        )
        return self._l2_place(x, delta)

    def _l2_place(self, x, delta):
        """x + delta rescaled to norm eps, clipped to [0, 1]."""
        scale = self.eps / torch.linalg.vector_norm(delta.view(len(x), -1), dim=1).clamp_min_(1e-12)
        return torch.addcmul(x, delta, scale.view(-1, 1, 1, 1)).clamp_(0.0, 1.0)

    def _l2_step(self, x, x_best, s, gen):
        """A proposal (Algorithm 3 of the paper): per channel, the perturbation in W1 and W2 plus an equal
        share of the unused budget eps^2 - ||delta||^2 goes into W1, shaped as the normalised old W1 plus a
        centre pattern of random sign; W2 becomes 0; the result is rescaled to norm eps."""
        n, c = x.shape[:2]
        dev = x.device
        delta = x_best - x
        flat = delta.view(-1)
        w1, w2 = random_window(x.shape, s, gen, dev), random_window(x.shape, s, gen, dev)
        unused = (self.eps**2 - delta.view(n, -1).square().sum(1)).clamp_(min=0.0)  # (n,)
        old = flat.take(w1).view(n, c, s, s)
        in_w2 = flat.take(w2).view(n, c, -1).square().sum(2)  # (n, c)
        flat.index_fill_(0, w2, 0.0)
        in_w1_only = flat.take(w1).view(n, c, -1).square().sum(2)  # W1 minus W2
        avail = (in_w2 + in_w1_only + unused[:, None] / c).sqrt_()[..., None, None]  # (n, c, 1, 1)
        old = old / old.square().sum((2, 3), keepdim=True).sqrt_().add_(1e-12)
        turn = torch.randint(0, 2, (n, 1), generator=gen, device=dev)
        sign = torch.randint(0, 2, (n, c, 1, 1), generator=gen, device=dev, dtype=x.dtype).mul_(2).sub_(1)
        new = self._pattern_pair(s, dev, x.dtype)[turn] * sign + old
        new = new * (avail / new.square().sum((2, 3), keepdim=True).sqrt_().add_(1e-12))
        flat.index_copy_(0, w1, new.view(-1))
        return self._l2_place(x, delta)

    def _forward(self, model, x):
        with attack_autocast(self.precision, x.device):
            return model(x).float()

    def _run(self, model, x, y, out, todo, gen, dtype):
        """One restart on the points `todo` (indices into out). Broken points get their adversarial example
        written into out; returns the indices still unbroken."""
        x_a, y_a, idx = x[todo].contiguous(), y[todo], todo
        h, w = x_a.shape[2:]
        if self.norm == "Linf":
            lo, hi = (x_a - self.eps).clamp_(min=0.0), (x_a + self.eps).clamp_(max=1.0)
            x_best = self._linf_start(lo, hi, gen)
        else:
            lo = hi = None
            x_best = self._l2_start(x_a, gen)
        m_best = margin(self._forward(model, x_best.to(dtype)), y_a)
        for it in range(self.n_queries + 1):
            broken = m_best < 0
            if bool(broken.any()):  # a broken point leaves the batch with its adversarial example
                out[idx[broken]] = x_best[broken]
                keep = ~broken
                x_a, y_a, idx, x_best, m_best = x_a[keep], y_a[keep], idx[keep], x_best[keep], m_best[keep]
                if lo is not None:
                    lo, hi = lo[keep], hi[keep]
            if len(idx) == 0 or it == self.n_queries:
                break
            s = self._side(it, h, w)
            if self.norm == "Linf":
                cand, win, new = self._linf_step(x_best, lo, hi, s, gen)
            else:
                cand = self._l2_step(x_a, x_best, s, gen)
            m_cand = margin(self._forward(model, cand.to(dtype)), y_a)
            better = m_cand < m_best
            m_best = torch.where(better, m_cand, m_best)
            if self.norm == "Linf":  # the candidate differs from x_best only in the window
                n, c = x_best.shape[:2]
                old = x_best.view(-1).take(win).view(n, c, s, s)
                x_best.view(-1).index_copy_(0, win, torch.where(better[:, None, None, None], new, old).view(-1))
            else:
                x_best = torch.where(better[:, None, None, None], cand, x_best)
        return idx

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        check_image_range(x)
        if x.dim() != 4:
            raise UserError(f"Square Attack needs images of shape (n, C, H, W), got shape {tuple(x.shape)}")
        if y.shape != (len(x),):
            raise UserError(
                f"Square Attack needs one label per image, got labels of shape {tuple(y.shape)} for {len(x)} images"
            )
        x = x.detach()
        if len(x) == 0 or self.eps == 0:
            return x.clone()
        y = y.to(device=x.device, dtype=torch.long)
        param = next(model.parameters(), None)
        dtype = param.dtype if param is not None and param.dtype.is_floating_point else x.dtype
        gen = make_generator(x.device, self.seed)
        out = x.clone()
        with frozen_eval(model), torch.no_grad():
            todo = (model(x.to(dtype)).argmax(1) == y).nonzero().squeeze(1)  # misclassified: returned as x
            for _ in range(self.restarts):
                if len(todo) == 0:
                    break
                todo = self._run(model, x, y, out, todo, gen, dtype)
        return verified(model, x, out, y, self.eps, self.norm)
