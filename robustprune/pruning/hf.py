"""Hugging Face `transformers` image classifiers (ViTForImageClassification, ResNetForImageClassification,
ConvNextForImageClassification, ...) as models the structured-pruning engine can trace and prune.

A transformers model takes `pixel_values=` and returns a ModelOutput; HFClassifier makes it a plain
images -> logits module, and marks its MLP expansion layers as HiddenLinear so that their width is
pruned like a conv's filters. Attention heads need nothing here: the engine finds every attention
with separate q_proj/k_proj/v_proj/o_proj layers (robustprune.pruning.structured._split_attention).
Nothing here imports transformers: pruning works on the model object the user built.
"""

from __future__ import annotations

import torch
from torch import nn

from robustprune.models.blocks import HiddenLinear

# Names (suffixes) of the first Linear layer of a transformer MLP in transformers' models: ViT, DeiT,
# CLIP ... ('mlp.fc1'; 'intermediate.dense' before transformers 5), ConvNeXt ('pwconv1').
MLP_EXPANSIONS = ("mlp.fc1", "intermediate.dense", "pwconv1")


def mark_hidden_linears_(model: nn.Module) -> list[str]:
    """Mark the MLP expansion layers of a transformers model (MLP_EXPANSIONS) as HiddenLinear, in
    place (weights and forward unchanged), and return their names (already marked ones included).
    Their output width is a hidden width, prunable as filters are; other Linear layers stay
    consumers only."""
    marked = []
    for name, m in model.named_modules():
        if type(m) in (nn.Linear, HiddenLinear) and any(name == s or name.endswith("." + s) for s in MLP_EXPANSIONS):
            m.__class__ = HiddenLinear  # (a subclass that adds nothing: weights and forward stay)
            marked.append(name)
    return marked


class HFClassifier(nn.Module):
    """A transformers image classifier as images -> logits: forward(x) is model(pixel_values=x).logits.

    Pruning the wrapper prunes `model` in place (layer names gain the prefix 'model.'), which stays
    a working transformers model; its config keeps the original sizes. The MLP expansion layers are
    marked as HiddenLinear when the wrapper is built (`hidden_layers` lists them)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.hidden_layers = [f"model.{n}" for n in mark_hidden_linears_(model)]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=x).logits
