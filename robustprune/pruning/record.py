"""The record of what structured pruning removed: every pruning function (filters, heads, blocks)
appends its steps to the model, and robustprune.saving stores and replays them. A module of its own,
below structured.py and blocks.py, which both write to it."""

from __future__ import annotations

from torch import nn

STRUCTURE_ATTR = "_robustprune_structure"


def record_step_(model: nn.Module, step: dict) -> None:
    """Append one pruning step (plain JSON data) to the model's structure record, a list attribute
    that is neither a parameter, a buffer nor a submodule. Steps accumulate in the order they ran."""
    # a new list each time: a copy of the model made before this step keeps its own record
    object.__setattr__(model, STRUCTURE_ATTR, [*model.__dict__.get(STRUCTURE_ATTR, []), step])
