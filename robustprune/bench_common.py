"""What the `robustprune bench` sections share: the MNIST study's CNN trained once for them, the
figures table they print, and the check for the torchattacks reference. A module of its own so that
bench.py (which runs the sections) and bench_attacks.py (one section) need not import each other."""

from __future__ import annotations

import time

import torch
from rich.table import Table

from robustprune.models import build_model, to_device
from robustprune.train import TrainConfig, train

# model.args of studies/mnist_pruning_robustness.yaml (tests/test_bench.py checks they stay equal)
STUDY_CNN_ARGS = {"conv1": 8, "conv2": 16, "fc": 128, "kernel_size": 5, "padding": 0}


def sync_device(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def results_table(title: str) -> Table:
    t = Table(title=title, title_justify="left")
    t.add_column("measurement")
    t.add_column("value", justify="right")
    return t


def trained_study_cnn(data, device, train_images: int | None, seed: int = 0, cfg: TrainConfig | None = None):
    """The study's CNN trained on the first `train_images` images, by default for one epoch (attack
    accuracies of an untrained model mean nothing); `cfg` trains it otherwise (e.g. adversarially)."""
    torch.manual_seed(seed)
    model = to_device(
        build_model(
            "mnist_cnn",
            num_classes=data.num_classes,
            image_shape=data.image_shape,
            mean=data.mean,
            std=data.std,
            **STUDY_CNN_ARGS,
        ),
        device,
    )
    x, y = data.x_train[:train_images], data.y_train[:train_images]
    t0 = time.perf_counter()
    train(model, x.to(device), y.to(device), cfg or TrainConfig(epochs=1, lr=0.05), seed=seed)
    sync_device(device)
    return model.eval(), {"train_images": len(x), "train_seconds": time.perf_counter() - t0}


def torchattacks_missing() -> str | None:
    """One sentence for the PGD row when torchattacks is absent, else None."""
    try:
        import torchattacks  # noqa: F401
    except ImportError:
        return "torchattacks is missing; install it with `pip install --no-deps torchattacks`"
    return None
