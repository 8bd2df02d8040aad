"""The registry of pruning methods a study file can name."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from robustprune.prune.structured import filters_to_remove, remove_filters_
from robustprune.prune.unstructured import apply_masks_, global_magnitude_masks
from robustprune.registry import Registry

PRUNING_METHODS: Registry = Registry("pruning method")


class MethodParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PruningMethod(ABC):
    """prune(model, sparsity, example_input) prunes in place and returns masks to keep during
    fine-tuning (unstructured) or None (structured: the model itself shrank)."""

    Params: ClassVar[type[MethodParams]] = MethodParams
    iterative: ClassVar[bool] = False

    @abstractmethod
    def prune(self, model: nn.Module, sparsity: float, example_input: torch.Tensor, params) -> dict | None:
        """Prune `model` in place to `sparsity`."""


@PRUNING_METHODS.register("global_magnitude")
class GlobalMagnitude(PruningMethod):
    """Global L1 unstructured: the fraction s of all conv+linear weights with the smallest |w|."""

    def prune(self, model, sparsity, example_input, params):
        masks = global_magnitude_masks(model, sparsity)
        apply_masks_(model, masks)
        return masks


@PRUNING_METHODS.register("channel_l1")
class ChannelL1(PruningMethod):
    """Structured: the fraction s of filters with the smallest L1 norm in every conv layer, removed."""

    def prune(self, model, sparsity, example_input, params):
        remove_filters_(model, filters_to_remove(model, sparsity), example_input)
        return None


class LotteryParams(MethodParams):
    rounds: int = Field(5, ge=1, description="pruning rounds")
    rate: float = Field(0.2, gt=0, lt=1, description="share of the remaining weights pruned per round")
    epochs: int | None = Field(None, ge=1, description="retraining epochs per round (default: as the dense model)")


@PRUNING_METHODS.register("lottery_ticket")
class LotteryTicket(PruningMethod):
    """Iterative magnitude pruning with rewinding to the initial weights (Frankle & Carbin 2019)."""

    Params = LotteryParams
    iterative = True

    def prune(self, model, sparsity, example_input, params):
        masks = global_magnitude_masks(model, sparsity)
        apply_masks_(model, masks)
        return masks
