"""Wall-clock inference latency, to report the real speed-up of a pruned model over the dense one
(FLOPs and parameters do not show whether the hardware runs the smaller tensors faster)."""

from __future__ import annotations

import time
from contextlib import contextmanager

import torch
from torch import nn


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default method)."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


@contextmanager
def _num_threads(threads: int | None):
    if threads is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure_latency(
    model: nn.Module, example_input: torch.Tensor, warmup: int = 3, repeats: int = 20, threads: int | None = None
) -> dict[str, float]:
    """Milliseconds per forward pass of `example_input` (a whole batch) through `model`, in eval
    mode under torch.inference_mode, on the device the input is on: {'median_ms', 'p10_ms',
    'p90_ms'} over `repeats` timed runs after `warmup` untimed ones. On CUDA every run is
    bracketed by torch.cuda.synchronize. `threads` sets torch's CPU thread count for the
    measurement (None: leave it). The model's train/eval mode is restored afterwards."""
    if repeats < 1 or warmup < 0:
        raise ValueError("measure_latency needs repeats >= 1 and warmup >= 0")
    cuda = example_input.device.type == "cuda"

    def sync():
        if cuda:
            torch.cuda.synchronize(example_input.device)

    was_training = model.training
    model.eval()
    times = []
    try:
        with _num_threads(threads), torch.inference_mode():
            for _ in range(warmup):
                model(example_input)
            sync()
            for _ in range(repeats):
                start = time.perf_counter()
                model(example_input)
                sync()
                times.append((time.perf_counter() - start) * 1000.0)
    finally:
        model.train(was_training)
    times.sort()
    return {"median_ms": _quantile(times, 0.5), "p10_ms": _quantile(times, 0.1), "p90_ms": _quantile(times, 0.9)}
