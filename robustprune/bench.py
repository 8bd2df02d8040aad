"""`robustprune bench`: how fast this machine trains and evaluates.

Training section: the fp32 matrix-multiply peak (GFLOP/s) and the training throughput (images/s)
of the MNIST study's CNN, turned into GFLOP/s (3x the forward multiply-accumulates x 2 FLOPs) and
compared with the peak; also white-box FGSM evaluation.

Evaluation section: PGD-20 (eps 0.1) on the MNIST test images against the study's CNN trained for
one epoch, robustprune's PGD and torchattacks' on the same inputs in the same run (images/s of
both and their ratio), then the 15 x 5 corruption suite on CIFAR-sized images.

CIFAR section and the ResNet-20 fast-trainer run: bench_cifar.py; the attacks section (PGD-20 and
AutoAttack against the torchattacks reference): bench_attacks.py."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from robustprune.attacks import ATTACKS, adversarial_accuracy
from robustprune.bench_common import (
    STUDY_CNN_ARGS,
    results_table,
    sync_device,
    torchattacks_missing,
    trained_study_cnn,
)
from robustprune.device import pick_device
from robustprune.errors import UserError
from robustprune.files import write_text
from robustprune.metrics.size import count_macs
from robustprune.models import build_model
from robustprune.train import TrainConfig, accuracy, train

DEFAULT_MODEL = ("mnist_cnn", STUDY_CNN_ARGS, (1, 28, 28))  # the MNIST study's CNN
PGD_EPS, PGD_STEPS, PGD_BATCH = 0.1, 20, 500


def matmul_peak(device: torch.device, seconds: float, n: int = 2048) -> float:
    """Best fp32 GFLOP/s of an n x n matrix multiply over repeated trials."""
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    torch.mm(a, b)
    best, t_end = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        sync_device(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync_device(device)
        best = max(best, 2 * n**3 / (time.perf_counter() - t0) / 1e9)
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
    sync_device(device)
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


def _training_section(console, device, args) -> dict:
    peak = matmul_peak(device, args.seconds)
    img_s, macs = training_throughput(device, args.seconds, args.batch_size)
    achieved = img_s * 3 * 2 * macs / 1e9
    from robustprune.study.executor import worker_layout

    workers, _ = worker_layout("auto", str(device))
    par_s = parallel_training_throughput(device, args.seconds, args.batch_size, workers) if workers > 1 else img_s
    fgsm_s = fgsm_throughput(device, args.seconds)
    t = results_table("robustprune bench: training")
    t.add_row("fp32 matmul peak (2048x2048)", f"{peak:,.1f} GFLOP/s")
    t.add_row(
        f"training, {DEFAULT_MODEL[0]}, batch {args.batch_size}, {torch.get_num_threads()} threads",
        f"{img_s:,.0f} images/s",
    )
    t.add_row("  forward MACs per image", f"{macs:,}")
    t.add_row("  achieved (6 x MACs x images/s)", f"{achieved:,.1f} GFLOP/s")
    t.add_row("  achieved / peak", f"{achieved / peak:.1%}")
    if workers > 1:
        par = par_s * 3 * 2 * macs / 1e9
        t.add_row(f"training, {workers} worker processes x 1 thread (run --workers auto)", f"{par_s:,.0f} images/s")
        t.add_row("  achieved / peak", f"{par / peak:.1%}")
    t.add_row("white-box FGSM evaluation", f"{fgsm_s:,.0f} images/s")
    console.print(t)
    return {
        "peak_gflops": peak,
        "train_images_per_s": img_s,
        "achieved_gflops": achieved,
        "fraction_of_peak": achieved / peak,
        "parallel_train_images_per_s": par_s,
        "fgsm_images_per_s": fgsm_s,
    }


# ---- evaluation section --------------------------------------------------------------------------


def load_mnist_or_explain(data_dir):
    """MNIST from the data folder, never downloaded: a benchmark should not spend its time on the
    network, and a missing folder deserves one sentence naming the fix."""
    from robustprune.data import load_dataset
    from robustprune.data.base import DATA_ENV, resolve_data_dir
    from robustprune.data.mnist import FILES

    folder = resolve_data_dir(data_dir)
    if not any((f / FILES["test_images"][0]).exists() for f in (folder, folder / "mnist")):
        raise UserError(
            f"the evaluation section needs MNIST, which is not in {folder}; pass --data-dir (or set "
            f"${DATA_ENV}) to a folder holding mnist/, or run `robustprune run "
            f"studies/mnist_pruning_robustness.yaml --budget smoke` once to download it"
        )
    return load_dataset("mnist", folder, download=False)


def pgd_comparison(model, x, y) -> dict:
    from robustprune.attacks.benchmark import pgd_benchmark

    missing = torchattacks_missing()
    if missing:
        return {"skipped": missing}
    return pgd_benchmark(model, x, y, eps=PGD_EPS, steps=PGD_STEPS, batch_size=PGD_BATCH)


def corruption_suite(n: int) -> dict:
    from robustprune.attacks.corruptions import corruption_benchmark

    return corruption_benchmark(n, size=32, channels=3, seed=0)


def _evaluation_section(console, device, args, data) -> dict:
    model, fit = trained_study_cnn(data, device, args.train_images)
    x, y = data.x_test[: args.eval_images], data.y_test[: args.eval_images]
    clean = accuracy(model, x, y)
    console.print(
        f"trained the study CNN 1 epoch on {fit['train_images']:,} MNIST images in "
        f"{fit['train_seconds']:.1f} s (clean accuracy {clean:.2%}); running PGD-{PGD_STEPS} on "
        f"{len(x):,} test images, ours and torchattacks ..."
    )
    pgd = pgd_comparison(model, x, y)
    console.print(f"running the 15 x 5 corruption suite on {args.corruption_images:,} 3x32x32 images ...")
    corr = corruption_suite(args.corruption_images)
    _print_evaluation(console, len(x), clean, pgd, corr)
    return {
        "model": {"name": "mnist_cnn", "args": STUDY_CNN_ARGS, **fit, "clean_accuracy": clean},
        "pgd": pgd,
        "corruptions": corr,
    }


def _print_evaluation(console, n: int, clean: float, pgd: dict, corr: dict) -> None:
    t = results_table("robustprune bench: evaluation")
    t.add_row("model: the study's CNN trained 1 epoch (so attack accuracies mean something)", f"{clean:.2%} clean")
    label = f"PGD-{PGD_STEPS}, eps {PGD_EPS}, {n:,} MNIST test images, batch {PGD_BATCH}"
    if "skipped" in pgd:
        t.add_row(label, pgd["skipped"])
    else:
        t.add_row(label + ": robustprune", f"{pgd['robustprune_images_per_s']:,.0f} images/s")
        t.add_row("  torchattacks (same inputs, interleaved)", f"{pgd['torchattacks_images_per_s']:,.0f} images/s")
        t.add_row("  ratio robustprune / torchattacks (target >= 1)", f"{pgd['ratio']:.2f}")
        t.add_row(
            "  adversarial accuracy robustprune / torchattacks",
            f"{pgd['robustprune_accuracy']:.2%} / {pgd['torchattacks_accuracy']:.2%}",
        )
    t.add_row(
        f"corruptions, 15 x 5 severities, {corr['n']:,} 3x32x32 images, {corr['threads']} threads",
        f"{corr['total_seconds']:.1f} s",
    )
    slowest = sorted(corr["per_corruption_seconds"].items(), key=lambda kv: -kv[1])[:3]
    t.add_row("  slowest", ", ".join(f"{name} {sec:.1f} s" for name, sec in slowest))
    console.print(t)


# ---- the command ---------------------------------------------------------------------------------


def _check_sizes(args) -> None:
    for flag in ("train_images", "eval_images", "corruption_images", "epochs", "autoattack_images"):
        n = getattr(args, flag, None)
        if n is not None and n < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be at least 1, got {n}")


def _check_json_path(path) -> Path | None:
    """Fail before minutes of measuring, not after, when the figures could not be written."""
    if not path:
        return None
    path = Path(path)
    if not path.parent.is_dir():
        raise UserError(f"cannot write {path}: folder {path.parent} does not exist; create it or pick another path")
    return path


def run_bench(console, args) -> dict:
    """Run the chosen sections; return every figure (and write them to args.json when given)."""
    section = args.section
    _check_sizes(args)
    json_path = _check_json_path(args.json)
    device = pick_device(args.device)
    # data first: a missing folder is reported before any time is spent measuring
    data = load_mnist_or_explain(args.data_dir) if section in ("all", "evaluation", "attacks") else None
    if section == "resnet20":
        from robustprune.bench_cifar import load_cifar10_or_explain

        load_cifar10_or_explain(args.data_dir)
    console.print(f"device: {device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    out: dict = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads()}
    if section in ("all", "training"):
        out.update(_training_section(console, device, args))
    if section in ("all", "evaluation"):
        out["evaluation"] = _evaluation_section(console, device, args, data)
    if section == "attacks":  # not part of `all`: the reference AutoAttack alone takes minutes
        from robustprune.bench_attacks import attacks_section

        out["attacks"] = attacks_section(console, device, args, data)
    if section in ("all", "cifar"):
        from robustprune.bench_cifar import cifar_section

        out["cifar"] = cifar_section(console, device, args.batch_size)
    if section == "resnet20":  # not part of `all`: it trains for about 20 minutes
        from robustprune.bench_cifar import fast_resnet20

        out["resnet20"] = fast_resnet20(
            console, device, args.data_dir, epochs=args.epochs, train_images=args.train_images
        )
    if json_path:
        write_text(json_path, json.dumps(out, indent=2) + "\n", "--json", "the figures are printed above")
        console.print(f"figures written to {json_path}")
    return out
