"""`robustprune bench`: how close training gets to what this machine can do. Measures, in one run,
the fp32 matrix-multiply peak (GFLOP/s) and the training throughput (images/s) of the default
MNIST model, turns the latter into GFLOP/s (3x the forward multiply-accumulates x 2 FLOPs), and
prints achieved/peak. Also times white-box FGSM evaluation."""
from __future__ import annotations

import time

import torch
from rich.table import Table

from robustprune.attacks import ATTACKS, adversarial_accuracy
from robustprune.device import pick_device
from robustprune.metrics.size import count_macs
from robustprune.models import build_model
from robustprune.train import TrainConfig, train

DEFAULT_MODEL = ("mnist_cnn", {}, (1, 28, 28))  # the MNIST study's CNN with its default widths


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def matmul_peak(device: torch.device, seconds: float, n: int = 2048) -> float:
    """Best fp32 GFLOP/s of an n x n matrix multiply over repeated trials."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.mm(a, b)
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        best = max(best, 2 * n ** 3 / (time.perf_counter() - t0) / 1e9)
    return best


def training_throughput(device: torch.device, seconds: float, batch_size: int) -> tuple[float, int]:
    """Images/s of the study's training loop on the default model (synthetic MNIST-shaped data)."""
    name, args, shape = DEFAULT_MODEL
    torch.manual_seed(0)
    model = build_model(name, num_classes=10, image_shape=shape, mean=(0.1307,), std=(0.3081,), **args).to(device)
    macs, _ = count_macs(model, torch.zeros(1, *shape, device=device))
    x = torch.randint(0, 256, (batch_size * 20, *shape), dtype=torch.uint8, device=device)
    y = torch.randint(0, 10, (len(x),), device=device)
    cfg = TrainConfig(epochs=1, batch_size=batch_size)
    train(model, x[: batch_size * 4], y[: batch_size * 4], cfg, seed=0)  # warm-up
    images, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        train(model, x, y, cfg, seed=images)
        images += len(x)
    _sync(device)
    return images / (time.perf_counter() - t0), macs


def _one_thread_throughput(args: tuple) -> float:
    device, seconds, batch_size = args
    torch.set_num_threads(1)
    return training_throughput(torch.device(device), seconds, batch_size)[0]


def parallel_training_throughput(device: torch.device, seconds: float, batch_size: int, workers: int) -> float:
    """Summed images/s of `workers` single-threaded processes, as `robustprune run` uses a CPU."""
    import multiprocessing as mp

    with mp.get_context("spawn").Pool(workers) as pool:
        return sum(pool.map(_one_thread_throughput, [(str(device), seconds, batch_size)] * workers))


def fgsm_throughput(device: torch.device, seconds: float) -> float:
    name, args, shape = DEFAULT_MODEL
    model = build_model(name, num_classes=10, image_shape=shape, mean=(0.1307,), std=(0.3081,), **args).to(device)
    x = torch.rand(2000, *shape, device=device)
    y = torch.randint(0, 10, (len(x),), device=device)
    attack = ATTACKS.get("fgsm")(0.1)
    adversarial_accuracy(model, attack, x[:200], y[:200])
    images, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        adversarial_accuracy(model, attack, x, y)
        images += len(x)
    return images / (time.perf_counter() - t0)


def run_bench(console, args) -> dict:
    device = pick_device(args.device)
    console.print(f"device: {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    peak = matmul_peak(device, args.seconds)
    img_s, macs = training_throughput(device, args.seconds, args.batch_size)
    achieved = img_s * 3 * 2 * macs / 1e9
    from robustprune.study.executor import worker_layout

    workers, _ = worker_layout("auto", str(device))
    par_s = parallel_training_throughput(device, args.seconds, args.batch_size, workers) if workers > 1 else img_s
    fgsm_s = fgsm_throughput(device, args.seconds)
    t = Table(title="robustprune bench", title_justify="left")
    for col in ("measurement", "value"):
        t.add_column(col, justify="right" if col == "value" else "left")
    t.add_row("fp32 matmul peak (2048x2048)", f"{peak:,.1f} GFLOP/s")
    t.add_row(f"training, {DEFAULT_MODEL[0]}, batch {args.batch_size}, {torch.get_num_threads()} threads",
              f"{img_s:,.0f} images/s")
    t.add_row("  forward MACs per image", f"{macs:,}")
    t.add_row("  achieved (6 x MACs x images/s)", f"{achieved:,.1f} GFLOP/s")
    t.add_row("  achieved / peak", f"{achieved / peak:.1%}")
    if workers > 1:
        par = par_s * 3 * 2 * macs / 1e9
        t.add_row(f"training, {workers} worker processes x 1 thread (run --workers auto)", f"{par_s:,.0f} images/s")
        t.add_row("  achieved / peak", f"{par / peak:.1%}")
    t.add_row("white-box FGSM evaluation", f"{fgsm_s:,.0f} images/s")
    console.print(t)
    return {"peak_gflops": peak, "train_images_per_s": img_s, "achieved_gflops": achieved,
            "fraction_of_peak": achieved / peak, "parallel_train_images_per_s": par_s, "fgsm_images_per_s": fgsm_s}
