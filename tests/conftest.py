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
