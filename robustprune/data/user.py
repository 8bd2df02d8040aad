"""A user's own data and code: images and labels given as tensors, a Dataset or a DataLoader, an
.npz file, or a function named by an import path ("my_pkg.data:load"). Everything comes out as
(x, y) tensors: images N x C x H x W, uint8 or float in [0, 1], labels int64."""

from __future__ import annotations

import importlib
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from robustprune.data.base import ImageDataset
from robustprune.errors import UserError
from robustprune.files import check_regular_file

# what the public API accepts as data
Data = Any  # tuple[torch.Tensor, torch.Tensor] | torch.utils.data.Dataset | torch.utils.data.DataLoader


def _tensor(value, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(value))
    if isinstance(value, (int, float)) or (isinstance(value, (list, tuple)) and value):
        return torch.as_tensor(value)
    raise UserError(f"{what} is a {type(value).__name__}, not a tensor; give images and labels as tensors")


def _from_items(items, what: str, limit: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys, n = [], [], 0
    for item in items:
        if not isinstance(item, (tuple, list)) or len(item) < 2:
            raise UserError(f"{what} yields {type(item).__name__} items; each item must be (image, label)")
        x, y = _tensor(item[0], f"an image of {what}"), _tensor(item[1], f"a label of {what}")
        xs.append(x if x.dim() == 4 else x.unsqueeze(0))
        ys.append(y.reshape(-1))
        n += len(xs[-1])
        if limit is not None and n >= limit:
            break
    if not xs:
        raise UserError(f"{what} is empty; give at least one image")
    return torch.cat(xs), torch.cat(ys)


def as_tensors(data: Data, what: str = "data", limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) from a pair of tensors (or arrays), a map-style or iterable Dataset of (image, label),
    or a DataLoader of batches; at most `limit` images. The images are checked (see check_images)."""
    from torch.utils.data import DataLoader, Dataset, IterableDataset

    if isinstance(data, (tuple, list)) and len(data) == 2 and not isinstance(data[0], (tuple, list)):
        x, y = _tensor(data[0], f"the images of {what}"), _tensor(data[1], f"the labels of {what}")
    elif isinstance(data, DataLoader):
        x, y = _from_items(iter(data), what, limit)
    elif isinstance(data, (Dataset, IterableDataset)):
        items = iter(data) if isinstance(data, IterableDataset) else (data[i] for i in range(len(data)))
        x, y = _from_items(items, what, limit)
    else:
        raise UserError(
            f"{what} is a {type(data).__name__}; give (images, labels) tensors, a torch Dataset or a DataLoader"
        )
    if limit is not None:
        x, y = x[:limit], y[:limit]
    return check_images(x, y, what)


def check_images(x: torch.Tensor, y: torch.Tensor, what: str = "data") -> tuple[torch.Tensor, torch.Tensor]:
    """Images N x C x H x W (a batch of N x H x W greyscale gets its channel), uint8 or float in
    [0, 1]; labels N whole numbers from 0. Returns them with labels as int64."""
    if x.dim() == 3:
        x = x.unsqueeze(1)
    if x.dim() != 4:
        raise UserError(f"the images of {what} have shape {tuple(x.shape)}; give N x C x H x W")
    if y.dim() != 1 or len(y) != len(x):
        raise UserError(f"{what} has {len(x)} images but labels of shape {tuple(y.shape)}; give one label per image")
    if len(x) == 0:
        raise UserError(f"{what} is empty; give at least one image")
    if x.dtype != torch.uint8:
        if not x.is_floating_point():
            raise UserError(f"the images of {what} are {x.dtype}; give uint8, or floats in [0, 1]")
        lo, hi = float(x.min()), float(x.max())
        if not (math.isfinite(lo) and math.isfinite(hi)):
            raise UserError(f"the images of {what} hold NaN or infinite values; give floats in [0, 1]")
        if lo < 0 or hi > 1:
            raise UserError(
                f"the images of {what} range over [{lo:.3g}, {hi:.3g}], not [0, 1]; give unnormalised images "
                "(divide by 255; put any normalisation inside the model, where attacks see it)"
            )
    if y.is_floating_point() or y.dtype == torch.bool:
        if y.is_floating_point() and not torch.equal(y, y.round()):
            raise UserError(f"the labels of {what} are not whole numbers; give class indices 0, 1, ...")
    y = y.long()
    if int(y.min()) < 0:
        raise UserError(f"the labels of {what} include {int(y.min())}; give class indices 0, 1, ...")
    return x, y


def import_object(spec: str, what: str) -> Any:
    """The object an import path "package.module:attribute" names; the working folder is importable."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UserError(f"{what} '{spec}' is not an import path; write it as package.module:name")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # a study's own module beside it, as `python -m` would find it
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        raise UserError(
            f"{what} '{spec}': no module named '{e.name}'; install it or run from the folder that holds it"
        ) from None
    except Exception as e:  # the user's module failed while importing: say where, not a traceback
        raise UserError(f"{what} '{spec}': importing {module_name} failed ({type(e).__name__}: {e})") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise UserError(f"{what} '{spec}': {module_name} has no '{attr}'; check the name after the colon")
        obj = getattr(obj, part)
    return obj


NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")


def load_npz(path: str | Path) -> dict[str, torch.Tensor]:
    """Train and test splits from an .npz file holding x_train, y_train, x_test and y_test."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"the data file {path} does not exist; give the path of an .npz file")
    check_regular_file(path, "the data file", "give the path of an .npz file")
    try:
        with np.load(path, allow_pickle=False) as f:
            missing = [k for k in NPZ_KEYS if k not in f.files]
            if missing:
                raise UserError(
                    f"the data file {path} lacks {', '.join(missing)}; save it with "
                    "np.savez(path, x_train=..., y_train=..., x_test=..., y_test=...)"
                )
            arrays = {k: torch.from_numpy(np.ascontiguousarray(f[k])) for k in NPZ_KEYS}
    except UserError:
        raise
    except Exception as e:  # not a zip, a pickled object array, a damaged member
        why = f"{type(e).__name__}: {e}"
        raise UserError(f"the data file {path} cannot be read as .npz ({why}); save it again") from None
    for split in ("train", "test"):
        x, y = check_images(arrays[f"x_{split}"], arrays[f"y_{split}"], f"{path} ({split})")
        arrays[f"x_{split}"], arrays[f"y_{split}"] = x, y
    return arrays


def _dataset_from(obj, spec: str) -> ImageDataset:
    """What a user's data function returned -> ImageDataset: a dict with x_train, y_train, x_test,
    y_test (tensors or arrays), or a pair (train, test) of datasets / loaders / (x, y) pairs."""
    if isinstance(obj, ImageDataset):
        return obj
    if isinstance(obj, dict) and all(k in obj for k in NPZ_KEYS):
        train = check_images(_tensor(obj["x_train"], "x_train"), _tensor(obj["y_train"], "y_train"), f"{spec} (train)")
        test = check_images(_tensor(obj["x_test"], "x_test"), _tensor(obj["y_test"], "y_test"), f"{spec} (test)")
    elif isinstance(obj, (tuple, list)) and len(obj) == 2:
        train, test = as_tensors(obj[0], f"{spec} (train)"), as_tensors(obj[1], f"{spec} (test)")
    else:
        raise UserError(
            f"data '{spec}' returned a {type(obj).__name__}; return (train, test) (each (x, y) tensors, a Dataset "
            "or a DataLoader) or a dict with x_train, y_train, x_test and y_test"
        )
    return to_image_dataset(spec, *train, *test)


def to_image_dataset(name: str, x_train, y_train, x_test, y_test) -> ImageDataset:
    """Splits as the studies keep them: uint8 images (floats in [0, 1] are rounded to 1/255)."""
    from robustprune.data.imagefolder import channel_stats

    def u8(x: torch.Tensor) -> torch.Tensor:
        return x if x.dtype == torch.uint8 else (x.float() * 255).round_().to(torch.uint8)

    if x_test.shape[1:] != x_train.shape[1:]:
        raise UserError(
            f"data '{name}': test images are {tuple(x_test.shape[1:])} but training images are "
            f"{tuple(x_train.shape[1:])}; give both splits the same image size"
        )
    x_train, x_test = u8(x_train), u8(x_test)
    mean, std = channel_stats(x_train)
    classes = int(max(int(y_train.max()), int(y_test.max()))) + 1
    return ImageDataset(name, x_train, y_train, x_test, y_test, classes, mean, std)


def source_loader(kind: str, value: str, image_size: int | None = None, kwargs: dict | None = None):
    """A loader (data_dir, download) -> ImageDataset for a study's own data: an image folder, an
    .npz file or an import path. The data folder setting does not apply to these paths."""

    def load(data_dir=None, download: bool = False) -> ImageDataset:
        if kind == "folder":
            from robustprune.data.imagefolder import load_image_folder

            return load_image_folder(value, image_size=image_size, name=f"folder:{value}")
        if kind == "npz":
            a = load_npz(value)
            return to_image_dataset(f"npz:{value}", a["x_train"], a["y_train"], a["x_test"], a["y_test"])
        fn = import_object(value, "data.import")
        if not callable(fn):
            raise UserError(f"data.import '{value}' is a {type(fn).__name__}, not a function; name a function")
        try:
            import inspect

            args = dict(kwargs or {})
            try:  # the data folder setting (--data-dir, $ROBUSTPRUNE_DATA) goes to a function that asks for it
                if "data_dir" in inspect.signature(fn).parameters and "data_dir" not in args:
                    args["data_dir"] = data_dir
            except (TypeError, ValueError):  # a builtin without a signature
                pass
            obj = fn(**args)
        except UserError:
            raise
        except Exception as e:  # the user's loader failed: one sentence that says whose code
            raise UserError(f"data.import '{value}' raised {type(e).__name__}: {e}") from None
        return _dataset_from(obj, value)

    return load


def register_source(kind: str, value: str, image_size: int | None = None, kwargs: dict | None = None) -> str:
    """Put a study's own data in the dataset registry (once) and return its registered name."""
    from robustprune.data.base import DATASETS

    name = f"{kind}:{value}" + (f"@{image_size}" if image_size else "")
    name += f"{sorted(kwargs.items())}" if kwargs else ""
    if name not in DATASETS:
        loader = source_loader(kind, value, image_size, kwargs)
        DATASETS.register(name, f"the study's own data ({kind} {value})")(loader)
    return name
