"""Module Robust Sensitivity and robustness-aware per-layer pruning ratios (MRPF; Bai, Tabia and
Santos-Rodríguez, "Beyond pruning criteria", Appendix A and B.4).

MRS of a layer: how much the adversarial loss on a fixed set of adversarial examples AE rises
when only that layer's weights move by projected gradient *ascent* on that loss, within a relative
L2 ball ||W - W_orig|| <= eps ||W_orig||. A layer whose small perturbation hurts robustness a lot
matters for robustness and is pruned less.

Two ways to turn MRS into ratios:
- `adaptive_ratios` (Appendix A / B.4.2, what MRPF runs): deviations from the mean MRS scaled to
  [-1, 1], p_i = r_g - Δ_i (r_max - r_min), clipped to [r_min, r_max], then rescaled so that
  their mean is r_g;
- `inverse_mrs_ratios` (main text, Eq. 8-10): p_i = min(w_i r_g, r_max) with w_i the normalised
  inverse MRS. Taken literally, the w_i sum to 1, so the mean ratio is r_g / L; `scale="mean"`
  (default) multiplies by L so the ratios average r_g, `scale="literal"` keeps Eq. 10 as printed.
The ratios map layer names to shares of filters; they feed the structured-pruning engine's
`layer_ratios` with any criterion."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from robustprune.errors import UserError

DELTA = 1e-6  # B.4.3: replaces non-positive MRS values


def project_relative_(w: torch.Tensor, w_orig: torch.Tensor, eps: float) -> torch.Tensor:
    """Project w in place onto {w : ||w - w_orig||_2 <= eps ||w_orig||_2} (Eq. 6)."""
    radius = eps * float(w_orig.norm())
    diff = w - w_orig
    norm = float(diff.norm())
    if norm > radius:
        w.copy_(w_orig + diff * (radius / norm))
    return w


@torch.no_grad()
def adversarial_loss(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor, batch_size: int = 500) -> float:
    """Mean cross-entropy over (x_adv, y) in eval mode."""
    model.eval()
    total = 0.0
    for i in range(0, len(x_adv), batch_size):
        total += float(
            F.cross_entropy(model(x_adv[i : i + batch_size]).float(), y[i : i + batch_size], reduction="sum")
        )
    return total / len(x_adv)


def perturbed_copy(
    model: nn.Module,
    layer: str | Sequence[str],
    x_adv: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: float,
    epochs: int,
    eps: float,
    batch_size: int = 128,
) -> nn.Module:
    """A copy of the model in which only the weight of `layer` (or of each of several layers that
    form one module, e.g. the convs sharing a residual stream's channels) took `epochs` passes of
    projected gradient ascent (step lr) on the adversarial loss over batches of AE (Algorithm,
    lines 5-11), each weight projected onto its own relative ball. The model itself is not
    changed; BatchNorm stays in eval mode, so only those weights move."""
    layers = [layer] if isinstance(layer, str) else list(layer)
    modules = dict(model.named_modules())
    for name in layers:
        if name not in modules or not isinstance(getattr(modules[name], "weight", None), torch.Tensor):
            raise UserError(f"the model has no layer '{name}' with a weight; name a conv or linear layer")
    clone = copy.deepcopy(model).eval()
    for p in clone.parameters():
        p.requires_grad_(False)
    cloned = dict(clone.named_modules())
    ws = [cloned[name].weight for name in layers]
    origs = [w.detach().clone() for w in ws]
    for w in ws:
        w.requires_grad_(True)
    for _ in range(epochs):
        for i in range(0, len(x_adv), batch_size):
            loss = F.cross_entropy(clone(x_adv[i : i + batch_size]).float(), y[i : i + batch_size])
            grads = torch.autograd.grad(loss, ws)
            with torch.no_grad():
                for w, g, w0 in zip(ws, grads, origs):
                    w.add_(g, alpha=lr)  # ascent: raise the adversarial loss
                    project_relative_(w, w0, eps)
    for w in ws:
        w.requires_grad_(False)
    return clone


def layer_sensitivity(
    model: nn.Module,
    layer: str | Sequence[str],
    x_adv: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: float,
    epochs: int,
    eps: float,
    batch_size: int = 128,
    base_loss: float | None = None,
) -> float:
    """MRS of one layer (Algorithm, lines 12-13): perturbed minus original adversarial loss."""
    if base_loss is None:
        base_loss = adversarial_loss(model, x_adv, y)
    clone = perturbed_copy(model, layer, x_adv, y, lr=lr, epochs=epochs, eps=eps, batch_size=batch_size)
    return adversarial_loss(clone, x_adv, y) - base_loss


def module_robust_sensitivity(
    model: nn.Module,
    modules: Sequence[str | Sequence[str]],
    x_adv: torch.Tensor,
    y: torch.Tensor,
    *,
    lr: float = 0.01,
    epochs: int = 1,
    eps: float = 8 / 255,
    batch_size: int = 128,
) -> dict[str, float]:
    """Raw MRS (perturbed - original adversarial loss) of every module: a layer name, or a list of
    layers perturbed together (keyed by the first, as filter_groups lists them). Non-positive values
    are kept here and replaced by δ where ratios are computed, so the stored numbers are the
    measured ones."""
    base = adversarial_loss(model, x_adv, y)
    return {
        (m if isinstance(m, str) else m[0]): layer_sensitivity(
            model, m, x_adv, y, lr=lr, epochs=epochs, eps=eps, batch_size=batch_size, base_loss=base
        )
        for m in modules
    }


def _check_range(r_global: float, r_min: float, r_max: float) -> None:
    if not 0 <= r_min <= r_global <= r_max < 1:
        raise UserError(
            f"MRPF ratios need 0 <= r_min <= r_global <= r_max < 1, got r_min {r_min}, r_global "
            f"{r_global}, r_max {r_max}; fix the values"
        )


def adaptive_ratios(
    mrs: Mapping[str, float], r_global: float, r_min: float, r_max: float, delta: float = DELTA
) -> dict[str, float]:
    """Appendix B.4.2: per-layer pruning ratios from MRS values (higher MRS -> lower ratio). As in
    the paper, the final rescaling to mean r_g can move a ratio slightly outside [r_min, r_max]."""
    _check_range(r_global, r_min, r_max)
    if not mrs:
        return {}
    names = list(mrs)
    values = torch.tensor([max(float(mrs[n]), delta) for n in names], dtype=torch.float64)
    dev = values - values.mean()
    top = float(dev.abs().max())
    dev = dev / top if top > 0 else dev  # every layer equally sensitive: uniform r_global
    p = (r_global - dev * (r_max - r_min)).clamp(r_min, r_max)
    actual = float(p.mean())
    if actual > 0:
        p = p * (r_global / actual)
    return {n: float(v) for n, v in zip(names, p)}


def inverse_mrs_ratios(
    mrs: Mapping[str, float], r_global: float, r_max: float, delta: float = DELTA, scale: str = "mean"
) -> dict[str, float]:
    """Main text, Eq. 8-10: InvMRS = 1 / (MRS + δ), w_i = InvMRS_i / Σ InvMRS, p_i = min(w_i r_g, r_max);
    with scale="mean" w_i is multiplied by the number of layers first (see the module docstring)."""
    _check_range(r_global, 0.0, r_max)
    if scale not in ("mean", "literal"):
        raise UserError(f"scale must be 'mean' or 'literal', not {scale!r}")
    if not mrs:
        return {}
    names = list(mrs)
    inv = torch.tensor([1.0 / (max(float(mrs[n]), 0.0) + delta) for n in names], dtype=torch.float64)
    w = inv / inv.sum() * (len(names) if scale == "mean" else 1)
    return {n: float(v) for n, v in zip(names, (w * r_global).clamp(max=r_max))}
