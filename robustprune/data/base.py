"""The in-memory dataset every part of robustprune works on: uint8 image tensors, int64 labels."""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import tempfile
import urllib.request
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from robustprune.errors import UserError
from robustprune.files import FULL, check_regular_file, write_failed
from robustprune.registry import Registry

DATA_ENV = "ROBUSTPRUNE_DATA"
OFFLINE_ENV = "ROBUSTPRUNE_OFFLINE"  # 1: never download (run --offline)


@dataclass
class ImageDataset:
    """Whole splits as tensors: images uint8 (N, C, H, W), labels int64 (N,)."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    # Extra named test sets a training regime adds (e.g. patched or adversarial images).
    extra_tests: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    # A validation split held out from the training set (models are selected on it, never on the test set).
    x_val: torch.Tensor | None = None
    y_val: torch.Tensor | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.x_train.shape[1:])  # type: ignore[return-value]

    def subset(self, train: int | None, test: int | None) -> "ImageDataset":
        """The first `train` / `test` examples (deterministic, used by small budgets)."""
        tr = slice(None) if not train else slice(0, train)
        te = slice(None) if not test else slice(0, test)
        return ImageDataset(
            self.name,
            self.x_train[tr],
            self.y_train[tr],
            self.x_test[te],
            self.y_test[te],
            self.num_classes,
            self.mean,
            self.std,
        )

    def hold_out(self, n: int) -> "ImageDataset":
        """The last n training examples become the validation split; training keeps the rest."""
        if not n:
            return self
        if n >= len(self.x_train):
            raise UserError(
                f"data.validation holds out {n} images but the training set has only {len(self.x_train)}; "
                "use a smaller validation split"
            )
        return replace(
            self, x_train=self.x_train[:-n], y_train=self.y_train[:-n], x_val=self.x_train[-n:], y_val=self.y_train[-n:]
        )


DATASETS: Registry = Registry("dataset")


def default_data_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "robustprune" / "data"


def resolve_data_dir(flag: str | os.PathLike | None) -> Path:
    """--data-dir beats $ROBUSTPRUNE_DATA beats the user cache folder."""
    if flag:
        return Path(flag).expanduser()
    if os.environ.get(DATA_ENV):
        return Path(os.environ[DATA_ENV]).expanduser()
    return default_data_dir()


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, download: bool = True) -> ImageDataset:
    loader = DATASETS.get(name)
    folder = resolve_data_dir(data_dir)
    if folder.exists() and not folder.is_dir():
        raise UserError(f"the data folder {folder} is a file; point --data-dir (or ${DATA_ENV}) at a folder")
    offline = os.environ.get(OFFLINE_ENV, "") not in ("", "0")
    return loader(folder, download=download and not offline)


def md5_of(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(urls: list[str], dest: Path, md5: str) -> None:
    """Download `dest` from the first mirror that works, verify its MD5, then move it in place."""
    try:
        dest.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(
            f"cannot create the data folder {dest.parent} ({e.strerror}); "
            f"pass a writable folder with --data-dir or ${DATA_ENV}"
        ) from None
    errors = []
    for url in urls:
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=dest.name, suffix=".part")
        os.close(fd)
        try:
            with urllib.request.urlopen(url, timeout=60) as r, open(tmp, "wb") as out:
                shutil.copyfileobj(r, out)
            got = md5_of(Path(tmp))
            if got != md5:
                errors.append(f"{url}: MD5 {got} != {md5}")
                continue
            os.replace(tmp, dest)
            return
        except (OSError, ValueError, http.client.HTTPException) as e:
            if isinstance(e, OSError) and e.errno in FULL:  # another mirror would not help
                raise write_failed(dest, e, "--data-dir", "nothing was half-written") from None
            errors.append(f"{url}: {e}")
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
    raise UserError(
        f"could not download {dest.name} ({'; '.join(errors)}); put the file in "
        f"{dest.parent} yourself or point --data-dir / ${DATA_ENV} at a folder that has it"
    )


def ensure_file(folder: Path, filename: str, md5: str, urls: list[str], download: bool) -> Path:
    """Return folder/filename with a verified checksum, downloading it when missing."""
    path = folder / filename
    check_regular_file(path, "data file", f"replace it with the official {filename}")
    if not path.exists():
        if not download:
            raise UserError(
                f"{path} is missing and downloading is off; put the file there or point --data-dir "
                f"(or ${DATA_ENV}) at the folder that has it"
            )
        fetch(urls, path, md5)
        return path
    got = md5_of(path)
    if got != md5:
        raise UserError(
            f"{path} is corrupt or not the official file (MD5 {got}, expected {md5}); "
            f"delete it so it is downloaded again, or replace it with the official file"
        )
    return path
