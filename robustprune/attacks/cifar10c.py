"""The official CIFAR-10-C test sets (Hendrycks & Dietterich 2019), read from their .npy files.

The release holds one file per corruption, `<name>.npy`, uint8 of shape (50000, 32, 32, 3): the
10 000 CIFAR-10 test images at severity 1, then at 2, ... 5; and `labels.npy` with the matching
50 000 labels. Download: https://zenodo.org/record/2535967 (CIFAR-10-C.tar)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from robustprune.errors import UserError, closest
from robustprune.files import check_regular_file

# the 15 benchmark corruptions and the 4 extra ones of the release
CIFAR10C_NAMES = (
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
    "speckle_noise",
    "gaussian_blur",
    "spatter",
    "saturate",
)
_FIX = "download CIFAR-10-C (https://zenodo.org/record/2535967) and pass the folder that holds its .npy files"


def _load(path: Path, what: str) -> np.ndarray:
    check_regular_file(path, "CIFAR-10-C file", _FIX)
    if not path.is_file():
        raise UserError(f"CIFAR-10-C file {path} not found; {_FIX}")
    try:
        return np.load(path, mmap_mode="r")  # one severity is read, not the whole 150 MB file
    except (OSError, ValueError) as e:
        raise UserError(f"CIFAR-10-C file {path} is not a readable .npy file ({e}); {_FIX}") from None


def load_cifar10c(folder: str | os.PathLike, name: str, severity: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Corruption `name` at `severity` (1-5): images uint8 (N, 3, 32, 32) and labels int64 (N,)."""
    if name not in CIFAR10C_NAMES:
        raise UserError(f"unknown CIFAR-10-C corruption '{name}'; {closest(name, CIFAR10C_NAMES)}")
    if isinstance(severity, bool) or not isinstance(severity, int) or not 1 <= severity <= 5:
        raise UserError(f"CIFAR-10-C severity must be one of 1, 2, 3, 4, 5, got {severity!r}")
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise UserError(f"CIFAR-10-C folder {folder} not found; {_FIX}")
    images = _load(folder / f"{name}.npy", "images")
    labels = _load(folder / "labels.npy", "labels")
    if images.ndim != 4 or images.shape[1:] != (32, 32, 3) or images.shape[0] % 5 or images.dtype != np.uint8:
        raise UserError(
            f"CIFAR-10-C file {folder / (name + '.npy')} holds {images.dtype} of shape "
            f"{images.shape}, not uint8 of shape (5 x N, 32, 32, 3); {_FIX}"
        )
    if labels.shape != (images.shape[0],):
        raise UserError(
            f"CIFAR-10-C file {folder / 'labels.npy'} has shape {labels.shape}, not "
            f"({images.shape[0]},) to match {name}.npy; {_FIX}"
        )
    n = images.shape[0] // 5
    block = slice((severity - 1) * n, severity * n)
    x = torch.from_numpy(np.array(images[block])).permute(0, 3, 1, 2).contiguous()  # a copy: memmaps are read-only
    y = torch.from_numpy(np.asarray(labels[block]).astype(np.int64))
    return x, y
