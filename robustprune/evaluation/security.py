"""Security curves (robust accuracy against the perturbation size eps) from one run of FMN, the
minimum-norm attack, as the Adversarial Pruning Benchmark draws them: FMN gives every point its
smallest breaking perturbation, and the robust accuracy at eps is the share of points whose
minimum norm exceeds eps. One run gives the whole curve, for dense and pruned models alike.

    curve_from_norms       robust accuracy at each eps of a grid, from per-point minimum norms
    security_curve         FMN on a model, then the curve, the norms, their median and the clean accuracy
    plot_security_curves   several models' curves on one axes, with each model's AutoAttack-checked point
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
from torch import nn

from robustprune.attacks.fmn import FMN
from robustprune.attacks.norms import check_norm
from robustprune.attacks.pgd import check_count
from robustprune.errors import UserError
from robustprune.files import STORE_UNCHANGED, atomic_write
from robustprune.tensors import to_float

GRID_POINTS = 51  # radii of the default grid, 0 to the largest norm found


def _as_norms(norms) -> torch.Tensor:
    t = torch.as_tensor(norms, dtype=torch.float64).flatten().cpu()
    if t.numel() == 0:
        raise UserError("a security curve needs at least one point's minimum norm, got none")
    if torch.isnan(t).any() or (t < 0).any():
        raise UserError(
            "minimum norms must be numbers >= 0 (inf where no adversarial point was found), got NaN or a negative value"
        )
    return t


def _as_grid(eps_grid) -> list[float]:
    try:
        grid = [float(e) for e in eps_grid]
    except (TypeError, ValueError):
        raise UserError(f"eps_grid must be a list of numbers >= 0, got {eps_grid!r}") from None
    if not grid or any(not math.isfinite(e) or e < 0 for e in grid):
        raise UserError(f"eps_grid must be a non-empty list of finite numbers >= 0, got {eps_grid!r}")
    return grid


def curve_from_norms(norms, eps_grid) -> list[float]:
    """Robust accuracy at each eps of eps_grid: the share of points whose minimum norm is > eps.
    norms: per point, 0 where the clean input is misclassified (never robust), inf where no attack
    broke it (robust at every eps)."""
    t = _as_norms(norms)
    return [float((t > e).double().mean()) for e in _as_grid(eps_grid)]


def median_norm(norms) -> float:
    """The median minimum norm (the lower middle value for an even count, so that it is one point's
    norm; inf when more than half of the points were never broken)."""
    t = _as_norms(norms)
    return float(t.sort().values[(t.numel() - 1) // 2])


def default_grid(norms, norm: str, points: int = GRID_POINTS) -> list[float]:
    """`points` evenly spaced radii from 0 to the largest finite norm (the whole curve, down to the
    share of points never broken); 0 to 1 (L-inf) or 0 to 10 (L2) when no norm is finite and > 0."""
    t = _as_norms(norms)
    finite = t[torch.isfinite(t)]
    top = float(finite.max()) if finite.numel() and float(finite.max()) > 0 else (1.0 if norm == "Linf" else 10.0)
    return [top * i / (points - 1) for i in range(points)]


def security_curve(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    norm: str = "Linf",
    eps_grid=None,
    steps: int = 100,
    seed: int = 0,
    batch_size: int = 500,
) -> dict:
    """FMN once on (x, y), batch by batch, then robust accuracy at every eps of the grid.

    x: uint8 or float images in [0, 1]. eps_grid: radii (default: default_grid of the norms found).
    Returns {"norm", "eps", "robust_accuracy" (one per eps), "norms" (per point; 0 misclassified
    clean, inf never broken), "median_norm", "clean_accuracy", "n", "steps", "seed", "seconds"}."""
    norm = check_norm("security curve", norm)
    batch_size = check_count("security curve", "batch_size", batch_size, 500)
    grid = None if eps_grid is None else _as_grid(eps_grid)
    if len(x) == 0:
        raise UserError("a security curve needs at least one image, got none")
    if len(x) != len(y):
        raise UserError(f"security curve got {len(x)} images but {len(y)} labels")
    attack = FMN(norm=norm, steps=steps, seed=seed)
    device = next(model.parameters()).device
    start = time.perf_counter()
    parts = []
    for i in range(0, len(x), batch_size):
        xb, yb = to_float(x[i : i + batch_size].to(device)), y[i : i + batch_size].to(device)
        parts.append(attack.min_norms(model, xb, yb)[1].cpu())
    norms = torch.cat(parts)
    seconds = time.perf_counter() - start
    grid = default_grid(norms, norm) if grid is None else grid
    return {
        "norm": norm,
        "eps": grid,
        "robust_accuracy": curve_from_norms(norms, grid),
        "norms": [float(v) for v in norms],
        "median_norm": median_norm(norms),
        "clean_accuracy": float((norms > 0).double().mean()),
        "n": len(norms),
        "steps": steps,
        "seed": seed,
        "seconds": seconds,
    }


def plot_security_curves(
    curves: dict[str, dict],
    path,
    norm: str,
    checked: dict[str, tuple[float, float]] | None = None,
    title: str | None = None,
) -> Path:
    """One PNG: robust accuracy against eps, one line per model (curves: {label: security_curve
    result, or any dict with "eps" and "robust_accuracy"}), and for each label in `checked` its
    (eps, robust accuracy) under AutoAttack as a star in the line's colour. Written under a
    temporary name and renamed, so `path` is never a half-written file. Returns the path."""
    norm = check_norm("security curve figure", norm)
    if not isinstance(curves, dict) or not curves:
        raise UserError("plot_security_curves needs at least one curve, got none")
    checked = checked or {}
    unknown = sorted(set(checked) - set(curves))
    if unknown:
        raise UserError(f"checked points for {', '.join(unknown)} have no curve; known: {', '.join(curves)}")
    for label, c in curves.items():
        if (
            not isinstance(c, dict)
            or "eps" not in c
            or "robust_accuracy" not in c
            or len(c["eps"]) != len(c["robust_accuracy"])
            or not len(c["eps"])
        ):
            raise UserError(f"curve '{label}' must have equally long, non-empty 'eps' and 'robust_accuracy' lists")
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise UserError(f"the security curve figure is a PNG file; name it *.png, got {path.name!r}")

    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    try:
        star = {"marker": "*", "markersize": 13, "markeredgecolor": "black", "linestyle": "none"}
        for label, c in curves.items():
            (line,) = ax.plot(c["eps"], c["robust_accuracy"], label=label, linewidth=1.6)
            if label in checked:
                eps, acc = checked[label]
                ax.plot([eps], [acc], color=line.get_color(), zorder=5, **star)
        if checked:  # one legend entry for all the stars, after the models
            ax.plot([], [], color="lightgray", label="AutoAttack check (same colour)", **star)
        ax.set_xlabel(f"perturbation size eps ({norm})")
        ax.set_ylabel("robust accuracy")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlim(left=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        ax.set_title(title or f"Security curves (FMN, {norm})", fontsize=9)
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=150, format="png"), "--figures, --out", STORE_UNCHANGED)
    finally:
        plt.close(fig)
    return path
