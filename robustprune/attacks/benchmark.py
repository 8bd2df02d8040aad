"""Throughput of robustprune's PGD against torchattacks' PGD, same model, inputs and settings."""
from __future__ import annotations

import time

import torch
from torch import nn

from robustprune.attacks.base import frozen_eval
from robustprune.attacks.pgd import PGD
from robustprune.errors import UserError
from robustprune.train import to_float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(attack, xb, yb, device) -> tuple[float, torch.Tensor]:
    _sync(device)
    t0 = time.perf_counter()
    x_adv = attack(xb, yb)
    _sync(device)
    return time.perf_counter() - t0, x_adv


def pgd_benchmark(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 0.1, steps: int = 20,
                  batch_size: int = 500) -> dict:
    """Images/s of robustprune's PGD and of torchattacks.PGD (no random start, step eps/4) on the
    same inputs in the same run; x uint8 or float in [0, 1]. Also returns both accuracies."""
    try:
        import torchattacks
    except ImportError:
        raise UserError("the PGD benchmark compares with torchattacks, which is not installed; "
                        "run `pip install --no-deps torchattacks`") from None
    if len(x) == 0:
        raise UserError("the PGD benchmark needs at least one image")
    if batch_size < 1:
        raise UserError(f"the PGD benchmark batch size must be >= 1, got {batch_size}")
    device = next(model.parameters()).device
    step_size = eps / 4
    ours = PGD(eps, steps=steps, step_size=step_size, random_start=False)
    theirs = torchattacks.PGD(model, eps=eps, alpha=step_size, steps=steps, random_start=False)
    runs = {"robustprune": lambda xb, yb: ours(model, xb, yb), "torchattacks": theirs}
    # untimed warm-up on one full batch (allocator, oneDNN primitives are cached per shape), 2 steps
    xb, yb = to_float(x[:batch_size].to(device)), y[:batch_size].to(device)
    PGD(eps, steps=2, step_size=step_size, random_start=False)(model, xb, yb)
    torchattacks.PGD(model, eps=eps, alpha=step_size, steps=2, random_start=False)(xb, yb)
    # interleaved batch by batch, in alternating order, so that load from other processes hits both alike
    seconds = {name: 0.0 for name in runs}
    correct = {name: 0 for name in runs}
    for b, i in enumerate(range(0, len(x), batch_size)):
        xb, yb = to_float(x[i:i + batch_size].to(device)), y[i:i + batch_size].to(device)
        for name in (list(runs) if b % 2 == 0 else list(runs)[::-1]):
            dt, x_adv = _timed(runs[name], xb, yb, device)
            seconds[name] += dt
            with torch.inference_mode(), frozen_eval(model):
                correct[name] += int((model(x_adv).argmax(1) == yb).sum())
    out: dict = {"images": len(x), "eps": eps, "steps": steps, "batch_size": batch_size, "device": str(device)}
    for name in runs:
        out[f"{name}_images_per_s"] = len(x) / seconds[name]
        out[f"{name}_accuracy"] = correct[name] / len(x)
    out["ratio"] = out["robustprune_images_per_s"] / out["torchattacks_images_per_s"]
    return out
