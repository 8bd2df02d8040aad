"""Training regimes (Liang et al. 2025, §4.3): each turns a clean dataset into the data one dense
model is trained on, and adds the named test sets its robustness is measured on."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import replace
from typing import Callable, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field

from robustprune.data.base import ImageDataset
from robustprune.registry import Registry

REGIMES: Registry = Registry("training regime")


class RegimeParams(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Regime(ABC):
    """Subclasses set `Params` and implement `apply`. `source_model(seed)` gives a trained clean
    model on the same data when a regime needs one (the FGSM data set)."""

    Params: ClassVar[type[RegimeParams]] = RegimeParams

    @abstractmethod
    def apply(
        self, data: ImageDataset, params, seed: int, source_model: Callable[[int], torch.nn.Module]
    ) -> ImageDataset:
        """The training data (and extra test sets) of this regime."""

    def transfer_tests(self, params) -> dict[str, tuple[str, float]]:
        """Extra test sets that are adversarial examples crafted on another model, as
        {test name: (attack, eps)}: a white-box attack at that eps must not be weaker (masking check)."""
        return {}


@REGIMES.register("clean")
class Clean(Regime):
    """The data as it is."""

    def apply(self, data, params, seed, source_model):
        return data


# Class -> (rows, cols) of the white 5x5 patch, exactly as listed in §4.3.4.
SPURIOUS_PATCHES = {
    0: (slice(0, 5), slice(0, 5)),
    1: (slice(0, 5), slice(23, 28)),
    2: (slice(23, 28), slice(0, 5)),
    3: (slice(23, 28), slice(23, 28)),
}
CENTER_PATCH = (slice(12, 17), slice(12, 17))


def add_class_patches(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Paint the class-dependent white patch on every image (uint8, N x C x 28 x 28)."""
    x = x.clone()
    white = 255 if x.dtype == torch.uint8 else 1.0
    for c in range(int(y.max()) + 1 if len(y) else 0):
        rows, cols = SPURIOUS_PATCHES.get(c, CENTER_PATCH)
        idx = (y == c).nonzero(as_tuple=True)[0]
        sub = x[idx]
        sub[:, :, rows, cols] = white
        x[idx] = sub
    return x


class SpuriousParams(RegimeParams):
    pass


@REGIMES.register("spurious")
class Spurious(Regime):
    """Class-dependent 5x5 white patches on every training image (shortcut feature)."""

    Params = SpuriousParams

    def apply(self, data, params, seed, source_model):
        out = replace(data, x_train=add_class_patches(data.x_train, data.y_train), extra_tests=dict(data.extra_tests))
        out.extra_tests["patched"] = (add_class_patches(data.x_test, data.y_test), data.y_test)
        return out


class NoisyParams(RegimeParams):
    rate: float = Field(0.4, ge=0.0, le=1.0, description="probability that a label is redrawn uniformly")


def symmetric_label_noise(y: torch.Tensor, rate: float, num_classes: int, seed: int) -> torch.Tensor:
    """With probability `rate` a label is replaced by a uniform draw over all classes (§4.3.3)."""
    g = torch.Generator().manual_seed(seed)
    redraw = torch.rand(len(y), generator=g) < rate
    random_labels = torch.randint(0, num_classes, (len(y),), generator=g)
    return torch.where(redraw, random_labels, y)


@REGIMES.register("noisy_labels")
class NoisyLabels(Regime):
    """Symmetric label noise on the training labels only (test labels untouched)."""

    Params = NoisyParams

    def apply(self, data, params, seed, source_model):
        return replace(data, y_train=symmetric_label_noise(data.y_train, params.rate, data.num_classes, seed))


class FgsmDataParams(RegimeParams):
    eps: float = Field(0.2, ge=0.0, le=1.0, description="FGSM step of the crafted data set, pixel scale [0, 1]")
    mode: Literal["mixed", "adversarial_only"] = "mixed"
    adv_fraction: float = Field(0.5, ge=0.0, le=1.0, description="share of adversarial images in 'mixed' mode")
    source_seed_offset: int = Field(1000, description="the source model is trained with seed + this offset")


@REGIMES.register("fgsm_data")
class FgsmData(Regime):
    """A fixed FGSM data set crafted once on a separately trained clean model (train and test)."""

    Params = FgsmDataParams

    def apply(self, data, params, seed, source_model):
        from robustprune.attacks.fgsm import fgsm_dataset

        model = source_model(seed + params.source_seed_offset)
        adv_train = fgsm_dataset(model, data.x_train, data.y_train, params.eps)
        adv_test = fgsm_dataset(model, data.x_test, data.y_test, params.eps)
        if params.mode == "adversarial_only":
            x_train = adv_train
        else:
            g = torch.Generator().manual_seed(seed)
            use_adv = torch.rand(len(data.x_train), generator=g) < params.adv_fraction
            x_train = torch.where(use_adv.view(-1, 1, 1, 1), adv_train, data.x_train)
        out = replace(data, x_train=x_train, extra_tests=dict(data.extra_tests))
        out.extra_tests["fgsm_data"] = (adv_test, data.y_test)
        return out

    def transfer_tests(self, params):
        return {"fgsm_data": ("fgsm", params.eps)}
