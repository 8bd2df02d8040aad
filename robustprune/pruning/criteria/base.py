"""One signature for every importance criterion (the shape of Torch-Pruning's importance callables):
`criterion(group) -> scores`, one score per channel of a Torch-Pruning group of coupled layers, the
lowest removed first. Data-driven criteria collect what they need in `prepare(model, x, y)` on the
unpruned model before any scoring. Layer pruning asks `block_scores(model, blocks, x, y)`, one
score per residual block, the lowest removed first."""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import torch
import torch_pruning as tp
from torch import nn

from robustprune.errors import UserError
from robustprune.registry import Registry

CRITERIA: Registry = Registry("criterion")


class Criterion(tp.importance.Importance):
    name: ClassVar[str] = "criterion"
    needs_data: ClassVar[bool] = False

    def prepare(self, model: nn.Module, x: torch.Tensor | None = None, y: torch.Tensor | None = None) -> None:
        """Called once on the unpruned model before scoring; data-free criteria need nothing."""
        if self.needs_data and x is None:
            raise UserError(
                f"criterion '{self.name}' scores filters from data but none was given; "
                f"pass a batch of training images or pick a data-free criterion (l1, l2, lamp, random)"
            )

    @abstractmethod
    def __call__(self, group) -> torch.Tensor:
        """One score per channel of the Torch-Pruning group, in the order of its root indices."""

    def block_scores(
        self,
        model: nn.Module,
        blocks: list[tuple[str, nn.Module]],
        x: torch.Tensor | None = None,
        y: torch.Tensor | None = None,
    ) -> torch.Tensor:
        raise UserError(
            f"criterion '{self.name}' cannot score residual blocks; use one that can ({', '.join(block_criteria())})"
        )


def block_criteria() -> list[str]:
    return [n for n in CRITERIA.names() if CRITERIA.get(n).block_scores is not Criterion.block_scores]


def build_criterion(name: str, **params) -> Criterion:
    return CRITERIA.get(name)(**params)
