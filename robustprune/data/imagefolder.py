"""Folders of image files -> ImageDataset, decoded once with Pillow to uint8 RGB tensors.

Two layouts are read:
- generic: `root/train/<class>/*.png|jpg|jpeg` and `root/test/<class>/...` (or `root/val/<class>/...`);
- Tiny ImageNet (`tiny-imagenet-200`): `root/train/<wnid>/images/*.JPEG`, and the labelled
  validation set `root/val/images/*.JPEG` with `root/val/val_annotations.txt` (file, wnid, box);
  its `test/` has no labels, so the validation set is the test split.

Classes are the sorted names of the train sub-folders; label i is the i-th. Each split is put in
a fixed pseudo-random order (the same on every machine), so `subset(n)` takes all classes rather
than the first few. mean/std are those of the training images."""

from __future__ import annotations

import os
import shutil
import tempfile
import zipfile
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PurePosixPath

import numpy as np
import torch

from robustprune.data.base import DATA_ENV, DATASETS, ImageDataset, ensure_file
from robustprune.errors import UserError
from robustprune.files import write_failed

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg"}
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
TINY_IMAGENET_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
TINY_IMAGENET_DIR = "tiny-imagenet-200"
ORDER_SEED = 0


def _image_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _class_folders(split: Path) -> dict[str, list[Path]]:
    """<class> -> its image files, from split/<class>/ or split/<class>/images/ (Tiny ImageNet)."""
    out = {}
    for d in sorted(p for p in split.iterdir() if p.is_dir()):
        out[d.name] = _image_files(d / "images" if (d / "images").is_dir() else d)
    return out


def _tiny_val(val: Path) -> list[tuple[Path, str]]:
    """(image, wnid) pairs listed in val/val_annotations.txt, in the file's order."""
    ann = val / "val_annotations.txt"
    pairs = []
    for n, line in enumerate(ann.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split("\t")
        if len(fields) < 2:
            raise UserError(
                f"line {n} of {ann} has no tab-separated class after the file name; "
                "replace the file with the official one"
            )
        pairs.append((val / "images" / fields[0], fields[1]))
    return pairs


def _decode(path: Path, size: int | None) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if size is not None and im.size != (size, size):
                im = im.resize((size, size), Image.BILINEAR)
            return np.asarray(im, dtype=np.uint8)
    except FileNotFoundError:
        raise UserError(f"image {path} does not exist; restore it or remove its entry") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError, zlib.error) as e:
        raise UserError(f"image {path} cannot be decoded ({e}); replace or delete the file") from None


def _load_split(files: list[Path], labels: list[int], size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    first = _decode(files[0], size)
    out = np.empty((len(files), *first.shape), dtype=np.uint8)
    out[0] = first

    def put(i: int) -> None:
        img = _decode(files[i], size)
        if img.shape != first.shape:
            raise UserError(
                f"image {files[i]} is {img.shape[1]}x{img.shape[0]} but {files[0]} is "
                f"{first.shape[1]}x{first.shape[0]}; pass image_size to resize them all"
            )
        out[i] = img

    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # Pillow decodes without the GIL
        list(pool.map(put, range(1, len(files))))
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(ORDER_SEED))
    x = torch.from_numpy(out).permute(0, 3, 1, 2)[order].contiguous()
    return x, torch.tensor(labels, dtype=torch.long)[order]


def channel_stats(x: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images, scaled to [0, 1], rounded to 4 decimals."""
    c = x.shape[1]
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    for i in range(0, len(x), chunk):
        xb = x[i : i + chunk].double().div_(255)
        s += xb.sum((0, 2, 3))
        s2 += xb.square().sum((0, 2, 3))
    count = max(x.numel() // c, 1)
    mean = s / count
    std = (s2 / count - mean.square()).clamp_min(0).sqrt()
    return tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)


def load_image_folder(root: str | os.PathLike, image_size: int | None = None, name: str | None = None) -> ImageDataset:
    """Read root/train and root/test (or root/val) into uint8 RGB tensors (N, 3, H, W).

    Every image must have the same size unless `image_size` is given; then all are resized to
    image_size x image_size (bilinear)."""
    root = Path(root).expanduser()
    train_dir = root / "train"
    if not train_dir.is_dir():
        raise UserError(
            f"{root} has no train/ folder; an image folder needs train/<class>/ images "
            "and test/<class>/ (or val/<class>/) images"
        )
    train = _class_folders(train_dir)
    classes = sorted(train)
    if not any(train.values()):
        raise UserError(
            f"{train_dir} has no class folder with .png/.jpg/.jpeg images; put each class's images in train/<class>/"
        )
    index = {c: i for i, c in enumerate(classes)}

    if (root / "val" / "val_annotations.txt").is_file():  # Tiny ImageNet
        test_dir = root / "val"
        pairs = _tiny_val(test_dir)
    else:
        test_dir = next(
            (
                root / s
                for s in ("test", "val")
                if (root / s).is_dir() and any(p.is_dir() for p in (root / s).iterdir())
            ),
            None,
        )
        if test_dir is None:
            raise UserError(
                f"{root} has neither test/<class>/ nor val/<class>/ folders; add the test images one folder per class"
            )
        pairs = [(f, c) for c, files in _class_folders(test_dir).items() for f in files]
    unknown = sorted({c for _, c in pairs} - set(index))
    if unknown:
        raise UserError(
            f"{test_dir} has images of class '{unknown[0]}', which has no folder in {train_dir}; "
            "add its training images or remove it"
        )

    if not pairs:
        raise UserError(f"{test_dir} has no test images; put each class's test images in {test_dir}/<class>/")
    x_train, y_train = _load_split(
        [f for c in classes for f in train[c]], [index[c] for c in classes for _ in train[c]], image_size
    )
    x_test, y_test = _load_split([f for f, _ in pairs], [index[c] for _, c in pairs], image_size)
    if x_test.shape[1:] != x_train.shape[1:]:
        raise UserError(
            f"test images in {test_dir} are {x_test.shape[-1]}x{x_test.shape[-2]} but training images are "
            f"{x_train.shape[-1]}x{x_train.shape[-2]}; pass image_size to resize them all"
        )
    mean, std = channel_stats(x_train)
    return ImageDataset(
        name=name or root.name,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=len(classes),
        mean=mean,
        std=std,
    )


def _unzip(archive: Path, dest: Path) -> None:
    """Extract the Tiny ImageNet zip next to itself, refusing absolute or '..' member paths; the
    folder appears whole or not at all."""
    tmp = Path(tempfile.mkdtemp(dir=archive.parent, prefix=".unzip-"))
    try:
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                parts = PurePosixPath(info.filename).parts
                if info.filename.startswith(("/", "\\")) or ".." in parts or ":" in info.filename:
                    raise UserError(
                        f"{archive} has a member named {info.filename!r} outside its folder; "
                        f"delete it and download {TINY_IMAGENET_URL} again"
                    )
            z.extractall(tmp)
        if not (tmp / TINY_IMAGENET_DIR).is_dir():
            raise UserError(
                f"{archive} has no {TINY_IMAGENET_DIR}/ folder; delete it and download {TINY_IMAGENET_URL} again"
            )
        os.replace(tmp / TINY_IMAGENET_DIR, dest)
    except (zipfile.BadZipFile, EOFError, zlib.error) as e:
        raise UserError(
            f"{archive} is not a readable zip archive, it is truncated or corrupt ({e}); "
            f"delete it and download {TINY_IMAGENET_URL} again"
        ) from None
    except OSError as e:  # a full disk or read-only folder while extracting: the partial copy is removed below
        raise write_failed(dest, e, "--data-dir", "nothing was half-written") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@DATASETS.register("tiny_imagenet")
def load_tiny_imagenet(data_dir: Path, download: bool = True) -> ImageDataset:
    """Tiny ImageNet: 100 000 train / 10 000 val colour 64x64 images, 200 classes."""
    root = data_dir / TINY_IMAGENET_DIR
    if not root.is_dir() and (data_dir / "wnids.txt").is_file():  # the data folder is the Tiny ImageNet folder
        root = data_dir
    if not root.is_dir():
        archive = data_dir / f"{TINY_IMAGENET_DIR}.zip"
        if not archive.is_file() and not download:
            raise UserError(
                f"{root} is missing; download {TINY_IMAGENET_URL} and unzip it in {data_dir}, allow "
                f"downloading, or point --data-dir / ${DATA_ENV} at a folder that has it"
            )
        _unzip(ensure_file(data_dir, archive.name, TINY_IMAGENET_MD5, [TINY_IMAGENET_URL], download), root)
    return load_image_folder(root, name="tiny_imagenet")
