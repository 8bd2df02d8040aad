"""Where tensors live: CUDA when a user has it, else the CPU."""

from __future__ import annotations

from functools import lru_cache

import torch

from robustprune.errors import UserError


def pick_device(name: str = "auto") -> torch.device:
    """'auto' (CUDA when available, else the CPU) or a torch device string, checked before any work."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device '{name}' is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(
                f"--device {name} asks for CUDA, which this machine (or this torch build) does not "
                "have; use --device cpu or auto"
            )
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(
                f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                f"use cuda:0 to cuda:{torch.cuda.device_count() - 1}"
            )
    elif device.type != "cpu":
        raise UserError(f"--device {name}: only cpu and cuda devices are supported; use auto, cpu or cuda:N")
    return device


@lru_cache(maxsize=None)
def cpu_has_bf16_matmul() -> bool:
    """bf16 autocast only pays off on CPUs with AMX; on AVX-512 alone it was ~40 % slower here."""
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


def use_bf16(precision: str, device: torch.device) -> bool:
    if precision == "bf16":
        return True
    if precision == "auto":
        return device.type == "cuda" or cpu_has_bf16_matmul()
    return False
