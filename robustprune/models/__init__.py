"""Model registry. Every model takes images in [0, 1]; normalisation is its first layer so that
attacks work in pixel space. Any nn.Module works through the Python API.

MODELS and the helpers the architectures share live in registry.py, which the architecture modules
import (never this package); importing them here registers every architecture."""

from __future__ import annotations

import torch
from torch import nn

from robustprune.errors import UserError, excerpt
from robustprune.models import (  # noqa: F401  (registers)
    mnist_cnn,
    mobilenetv2,
    mobilevit,
    resnet_cifar,
    resnet_imagenet,
    vgg,
)
from robustprune.models.registry import MODELS, Normalize, fraction, positive, whole  # noqa: F401  (public here)


def to_device(model: nn.Module, device) -> nn.Module:
    """Move a model and store its convolutions channels-last (2-4x faster on CPU with oneDNN)."""
    return model.to(device=device, memory_format=torch.channels_last)


def build_model(name: str, *, num_classes: int, image_shape, mean, std, **args) -> nn.Module:
    return MODELS.get(name)(num_classes=num_classes, image_shape=image_shape, mean=mean, std=std, **args)


MAX_PARAMS = 1_000_000_000  # 4 GB of fp32 weights; a typo in a width (65536 for 64) asks for terabytes


def meta_model(name: str, **args) -> nn.Module:
    """The model built on the meta device: its structure and parameter count, with no memory used."""
    with torch.device("meta"):
        return MODELS.get(name)(**args)


def check_model(name: str, args: dict, *, dataset: str, num_classes: int, image_shape, mean, std) -> None:
    """Build the model and run one image of the dataset's shape through it, so that arguments that
    cannot work (a kernel larger than the image, a width of 0) are refused before a run writes
    anything, in one sentence instead of a torch traceback mid-run."""
    what = f"model '{name}' with args {excerpt(args)}"
    size = "x".join(map(str, image_shape))
    kw = dict(num_classes=num_classes, image_shape=tuple(image_shape), mean=mean, std=std, **args)
    try:
        n = sum(p.numel() for p in meta_model(name, **kw).parameters())
        if n > MAX_PARAMS:
            raise UserError(
                f"{what} has {n:,} parameters, over the limit of {MAX_PARAMS:,} (smaller widths); fix its args"
            )
        model = build_model(name, **kw).eval()
        with torch.no_grad():
            out = model(torch.zeros(1, *image_shape))
    except UserError as e:
        if str(e).startswith(what):
            raise
        raise UserError(f"{what} cannot be built ({e}); fix its args") from None
    except Exception as e:  # whatever torch or the model raises: the args do not fit this input
        reason = excerpt((str(e).strip().splitlines() or [type(e).__name__])[0], 160)
        raise UserError(f"{what} cannot run on {dataset} images ({size}): {reason}; fix its args") from None
    if tuple(out.shape) != (1, num_classes):
        raise UserError(
            f"{what} gives outputs of shape {tuple(out.shape)} on {dataset} images, not (1, {num_classes}); "
            "fix its args"
        )
