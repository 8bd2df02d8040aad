"""CIFAR-10 and CIFAR-100 (Krizhevsky 2009) from the official python archives or a compact .npz.

A data folder may hold, in `<dir>/cifar10` or `<dir>` itself, either `cifar10.npz` (uint8
x_train (50000, 32, 32, 3) HWC RGB, y_train (50000,), x_test (10000, 32, 32, 3), y_test (10000,))
or the official `cifar-10-python.tar.gz`; the .npz is preferred, the archive is downloaded when
neither is there. Both give the same tensors: images uint8 (N, 3, 32, 32), labels int64.
CIFAR-100 works the same way (`<dir>/cifar100`, `cifar100.npz` or `cifar-100-python.tar.gz`,
the 100 fine labels).

The archive's batches are pickles. They are read with an unpickler that can build nothing but
numpy arrays, so a tampered archive cannot run code; the archive is also MD5-checked. The .npz is
read with allow_pickle=False; it has no official checksum, so its keys, shapes, dtypes and label
range are checked instead."""

from __future__ import annotations

import io
import pickle
import tarfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from robustprune.data.base import DATA_ENV, DATASETS, ImageDataset, ensure_file
from robustprune.errors import UserError
from robustprune.files import check_regular_file

try:  # numpy >= 2 keeps it in numpy._core; the official batches name numpy.core (numpy 1.x)
    from numpy._core.multiarray import _reconstruct
except ImportError:  # pragma: no cover - numpy 1.x
    from numpy.core.multiarray import _reconstruct


@dataclass(frozen=True)
class CifarSpec:
    """Where one CIFAR variant lives and what its files must contain."""

    name: str
    archive: str  # the official download
    url: str
    md5: str
    npz: str  # the compact alternative (no official checksum)
    members: dict[str, tuple[str, ...]]  # split -> archive members, concatenated in this order
    label_key: str
    num_classes: int
    counts: dict[str, int]  # split -> number of images
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CIFAR10 = CifarSpec(
    name="cifar10",
    archive="cifar-10-python.tar.gz",
    url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
    md5="c58f30108f718f92721af3b95e74349a",
    npz="cifar10.npz",
    members={
        "train": tuple(f"cifar-10-batches-py/data_batch_{i}" for i in range(1, 6)),
        "test": ("cifar-10-batches-py/test_batch",),
    },
    label_key="labels",
    num_classes=10,
    counts={"train": 50000, "test": 10000},
    mean=(0.4914, 0.4822, 0.4465),
    std=(0.2470, 0.2435, 0.2616),
)
CIFAR100 = CifarSpec(
    name="cifar100",
    archive="cifar-100-python.tar.gz",
    url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
    md5="eb9058c3a382ffc7106e4002c42a8d85",
    npz="cifar100.npz",
    members={"train": ("cifar-100-python/train",), "test": ("cifar-100-python/test",)},
    label_key="fine_labels",
    num_classes=100,
    counts={"train": 50000, "test": 10000},
    mean=(0.5071, 0.4865, 0.4409),
    std=(0.2673, 0.2564, 0.2762),
)
PIXELS = 3 * 32 * 32
MAX_MEMBER_BYTES = 400 << 20  # an official batch is ~31 MB (CIFAR-100 train: ~155 MB)

# The only globals an official batch refers to: numpy's array reconstructor, ndarray and dtype.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class ForbiddenGlobal(pickle.UnpicklingError):
    """A pickle asked for a global that a CIFAR batch never contains."""


class BatchUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays; refuses every other global, so
    loading a pickle can neither import modules nor call functions."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise ForbiddenGlobal(f"{module}.{name}") from None

    def persistent_load(self, pid):
        raise ForbiddenGlobal(f"persistent id {pid!r}")


def _fix(spec: CifarSpec, path: Path) -> str:
    return f"delete it and put the official {spec.archive} ({spec.url}) in {path.parent}, or a valid {spec.npz} there"


def unpickle_batch(raw: bytes, where: str) -> dict:
    """One pickled batch -> dict with str keys; `where` names it in error messages."""
    try:
        obj = BatchUnpickler(io.BytesIO(raw), encoding="bytes").load()
    except ForbiddenGlobal as e:
        raise UserError(
            f"{where} asks to load '{e}', which no CIFAR batch contains, so it was refused "
            "(the file is not the official one and may be malicious)"
        ) from None
    except Exception as e:  # noqa: BLE001 - any failure to parse untrusted bytes means a corrupt file
        raise UserError(f"{where} is not a readable pickled batch ({type(e).__name__}: {e})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where} holds a {type(obj).__name__}, not the dict of a CIFAR batch")
    return {k.decode("latin1") if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _batch_arrays(batch: dict, spec: CifarSpec, where: str, fix: str) -> tuple[np.ndarray, np.ndarray]:
    data, labels = batch.get("data"), batch.get(spec.label_key)
    if data is None or labels is None:
        raise UserError(f"{where} has no '{'data' if data is None else spec.label_key}' entry; {fix}")
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != PIXELS:
        shape = getattr(data, "shape", None)
        raise UserError(
            f"{where} holds 'data' of type {type(data).__name__} {getattr(data, 'dtype', '')} "
            f"shape {shape}, not uint8 (N, {PIXELS}); {fix}"
        )
    labels = np.asarray(labels)
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise UserError(
            f"{where} holds {labels.dtype} '{spec.label_key}' of shape {labels.shape}, not {len(data)} integers; {fix}"
        )
    return data, labels


def _check_labels(labels: np.ndarray, spec: CifarSpec, where: str, fix: str) -> torch.Tensor:
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise UserError(
            f"{where} has labels from {labels.min()} to {labels.max()}, outside 0..{spec.num_classes - 1}; {fix}"
        )
    return torch.from_numpy(labels.astype(np.int64))


def read_cifar_tar(path: Path, spec: CifarSpec) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The official archive -> split -> (images uint8 (N, 3, 32, 32), labels int64). Members are
    read from the compressed stream in one pass, never extracted to disk."""
    fix = _fix(spec, path)
    wanted = {m for ms in spec.members.values() for m in ms}
    found: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    try:
        with tarfile.open(path, "r:gz") as tf:
            for member in tf:
                if member.name not in wanted or member.name in found:
                    continue
                where = f"member {member.name} of {path}"
                if not member.isfile() or member.size > MAX_MEMBER_BYTES:
                    raise UserError(f"{where} is not a regular file of at most {MAX_MEMBER_BYTES >> 20} MB; {fix}")
                raw = tf.extractfile(member).read()
                found[member.name] = _batch_arrays(unpickle_batch(raw, where), spec, where, fix)
                if len(found) == len(wanted):
                    break
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise UserError(f"{path} is not a readable tar.gz archive, it is truncated or corrupt ({e}); {fix}") from None
    missing = sorted(wanted - set(found))
    if missing:
        raise UserError(f"{path} has no member {missing[0]}; {fix}")
    out = {}
    for split, members in spec.members.items():
        x = np.concatenate([found[m][0] for m in members])
        y = np.concatenate([found[m][1] for m in members])
        if len(x) != spec.counts[split]:
            raise UserError(f"{path} holds {len(x)} {split} images, expected {spec.counts[split]}; {fix}")
        out[split] = (
            torch.from_numpy(x.reshape(-1, 3, 32, 32)),
            _check_labels(y, spec, f"the {split} set of {path}", fix),
        )
    return out


def read_cifar_npz(path: Path, spec: CifarSpec) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The compact .npz (HWC images) -> split -> (images uint8 (N, 3, 32, 32), labels int64)."""
    fix = (
        f"replace {path} with a valid one (uint8 x_train, y_train, x_test, y_test), or delete it and "
        f"put the official {spec.archive} ({spec.url}) in {path.parent}"
    )
    keys = [f"{a}_{split}" for split in spec.counts for a in ("x", "y")]
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise UserError(f"{path} is a single .npy array, not an .npz archive; {fix}")
        with npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise UserError(f"{path} has no array '{missing[0]}' (it has {', '.join(npz.files) or 'none'}); {fix}")
            arrays = {k: npz[k] for k in keys}
    except (OSError, ValueError, EOFError, zlib.error, zipfile.BadZipFile, KeyError) as e:
        raise UserError(f"{path} is not a readable .npz archive, it is truncated or corrupt ({e}); {fix}") from None
    out = {}
    for split, n in spec.counts.items():
        x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
        if x.dtype != np.uint8 or x.shape != (n, 32, 32, 3):
            raise UserError(
                f"{path} holds x_{split} as {x.dtype} of shape {x.shape}, not uint8 of shape ({n}, 32, 32, 3); {fix}"
            )
        if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
            raise UserError(f"{path} holds y_{split} as {y.dtype} of shape {y.shape}, not {n} integer labels; {fix}")
        out[split] = (
            torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(),
            _check_labels(y, spec, f"y_{split} in {path}", fix),
        )
    return out


def find_cifar_file(data_dir: Path, spec: CifarSpec) -> Path | None:
    """The .npz, else the archive, in <data_dir>/<name> or <data_dir> itself; None when neither is there."""
    folders = (data_dir / spec.name, data_dir)
    for filename in (spec.npz, spec.archive):
        for folder in folders:
            if (folder / filename).exists():  # a FIFO or folder of that name is refused, not skipped
                check_regular_file(folder / filename, "data file", f"replace it with a valid {filename}")
                return folder / filename
    return None


def load_cifar(data_dir: Path, download: bool, spec: CifarSpec) -> ImageDataset:
    path = find_cifar_file(data_dir, spec)
    if path is None:
        folder = data_dir / spec.name
        if not download:
            raise UserError(
                f"neither {spec.npz} nor {spec.archive} is in {folder} or {data_dir}; download "
                f"{spec.url} into {folder}, allow downloading, or point --data-dir / ${DATA_ENV} at a folder "
                f"that has it"
            )
        path = ensure_file(folder, spec.archive, spec.md5, [spec.url], download=True)  # downloads, MD5-checks
    elif path.name == spec.archive:
        ensure_file(path.parent, spec.archive, spec.md5, [spec.url], download)  # MD5-checks
    splits = read_cifar_tar(path, spec) if path.name == spec.archive else read_cifar_npz(path, spec)
    (x_train, y_train), (x_test, y_test) = splits["train"], splits["test"]
    return ImageDataset(
        name=spec.name,
        x_train=x_train,
        y_train=y_train,
        x_test=x_test,
        y_test=y_test,
        num_classes=spec.num_classes,
        mean=spec.mean,
        std=spec.std,
    )


@DATASETS.register("cifar10")
def load_cifar10(data_dir: Path, download: bool = True) -> ImageDataset:
    """CIFAR-10: 50 000 train / 10 000 test colour 32x32 images, 10 classes."""
    return load_cifar(data_dir, download, CIFAR10)


@DATASETS.register("cifar100")
def load_cifar100(data_dir: Path, download: bool = True) -> ImageDataset:
    """CIFAR-100: 50 000 train / 10 000 test colour 32x32 images, 100 fine classes."""
    return load_cifar(data_dir, download, CIFAR100)
