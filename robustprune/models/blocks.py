"""Building blocks the structured-pruning engine understands, so it needs no per-model code: residual
blocks that layer pruning can find and remove (every architecture with skip connections builds its
blocks from ResidualBlock), a Linear layer whose width filter pruning may narrow (HiddenLinear) and
a self-attention whose heads it may remove (MultiHeadSelfAttention)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ResidualBlock(nn.Module):
    """out = act(body(x) + shortcut(x)). Subclasses set `body`, `shortcut` (nn.Identity when the
    block keeps the shape) and `act` (nn.Identity when nothing follows the addition, as in
    MobileNetV2's inverted residuals)."""

    body: nn.Module
    shortcut: nn.Module
    act: nn.Module

    def forward(self, x):
        return self.act(self.body(x) + self.shortcut(x))

    @property
    def removable(self) -> bool:
        """Only a block with an identity shortcut can go: the network then computes act(x), which is
        x itself when x already passed the same activation (ReLU after the previous block)."""
        return isinstance(self.shortcut, nn.Identity)


def residual_blocks(model: nn.Module) -> list[tuple[str, ResidualBlock]]:
    """All residual blocks in forward-definition order, with their qualified names."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ResidualBlock)]


def residual_stages(model: nn.Module) -> dict[str, list[tuple[str, ResidualBlock]]]:
    """Blocks grouped by the container that holds them (a ResNet stage, a MobileNetV2 group)."""
    stages: dict[str, list[tuple[str, ResidualBlock]]] = {}
    for name, block in residual_blocks(model):
        parent = name.rsplit(".", 1)[0] if "." in name else ""
        stages.setdefault(parent, []).append((name, block))
    return stages


class StridedPointwiseConv(nn.Conv2d):
    """A 1x1 convolution with stride s (a projection shortcut), computed as a stride-1 1x1
    convolution of every s-th pixel: the same numbers and parameters, but it avoids oneDNN's
    strided 1x1 backward-weights kernel, which writes out of bounds (a segfault, or wrong weight
    gradients) for channels-last inputs with fewer input channels than its block, e.g. a narrow
    or pruned ResNet trained on an odd-sized batch with 2 threads (oneDNN issue 6035)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__(in_channels, out_channels, 1, stride=stride, bias=False)

    def forward(self, x):
        sh, sw = self.stride
        return F.conv2d(x[:, :, ::sh, ::sw], self.weight, self.bias)


class HiddenLinear(nn.Linear):
    """A Linear layer whose output features are a hidden width (a transformer MLP's expansion):
    filter pruning narrows it as it does a conv's filters. Plain nn.Linear layers (classifiers,
    the MNIST CNN's fc) are only narrowed as consumers of pruned channels."""


class MultiHeadSelfAttention(nn.Module):
    """Self-attention over the tokens of x (..., tokens, dim), any leading dimensions. One `qkv`
    Linear makes the queries, keys and values (rows: all query heads, then the keys, then the
    values, head after head), `proj` merges the heads. Head pruning (prune_heads_) removes a head's
    q/k/v rows and its columns of `proj`; `num_heads` and `head_dim` always describe the weights."""

    def __init__(
        self, dim: int, num_heads: int, head_dim: int | None = None, bias: bool = True, attn_dropout: float = 0.0
    ):
        super().__init__()
        if head_dim is None:
            if dim % num_heads:
                raise ValueError(f"dim {dim} is not a multiple of {num_heads} heads; give head_dim")
            head_dim = dim // num_heads
        self.num_heads, self.head_dim, self.attn_dropout = num_heads, head_dim, attn_dropout
        self.qkv = nn.Linear(dim, 3 * num_heads * head_dim, bias=bias)
        self.proj = nn.Linear(num_heads * head_dim, dim, bias=bias)

    def forward(self, x):
        *lead, n, _ = x.shape
        qkv = self.qkv(x).reshape(*lead, n, 3, self.num_heads, self.head_dim)
        q, k, v = qkv.movedim(-3, 0).transpose(-3, -2).unbind(0)  # each (..., heads, tokens, head_dim)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_dropout if self.training else 0.0)
        return self.proj(out.transpose(-3, -2).reshape(*lead, n, self.num_heads * self.head_dim))

    def head_rows(self, heads) -> list[int]:
        """The qkv rows of the given heads (their query, key and value rows)."""
        inner, d = self.num_heads * self.head_dim, self.head_dim
        return [part * inner + h * d + i for part in range(3) for h in heads for i in range(d)]

    @torch.no_grad()
    def prune_heads_(self, heads) -> None:
        """Remove the given heads (indices into the current heads); at least one must stay."""
        gone = set(int(h) for h in heads)
        keep = [h for h in range(self.num_heads) if h not in gone]
        if not keep or not gone <= set(range(self.num_heads)):
            raise ValueError(f"cannot remove heads {sorted(gone)} of {self.num_heads}")
        rows = torch.tensor(self.head_rows(keep))
        cols = torch.tensor([h * self.head_dim + i for h in keep for i in range(self.head_dim)])
        _keep_features_(self.qkv, rows, dim=0)
        _keep_features_(self.proj, cols, dim=1)
        self.num_heads = len(keep)


def _keep_features_(layer: nn.Linear, idxs: torch.Tensor, dim: int) -> None:
    """Narrow a Linear layer to the given output (dim 0) or input (dim 1) features, in place."""
    layer.weight = nn.Parameter(
        layer.weight.index_select(dim, idxs.to(layer.weight.device)), requires_grad=layer.weight.requires_grad
    )
    if dim == 0:
        if layer.bias is not None:
            layer.bias = nn.Parameter(layer.bias[idxs.to(layer.bias.device)], requires_grad=layer.bias.requires_grad)
        layer.out_features = len(idxs)
    else:
        layer.in_features = len(idxs)
