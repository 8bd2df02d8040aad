"""Wall-clock inference latency, to report the real speed-up of a pruned model over the dense one
(FLOPs and parameters do not show whether the hardware runs the smaller tensors faster).

Threads. torch runs every operator as an OpenMP parallel region whose threads wait for each other
at its end, spinning before they sleep. When other processes keep the cores busy, each region waits
until the scheduler gives every thread of the team a turn, and a forward pass has hundreds of
regions: on a 2-core machine with two busy training workers, ResNet-20 at batch 64 took about
1100 ms with torch's default of 2 threads and 80 ms with 1 thread. Threads beyond the cores
(a CPU quota smaller than the machine, as in a container) cost the same way. So the default thread
count is the number of usable cores (the affinity mask, capped by a cgroup CPU quota) that other
processes leave idle, at least 1; pass `threads` to fix it, e.g. to compare runs on a quiet machine."""

from __future__ import annotations

import gc
import math
import os
import time
from contextlib import contextmanager
from typing import Callable, Iterator

import torch
from torch import nn

clock = time.perf_counter  # (a module attribute, so that tests can replace the clock)
IDLE_SAMPLE_S = 0.2  # how long default_threads watches the cores
IDLE_MARGIN = 0.25  # a core counts as free when at least 75 % of it is idle


def _quantile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default method)."""
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def summarize(times_ms: list[float]) -> dict[str, float]:
    """{'median_ms', 'p10_ms', 'p90_ms'} of a list of timings."""
    s = sorted(times_ms)
    return {"median_ms": _quantile(s, 0.5), "p10_ms": _quantile(s, 0.1), "p90_ms": _quantile(s, 0.9)}


def _cgroup_cpu_limit() -> float | None:
    """Cores allowed by a cgroup CPU quota (v2 cpu.max, else v1 cfs quota), None without one."""
    try:
        with open("/sys/fs/cgroup/cpu.max") as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        with open("/sys/fs/cgroup/cpu/cpu.cfs_quota_us") as f:
            quota = int(f.read())
        with open("/sys/fs/cgroup/cpu/cpu.cfs_period_us") as f:
            period = int(f.read())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def _allowed_cpus() -> set[int] | None:
    try:
        return os.sched_getaffinity(0)
    except (AttributeError, OSError):  # not Linux
        return None


def usable_cores() -> int:
    """Cores this process may run on: its affinity mask (os.cpu_count counts the whole machine),
    capped by a cgroup CPU quota (which the mask does not show)."""
    cpus = _allowed_cpus()
    n = len(cpus) if cpus else (os.cpu_count() or 1)
    limit = _cgroup_cpu_limit()
    if limit is not None:
        n = min(n, max(1, math.ceil(limit)))
    return max(1, n)


def _cpu_times(cpus: set[int]) -> tuple[float, float] | None:
    """(idle, total) jiffies summed over the given CPUs, from /proc/stat."""
    idle = total = 0.0
    try:
        with open("/proc/stat") as f:
            for line in f:
                name, *fields = line.split()
                if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
                    continue
                values = [float(v) for v in fields[:8]]  # user nice system idle iowait irq softirq steal
                idle += values[3] + values[4]
                total += sum(values)
    except (OSError, ValueError, IndexError):
        return None
    return (idle, total) if total > 0 else None


def idle_cores(sample_s: float = IDLE_SAMPLE_S) -> float | None:
    """How many of this process's CPUs sat idle over `sample_s` seconds (None where /proc/stat is missing)."""
    cpus = _allowed_cpus()
    if not cpus:
        return None
    before = _cpu_times(cpus)
    time.sleep(sample_s)
    after = _cpu_times(cpus)
    if before is None or after is None or after[1] <= before[1]:
        return None
    return len(cpus) * (after[0] - before[0]) / (after[1] - before[1])


def default_threads() -> int:
    """The thread count for a measurement: the usable cores that other processes leave idle
    (at least 1). Busy cores would stall every parallel region (see the module's docstring)."""
    usable = usable_cores()
    idle = idle_cores()
    if idle is None:
        return usable
    return max(1, min(usable, int(idle + IDLE_MARGIN)))


@contextmanager
def torch_threads(threads: int) -> Iterator[None]:
    """torch's intra-op thread count set for a block, the previous one restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def time_calls(
    calls: dict[str, Callable[[], object]], warmup: int, repeats: int, sync: Callable[[], None] = lambda: None
) -> dict[str, list[float]]:
    """Milliseconds of each call, `repeats` times, after `warmup` untimed rounds (a thread pool
    starts, and kernels are chosen, on the first calls). The calls take turns, so a change in the
    machine's load slows each of them alike instead of biasing their ratio. The garbage collector
    is paused while timing; sync() ends each call (CUDA runs asynchronously)."""
    if repeats < 1 or warmup < 0:
        raise ValueError("a latency measurement needs repeats >= 1 and warmup >= 0")
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(warmup):
        for call in calls.values():
            call()
    sync()
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for _ in range(repeats):
            for name, call in calls.items():
                start = clock()
                call()
                sync()
                times[name].append((clock() - start) * 1000.0)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def cuda_sync(device: torch.device) -> Callable[[], None]:
    if device.type == "cuda":
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Models in eval mode for a block, each one's train/eval mode restored after it."""
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, was_training in zip(models, modes):
            m.train(was_training)


def measure_latency(
    model: nn.Module, example_input: torch.Tensor, warmup: int = 3, repeats: int = 20, threads: int | None = None
) -> dict[str, float]:
    """Milliseconds per forward pass of `example_input` (a whole batch) through `model`, in eval
    mode under torch.inference_mode, on the device the input is on: {'median_ms', 'p10_ms',
    'p90_ms'} over `repeats` timed runs after `warmup` untimed ones. On CUDA every run is
    bracketed by torch.cuda.synchronize. `threads` sets torch's CPU thread count for the
    measurement (None: default_threads(), the idle usable cores); the previous count and the
    model's train/eval mode are restored afterwards."""
    if repeats < 1 or warmup < 0:
        raise ValueError("measure_latency needs repeats >= 1 and warmup >= 0")
    threads = default_threads() if threads is None else threads
    with torch_threads(threads), eval_mode(model), torch.inference_mode():
        times = time_calls({"model": lambda: model(example_input)}, warmup, repeats, cuda_sync(example_input.device))
    return summarize(times["model"])
