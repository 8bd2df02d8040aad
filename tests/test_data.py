"""MNIST files: IDX parsing, checksums, downloading (file:// URLs), the data-folder precedence."""

from __future__ import annotations

import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from robustprune.data import ImageDataset, load_dataset, resolve_data_dir
from robustprune.data.base import DATA_ENV, ensure_file, fetch, md5_of
from robustprune.data.mnist import FILES, read_idx
from robustprune.errors import UserError

TRAIN_HIST = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_HIST = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


@pytest.fixture(scope="module")
def real(data_dir, mnist_dir) -> dict:
    """The real files, read once for the whole module: the data set and the raw IDX arrays."""
    return {
        "dataset": load_dataset("mnist", data_dir, download=False),
        "train_labels": read_idx(mnist_dir / "train-labels-idx1-ubyte.gz"),
        "test_labels": read_idx(mnist_dir / "t10k-labels-idx1-ubyte.gz"),
        "test_images": read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz"),
    }


@pytest.fixture(scope="module")
def mnist(real) -> ImageDataset:
    return real["dataset"]


def write_idx_gz(path: Path, magic: int, dims: tuple[int, ...], body: bytes) -> Path:
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(f">I{len(dims)}I", magic, *dims) + body)
    return path


# ---- the real files -------------------------------------------------------------------------------


def test_read_idx_real_label_files(real):
    train, test = real["train_labels"], real["test_labels"]
    assert train.shape == (60000,) and test.shape == (10000,) and train.dtype == np.uint8
    assert np.bincount(train, minlength=10).tolist() == TRAIN_HIST
    assert np.bincount(test, minlength=10).tolist() == TEST_HIST
    assert train[:5].tolist() == [5, 0, 4, 1, 9] and test[:5].tolist() == [7, 2, 1, 0, 4]


def test_read_idx_real_image_file(real):
    images = real["test_images"]
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert images.min() == 0 and images.max() == 255
    assert np.array_equal(images, real["dataset"].x_test[:, 0].numpy())
    assert np.array_equal(real["train_labels"], real["dataset"].y_train.numpy())


def test_load_dataset_mnist(mnist):
    assert mnist.name == "mnist" and mnist.num_classes == 10
    assert mnist.x_train.shape == (60000, 1, 28, 28) and mnist.x_train.dtype == torch.uint8
    assert mnist.x_test.shape == (10000, 1, 28, 28) and mnist.x_test.dtype == torch.uint8
    assert mnist.y_train.shape == (60000,) and mnist.y_train.dtype == torch.int64
    assert mnist.y_test.shape == (10000,) and mnist.y_test.dtype == torch.int64
    assert torch.bincount(mnist.y_train, minlength=10).tolist() == TRAIN_HIST
    assert torch.bincount(mnist.y_test, minlength=10).tolist() == TEST_HIST
    assert mnist.image_shape == (1, 28, 28)
    # the standard normalisation constants are those of the real training images
    assert float(mnist.x_train[:10000].float().div(255).mean()) == pytest.approx(0.1307, abs=0.003)
    assert mnist.extra_tests == {}


def test_subset_is_the_first_examples(mnist):
    small = mnist.subset(100, 30)
    assert torch.equal(small.x_train, mnist.x_train[:100]) and torch.equal(small.y_test, mnist.y_test[:30])
    assert small.subset(None, None).x_train.shape[0] == 100


def test_load_dataset_empty_folder_without_download(tmp_path):
    with pytest.raises(UserError) as e:
        load_dataset("mnist", tmp_path, download=False)
    assert "missing" in str(e.value)
    assert str(tmp_path / "mnist" / "train-images-idx3-ubyte.gz") in str(e.value)  # looks in <dir>/mnist


def test_unknown_dataset():
    with pytest.raises(UserError, match="unknown dataset 'svhn'; known: cifar10, cifar100, mnist, tiny_imagenet"):
        load_dataset("svhn", None, download=False)


# ---- data folder precedence -------------------------------------------------------------------------


def test_resolve_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv(DATA_ENV, raising=False)
    assert resolve_data_dir(None) == tmp_path / "cache" / "robustprune" / "data"
    monkeypatch.setenv(DATA_ENV, str(tmp_path / "env"))
    assert resolve_data_dir(None) == tmp_path / "env"
    assert resolve_data_dir(tmp_path / "flag") == tmp_path / "flag"
    assert resolve_data_dir(str(tmp_path / "flag")) == tmp_path / "flag"
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert resolve_data_dir("~/d") == tmp_path / "home" / "d"


def test_default_cache_without_xdg(monkeypatch, tmp_path):
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.delenv(DATA_ENV, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert resolve_data_dir(None) == tmp_path / ".cache" / "robustprune" / "data"
    monkeypatch.setenv(DATA_ENV, "")  # an empty variable counts as unset
    assert resolve_data_dir(None) == tmp_path / ".cache" / "robustprune" / "data"


# ---- checksums and missing files ------------------------------------------------------------------


def test_corrupt_label_file_is_refused(mnist_dir, tmp_path):
    for key in ("train_labels", "test_labels"):
        shutil.copy(mnist_dir / FILES[key][0], tmp_path / FILES[key][0])
    name, md5, _ = FILES["test_labels"]
    assert ensure_file(tmp_path, name, md5, [], download=False) == tmp_path / name  # intact copy passes
    (tmp_path / name).write_bytes(b"\x1f\x8b garbage, not the official file" * 10)
    with pytest.raises(UserError) as e:
        ensure_file(tmp_path, name, md5, [], download=False)
    assert "corrupt" in str(e.value) and "MD5" in str(e.value) and md5 in str(e.value)


def test_corrupt_file_through_load_dataset(tmp_path):
    (tmp_path / FILES["train_images"][0]).write_bytes(b"garbage")
    with pytest.raises(UserError, match="corrupt.*MD5"):
        load_dataset("mnist", tmp_path, download=False)


def test_missing_file_without_download(tmp_path):
    with pytest.raises(UserError, match="missing"):
        ensure_file(tmp_path, "x.gz", "0" * 32, ["file:///nonexistent"], download=False)
    assert not (tmp_path / "x.gz").exists()


# ---- read_idx on hand-made files -----------------------------------------------------------------


def test_read_idx_small_files(tmp_path):
    labels = read_idx(write_idx_gz(tmp_path / "l.gz", 2049, (3,), bytes([3, 1, 4])))
    assert labels.dtype == np.uint8 and labels.tolist() == [3, 1, 4]
    images = read_idx(write_idx_gz(tmp_path / "i.gz", 2051, (2, 3, 4), bytes(range(24))))
    assert images.shape == (2, 3, 4) and images[1, 2, 3] == 23 and images[0, 1, 0] == 4


def test_read_idx_truncated_body(tmp_path):
    path = write_idx_gz(tmp_path / "t.gz", 2049, (100,), bytes(50))
    with pytest.raises(UserError, match="truncated"):
        read_idx(path)


def test_read_idx_too_long_body(tmp_path):
    with pytest.raises(UserError, match="promises 4"):
        read_idx(write_idx_gz(tmp_path / "t.gz", 2049, (4,), bytes(5)))


def test_read_idx_truncated_gzip_stream(tmp_path):
    full = write_idx_gz(tmp_path / "full.gz", 2051, (10, 28, 28), bytes(range(256)) * 30 + bytes(160)).read_bytes()
    cut = tmp_path / "cut.gz"
    cut.write_bytes(full[: len(full) // 2])
    with pytest.raises(UserError, match="not a readable gzip"):
        read_idx(cut)


def test_read_idx_not_gzip(tmp_path):
    (tmp_path / "plain").write_bytes(b"plain bytes, no gzip header here")
    with pytest.raises(UserError, match="not a readable gzip"):
        read_idx(tmp_path / "plain")


def test_read_idx_wrong_magic(tmp_path):
    with pytest.raises(UserError, match="magic number 1234"):
        read_idx(write_idx_gz(tmp_path / "m.gz", 1234, (2,), bytes(2)))


def test_read_idx_too_short(tmp_path):
    with gzip.open(tmp_path / "s.gz", "wb") as f:
        f.write(b"\x00\x00")
    with pytest.raises(UserError, match="too short"):
        read_idx(tmp_path / "s.gz")


def test_read_idx_header_cut_inside_dimensions(tmp_path):
    # BUG: robustprune/data/mnist.py read_idx checks only len(raw) >= 8, but an image file (magic 2051)
    # needs a 16-byte header; with 8..15 bytes struct.unpack raises struct.error instead of UserError.
    with gzip.open(tmp_path / "h.gz", "wb") as f:
        f.write(struct.pack(">II", 2051, 10))  # magic + one of the three dimensions
    with pytest.raises(UserError, match="IDX"):
        read_idx(tmp_path / "h.gz")


# ---- fetch (file:// URLs, no network) ------------------------------------------------------------


def test_fetch_places_a_verified_file(tmp_path):
    src = tmp_path / "src" / "labels.gz"
    src.parent.mkdir()
    src.write_bytes(b"the official bytes")
    dest = tmp_path / "data" / "labels.gz"
    fetch([src.as_uri()], dest, md5_of(src))
    assert dest.read_bytes() == b"the official bytes"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["labels.gz"]  # no .part left


def test_fetch_wrong_md5_leaves_nothing(tmp_path):
    src = tmp_path / "src.gz"
    src.write_bytes(b"tampered bytes")
    dest = tmp_path / "data" / "labels.gz"
    with pytest.raises(UserError) as e:
        fetch([src.as_uri()], dest, "0" * 32)
    assert "MD5" in str(e.value) and "labels.gz" in str(e.value)
    assert list(dest.parent.iterdir()) == []


def test_fetch_falls_back_to_the_next_mirror(tmp_path):
    good = tmp_path / "good.gz"
    good.write_bytes(b"payload")
    dest = tmp_path / "data" / "f.gz"
    fetch([(tmp_path / "missing.gz").as_uri(), good.as_uri()], dest, md5_of(good))
    assert dest.read_bytes() == b"payload"
    assert sorted(p.name for p in dest.parent.iterdir()) == ["f.gz"]


def test_fetch_all_mirrors_fail(tmp_path):
    dest = tmp_path / "data" / "f.gz"
    with pytest.raises(UserError, match="could not download f.gz"):
        fetch([(tmp_path / "missing.gz").as_uri()], dest, "0" * 32)
    assert list(dest.parent.iterdir()) == []


def test_ensure_file_downloads_when_missing(tmp_path):
    src = tmp_path / "src.gz"
    src.write_bytes(b"abc")
    path = ensure_file(tmp_path / "d", "f.gz", md5_of(src), [src.as_uri()], download=True)
    assert path == tmp_path / "d" / "f.gz" and path.read_bytes() == b"abc"
    assert md5_of(path) == "900150983cd24fb0d6963f7d28e17f72"  # md5("abc")
