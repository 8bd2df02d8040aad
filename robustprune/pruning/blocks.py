"""Layer pruning: remove whole residual blocks (Jordão & Pedrini's "layers"; Veit et al. 2016 show
residual networks tolerate it). A block is removable when its shortcut is the identity
(ResidualBlock.removable); it is replaced by nn.Identity in its parent, so the network then passes
the block's input straight on. Blocks that change the shape (projection shortcuts) always stay."""

from __future__ import annotations

import torch
from torch import nn

from robustprune.errors import UserError
from robustprune.models.blocks import ResidualBlock, residual_blocks, residual_stages
from robustprune.pruning.checks import check_ratio
from robustprune.pruning.criteria.base import Criterion
from robustprune.pruning.record import record_step_


def removable_blocks(model: nn.Module) -> list[tuple[str, ResidualBlock]]:
    """The residual blocks layer pruning may remove, in forward-definition order."""
    return [(n, b) for n, b in residual_blocks(model) if b.removable]


def _has_weights(m: nn.Module) -> bool:
    return any(True for _ in m.parameters())


def _check_stages(model: nn.Module, chosen: set[str]) -> None:
    """A stage (the container holding blocks, see residual_stages) must keep at least one child with
    weights: a block that stays, or another layer such as MobileNetV2's first, strided block."""
    for stage, blocks in residual_stages(model).items():
        if not any(n in chosen for n, _ in blocks):
            continue
        container = model.get_submodule(stage) if stage else model
        prefix = f"{stage}." if stage else ""
        left = [c for c, m in container.named_children() if prefix + c not in chosen and _has_weights(m)]
        if not left:
            where = f"stage '{stage}'" if stage else "the model"
            gone = sum(n in chosen for n, _ in blocks)
            raise UserError(
                f"removing the {gone} lowest-scored blocks of {where} would leave it with no block; "
                f"remove fewer blocks (a smaller ratio or count)"
            )


def replace_with_identity_(model: nn.Module, name: str) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Identity())  # works for attributes, nn.Sequential and nn.ModuleList items


def prune_blocks_(
    model: nn.Module,
    criterion,
    ratio: float | None = None,
    *,
    count: int | None = None,
    x: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
) -> list[str]:
    """Remove the lowest-scored removable residual blocks; returns their names, lowest score first.

    Give either `ratio`, the share of the removable blocks removed (round(ratio * n), half to
    even), or `count`, how many. Scores come from `criterion.block_scores(model, blocks, x, y)`, one
    per removable block, on the model as it is; ties go to the earlier block. Refused (UserError)
    when the model has no removable blocks, or when the choice would empty a stage."""
    if (ratio is None) == (count is None):
        raise UserError("give either a ratio or a count of blocks to remove, not both or neither")
    blocks = residual_blocks(model)
    if not blocks:
        raise UserError(f"model {type(model).__name__} has no residual blocks to remove; prune filters instead")
    blocks = removable_blocks(model)
    if not blocks:
        raise UserError(
            f"model {type(model).__name__} has no residual blocks with an identity shortcut "
            f"to remove; prune filters instead"
        )
    if count is None:
        n = int(round(check_ratio(ratio, "block pruning ratio") * len(blocks)))
    elif isinstance(count, bool) or not isinstance(count, int) or not 0 <= count <= len(blocks):
        raise UserError(
            f"the number of blocks to remove must be a whole number from 0 to {len(blocks)} "
            f"(the removable blocks), not {count!r}"
        )
    else:
        n = count
    if n == 0:
        return []
    if getattr(criterion, "needs_data", False) and x is None:
        Criterion.prepare(criterion, model, x, y)  # raises the criterion's own UserError
    scores = torch.as_tensor(criterion.block_scores(model, blocks, x, y)).detach().float().cpu().flatten()
    if scores.numel() != len(blocks):
        raise ValueError(f"block_scores returned {scores.numel()} scores for {len(blocks)} blocks")
    chosen = [blocks[i][0] for i in torch.argsort(scores, stable=True)[:n].tolist()]
    _check_stages(model, set(chosen))
    for name in chosen:
        replace_with_identity_(model, name)
        record_step_(model, {"kind": "identity", "name": name})  # (robustprune.saving replays it)
    return chosen
