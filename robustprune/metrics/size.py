"""Model size: parameters, zeros, multiply-accumulates (dense and counting only non-zero weights)."""

from __future__ import annotations

import torch
from torch import nn

from robustprune.pruning.unstructured import prunable_weights


def count_params(model: nn.Module) -> tuple[int, int]:
    """(all parameters, non-zero parameters)."""
    total = sum(p.numel() for p in model.parameters())
    nonzero = sum(int((p != 0).sum()) for p in model.parameters())
    return total, nonzero


def count_macs(model: nn.Module, example_input: torch.Tensor) -> tuple[int, int]:
    """Multiply-accumulates of conv and linear layers for one image: (dense, non-zero weights only).
    The attention matrix products of a transformer (no weights) are not counted."""
    dense, nonzero = [0], [0]

    def hook(mod, inp, out):
        # Each weight of a conv filter is used once per output position (grouped convs included),
        # each weight of a linear layer once per token (one for a classifier, P·N in a transformer).
        per_weight_uses = out[0, 0].numel() if isinstance(mod, nn.Conv2d) else out[0].numel() // out.shape[-1]
        dense[0] += mod.weight.numel() * per_weight_uses
        nonzero[0] += int((mod.weight != 0).sum()) * per_weight_uses

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    try:
        was = model.training
        model.eval()
        with torch.inference_mode():
            model(example_input[:1])
        model.train(was)
    finally:
        for h in handles:
            h.remove()
    return dense[0], nonzero[0]


def layer_widths(model: nn.Module) -> dict[str, float]:
    """width:<layer> for every conv (output channels) and linear layer (output features), in module
    order: what structured pruning left of each layer (a removed residual block's layers are absent)."""
    from robustprune.evaluation.names import width

    return {
        width(name): float(m.out_channels if isinstance(m, nn.modules.conv._ConvNd) else m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))
    }


def size_metrics(model: nn.Module, example_input: torch.Tensor, dense_weight_count: int) -> dict[str, float]:
    """params, params_nonzero, flops, flops_nonzero (2 FLOPs per multiply-accumulate of conv and
    linear layers, per image) and sparsity: the share of the dense model's
    prunable weights that are gone (zeroed or physically removed)."""
    total, nonzero = count_params(model)
    macs, macs_nz = count_macs(model, example_input)
    alive = sum(int((w != 0).sum()) for w in prunable_weights(model).values())
    return {
        "params": total,
        "params_nonzero": nonzero,
        "flops": 2 * macs,
        "flops_nonzero": 2 * macs_nz,
        "sparsity": 1.0 - alive / dense_weight_count,
    }
