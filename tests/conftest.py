"""Shared fixtures for the fast unit tests (tiny tensors; only test_data reads the real MNIST files)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
STUDY_FILE = REPO_ROOT / "studies" / "mnist_pruning_robustness.yaml"


def shared_data_dir() -> Path:
    """$ROBUSTPRUNE_DATA when set, else the shared data folder next to the repository."""
    env = os.environ.get("ROBUSTPRUNE_DATA")
    return Path(env) if env else REPO_ROOT.parent / "shared" / "data"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The folder that holds mnist/ (or the MNIST files themselves); tests skip when it is absent."""
    d = shared_data_dir()
    mnist = d if (d / "train-images-idx3-ubyte.gz").exists() else d / "mnist"
    if not (mnist / "train-labels-idx1-ubyte.gz").exists():
        if os.environ.get("CI"):  # CI has ../shared/data beside the clone: missing data is a failure there
            pytest.fail(f"real MNIST files not found under {d}")
        pytest.skip(f"real MNIST files not found under {d}; set ROBUSTPRUNE_DATA")
    return d


@pytest.fixture(scope="session")
def mnist_dir(data_dir) -> Path:
    """The folder holding the four MNIST gzip files."""
    return data_dir if (data_dir / "train-images-idx3-ubyte.gz").exists() else data_dir / "mnist"


@pytest.fixture(scope="session")
def study_file() -> Path:
    return STUDY_FILE


@pytest.fixture
def tiny_cnn():
    """MnistCNN with small widths (conv1=4, conv2=6, fc=8), deterministic init."""
    from robustprune.models.mnist_cnn import MnistCNN

    torch.manual_seed(0)
    return MnistCNN(conv1=4, conv2=6, fc=8, kernel_size=3, padding=1).eval()


@pytest.fixture(autouse=True)
def _few_threads():
    """Tiny tensors: more threads only cost time on a shared 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def random_mnist(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n seeded random uint8 MNIST-shaped images and labels (for training-loop unit tests)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.uint8), torch.randint(
        0, 10, (n,), generator=g
    )


def run_cli(*args: str, timeout: int = 600):
    """`python -m robustprune ARGS` in a subprocess (the public CLI, as a user runs it)."""
    import subprocess
    import sys

    return subprocess.run(
        [sys.executable, "-m", "robustprune", *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


def stored_results(out: Path, key=lambda axes: axes["pruning"]) -> dict:
    """{(key(axes), metric): value} of every row in a study folder's store."""
    import json
    import sqlite3

    with sqlite3.connect(out / "results.sqlite") as db:
        return {(key(json.loads(a)), m): v for a, m, v in db.execute("SELECT axes, metric, value FROM results")}


def _train_mnist_cnn(data_dir: Path, n: int, cfg) -> torch.nn.Module:
    from robustprune.data import load_dataset
    from robustprune.models import build_model, to_device
    from robustprune.train import train

    ds = load_dataset("mnist", data_dir)
    torch.manual_seed(0)
    model = to_device(
        build_model("mnist_cnn", num_classes=10, image_shape=(1, 28, 28), mean=(0.1307,), std=(0.3081,)), "cpu"
    )
    train(model, ds.x_train[:n], ds.y_train[:n], cfg, seed=0)
    return model.eval()


@pytest.fixture(scope="session")
def mnist_cnns(data_dir):
    """Two real MNIST CNNs for the attack cross-checks and the first 500 test images (float, labels):
    'clean' (1 epoch on 10 000 images, ~97 %) and 'robust' (3 epochs on 20 000 images, each batch
    plus its PGD-5 adversarial copies at eps 0.3, as `robustprune bench --section attacks` trains it)."""
    from robustprune.bench_attacks import ROBUST_TRAIN_IMAGES, ROBUST_TRAINING
    from robustprune.data import load_dataset
    from robustprune.train import TrainConfig, to_float

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        clean = _train_mnist_cnn(data_dir, 10000, TrainConfig(epochs=1))
        robust = _train_mnist_cnn(data_dir, ROBUST_TRAIN_IMAGES, ROBUST_TRAINING)
    finally:
        torch.set_num_threads(threads)
    ds = load_dataset("mnist", data_dir)
    return {"clean": clean, "robust": robust, "x": to_float(ds.x_test[:500]), "y": ds.y_test[:500].clone()}


def without_root_override() -> None:
    """preexec_fn for a subprocess that must meet file permissions as an ordinary user would. Root
    ignores them (CAP_DAC_OVERRIDE); dropping that capability from the bounding set before exec
    leaves the child root but bound by the mode bits, so a chmod'd folder is really read-only."""
    if os.geteuid() != 0:
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "cannot drop CAP_DAC_OVERRIDE")


def read_only(*paths: Path) -> None:
    """chmod a-w every path and everything under it (undo with writable)."""
    for top in paths:
        for p in [top, *top.rglob("*")] if top.is_dir() else [top]:
            p.chmod(p.stat().st_mode & ~0o222)


def writable(*paths: Path) -> None:
    for top in paths:
        for p in [top, *top.rglob("*")] if top.is_dir() else [top]:
            p.chmod(p.stat().st_mode | 0o200)


@pytest.fixture
def no_hang():
    """A guard for code that could block (a FIFO opened for reading) or never end (/dev/zero read
    to its end): raises TimeoutError in the test after `seconds` instead of hanging the suite."""
    import contextlib
    import signal

    @contextlib.contextmanager
    def guard(seconds: float = 30.0):
        def expire(signum, frame):
            raise TimeoutError(f"still running after {seconds} s: it would hang")

        previous = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, seconds)
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)

    return guard


@pytest.fixture
def full_disk(monkeypatch):
    """A full disk, the kernel's own: every temporary file written through robustprune.files (every
    checkpoint, figure, report file) is a link to /dev/full, so torch, matplotlib and plain writes
    fail as on a full device."""
    from robustprune import files

    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full (Linux)")
    real = files.tmp_name

    def to_full(path: Path) -> Path:
        tmp = real(path)
        tmp.parent.mkdir(parents=True, exist_ok=True)
        tmp.symlink_to("/dev/full")
        return tmp

    monkeypatch.setattr(files, "tmp_name", to_full)


def wait_for(condition, what: str, timeout: float = 900.0, every: float = 0.1):
    """Poll until condition() is true and return its value. The deadline only turns a hang into a
    failure: it is far above what any machine needs, so the verdict never depends on the load."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"waited {timeout:.0f} s for {what}")
        time.sleep(every)


def stored_cells(out: Path) -> int:
    """Cells in a study folder's store (0 before it exists), read without writing anything."""
    import sqlite3

    try:
        with sqlite3.connect(f"file:{out / 'results.sqlite'}?mode=ro", uri=True, timeout=30) as db:
            return db.execute("SELECT count(*) FROM cells").fetchone()[0]
    except sqlite3.OperationalError:  # not created yet, or its tables not yet
        return 0


def group_members(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group, from /proc."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            out.append(int(stat.parent.name))
    return out


def damage_store(path, how: str) -> None:
    """Damage a result store in place: 'garbage', 'empty', 'truncated', or a table to drop
    ('runs', or 'no-table:runs')."""
    import sqlite3

    if how == "garbage":
        path.write_bytes(os.urandom(8192))
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        with sqlite3.connect(path) as db:
            db.execute(f"DROP TABLE {how.split(':')[-1]}")
