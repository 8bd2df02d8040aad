"""Where tensors live: CUDA when a user has it, else the CPU."""
from __future__ import annotations

from functools import lru_cache

import torch


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


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
