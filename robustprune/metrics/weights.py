"""Weight statistics of a model (reverse-pruning paper, Table 1 and Eq. 3), over the weights of every
conv and linear layer:

    weights:q0 ... weights:q100   quantiles 0/25/50/75/100 % of the signed weights (zeros included:
                                  pruning makes many of them zero, which the paper's quartiles show)
    weights:l1, weights:l2        the L1 norm (the paper's "norm": 28,083 for its dense ResNet-56) and L2 norm
    weights:linf                  the largest magnitude
    weights:log10_bound           log10 of the product over layers of each layer's operator-norm bound
                                  (Eq. 3: output distortion <= prod_l ||W_l|| * ||delta||)

The operator bound of a linear layer is its spectral norm. For a conv layer, Young's convolution
inequality gives ||w_oi * x_i||_2 <= ||w_oi||_1 ||x_i||_2 for each (output, input) channel pair, so
||conv(x)||_2 <= ||A||_2 ||x||_2 with A[o, i] = ||w_oi||_1 (stride and zero padding only shrink the
output). A BatchNorm right after a layer is folded in (eval mode: |gamma| / sqrt(var + eps) per
channel). ReLU, max- and average-pooling are 1-Lipschitz, so for plain chains (the MNIST CNN, VGG)
the product is a true bound; with skip connections it is the paper's product, not a bound.
"""

from __future__ import annotations

import math

import torch
from torch import nn

QUANTILES = (0, 25, 50, 75, 100)


def quantiles(values: torch.Tensor, percents=QUANTILES) -> list[float]:
    """Linear-interpolation quantiles (numpy's default) by sorting: torch.quantile refuses tensors of
    more than 2^24 elements, which ResNet-50 exceeds."""
    s = values.flatten().double().sort().values
    out = []
    for p in percents:
        pos = p / 100 * (len(s) - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        out.append(float(s[lo] + (s[hi] - s[lo]) * (pos - lo)))
    return out


def layer_bound(layer: nn.Module, bn: nn.Module | None = None) -> float:
    """Operator-norm bound (L2 -> L2) of a conv or linear layer, times the following BatchNorm's scale."""
    w = layer.weight.detach().double()
    a = w.abs().sum(dim=tuple(range(2, w.dim()))) if w.dim() > 2 else w  # conv: A[o, i] = ||w_oi||_1
    if bn is not None and getattr(bn, "running_var", None) is not None:
        scale = torch.ones(a.shape[0], dtype=torch.float64) if bn.weight is None else bn.weight.detach().double().abs()
        a = a * (scale / torch.sqrt(bn.running_var.detach().double() + bn.eps)).view(-1, 1).to(a.device)
    if isinstance(layer, nn.Conv2d) and layer.groups > 1:  # grouped: A is block-diagonal, its norm the largest block's
        return max(float(torch.linalg.matrix_norm(block, ord=2)) for block in a.chunk(layer.groups, dim=0))
    return float(torch.linalg.matrix_norm(a, ord=2))


def _layers_with_bn(model: nn.Module) -> list[tuple[nn.Module, nn.Module | None]]:
    """Every conv and linear layer, paired with the BatchNorm registered right after it (if its width matches)."""
    modules = [m for m in model.modules() if not list(m.children())]
    out = []
    for i, m in enumerate(modules):
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nxt = modules[i + 1] if i + 1 < len(modules) else None
            width = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
            bn = nxt if isinstance(nxt, nn.modules.batchnorm._BatchNorm) and nxt.num_features == width else None
            out.append((m, bn))
    return out


@torch.no_grad()
def weight_statistics(model: nn.Module) -> dict[str, float]:
    pairs = _layers_with_bn(model)
    if not pairs:
        return {}
    flat = torch.cat([m.weight.detach().flatten().cpu() for m, _ in pairs])
    out = {f"weights:q{p}": v for p, v in zip(QUANTILES, quantiles(flat))}
    out["weights:l1"] = float(flat.double().abs().sum())
    out["weights:l2"] = float(flat.double().norm())
    out["weights:linf"] = float(flat.abs().max())
    bounds = [layer_bound(m, bn) for m, bn in pairs]
    if all(b > 0 for b in bounds):  # a layer of zeros bounds the output by 0: no finite log to store
        out["weights:log10_bound"] = sum(math.log10(b) for b in bounds)
    return out
