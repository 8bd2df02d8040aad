from __future__ import annotations

import contextlib

import torch
from torch import nn

from robustprune.attacks.registry import ATTACKS, build_attack  # noqa: F401  (still importable from here)
from robustprune.errors import UserError
from robustprune.tensors import to_float


@contextlib.contextmanager
def frozen_eval(model: nn.Module):
    """Eval mode (BatchNorm statistics never change) and no weight gradients during an attack; conv
    weights in channels-last layout for its duration (oneDNN's input gradient of a small CNN is 2x
    faster on a CPU that way), restored afterwards."""
    was_training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    # by stride, not is_contiguous: a 1-channel NCHW weight counts as channels-last to torch, but
    # oneDNN takes the slow path for it (and .contiguous() would return it unchanged)
    relaid = [(m, m.weight.data) for m in model.modules() if isinstance(m, nn.Conv2d) and m.weight.stride(1) != 1]
    for m, w in relaid:
        m.weight.data = torch.empty_like(w, memory_format=torch.channels_last).copy_(w)
    try:
        yield model
    finally:
        for m, w in relaid:  # the weights did not change (no gradients): put the originals back
            m.weight.data = w
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
        model.train(was_training)


PRECISIONS = ("fp32", "bf16", "auto")


def check_precision(attack: str, precision) -> str:
    if precision not in PRECISIONS:
        raise UserError(
            f"{attack} precision must be fp32, bf16 or auto (bf16 where the device multiplies it "
            f"natively), got {precision!r}"
        )
    return precision


def attack_autocast(precision: str, device: torch.device):
    """The autocast of an attack's iterations: bf16 for precision 'bf16', or 'auto' on a device that
    multiplies bf16 natively; none for 'fp32'. Whatever it is, every point an attack returns as
    adversarial has been checked on the fp32 model (norms.verified)."""
    from robustprune.device import use_bf16

    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16(precision, device))


def check_image_range(x: torch.Tensor) -> None:
    """Raise UserError unless every value of x lies in [0, 1] (the attacks' pixel space)."""
    if x.numel() == 0:
        return
    lo, hi = (float(v) for v in torch.aminmax(x.detach()))
    if not (lo >= 0 and hi <= 1):  # written so that NaN fails too
        raise UserError(
            f"images must be in [0, 1], got values in [{lo:.4g}, {hi:.4g}]; divide uint8 images "
            f"by 255 (robustprune.train.to_float), since normalisation belongs inside the model"
        )


def adversarial_accuracy(
    model: nn.Module,
    attack,
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int = 1000,
    record: dict | None = None,
    name: str | None = None,
) -> float:
    """Accuracy on attack(model, x, y), batch by batch; x uint8 or float in [0, 1]. With `record`,
    record[name] keeps which images stayed correct."""
    if len(x) == 0:
        return float("nan")
    device = next(model.parameters()).device
    hits = []
    for i in range(0, len(x), batch_size):
        xb, yb = to_float(x[i : i + batch_size].to(device)), y[i : i + batch_size].to(device)
        x_adv = attack(model, xb, yb)
        with torch.inference_mode(), frozen_eval(model):
            hits.append((model(x_adv).argmax(1) == yb).cpu())
    hits = torch.cat(hits)
    if record is not None:
        record[name] = hits
    return int(hits.sum()) / len(x)
