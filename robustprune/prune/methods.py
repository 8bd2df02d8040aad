"""The registry of pruning methods a study file can name."""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from robustprune.prune.criteria import build_criterion
from robustprune.prune.structured import StructuredParams, filters_to_remove, prune_structured_, remove_filters_
from robustprune.prune.unstructured import apply_masks_, global_magnitude_masks
from robustprune.registry import Registry

PRUNING_METHODS: Registry = Registry("pruning method")


class MethodParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class PruningMethod(ABC):
    """prune(model, sparsity, example_input, params, data) prunes in place and returns masks to keep
    during fine-tuning (unstructured) or None (structured: the model itself shrank). `data` is a
    batch (x, y) of training images for methods whose criterion reads data, else None."""

    Params: ClassVar[type[BaseModel]] = MethodParams
    iterative: ClassVar[bool] = False
    adjustable: ClassVar[bool] = True  # its structure can be put on other weights (Scratch-E/B, winning ticket)

    def needs_data(self, params) -> bool:
        return False

    def validate(self, params) -> None:
        """Raise ValueError for parameters that pass their types but cannot run (checked when the
        study file is read, before any work)."""

    @abstractmethod
    def prune(self, model: nn.Module, sparsity: float, example_input: torch.Tensor, params,
              data: tuple[torch.Tensor, torch.Tensor] | None = None) -> dict | None:
        """Prune `model` in place to `sparsity`."""


@PRUNING_METHODS.register("global_magnitude")
class GlobalMagnitude(PruningMethod):
    """Global L1 unstructured: the fraction s of all conv+linear weights with the smallest |w|."""

    def prune(self, model, sparsity, example_input, params, data=None):
        masks = global_magnitude_masks(model, sparsity)
        apply_masks_(model, masks)
        return masks


@PRUNING_METHODS.register("channel_l1")
class ChannelL1(PruningMethod):
    """Structured: the fraction s of filters with the smallest L1 norm in every conv layer, removed."""

    adjustable = False  # no criterion to replay; the 'structured' method with criterion l1 can

    def prune(self, model, sparsity, example_input, params, data=None):
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

    def prune(self, model, sparsity, example_input, params, data=None):
        masks = global_magnitude_masks(model, sparsity)
        apply_masks_(model, masks)
        return masks


@PRUNING_METHODS.register("structured")
class Structured(PruningMethod):
    """Structured: filters, residual blocks or both removed by any criterion (Torch-Pruning graph)."""

    Params = StructuredParams

    def needs_data(self, params) -> bool:
        return self.criterion(params).needs_data

    @staticmethod
    def criterion(params):
        """A fresh criterion object as the entry's params name it."""
        return build_criterion(params.criterion, **params.criterion_params)

    def validate(self, params) -> None:
        try:
            self.criterion(params)
        except TypeError as e:
            raise ValueError(f"criterion '{params.criterion}' does not accept {params.criterion_params} ({e})") from None

    def prune(self, model, sparsity, example_input, params, data=None, criterion=None):
        """`criterion` replaces the one in params (e.g. to record or replay its scores)."""
        criterion = criterion or self.criterion(params)
        x, y = data if data is not None else (None, None)
        ratio = (params.block_ratio if params.block_ratio is not None else sparsity, sparsity) \
            if params.target == "both" else sparsity
        prune_structured_(model, criterion, ratio, example_input, target=params.target, scope=params.scope,
                          layer_ratios=params.layer_ratios, x=x, y=y)
        return None
