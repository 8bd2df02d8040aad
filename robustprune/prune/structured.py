"""Structured channel pruning that physically removes filters, on Torch-Pruning's dependency graph
(the matching input channels of the next layer, flatten->linear included, go with them)."""
from __future__ import annotations

import torch
import torch_pruning as tp
from torch import nn

from robustprune.errors import UserError


def l1_filter_scores(conv: nn.Conv2d) -> torch.Tensor:
    return conv.weight.detach().abs().flatten(1).sum(1)


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """Prunable conv layers: ordinary (non-grouped) 2-d convolutions."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1]


def filters_to_remove(model: nn.Module, fraction: float, score=l1_filter_scores) -> dict[str, list[int]]:
    """Per conv layer, the round(fraction * filters) indices with the lowest score, all scored on the
    unpruned model (as torch.nn.utils.prune.ln_structured does layer by layer)."""
    plan = {}
    for name, conv in conv_layers(model):
        n = int(round(fraction * conv.out_channels))
        if n >= conv.out_channels:
            raise UserError(f"pruning {fraction:.0%} of the {conv.out_channels} filters of layer '{name}' "
                            f"would remove all of them; use a smaller ratio")
        plan[name] = torch.argsort(score(conv), stable=True)[:n].tolist()
    return plan


def remove_filters_(model: nn.Module, plan: dict[str, list[int]], example_input: torch.Tensor) -> nn.Module:
    """Physically remove the planned filters (and everything that depends on them)."""
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
    modules = dict(model.named_modules())
    for name, idxs in plan.items():
        if idxs:
            graph.get_pruning_group(modules[name], tp.prune_conv_out_channels, idxs=sorted(idxs)).prune()
    return model


def channel_widths(model: nn.Module) -> dict[str, int]:
    return {name: conv.out_channels for name, conv in conv_layers(model)}
