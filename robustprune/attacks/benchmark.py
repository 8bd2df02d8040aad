"""Speed and strength of robustprune's attacks against torchattacks' (PGD) and against the reference
AutoAttack built from torchattacks' four attacks, on the same model and inputs in the same run."""

from __future__ import annotations

import time

import torch
from torch import nn

from robustprune.attacks.base import frozen_eval
from robustprune.attacks.pgd import PGD
from robustprune.errors import UserError
from robustprune.tensors import to_float


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(attack, xb, yb, device) -> tuple[float, torch.Tensor]:
    _sync(device)
    t0 = time.perf_counter()
    x_adv = attack(xb, yb)
    _sync(device)
    return time.perf_counter() - t0, x_adv


def pgd_benchmark(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float = 0.1, steps: int = 20, batch_size: int = 500
) -> dict:
    """Images/s of robustprune's PGD and of torchattacks.PGD (no random start, step eps/4) on the
    same inputs in the same run; x uint8 or float in [0, 1]. Also returns both accuracies."""
    torchattacks = _torchattacks("the PGD benchmark's comparison")
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
        xb, yb = to_float(x[i : i + batch_size].to(device)), y[i : i + batch_size].to(device)
        for name in list(runs) if b % 2 == 0 else list(runs)[::-1]:
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


def reference_autoattack(model: nn.Module, eps: float, norm: str = "Linf", n_classes: int = 10, seed: int = 0):
    """The reference AutoAttack (standard version) built from torchattacks' four attacks with the
    original's settings, as a cascade (MultiAttack): APGD-CE and APGD-T with 100 steps, APGD-T and
    FAB-T against 9 target classes, Square with 5000 queries. torchattacks' own AutoAttack class is
    not the reference: it leaves APGD, APGD-T and FAB at 10 steps. Called as attack(x, y)."""
    torchattacks = _torchattacks("the AutoAttack reference")
    common = {"norm": norm, "eps": eps, "seed": seed}
    return torchattacks.MultiAttack(
        [
            torchattacks.APGD(model, steps=100, n_restarts=1, loss="ce", **common),
            torchattacks.APGDT(model, steps=100, n_restarts=1, n_classes=n_classes, **common),
            torchattacks.FAB(model, steps=100, n_restarts=1, multi_targeted=True, n_classes=n_classes, **common),
            torchattacks.Square(model, n_queries=5000, n_restarts=1, p_init=0.8, loss="margin", **common),
        ]
    )


def _torchattacks(what: str):
    try:
        import torchattacks
    except ImportError:
        raise UserError(
            f"{what} comes from torchattacks, which is not installed; run `pip install --no-deps torchattacks`"
        ) from None
    return torchattacks


def autoattack_benchmark(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    norm: str = "Linf",
    batch_size: int = 500,
    n_classes: int = 10,
) -> dict:
    """Robust accuracy and seconds of robustprune's AutoAttack (standard) and of the torchattacks
    reference on the same images in the same run (ours first, then theirs, batch by batch in
    alternating order); also ours per stage. x uint8 or float in [0, 1]."""
    from robustprune.attacks.autoattack import AutoAttack

    if len(x) == 0:
        raise UserError("the AutoAttack benchmark needs at least one image")
    device = next(model.parameters()).device
    ours = AutoAttack(eps, norm=norm, version="standard", seed=0)
    theirs = reference_autoattack(model, eps, norm, n_classes)
    seconds = {"robustprune": 0.0, "reference": 0.0}
    robust = {"robustprune": 0, "reference": 0}
    stages: dict[str, float] = {}
    for b, i in enumerate(range(0, len(x), batch_size)):
        xb, yb = to_float(x[i : i + batch_size].to(device)), y[i : i + batch_size].to(device)
        order = ["robustprune", "reference"] if b % 2 == 0 else ["reference", "robustprune"]
        for name in order:
            _sync(device)
            t0 = time.perf_counter()
            if name == "robustprune":
                result = ours.run(model, xb, yb)
                x_adv = result.x_adv
                for stage, sec in result.seconds.items():
                    stages[stage] = stages.get(stage, 0.0) + sec
            else:
                x_adv = theirs(xb, yb)
            _sync(device)
            seconds[name] += time.perf_counter() - t0
            with torch.inference_mode(), frozen_eval(model):
                robust[name] += int((model(x_adv).argmax(1) == yb).sum())
    return {
        "images": len(x),
        "eps": eps,
        "norm": norm,
        "device": str(device),
        "robustprune_accuracy": robust["robustprune"] / len(x),
        "reference_accuracy": robust["reference"] / len(x),
        "robustprune_seconds": seconds["robustprune"],
        "reference_seconds": seconds["reference"],
        "speedup": seconds["reference"] / max(seconds["robustprune"], 1e-9),
        "robustprune_stage_seconds": stages,
    }
