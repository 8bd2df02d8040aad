"""`robustprune bench --section resnet20`: the fast trainer on real CIFAR-10.

ResNet-20 trained from scratch with the recipe below, then scored on the 10 000 test images.
The recipe is the project's fast CPU trainer: one-cycle SGD-Nesterov with label smoothing and
crop + flip, bf16 autocast (1.7x the fp32 throughput of ResNet-20 on this project's AVX-512-BF16
CPU; weights, optimiser state and evaluation stay fp32). It is also the dense training of the
CIFAR studies' `cpu` budgets, so this benchmark is the time those budgets spend per dense model."""
from __future__ import annotations

import time

import torch

from robustprune.errors import UserError
from robustprune.models import build_model, to_device
from robustprune.train import TrainConfig, accuracy, train

# 40 epochs x 50 000 images: 91-92 % in about 20 minutes on 2 CPU cores (README, Performance).
FAST_RESNET20 = TrainConfig(epochs=40, batch_size=128, optimizer="sgd", lr=0.2, momentum=0.9, nesterov=True,
                            weight_decay=5e-4, schedule="onecycle", warmup=0.15, label_smoothing=0.1,
                            precision="bf16", augment="crop_flip")


def load_cifar10_or_explain(data_dir):
    """CIFAR-10 from the data folder, never downloaded (a benchmark times training, not the network)."""
    from robustprune.data import load_dataset
    from robustprune.data.base import DATA_ENV, resolve_data_dir

    folder = resolve_data_dir(data_dir)
    names = ("cifar10.npz", "cifar-10-python.tar.gz")
    if not any((f / n).exists() for f in (folder, folder / "cifar10") for n in names):
        raise UserError(f"the resnet20 section needs CIFAR-10, which is not in {folder}; pass --data-dir (or set "
                        f"${DATA_ENV}) to a folder holding cifar10/cifar10.npz or cifar-10-python.tar.gz")
    return load_dataset("cifar10", folder, download=False)


def fast_resnet20(console, device, data_dir, epochs: int | None = None, train_images: int | None = None,
                  precision: str | None = None, seed: int = 0) -> dict:
    """Train ResNet-20 with FAST_RESNET20 (epochs / precision overridable), print one line per epoch
    with the time left, and return wall time, images/s and test accuracy."""
    data = load_cifar10_or_explain(data_dir)
    cfg = FAST_RESNET20.model_copy(update={k: v for k, v in (("epochs", epochs), ("precision", precision))
                                           if v is not None})
    torch.manual_seed(seed)
    model = to_device(build_model("resnet20", num_classes=data.num_classes, image_shape=data.image_shape,
                                  mean=data.mean, std=data.std), device)
    x, y = data.x_train[:train_images].to(device), data.y_train[:train_images].to(device)
    console.print(f"ResNet-20, {len(x):,} CIFAR-10 training images, {cfg.epochs} epochs, batch {cfg.batch_size}, "
                  f"{cfg.precision}, {torch.get_num_threads()} threads on {device}")
    t0 = time.perf_counter()

    def epoch_done(epoch: int, _model) -> dict:
        elapsed = time.perf_counter() - t0
        left = elapsed / epoch * (cfg.epochs - epoch)
        console.print(f"  epoch {epoch}/{cfg.epochs}: {elapsed:6.0f} s elapsed, about {left:4.0f} s left")
        return {"seconds": elapsed}

    history = train(model, x, y, cfg, seed=seed, on_epoch_end=epoch_done)
    wall = time.perf_counter() - t0
    acc = accuracy(model, data.x_test.to(device), data.y_test.to(device))
    result = {"model": "resnet20", "train_images": len(x), "epochs": cfg.epochs, "precision": cfg.precision,
              "train_seconds": wall, "images_per_s": len(x) * cfg.epochs / wall, "test_accuracy": acc,
              "final_train_loss": history[-1]["loss"] if history else None, "recipe": cfg.model_dump()}
    console.print(f"ResNet-20: {acc:.2%} test accuracy after {wall / 60:.1f} min "
                  f"({result['images_per_s']:,.0f} training images/s)")
    return result
