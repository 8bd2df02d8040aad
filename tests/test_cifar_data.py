"""CIFAR-10/100 (the real .npz; synthetic archives in the official pickle format) and image folders."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import tarfile
import zipfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from robustprune.data import load_dataset
from robustprune.data.base import md5_of
from robustprune.data.cifar import (
    CIFAR10,
    CIFAR100,
    BatchUnpickler,
    ForbiddenGlobal,
    find_cifar_file,
    load_cifar,
    read_cifar_npz,
    read_cifar_tar,
    unpickle_batch,
)
from robustprune.data.imagefolder import channel_stats, load_image_folder
from robustprune.errors import UserError

# the first labels of the canonical order (data_batch_1 and test_batch of the official archive)
FIRST_TRAIN_LABELS = [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
FIRST_TEST_LABELS = [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]


# ---- the real CIFAR-10 .npz ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_npz(data_dir) -> Path:
    path = data_dir / "cifar10" / "cifar10.npz"
    if not path.is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{path} not found")
        pytest.skip(f"{path} not found; set ROBUSTPRUNE_DATA")
    return path


@pytest.fixture(scope="module")
def cifar10(real_npz, data_dir):
    return load_dataset("cifar10", data_dir, download=False)


def test_real_cifar10_shapes_and_labels(cifar10):
    assert cifar10.name == "cifar10" and cifar10.num_classes == 10
    assert cifar10.x_train.shape == (50000, 3, 32, 32) and cifar10.x_train.dtype == torch.uint8
    assert cifar10.x_test.shape == (10000, 3, 32, 32) and cifar10.x_test.dtype == torch.uint8
    assert cifar10.x_train.is_contiguous() and cifar10.x_test.is_contiguous()
    assert cifar10.y_train.dtype == torch.int64 and cifar10.y_test.dtype == torch.int64
    assert torch.bincount(cifar10.y_train, minlength=10).tolist() == [5000] * 10
    assert torch.bincount(cifar10.y_test, minlength=10).tolist() == [1000] * 10
    assert cifar10.y_train[:10].tolist() == FIRST_TRAIN_LABELS
    assert cifar10.y_test[:10].tolist() == FIRST_TEST_LABELS
    assert cifar10.image_shape == (3, 32, 32)


def test_real_cifar10_is_the_npz_in_nchw(cifar10, real_npz):
    with np.load(real_npz) as z:
        x0, xt = z["x_train"][[0, 123, 49999]], z["x_test"][[0, 9999]]
    assert np.array_equal(cifar10.x_train[[0, 123, 49999]].numpy(), x0.transpose(0, 3, 1, 2))
    assert np.array_equal(cifar10.x_test[[0, 9999]].numpy(), xt.transpose(0, 3, 1, 2))


def test_real_cifar10_normalisation_constants(cifar10):
    mean, std = channel_stats(cifar10.x_train)
    assert mean == pytest.approx(CIFAR10.mean, abs=1e-4) and cifar10.mean == CIFAR10.mean
    assert std == pytest.approx(CIFAR10.std, abs=1e-4) and cifar10.std == CIFAR10.std


# ---- synthetic files in the official formats ---------------------------------------------------------


class Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 `str` (BINSTRING opcodes), as the official batches were made
    with Python 2's cPickle, so loading them with encoding='bytes' gives bytes keys."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        data = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(data) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
        self.memoize(obj)

    dispatch[str] = save_py2_str
    dispatch[bytes] = save_py2_str


def py2_pickle(obj) -> bytes:
    f = io.BytesIO()
    Py2Pickler(f, protocol=2).dump(obj)
    # the official batches name numpy 1.x's module
    return f.getvalue().replace(b"cnumpy._core.multiarray\n", b"cnumpy.core.multiarray\n")


def batch(x: torch.Tensor, labels, label_key="labels", **extra) -> bytes:
    """One official-format batch: 'data' uint8 (N, 3072) in CHW order, labels a list of ints."""
    d = {
        b"batch_label": b"synthetic batch",
        b"data": x.reshape(len(x), -1).numpy(),
        label_key.encode(): [int(v) for v in labels],
        b"filenames": [b"img_%d.png" % i for i in range(len(x))],
    }
    d.update({k.encode(): v for k, v in extra.items()})
    return py2_pickle(d)


def write_tar(path: Path, members: dict[str, bytes], extra_first: bool = True) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tf:
        if extra_first:
            info = tarfile.TarInfo("cifar-10-batches-py/readme.html")
            info.size = 5
            tf.addfile(info, io.BytesIO(b"hello"))
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return path


def images(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def labels(n: int, classes: int, seed: int) -> torch.Tensor:
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def small10():
    """5 train batches of 4 images and a test batch of 6, with the spec that expects them."""
    x_train, y_train = images(20, 1), labels(20, 10, 2)
    x_test, y_test = images(6, 3), labels(6, 10, 4)
    members = {
        f"cifar-10-batches-py/data_batch_{i + 1}": batch(x_train[4 * i : 4 * i + 4], y_train[4 * i : 4 * i + 4])
        for i in range(5)
    }
    members["cifar-10-batches-py/test_batch"] = batch(x_test, y_test)
    spec = replace(CIFAR10, counts={"train": 20, "test": 6})
    return spec, members, (x_train, y_train, x_test, y_test)


def write_npz(path: Path, x_train, y_train, x_test, y_test, **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arrays = {
        "x_train": x_train.permute(0, 2, 3, 1).numpy(),
        "y_train": y_train.numpy().astype(np.uint8),
        "x_test": x_test.permute(0, 2, 3, 1).numpy(),
        "y_test": y_test.numpy().astype(np.uint8),
    }
    arrays.update(kw)
    np.savez_compressed(path, **arrays)
    return path


def test_tar_and_npz_give_identical_tensors(tmp_path, small10):
    spec, members, (x_train, y_train, x_test, y_test) = small10
    tar = write_tar(tmp_path / "a" / "cifar10" / CIFAR10.archive, members)
    write_npz(tmp_path / "b" / CIFAR10.npz, x_train, y_train, x_test, y_test)  # in the data folder itself
    spec = replace(spec, md5=md5_of(tar))
    from_tar = load_cifar(tmp_path / "a", download=False, spec=spec)
    from_npz = load_cifar(tmp_path / "b", download=False, spec=spec)
    for a, b, want in [
        (from_tar.x_train, from_npz.x_train, x_train),
        (from_tar.y_train, from_npz.y_train, y_train),
        (from_tar.x_test, from_npz.x_test, x_test),
        (from_tar.y_test, from_npz.y_test, y_test),
    ]:
        assert a.dtype == b.dtype == want.dtype and a.shape == b.shape == want.shape
        assert a.is_contiguous() and b.is_contiguous()
        assert torch.equal(a, b) and torch.equal(a, want)
    assert from_tar.mean == from_npz.mean == CIFAR10.mean and from_tar.num_classes == 10


def test_official_batch_layout_is_rgb_planes(tmp_path, small10):
    """'data' rows are 1024 red, then 1024 green, then 1024 blue values, each plane row-major."""
    spec, members, (x_train, *_) = small10
    out = read_cifar_tar(write_tar(tmp_path / "c.tar.gz", members), spec)
    row = x_train[0].reshape(-1)
    assert out["train"][0][0, 1, 0, 0] == row[1024] and out["train"][0][0, 2, 31, 31] == row[3071]
    assert out["train"][0][0, 0, 1, 0] == row[32]


def test_npz_is_preferred_to_the_archive(tmp_path, small10):
    spec, members, (x_train, y_train, x_test, y_test) = small10
    write_tar(tmp_path / CIFAR10.archive, members)
    write_npz(tmp_path / "cifar10" / CIFAR10.npz, x_train, (y_train + 1) % 10, x_test, y_test)
    assert find_cifar_file(tmp_path, spec) == tmp_path / "cifar10" / CIFAR10.npz
    assert torch.equal(load_cifar(tmp_path, False, spec).y_train, (y_train + 1) % 10)
    (tmp_path / "cifar10" / CIFAR10.npz).unlink()
    assert find_cifar_file(tmp_path, spec) == tmp_path / CIFAR10.archive
    assert find_cifar_file(tmp_path / "cifar10", spec) is None


def test_archive_md5_is_checked(tmp_path, small10):
    _, members, _ = small10
    write_tar(tmp_path / "cifar10" / CIFAR10.archive, members)
    with pytest.raises(
        UserError, match=r"corrupt or not the official file \(MD5 .*expected c58f30108f718f92721af3b95e74349a"
    ):
        load_dataset("cifar10", tmp_path, download=False)


def test_nothing_there_without_download(tmp_path):
    with pytest.raises(UserError) as e:
        load_dataset("cifar10", tmp_path, download=False)
    msg = str(e.value)
    assert "cifar10.npz" in msg and "cifar-10-python.tar.gz" in msg and CIFAR10.url in msg
    assert str(tmp_path / "cifar10") in msg and "\n" not in msg
    with pytest.raises(UserError, match="cifar-100-python.tar.gz"):
        load_dataset("cifar100", tmp_path, download=False)


def test_download_places_and_reads_the_archive(tmp_path, small10):
    spec, members, (x_train, *_) = small10
    src = write_tar(tmp_path / "mirror" / CIFAR10.archive, members)
    spec = replace(spec, url=src.as_uri(), md5=md5_of(src))
    ds = load_cifar(tmp_path / "data", download=True, spec=spec)
    assert (tmp_path / "data" / "cifar10" / CIFAR10.archive).read_bytes() == src.read_bytes()
    assert torch.equal(ds.x_train, x_train)


def test_cifar100_from_official_archive(tmp_path):
    x_train, y_train = images(12, 5), labels(12, 100, 6)
    x_test, y_test = images(5, 7), labels(5, 100, 8)
    y_train[0] = 99
    members = {
        "cifar-100-python/train": batch(x_train, y_train, "fine_labels", coarse_labels=[int(v) // 5 for v in y_train]),
        "cifar-100-python/test": batch(x_test, y_test, "fine_labels", coarse_labels=[int(v) // 5 for v in y_test]),
    }
    tar = write_tar(tmp_path / "cifar100" / CIFAR100.archive, members, extra_first=False)
    spec = replace(CIFAR100, md5=md5_of(tar), counts={"train": 12, "test": 5})
    ds = load_cifar(tmp_path, download=False, spec=spec)
    assert ds.name == "cifar100" and ds.num_classes == 100
    assert ds.mean == (0.5071, 0.4865, 0.4409) and ds.std == (0.2673, 0.2564, 0.2762)
    assert torch.equal(ds.x_train, x_train) and torch.equal(ds.y_train, y_train) and ds.y_train.dtype == torch.int64
    assert torch.equal(ds.x_test, x_test) and torch.equal(ds.y_test, y_test)
    # coarse labels are not what CIFAR-100 is classified on
    no_fine = {
        "cifar-100-python/train": batch(x_train, y_train, "coarse_labels"),
        "cifar-100-python/test": members["cifar-100-python/test"],
    }
    with pytest.raises(UserError, match="has no 'fine_labels' entry"):
        read_cifar_tar(write_tar(tmp_path / "nofine.tar.gz", no_fine), spec)


# ---- broken archives and .npz files -----------------------------------------------------------------


def test_truncated_archive(tmp_path, small10):
    spec, members, _ = small10
    full = write_tar(tmp_path / "full.tar.gz", members).read_bytes()
    # (a cut in the archive's trailing padding leaves every batch whole; the MD5 check refuses that file)
    for cut in (len(full) // 2, len(full) * 3 // 4, 100):
        path = tmp_path / "cifar10" / CIFAR10.archive
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(full[:cut])
        with pytest.raises(UserError, match="is not a readable tar.gz archive, it is truncated or corrupt") as e:
            load_cifar(tmp_path, False, replace(spec, md5=md5_of(path)))
        assert str(path) in str(e.value) and CIFAR10.url in str(e.value)


def test_garbage_archive(tmp_path, small10):
    spec, _, _ = small10
    path = tmp_path / "g.tar.gz"
    path.write_bytes(b"not a tar file at all" * 100)
    with pytest.raises(UserError, match="not a readable tar.gz"):
        read_cifar_tar(path, spec)
    path.write_bytes(gzip.compress(b"gzip, but no tar inside" * 100))
    with pytest.raises(UserError, match="not a readable tar.gz"):
        read_cifar_tar(path, spec)


def test_archive_missing_member(tmp_path, small10):
    spec, members, _ = small10
    del members["cifar-10-batches-py/data_batch_3"]
    with pytest.raises(UserError, match="has no member cifar-10-batches-py/data_batch_3"):
        read_cifar_tar(write_tar(tmp_path / "m.tar.gz", members), spec)


@pytest.mark.parametrize(
    "bad, message",
    [
        ({b"data": np.zeros((4, 3000), np.uint8), b"labels": [0] * 4}, r"not uint8 \(N, 3072\)"),
        ({b"data": np.zeros((4, 3072), np.float32), b"labels": [0] * 4}, r"float32 shape \(4, 3072\), not uint8"),
        ({b"data": [[0] * 3072] * 4, b"labels": [0] * 4}, "type list"),
        ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0] * 3}, "not 4 integers"),
        ({b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 10]}, r"labels from 0 to 10, outside 0..9"),
        ({b"labels": [0] * 4}, "has no 'data' entry"),
        ([1, 2, 3], "holds a list, not the dict"),
    ],
)
def test_archive_with_a_wrong_batch(tmp_path, small10, bad, message):
    spec, members, _ = small10
    members["cifar-10-batches-py/data_batch_2"] = py2_pickle(bad)
    with pytest.raises(UserError, match=message):
        read_cifar_tar(write_tar(tmp_path / "w.tar.gz", members), spec)


def test_archive_with_wrong_image_count(tmp_path, small10):
    spec, members, _ = small10
    with pytest.raises(UserError, match="holds 20 train images, expected 50000"):
        read_cifar_tar(write_tar(tmp_path / "n.tar.gz", members), replace(spec, counts={"train": 50000, "test": 6}))


def test_archive_member_that_is_not_a_pickle(tmp_path, small10):
    spec, members, _ = small10
    members["cifar-10-batches-py/test_batch"] = members["cifar-10-batches-py/test_batch"][:500]
    with pytest.raises(UserError, match="member cifar-10-batches-py/test_batch of .* is not a readable pickled batch"):
        read_cifar_tar(write_tar(tmp_path / "p.tar.gz", members), spec)


class CreatesAFile:
    """Unpickling this runs open(path, 'w'): what a malicious archive would do."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_malicious_pickle_is_refused_without_running(tmp_path, small10):
    spec, members, _ = small10
    marker = tmp_path / "pwned"
    payload = pickle.dumps({b"data": CreatesAFile(marker), b"labels": [0] * 4}, protocol=4)
    # the payload is live: an ordinary unpickler creates the file
    live = tmp_path / "live"
    pickle.loads(pickle.dumps(CreatesAFile(live), protocol=4)).close()
    assert live.exists()
    members["cifar-10-batches-py/data_batch_1"] = payload
    tar = write_tar(tmp_path / "cifar10" / CIFAR10.archive, members)
    with pytest.raises(UserError, match=r"asks to load '(io|builtins).open'.*refused.*may be malicious"):
        load_cifar(tmp_path, False, replace(spec, md5=md5_of(tar)))
    assert not marker.exists()


@pytest.mark.parametrize(
    "module, name",
    [
        ("os", "system"),
        ("builtins", "eval"),
        ("numpy", "load"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy", "frombuffer"),
        ("subprocess", "Popen"),
        ("builtins", "getattr"),
    ],
)
def test_unpickler_allows_only_numpy_arrays(module, name):
    with pytest.raises(ForbiddenGlobal):
        BatchUnpickler(io.BytesIO(b"")).find_class(module, name)
    data = b"\x80\x02c" + module.encode() + b"\n" + name.encode() + b"\n."
    with pytest.raises(UserError, match=f"'{module}.{name}'"):
        unpickle_batch(data, "test pickle")


def test_unpickler_reads_numpy_arrays_and_python_values():
    arr = np.arange(3072 * 2, dtype=np.int64).astype(np.uint8).reshape(2, 3072)
    out = unpickle_batch(py2_pickle({b"data": arr, b"labels": [1, 2], b"name": b"x", "n": 3.5}), "t")
    assert out["labels"] == [1, 2] and out["name"] == b"x" and out["n"] == 3.5
    assert out["data"].dtype == np.uint8 and np.array_equal(out["data"], arr)
    # numpy 2's module name for the reconstructor works too
    out = unpickle_batch(
        py2_pickle({"data": arr}).replace(b"cnumpy.core.multiarray\n", b"cnumpy._core.multiarray\n"), "t"
    )
    assert np.array_equal(out["data"], arr)
    # Python 3 protocol-2 pickles of bytes need _codecs.encode, which is refused
    with pytest.raises(UserError, match="_codecs.encode"):
        unpickle_batch(pickle.dumps({b"data": arr}, protocol=2), "t")


def test_truncated_and_garbage_npz(tmp_path, small10):
    spec, _, (x_train, y_train, x_test, y_test) = small10
    full = write_npz(tmp_path / "full.npz", x_train, y_train, x_test, y_test).read_bytes()
    path = tmp_path / "cifar10.npz"
    for data in (full[: len(full) // 2], full[:-40], b"garbage" * 50, b""):
        path.write_bytes(data)
        with pytest.raises(UserError, match="is not a readable .npz archive, it is truncated or corrupt") as e:
            load_cifar(tmp_path, False, spec)
        assert str(path) in str(e.value)


def test_npz_problems(tmp_path, small10):
    spec, _, (x_train, y_train, x_test, y_test) = small10
    path = tmp_path / "cifar10.npz"
    cases = [
        (dict(x_test=None), "has no array 'x_test'"),
        (
            dict(x_test=x_test.permute(0, 2, 3, 1).numpy().astype(np.float32)),
            r"x_test as float32 of shape \(6, 32, 32, 3\), not uint8",
        ),
        (
            dict(x_train=x_train.numpy()),
            r"x_train as uint8 of shape \(20, 3, 32, 32\), not uint8 of shape \(20, 32, 32, 3\)",
        ),
        (dict(y_test=np.full(6, 10, np.uint8)), "labels from 10 to 10, outside 0..9"),
        (dict(y_train=np.zeros(20, np.float32)), "not 20 integer labels"),
        (dict(y_train=np.zeros(19, np.uint8)), "not 20 integer labels"),
        (dict(y_train=np.array([object()] * 20)), "truncated or corrupt.*allow_pickle"),
    ]
    for arrays, message in cases:
        full = {
            "x_train": x_train.permute(0, 2, 3, 1).numpy(),
            "y_train": y_train.numpy(),
            "x_test": x_test.permute(0, 2, 3, 1).numpy(),
            "y_test": y_test.numpy(),
            **arrays,
        }
        np.savez(path, **{k: v for k, v in full.items() if v is not None})
        with pytest.raises(UserError, match=message):
            read_cifar_npz(path, spec)
    np.save(tmp_path / "single.npy", x_train.numpy())
    with pytest.raises(UserError, match="single .npy array"):
        read_cifar_npz(tmp_path / "single.npy", spec)


# ---- image folders -------------------------------------------------------------------------------------


def save(path: Path, array: np.ndarray, **kw) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, **kw)


def pattern(cls: int, k: int, size=(8, 6)) -> np.ndarray:
    """A lossless-checkable RGB image: its pixels encode the class and the image index."""
    h, w = size
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = cls * 10
    img[..., 1] = k
    img[..., 2] = np.arange(w, dtype=np.uint8)[None, :] * 7  # left-right asymmetric
    return img


def test_generic_image_folder(tmp_path):
    classes = ["zebra", "ant", "cat"]  # sorted: ant 0, cat 1, zebra 2
    counts = {"zebra": 3, "ant": 2, "cat": 4}
    for ci, c in enumerate(classes):
        for k in range(counts[c]):
            ext = ".png" if k % 2 else ".PNG"
            save(tmp_path / "train" / c / f"{k}{ext}", pattern(ci, k))
        save(tmp_path / "test" / c / "t.png", pattern(ci, 100))
    (tmp_path / "train" / "ant" / "notes.txt").write_text("not an image")
    ds = load_image_folder(tmp_path)
    assert ds.name == tmp_path.name and ds.num_classes == 3
    assert ds.x_train.shape == (9, 3, 8, 6) and ds.x_train.dtype == torch.uint8 and ds.y_train.dtype == torch.int64
    assert ds.x_test.shape == (3, 3, 8, 6)
    sorted_names = sorted(classes)
    for x, y in [(ds.x_train, ds.y_train), (ds.x_test, ds.y_test)]:
        for img, label in zip(x, y):
            written_class = classes.index(sorted_names[int(label)])
            k = int(img[1, 0, 0])
            assert torch.equal(img, torch.from_numpy(pattern(written_class, k)).permute(2, 0, 1))
    assert torch.bincount(ds.y_train).tolist() == [2, 4, 3]
    # a fixed order that mixes the classes, the same on every call
    assert ds.y_train.tolist() != sorted(ds.y_train.tolist())
    assert torch.equal(load_image_folder(tmp_path).x_train, ds.x_train)
    mean, std = channel_stats(ds.x_train)
    assert ds.mean == mean and len(ds.std) == 3
    assert ds.mean[1] == pytest.approx(float(ds.x_train[:, 1].double().mean() / 255), abs=1e-4)


def test_image_folder_val_split_jpg_and_resize(tmp_path):
    for ci, c in enumerate(["a", "b"]):
        save(tmp_path / "train" / c / "x.jpg", np.full((10, 12, 3), 40 + 100 * ci, np.uint8), quality=95)
        save(tmp_path / "train" / c / "y.png", np.full((20, 24, 3), 50 + 100 * ci, np.uint8))
        save(
            tmp_path / "val" / c / "v.jpeg", np.full((10, 12, 3), 60 + 100 * ci, np.uint8).mean(2).astype(np.uint8)
        )  # grey
    with pytest.raises(UserError, match="pass image_size to resize them all"):
        load_image_folder(tmp_path)
    ds = load_image_folder(tmp_path, image_size=16, name="mine")
    assert ds.name == "mine" and ds.x_train.shape == (4, 3, 16, 16) and ds.x_test.shape == (2, 3, 16, 16)
    for img, label in zip(ds.x_test, ds.y_test):  # grey JPEGs become 3 equal channels
        assert (img.int() - (60 + 100 * int(label))).abs().max() <= 2


def test_image_folder_errors(tmp_path):
    with pytest.raises(UserError, match="has no train/ folder"):
        load_image_folder(tmp_path)
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(UserError, match="no class folder with .png/.jpg/.jpeg images"):
        load_image_folder(tmp_path)
    save(tmp_path / "train" / "a" / "0.png", pattern(0, 0))
    with pytest.raises(UserError, match="neither test/<class>/ nor val/<class>/"):
        load_image_folder(tmp_path)
    save(tmp_path / "test" / "b" / "0.png", pattern(1, 0))
    with pytest.raises(UserError, match="class 'b', which has no folder in"):
        load_image_folder(tmp_path)
    (tmp_path / "test" / "b" / "0.png").rename(tmp_path / "test" / "b" / "0.txt")
    (tmp_path / "test" / "b").rename(tmp_path / "test" / "a")
    with pytest.raises(UserError, match="has no test images"):
        load_image_folder(tmp_path)
    (tmp_path / "test" / "a" / "1.png").write_bytes(b"\x89PNG not really")
    with pytest.raises(UserError, match=r"image .*1.png cannot be decoded"):
        load_image_folder(tmp_path)


def make_tiny_imagenet(root: Path, wnids=("n02", "n01", "n03"), per_class=3, val_per_class=2) -> None:
    (root / "wnids.txt").parent.mkdir(parents=True, exist_ok=True)
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    lines = []
    for i, w in enumerate(wnids):
        colour = 30 + 70 * sorted(wnids).index(w)
        for k in range(per_class):
            save(root / "train" / w / "images" / f"{w}_{k}.JPEG", np.full((64, 64, 3), colour, np.uint8), quality=95)
        (root / "train" / w / f"{w}_boxes.txt").write_text("")
        for k in range(val_per_class):
            name = f"val_{i * val_per_class + k}.JPEG"
            save(root / "val" / "images" / name, np.full((64, 64, 3), colour, np.uint8), quality=95)
            lines.append(f"{name}\t{w}\t0\t0\t63\t63")
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    save(root / "test" / "images" / "test_0.JPEG", np.zeros((64, 64, 3), np.uint8))  # unlabelled: not used


def test_tiny_imagenet_layout(tmp_path):
    make_tiny_imagenet(tmp_path / "tiny-imagenet-200")
    ds = load_dataset("tiny_imagenet", tmp_path, download=False)
    assert ds.name == "tiny_imagenet" and ds.num_classes == 3
    assert ds.x_train.shape == (9, 3, 64, 64) and ds.x_test.shape == (6, 3, 64, 64)
    assert torch.bincount(ds.y_train).tolist() == [3, 3, 3] and torch.bincount(ds.y_test).tolist() == [2, 2, 2]
    for x, y in [(ds.x_train, ds.y_train), (ds.x_test, ds.y_test)]:  # label i = i-th sorted wnid = colour 30 + 70 i
        assert ((x.float().mean((1, 2, 3)) - (30 + 70 * y.float())).abs() < 2).all()
    # the data folder may also be the Tiny ImageNet folder itself
    assert torch.equal(load_dataset("tiny_imagenet", tmp_path / "tiny-imagenet-200", download=False).y_test, ds.y_test)


def test_tiny_imagenet_bad_annotations(tmp_path):
    root = tmp_path / "tiny-imagenet-200"
    make_tiny_imagenet(root)
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG n01\nval_1.JPEG\tn01\n")
    with pytest.raises(UserError, match="line 1 of .*val_annotations.txt has no tab-separated class"):
        load_image_folder(root)
    (root / "val" / "val_annotations.txt").write_text("val_0.JPEG\tn09\n")
    with pytest.raises(UserError, match="class 'n09'"):
        load_image_folder(root)
    (root / "val" / "val_annotations.txt").write_text("missing.JPEG\tn01\n")
    with pytest.raises(UserError, match="missing.JPEG does not exist"):
        load_image_folder(root)


def test_tiny_imagenet_missing(tmp_path):
    with pytest.raises(UserError) as e:
        load_dataset("tiny_imagenet", tmp_path, download=False)
    assert "http://cs231n.stanford.edu/tiny-imagenet-200.zip" in str(e.value)
    assert str(tmp_path / "tiny-imagenet-200") in str(e.value)


def zip_folder(folder: Path, archive: Path, extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted(folder.rglob("*")):
            z.write(p, p.relative_to(folder.parent).as_posix())
        for name, data in (extra or {}).items():
            z.writestr(name, data)
    return archive


def test_tiny_imagenet_from_the_zip(tmp_path, monkeypatch):
    import robustprune.data.imagefolder as imf

    make_tiny_imagenet(tmp_path / "src" / "tiny-imagenet-200")
    data = tmp_path / "data"
    data.mkdir()
    archive = zip_folder(tmp_path / "src" / "tiny-imagenet-200", data / "tiny-imagenet-200.zip")
    monkeypatch.setattr(imf, "TINY_IMAGENET_MD5", md5_of(archive))
    ds = load_dataset("tiny_imagenet", data, download=False)  # the zip is there: unzipped, no download
    assert ds.x_train.shape == (9, 3, 64, 64) and (data / "tiny-imagenet-200" / "wnids.txt").is_file()
    assert sorted(p.name for p in data.iterdir()) == ["tiny-imagenet-200", "tiny-imagenet-200.zip"]


def test_tiny_imagenet_zip_with_escaping_member(tmp_path, monkeypatch):
    import robustprune.data.imagefolder as imf

    make_tiny_imagenet(tmp_path / "src" / "tiny-imagenet-200", per_class=1, val_per_class=1)
    data = tmp_path / "data"
    data.mkdir()
    archive = zip_folder(
        tmp_path / "src" / "tiny-imagenet-200", data / "tiny-imagenet-200.zip", extra={"../escaped.txt": b"x"}
    )
    monkeypatch.setattr(imf, "TINY_IMAGENET_MD5", md5_of(archive))
    with pytest.raises(UserError, match="outside its folder"):
        load_dataset("tiny_imagenet", data, download=False)
    assert not (tmp_path / "escaped.txt").exists()
    assert sorted(p.name for p in data.iterdir()) == ["tiny-imagenet-200.zip"]  # nothing half-extracted
    archive.write_bytes(archive.read_bytes()[:200])
    monkeypatch.setattr(imf, "TINY_IMAGENET_MD5", md5_of(archive))
    with pytest.raises(UserError, match="not a readable zip archive"):
        load_dataset("tiny_imagenet", data, download=False)
