"""Unstructured pruning as masks (shrinkbench's shape: a method returns {parameter name: mask})."""

from __future__ import annotations

import torch
from torch import nn


def prunable_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """Weights of every conv and linear layer (biases and normalisation layers are never pruned)."""
    out = {}
    for mod_name, mod in model.named_modules():
        if isinstance(mod, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)):
            out[f"{mod_name}.weight" if mod_name else "weight"] = mod.weight
    return out


def global_magnitude_masks(
    model: nn.Module, fraction: float, masks: dict[str, torch.Tensor] | None = None, largest: bool = False
) -> dict[str, torch.Tensor]:
    """Masks that remove round(fraction * n) of the n still-unmasked weights with the smallest
    magnitude over all layers at once (largest=True removes the biggest instead). Ties are broken
    by position, so the count is exact."""
    weights = prunable_weights(model)
    masks = masks or {name: torch.ones_like(w, dtype=torch.bool) for name, w in weights.items()}
    flat_w = torch.cat([weights[n].detach().abs().flatten() for n in weights])
    alive = torch.cat([masks[n].flatten().bool() for n in weights])
    n_remove = int(round(fraction * int(alive.sum())))
    keep = alive.clone()
    if n_remove > 0:
        alive_idx = alive.nonzero(as_tuple=True)[0]
        order = torch.argsort(flat_w[alive_idx], descending=largest, stable=True)
        keep[alive_idx[order[:n_remove]]] = False
    out, start = {}, 0
    for n, w in weights.items():
        out[n] = keep[start : start + w.numel()].view_as(w).clone()
        start += w.numel()
    return out


def layer_magnitude_masks(model: nn.Module, fraction: float, largest: bool = False) -> dict[str, torch.Tensor]:
    """Masks that remove round(fraction * n_l) of each layer's n_l weights with the smallest
    magnitude (largest=True: the biggest), layer by layer; ties broken by position."""
    masks = {}
    for name, w in prunable_weights(model).items():
        keep = torch.ones(w.numel(), dtype=torch.bool, device=w.device)
        n_remove = int(round(fraction * w.numel()))
        if n_remove > 0:
            order = torch.argsort(w.detach().abs().flatten(), descending=largest, stable=True)
            keep[order[:n_remove]] = False
        masks[name] = keep.view_as(w)
    return masks


def reverse_threshold(model: nn.Module, fraction: float) -> float:
    """The largest |w| left after a global reverse pruning of `fraction` of the conv and linear
    weights: the threshold tau of the high-magnitude penalty as the reverse-pruning paper picks it."""
    flat = torch.cat([w.detach().abs().flatten() for w in prunable_weights(model).values()])
    n_remove = int(round(fraction * flat.numel()))
    return float(torch.sort(flat, descending=True, stable=True).values[min(n_remove, flat.numel() - 1)])


def magnitude_masks(model: nn.Module, fraction: float, scope: str = "global", largest: bool = False):
    """global_magnitude_masks or layer_magnitude_masks, as `scope` says."""
    if scope == "layer":
        return layer_magnitude_masks(model, fraction, largest)
    return global_magnitude_masks(model, fraction, largest=largest)


def apply_masks_(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    """Make masks permanent: the masked weights become zeros in the parameters themselves."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, m in masks.items():
            params[name].mul_(m.to(device=params[name].device, dtype=params[name].dtype))


def rewind_(model: nn.Module, init_state: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]) -> None:
    """Lottery ticket: every parameter and buffer back to its initial value, masked weights zero."""
    model.load_state_dict(init_state)
    apply_masks_(model, masks)
