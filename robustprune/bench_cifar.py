"""`robustprune bench --section resnet20`: the fast trainer on real CIFAR-10; `--section cifar`:
pruning speed of ResNet-56 and training throughput of the CIFAR models (bottom of this file).

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
FAST_RESNET20 = TrainConfig(
    epochs=40,
    batch_size=128,
    optimizer="sgd",
    lr=0.2,
    momentum=0.9,
    nesterov=True,
    weight_decay=5e-4,
    schedule="onecycle",
    warmup=0.15,
    label_smoothing=0.1,
    precision="bf16",
    augment="crop_flip",
)


def load_cifar10_or_explain(data_dir):
    """CIFAR-10 from the data folder, never downloaded (a benchmark times training, not the network)."""
    from robustprune.data import load_dataset
    from robustprune.data.base import DATA_ENV, resolve_data_dir

    folder = resolve_data_dir(data_dir)
    names = ("cifar10.npz", "cifar-10-python.tar.gz")
    if not any((f / n).exists() for f in (folder, folder / "cifar10") for n in names):
        raise UserError(
            f"the resnet20 section needs CIFAR-10, which is not in {folder}; pass --data-dir (or set "
            f"${DATA_ENV}) to a folder holding cifar10/cifar10.npz or cifar-10-python.tar.gz"
        )
    return load_dataset("cifar10", folder, download=False)


def fast_resnet20(
    console,
    device,
    data_dir,
    epochs: int | None = None,
    train_images: int | None = None,
    precision: str | None = None,
    seed: int = 0,
) -> dict:
    """Train ResNet-20 with FAST_RESNET20 (epochs / precision overridable), print one line per epoch
    with the time left, and return wall time, images/s and test accuracy."""
    data = load_cifar10_or_explain(data_dir)
    cfg = FAST_RESNET20.model_copy(
        update={k: v for k, v in (("epochs", epochs), ("precision", precision)) if v is not None}
    )
    torch.manual_seed(seed)
    model = to_device(
        build_model(
            "resnet20", num_classes=data.num_classes, image_shape=data.image_shape, mean=data.mean, std=data.std
        ),
        device,
    )
    x, y = data.x_train[:train_images].to(device), data.y_train[:train_images].to(device)
    console.print(
        f"ResNet-20, {len(x):,} CIFAR-10 training images, {cfg.epochs} epochs, batch {cfg.batch_size}, "
        f"{cfg.precision}, {torch.get_num_threads()} threads on {device}"
    )
    t0 = time.perf_counter()

    def epoch_done(epoch: int, _model) -> dict:
        elapsed = time.perf_counter() - t0
        left = elapsed / epoch * (cfg.epochs - epoch)
        console.print(f"  epoch {epoch}/{cfg.epochs}: {elapsed:6.0f} s elapsed, about {left:4.0f} s left")
        return {"seconds": elapsed}

    history = train(model, x, y, cfg, seed=seed, on_epoch_end=epoch_done)
    wall = time.perf_counter() - t0
    acc = accuracy(model, data.x_test.to(device), data.y_test.to(device))
    result = {
        "model": "resnet20",
        "train_images": len(x),
        "epochs": cfg.epochs,
        "precision": cfg.precision,
        "train_seconds": wall,
        "images_per_s": len(x) * cfg.epochs / wall,
        "test_accuracy": acc,
        "final_train_loss": history[-1]["loss"] if history else None,
        "recipe": cfg.model_dump(),
    }
    console.print(
        f"ResNet-20: {acc:.2%} test accuracy after {wall / 60:.1f} min "
        f"({result['images_per_s']:,.0f} training images/s)"
    )
    return result


# ---- `--section cifar`: pruning speed and training throughput of the CIFAR models ---------------------

CIFAR_MODELS = ("resnet20", "resnet56", "vgg16_bn", "mobilenetv2", "resnet18", "mobilevit_xs", "resnet50")
SHAPE = (3, 32, 32)
STATS = dict(num_classes=10, image_shape=SHAPE, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))


def pruning_speed(repeats: int = 7, ratio: float = 0.3) -> dict[str, float]:
    """Best-of-`repeats` milliseconds to prune `ratio` of ResNet-56 with L1 (dependency graph and
    physical removal included, model copy excluded) for filters, blocks and both."""
    import copy

    from robustprune.pruning.criteria import build_criterion
    from robustprune.pruning.structured import prune_structured_

    torch.manual_seed(0)
    base = build_model("resnet56", **STATS)
    example = torch.zeros(1, *SHAPE)
    out = {}
    for target in ("filters", "blocks", "both"):
        best = float("inf")
        for _ in range(repeats):
            model = copy.deepcopy(base)
            t0 = time.perf_counter()
            prune_structured_(model, build_criterion("l1"), ratio, example, target=target)
            best = min(best, time.perf_counter() - t0)
        out[target] = best * 1000
    return out


def step_throughput(name: str, precision: str, device, batch_size: int, steps: int) -> float:
    """Training images/s of one model: median time of `steps` SGD steps on random CIFAR-shaped
    batches, after two warm-up steps."""
    import statistics

    import torch.nn.functional as F

    from robustprune.device import use_bf16
    from robustprune.train import TrainConfig, make_optimizer

    torch.manual_seed(0)
    model = to_device(build_model(name, **STATS), device).to(memory_format=torch.channels_last).train()
    opt = make_optimizer(model, TrainConfig())
    x = torch.rand(batch_size, *SHAPE, device=device).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch_size,), device=device)
    bf16 = use_bf16(precision, device)
    times = []
    for i in range(steps + 2):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
    return batch_size / statistics.median(times)


def cifar_section(console, device, batch_size: int, steps: int = 5) -> dict:
    from rich.table import Table

    speed = pruning_speed()
    throughput = {
        name: {p: step_throughput(name, p, device, batch_size, steps) for p in ("fp32", "bf16")}
        for name in CIFAR_MODELS
    }
    t = Table(title="robustprune bench: CIFAR models", title_justify="left")
    t.add_column("measurement")
    t.add_column("value", justify="right")
    t.add_row(
        "prune 30 % of ResNet-56 (L1): filters / blocks / both",
        " / ".join(f"{speed[k]:.0f}" for k in ("filters", "blocks", "both")) + " ms",
    )
    for name, tp in throughput.items():
        t.add_row(
            f"training {name}, batch {batch_size}, fp32 / bf16 autocast",
            f"{tp['fp32']:,.0f} / {tp['bf16']:,.0f} images/s",
        )
    console.print(t)
    return {"pruning_ms": speed, "train_images_per_s": throughput}
