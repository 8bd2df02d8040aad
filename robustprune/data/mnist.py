"""MNIST from the four canonical gzip IDX files (LeCun et al.), downloaded and MD5-checked."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from robustprune.data.base import DATASETS, ImageDataset, ensure_file
from robustprune.errors import UserError

MIRRORS = [
    "https://ossci-datasets.s3.amazonaws.com/mnist/",
    "http://yann.lecun.com/exdb/mnist/",
]
FILES = {
    "train_images": ("train-images-idx3-ubyte.gz", "f68b3c2dcbeaaa9fbdd348bbdeb94873", 60000),
    "train_labels": ("train-labels-idx1-ubyte.gz", "d53e105ee54ea40749a09fcbcd1e9432", 60000),
    "test_images": ("t10k-images-idx3-ubyte.gz", "9fb629c4189551a2d022fa330f9573f3", 10000),
    "test_labels": ("t10k-labels-idx1-ubyte.gz", "ec29112dd5afa0611ce80d1b7f02629c", 10000),
}
IDX_MAGIC = {2049: 1, 2051: 3}  # labels: 1-d, images: 3-d, both unsigned bytes


def read_idx(path: Path) -> np.ndarray:
    """Parse a gzip IDX file into a uint8 array, refusing anything malformed."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise UserError(f"{path} is not a readable gzip file ({e}); replace it with the official file") from None
    if len(raw) < 8:
        raise UserError(f"{path} is too short to be an IDX file; replace it with the official file")
    magic = struct.unpack(">I", raw[:4])[0]
    if magic not in IDX_MAGIC:
        raise UserError(
            f"{path} has IDX magic number {magic}, expected 2049 or 2051; replace it with the official file"
        )
    ndim = IDX_MAGIC[magic]
    if len(raw) < 4 + 4 * ndim:
        raise UserError(f"{path} ends inside its IDX header; the file is truncated, replace it with the official file")
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    body = raw[4 + 4 * ndim :]
    if len(body) != int(np.prod(dims)):
        raise UserError(
            f"{path} holds {len(body)} bytes of data but its header promises {int(np.prod(dims))}; "
            "the file is truncated, replace it with the official file"
        )
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


@DATASETS.register("mnist")
def load_mnist(data_dir: Path, download: bool = True) -> ImageDataset:
    """MNIST: 60 000 train / 10 000 test grey 28x28 digits, 10 classes."""
    # The data folder holds one sub-folder per dataset; a folder that already is the MNIST folder works too.
    folder = data_dir if (data_dir / FILES["train_images"][0]).exists() else data_dir / "mnist"
    arrays = {}
    for key, (filename, md5, count) in FILES.items():
        path = ensure_file(folder, filename, md5, [m + filename for m in MIRRORS], download)
        arr = read_idx(path)
        if arr.shape[0] != count or (key.endswith("images") and arr.shape[1:] != (28, 28)):
            raise UserError(
                f"{path} has shape {arr.shape}, expected ({count}{', 28, 28' if key.endswith('images') else ''}); "
                "replace it with the official file"
            )
        arrays[key] = torch.from_numpy(arr.copy())
    return ImageDataset(
        name="mnist",
        x_train=arrays["train_images"].unsqueeze(1),
        y_train=arrays["train_labels"].long(),
        x_test=arrays["test_images"].unsqueeze(1),
        y_test=arrays["test_labels"].long(),
        num_classes=10,
        mean=(0.1307,),
        std=(0.3081,),
    )
