"""The registry of pruning methods a study file can name."""

from __future__ import annotations

import copy
from abc import ABC, abstractmethod
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from robustprune.pruning.criteria import build_criterion
from robustprune.pruning.structured import (
    StructuredParams,
    filters_to_remove,
    prune_filters_,
    prune_structured_,
    remove_filters_,
)
from robustprune.pruning.unstructured import apply_masks_, global_magnitude_masks, magnitude_masks
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

    def validate(self, params) -> None:  # noqa: B027  (optional hook: most methods accept any valid params)
        """Raise ValueError for parameters that pass their types but cannot run (checked when the
        study file is read, before any work)."""

    def validate_sparsity(self, params, sparsity: float) -> None:  # noqa: B027  (optional hook)
        """Raise ValueError for a sparsity these parameters cannot reach (checked with the study file)."""

    @abstractmethod
    def prune(
        self,
        model: nn.Module,
        sparsity: float,
        example_input: torch.Tensor,
        params,
        data: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> dict | None:
        """Prune `model` in place to `sparsity`."""


class MagnitudeParams(MethodParams):
    scope: Literal["global", "layer"] = Field(
        "global", description="rank all layers' weights together, or remove the share s of every layer"
    )


@PRUNING_METHODS.register("global_magnitude")
class GlobalMagnitude(PruningMethod):
    """Unstructured: the fraction s of the conv+linear weights with the smallest |w| (over all layers
    at once, or per layer with scope: layer)."""

    Params = MagnitudeParams
    largest: ClassVar[bool] = False

    def prune(self, model, sparsity, example_input, params, data=None):
        masks = magnitude_masks(model, sparsity, params.scope, largest=self.largest)
        apply_masks_(model, masks)
        return masks


@PRUNING_METHODS.register("reverse_magnitude")
class ReverseMagnitude(GlobalMagnitude):
    """Reverse pruning (reverse-pruning paper, Sec. 4): the fraction s of the weights with the
    LARGEST |w| removed, as masks that stay applied during fine-tuning (the paper: s = 10 %)."""

    largest = True


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
            raise ValueError(
                f"criterion '{params.criterion}' does not accept {params.criterion_params} ({e})"
            ) from None

    def prune(self, model, sparsity, example_input, params, data=None, criterion=None):
        """`criterion` replaces the one in params (e.g. to record or replay its scores)."""
        criterion = criterion or self.criterion(params)
        x, y = data if data is not None else (None, None)
        ratio = (
            (params.block_ratio if params.block_ratio is not None else sparsity, sparsity)
            if params.target == "both"
            else sparsity
        )
        prune_structured_(
            model,
            criterion,
            ratio,
            example_input,
            target=params.target,
            scope=params.scope,
            layer_ratios=params.layer_ratios,
            x=x,
            y=y,
        )
        return None


class MRPFParams(StructuredParams):
    """Structured filter pruning at MRS-based per-group ratios (Bai et al., Appendix A): adversarial
    examples of the scoring images, MRS of every group of coupled filters, then the ratio rule."""

    attack: str = Field("fgsm", description="the attack that makes AE from the scoring images")
    attack_eps: float = Field(2 / 255, ge=0, le=1, description="its L-inf radius (the paper: 2/255)")
    mrs_lr: float = Field(0.01, gt=0, description="step of the gradient ascent on a group's weights (η)")
    mrs_epochs: int = Field(1, ge=1, description="passes of the ascent over AE (E)")
    mrs_eps: float = Field(8 / 255, gt=0, description="relative L2 bound of the perturbation (ε, B.4.3)")
    r_min: float = Field(0.0, ge=0, lt=1, description="smallest per-group ratio")
    r_max: float = Field(0.8, gt=0, lt=1, description="largest per-group ratio")
    rule: Literal["adaptive", "inverse"] = Field("adaptive", description="Appendix B.4.2, or the main text's Eq. 8-10")
    match_flops: bool = Field(
        False,
        description="choose the global ratio by bisection so that the FLOPs reduction is within 1 p.p. of what "
        "uniform filter pruning (method structured, the same criterion) removes at the entry's sparsity on the "
        "same model: the paper's tables compare at matched FLOPs. The sparsity then names that baseline",
    )


# what a FLOPs-matched MRPF plan holds besides MRS and ratios (stored as mrpf:<key> metrics)
MATCHED = ("global_ratio", "flops_reduction", "baseline_flops_reduction")


@PRUNING_METHODS.register("mrpf")
class MRPF(Structured):
    """Module Robust Pruning (Bai et al.): per-group ratios from Module Robust Sensitivity, filters
    ranked within each group by any criterion. `last_plan` holds the MRS values and ratios of the
    last call (stored with the cell), and passing them back as `plan` prunes the same way without
    recomputing them."""

    Params = MRPFParams
    # MRS depends on the model, the scoring images and these settings only, not on the criterion or
    # the ratio rule: a study keeps it per dense model (an object with get(key) and put(key, mrs)).
    MRS_SETTINGS = ("attack", "attack_eps", "mrs_lr", "mrs_epochs", "mrs_eps")
    mrs_cache = None
    FLOPS_TOLERANCE = 0.01  # match_flops: at most 1 p.p. from the baseline's FLOPs reduction

    @classmethod
    def mrs_key(cls, params) -> dict:
        return {name: getattr(params, name) for name in cls.MRS_SETTINGS}

    def needs_data(self, params) -> bool:
        return True  # the adversarial examples are made from the scoring images

    def validate(self, params) -> None:
        super().validate(params)
        if params.target != "filters" or params.rounds != 1 or params.layer_ratios:
            raise ValueError(
                "mrpf sets per-group filter ratios itself: use target filters, rounds 1 and no layer_ratios"
            )
        if params.r_min > params.r_max:
            raise ValueError(f"r_min {params.r_min} is above r_max {params.r_max}")
        self.attack(params)

    def validate_sparsity(self, params, sparsity: float) -> None:
        if not params.r_min <= sparsity <= params.r_max:
            raise ValueError(
                f"sparsity {sparsity} is outside [r_min, r_max] = [{params.r_min}, {params.r_max}]; widen r_min / r_max"
            )

    @staticmethod
    def attack(params):
        from robustprune.attacks.registry import build_attack

        return build_attack(params.attack, params.attack_eps)

    def mrs_plan(self, model, sparsity, example_input, params, x, y) -> dict:
        from robustprune.pruning.mrpf import module_robust_sensitivity
        from robustprune.pruning.structured import filter_groups

        mrs = self.mrs_cache.get(self.mrs_key(params)) if self.mrs_cache is not None else None
        if mrs is None:
            attack = self.attack(params)
            x_adv = torch.cat([attack(model, x[i : i + 256], y[i : i + 256]) for i in range(0, len(x), 256)])
            mrs = module_robust_sensitivity(
                model,
                filter_groups(model, example_input),
                x_adv,
                y,
                lr=params.mrs_lr,
                epochs=params.mrs_epochs,
                eps=params.mrs_eps,
            )
            if self.mrs_cache is not None:
                self.mrs_cache.put(self.mrs_key(params), mrs)
        if params.match_flops:
            return {"mrs": mrs} | self.flops_matched(model, mrs, sparsity, example_input, params, x, y)
        return {"mrs": mrs, "ratios": self.ratios(mrs, sparsity, params)}

    @staticmethod
    def ratios(mrs: dict, r_global: float, params) -> dict[str, float]:
        from robustprune.pruning.mrpf import adaptive_ratios, inverse_mrs_ratios

        if params.rule == "adaptive":
            return adaptive_ratios(mrs, r_global, params.r_min, params.r_max)
        return inverse_mrs_ratios(mrs, r_global, params.r_max)

    def flops_matched(self, model, mrs, sparsity, example_input, params, x, y) -> dict:
        """The global ratio whose MRPF ratios remove (within FLOPS_TOLERANCE) the share of FLOPs
        that uniform pruning at `sparsity` removes, found by bisection on copies of the model. The
        criterion runs once, on the baseline; every trial replays its scores (which filters of a
        group go does not change the FLOPs, only how many)."""
        from robustprune.errors import UserError
        from robustprune.metrics.size import count_macs
        from robustprune.pruning.criteria.replay import Recording, Replay

        dense = count_macs(model, example_input)[0]

        def reduction(prune) -> float:
            m = copy.deepcopy(model)
            prune(m)
            return 1.0 - count_macs(m, example_input)[0] / dense

        recording = Recording(self.criterion(params))
        target = reduction(lambda m: prune_filters_(m, recording, sparsity, example_input, x=x, y=y))
        scores = recording.state()

        def trial(r: float):
            ratios = self.ratios(mrs, r, params)
            try:
                return ratios, reduction(
                    lambda m: prune_filters_(m, Replay(scores), 0.0, example_input, layer_ratios=ratios)
                )
            except UserError:  # a ratio that empties a group: too much
                return ratios, None

        lo_bound = params.r_min if params.rule == "adaptive" else 0.0  # what each rule accepts
        lo, hi = lo_bound, params.r_max
        r, best = sparsity, None
        while True:  # the reduction grows with r (in steps, as counts are whole filters)
            ratios, got = trial(r)
            if got is not None and (best is None or abs(got - target) < abs(best[2] - target)):
                best = (r, ratios, got)
            if (got is not None and abs(got - target) <= 0.001) or hi - lo < 1e-3:  # 0.1 p.p. is close enough
                break
            lo, hi = (lo, r) if got is None or got > target else (r, hi)
            r = (lo + hi) / 2
        if best is None or abs(best[2] - target) > self.FLOPS_TOLERANCE:
            near = (
                "no global ratio prunes the model" if best is None else f"{best[2]:.2%} at global ratio {best[0]:.4f}"
            )
            raise UserError(
                f"mrpf cannot match the {target:.2%} FLOPs reduction of uniform pruning at sparsity {sparsity} within "
                f"{self.FLOPS_TOLERANCE * 100:g} p.p. (closest: {near}, searching {lo_bound} to {params.r_max}); "
                f"widen r_min / r_max or set match_flops: false"
            )
        r, ratios, got = best
        return {"ratios": ratios, "global_ratio": r, "flops_reduction": got, "baseline_flops_reduction": target}

    def prune(self, model, sparsity, example_input, params, data=None, criterion=None, plan=None):
        x, y = data if data is not None else (None, None)
        if plan is None:
            if x is None:
                from robustprune.errors import UserError

                raise UserError("mrpf needs training images to make adversarial examples from; pass data=(x, y)")
            plan = self.mrs_plan(model, sparsity, example_input, params, x, y)
        self.last_plan = plan
        prune_filters_(
            model, criterion or self.criterion(params), 0.0, example_input, layer_ratios=plan["ratios"], x=x, y=y
        )
        return None
