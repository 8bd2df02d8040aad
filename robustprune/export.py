"""ONNX export, checked against PyTorch, and the measured speed-up of a pruned model over the dense
one under PyTorch and onnxruntime (the optional extra: pip install -e ".[onnx]").

Why a pruned model can show no speed-up (measured on a 2-core AVX-512 Xeon, 1 thread):

- masks: a model pruned by masks (zeroed weights, torch.nn.utils.prune) has every channel still
  there, and runs at the dense model's speed in torch and in onnxruntime alike; only physically
  removed channels (robustprune.pruning.structured.prune_filters_) make smaller tensors;
- batch 1: a small network (ResNet-20 on 32x32 images, under 1 ms in onnxruntime) spends much of
  a single image's time on work that does not shrink with its width: launching each operator,
  waking threads, copying the input and output. A large batch amortises it. The report estimates
  this fixed part from the two batch sizes (time at batch 1 minus the per-image time at the large
  one) and says when it dominates;
- channel blocks: onnxruntime's fast CPU convolutions (its NCHWc layout, at graph optimisation
  level ALL) work on blocks of 16 channels with AVX-512 (8 with AVX2). Filter pruning at 30 %
  leaves ResNet-20 with 11/22/45 filters per stage instead of 16/32/64, and its convolutions fall
  back to the generic path with layout reorders around them. At batch 64 on one thread the dense
  model took 58 ms with the NCHWc layout and 158 ms without; the pruned one 79 ms either way:
  half the FLOPs, but slower than the dense model. ResNet-20 at widths 8/16/32 (whole blocks) ran
  1.8x faster than at 16/32/64, at 12/24/48 no faster. The report counts the pruned convolutions
  whose widths are not multiples of 16; rounding the kept filters to whole blocks is the remedy."""

from __future__ import annotations

import copy
import io
import logging
import math
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from robustprune.errors import UserError, closest, excerpt
from robustprune.files import atomic_write
from robustprune.metrics.latency import cuda_sync, default_threads, eval_mode, summarize, time_calls, torch_threads

NEEDS_EXTRA = 'ONNX export needs the onnx extra; install it with pip install -e ".[onnx]"'
RTOL = 1e-4  # largest difference allowed, relative to the largest output (at least 1)
CHECK_BATCH = 3  # random inputs checked; a size other than the export's tests the dynamic batch axis
WHERE = "the path given to export_onnx"  # what write failures tell the user to change
RUNTIMES = ("torch", "onnxruntime", "both")
EXPORTERS = ("auto", "torchscript", "dynamo")
CHANNEL_BLOCK = 16  # channels per block of onnxruntime's CPU convolutions with AVX-512


def _require_onnx():
    """onnxruntime, or one sentence on how to install it."""
    try:
        import onnx  # noqa: F401  (the exporters need it)
        import onnxruntime
    except ImportError:
        raise UserError(NEEDS_EXTRA) from None
    return onnxruntime


def _as_tuple(example_inputs) -> tuple[torch.Tensor, ...]:
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not inputs or not all(isinstance(x, torch.Tensor) and x.dim() >= 1 for x in inputs):
        raise UserError("example_inputs must be a tensor or a tuple of tensors, each with a batch dimension")
    return inputs


def _batch(inputs: tuple[torch.Tensor, ...], n: int) -> tuple[torch.Tensor, ...]:
    """Each input's first item repeated n times (a batch of identical items times as any other)."""
    return tuple(x[:1].repeat(n, *([1] * (x.dim() - 1))) for x in inputs)


def _random_like(inputs: tuple[torch.Tensor, ...], n: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """n random items in each input's value range (images in [0, 1] stay in it; ids stay ids)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for x in inputs:
        lo, hi = x.min().item(), x.max().item()
        shape = (n, *x.shape[1:])
        if x.dtype.is_floating_point:
            lo, hi = (0.0, 1.0) if lo == hi else (lo, hi)
            out.append((lo + (hi - lo) * torch.rand(shape, generator=g)).to(x.dtype))
        elif x.dtype == torch.bool:
            out.append(torch.rand(shape, generator=g) < 0.5)
        else:
            out.append(torch.randint(int(lo), int(hi) + 1, shape, generator=g).to(x.dtype))
    return tuple(out)


def _flat(outputs) -> list[np.ndarray]:
    if isinstance(outputs, torch.Tensor):
        return [outputs.detach().cpu().numpy()]
    if isinstance(outputs, (tuple, list)):
        return [a for o in outputs for a in _flat(o)]
    raise UserError(f"export_onnx supports models that return tensors, or tuples of them, not {type(outputs).__name__}")


def _numpy(inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    return [x.detach().cpu().contiguous().numpy() for x in inputs]


@contextmanager
def _quiet() -> Iterator[None]:
    """The exporters warn about tracing and deprecations and log optional operators they skip;
    the check against PyTorch is what tells whether the export is right."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _torchscript_export(model, inputs, opset, dynamic_batch) -> bytes:
    names = [f"input_{i}" for i in range(len(inputs))] if len(inputs) > 1 else ["input"]
    with torch.no_grad():
        n_out = len(_flat(model(*inputs)))
    outs = [f"output_{i}" for i in range(n_out)] if n_out > 1 else ["output"]
    axes = {name: {0: "batch"} for name in names + outs} if dynamic_batch else None
    buf = io.BytesIO()
    torch.onnx.export(
        model, inputs, buf, dynamo=False, opset_version=opset, input_names=names, output_names=outs, dynamic_axes=axes
    )
    return buf.getvalue()


def _dynamo_export(model, inputs, opset, dynamic_batch) -> bytes:
    shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch")
        shapes = tuple({0: batch} for _ in inputs)
    program = torch.onnx.export(model, inputs, dynamo=True, opset_version=opset, dynamic_shapes=shapes, verbose=False)
    return program.model_proto.SerializeToString()


_EXPORT: dict[str, Callable[..., bytes]] = {"torchscript": _torchscript_export, "dynamo": _dynamo_export}


def _session(ort, model_bytes: bytes, threads: int, cuda: bool = False):
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3  # errors only
    providers = ["CPUExecutionProvider"]
    if cuda and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    return ort.InferenceSession(model_bytes, options, providers=providers)


def _feed(session, arrays: list[np.ndarray]) -> dict[str, np.ndarray]:
    return {i.name: a for i, a in zip(session.get_inputs(), arrays)}


def _max_difference(ort, model_bytes: bytes, model: nn.Module, batches: list[tuple[torch.Tensor, ...]]) -> float:
    """The largest |onnxruntime - PyTorch| over the batches, relative to the outputs' scale (at least 1)."""
    session = _session(ort, model_bytes, threads=1)
    worst = 0.0
    for inputs in batches:
        with torch.no_grad():
            expected = _flat(model(*inputs))
        got = session.run(None, _feed(session, _numpy(inputs)))
        if len(got) != len(expected) or any(g.shape != e.shape for g, e in zip(got, expected)):
            return math.inf
        for g, e in zip(got, expected):
            scale = max(1.0, float(np.abs(e).max(initial=0.0)))
            diff = float(np.abs(g.astype(np.float64) - e.astype(np.float64)).max(initial=0.0))
            worst = max(worst, diff / scale if math.isfinite(diff) else math.inf)
    return worst


def _summary(e: BaseException) -> str:
    """The root cause of an exporter's (often very long) error: the torch.export-based exporter
    lists the chain of exceptions as '<class ...>: message' lines, the innermost first."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    chain = [ln.split(">: ", 1)[-1] for ln in lines if ln.startswith("<class") and ">: " in ln]
    return excerpt((chain or lines or [type(e).__name__])[0], 160)


def _export_checked(
    model: nn.Module, inputs: tuple[torch.Tensor, ...], opset: int | None, check: bool, dynamic_batch: bool, exporter
) -> bytes:
    """ONNX bytes of `model` (eval mode, on the CPU), checked against PyTorch when asked. 'auto'
    tries the TorchScript exporter first (about 0.2 s for a ResNet-20, and present in every torch
    this project supports), then the torch.export-based one (about 5 s, needs onnxscript; it also
    takes over where the first one is gone or gives a wrong graph)."""
    if exporter not in EXPORTERS:
        raise UserError(f"unknown ONNX exporter '{excerpt(exporter)}'; {closest(str(exporter), EXPORTERS)}")
    ort = _require_onnx()
    if dynamic_batch and inputs[0].shape[0] == 1:
        inputs = _batch(inputs, 2)  # torch.export fixes a dimension of size 1 to that size
    checks = [inputs, _random_like(inputs, CHECK_BATCH if dynamic_batch else inputs[0].shape[0])]
    failures = []
    for name in ("torchscript", "dynamo") if exporter == "auto" else (exporter,):
        try:
            with _quiet():
                data = _EXPORT[name](model, inputs, opset, dynamic_batch)
            if not check:
                return data
            diff = _max_difference(ort, data, model, checks)
        except (UserError, MemoryError):
            raise
        except Exception as e:  # noqa: BLE001  (any exporter or runtime failure: try the next exporter)
            failures.append(f"{name} exporter: {_summary(e)}")
            continue
        if diff <= RTOL:
            return data
        failures.append(
            f"{name} exporter: onnxruntime's outputs differ from PyTorch's by up to {diff:.3g} "
            f"of their scale (allowed {RTOL:g})"
        )
    raise UserError(f"cannot export {type(model).__name__} to ONNX ({'; '.join(failures)})")


def _cpu_copy(model: nn.Module) -> nn.Module:
    """The model itself on the CPU, or a CPU copy of a model elsewhere (onnxruntime checks on the
    CPU, where a GPU's TF32 convolutions would count as a mismatch)."""
    on_cpu = all(t.device.type == "cpu" for t in [*model.parameters(), *model.buffers()])
    return model if on_cpu else copy.deepcopy(model).cpu()


def export_onnx(
    model: nn.Module,
    path: str | Path,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    *,
    opset: int | None = None,
    check: bool = True,
    dynamic_batch: bool = True,
    exporter: str = "auto",
) -> Path:
    """Write `model` (in eval mode) as an ONNX file at `path` and return the path.

    example_inputs: a tensor, or a tuple of the forward's tensors, with a batch dimension first.
    dynamic_batch: the file takes any batch size (the first dimension of every input and output).
    check: run the file in onnxruntime on the example inputs and on a batch of random inputs in
    their value range, and refuse it (UserError, with the largest difference) when an output
    differs from PyTorch's by more than 1e-4 of the outputs' scale. exporter: 'auto' (the
    TorchScript exporter, then the torch.export-based one if that fails or mismatches),
    'torchscript' or 'dynamo'. opset: the ONNX opset (None: the exporter's default).

    The file is written to a temporary name and renamed, so it is whole or absent; the model's
    train/eval mode is restored. Needs the onnx extra (pip install -e ".[onnx]")."""
    inputs = _as_tuple(example_inputs)
    cpu_model = _cpu_copy(model)
    with eval_mode(model, cpu_model):
        data = _export_checked(cpu_model, tuple(x.cpu() for x in inputs), opset, check, dynamic_batch, exporter)
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), WHERE)


# ---- latency ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class LatencyEntry:
    """One runtime at one batch size: milliseconds per forward pass of the whole batch (medians)."""

    runtime: str
    batch: int
    dense_ms: float
    pruned_ms: float | None = None
    dense_spread: tuple[float, float] = (math.nan, math.nan)  # (p10, p90)
    pruned_spread: tuple[float, float] | None = None

    @property
    def speedup(self) -> float | None:
        """dense / pruned median time: above 1 when the pruned model is faster."""
        return None if self.pruned_ms is None else self.dense_ms / self.pruned_ms


@dataclass
class LatencyReport:
    """Latency of a dense model (and a pruned one) per runtime and batch size; str() is a table."""

    threads: int
    repeats: int
    device: str
    entries: list[LatencyEntry]
    notes: list[str] = field(default_factory=list)

    def entry(self, runtime: str, batch: int) -> LatencyEntry:
        for e in self.entries:
            if e.runtime == runtime and e.batch == batch:
                return e
        raise KeyError((runtime, batch))

    def speedup(self, runtime: str, batch: int) -> float | None:
        return self.entry(runtime, batch).speedup

    def table(self) -> str:
        pruned = any(e.pruned_ms is not None for e in self.entries)
        head = ["runtime", "batch", "dense ms", "p10-p90"] + (["pruned ms", "p10-p90", "speed-up"] if pruned else [])
        rows = []
        for e in self.entries:
            row = [e.runtime, str(e.batch), f"{e.dense_ms:.3f}", f"{e.dense_spread[0]:.2f}-{e.dense_spread[1]:.2f}"]
            if pruned:
                if e.pruned_ms is None:
                    row += ["", "", ""]
                else:
                    lo, hi = e.pruned_spread or (math.nan, math.nan)
                    row += [f"{e.pruned_ms:.3f}", f"{lo:.2f}-{hi:.2f}", f"{e.speedup:.2f}x"]
            rows.append(row)
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
        lines = [
            f"latency on {self.device}, {self.threads} thread(s), median of {self.repeats} runs per cell",
            "  ".join(h.rjust(w) for h, w in zip(head, widths)),
            "  ".join("-" * w for w in widths),
            *("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows),
        ]
        return "\n".join(lines + [f"note: {n}" for n in self.notes])

    __str__ = table

    def to_dict(self) -> dict[str, Any]:
        return {
            "threads": self.threads,
            "repeats": self.repeats,
            "device": self.device,
            "entries": [
                {
                    "runtime": e.runtime,
                    "batch": e.batch,
                    "dense_ms": e.dense_ms,
                    "dense_p10_ms": e.dense_spread[0],
                    "dense_p90_ms": e.dense_spread[1],
                    "pruned_ms": e.pruned_ms,
                    "pruned_p10_ms": None if e.pruned_spread is None else e.pruned_spread[0],
                    "pruned_p90_ms": None if e.pruned_spread is None else e.pruned_spread[1],
                    "speedup": e.speedup,
                }
                for e in self.entries
            ],
            "notes": list(self.notes),
        }


def _model_device(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def _channels_last(model: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Images channels-last when the model's first convolution stores its weights so (as the
    project's models do), so the timing includes no layout conversion the model would not do."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    if conv is None or not conv.weight.is_contiguous(memory_format=torch.channels_last):
        return inputs
    return tuple(x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x for x in inputs)


def _check_latency_args(runtime, batch_sizes, repeats, warmup, threads) -> tuple[int, ...]:
    if runtime not in RUNTIMES:
        raise UserError(f"unknown latency runtime '{excerpt(runtime)}'; {closest(str(runtime), RUNTIMES)}")
    sizes = tuple(batch_sizes)
    if not sizes or any(isinstance(b, bool) or not isinstance(b, int) or b < 1 for b in sizes):
        raise UserError(f"batch_sizes must be whole numbers of at least 1, got {excerpt(batch_sizes)}")
    for name, value, low in (("repeats", repeats, 1), ("warmup", warmup, 0), ("threads", threads, 1)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
            raise UserError(f"{name} must be a whole number of at least {low}, got {excerpt(value)}")
    return sizes


def _time_torch(models, inputs, sizes, warmup, repeats, threads) -> dict[int, dict[str, list[float]]]:
    device = inputs[0].device
    out = {}
    with torch_threads(threads), eval_mode(*models.values()), torch.inference_mode():
        for b in sizes:
            batch = {name: _channels_last(m, _batch(inputs, b)) for name, m in models.items()}
            calls = {name: (lambda m=m, x=batch[name]: m(*x)) for name, m in models.items()}
            out[b] = time_calls(calls, warmup, repeats, cuda_sync(device))
    return out


def _time_ort(models, inputs, sizes, warmup, repeats, threads, opset) -> dict[int, dict[str, list[float]]]:
    ort = _require_onnx()
    cuda = inputs[0].device.type == "cuda"
    sessions = {}
    for name, m in models.items():
        cpu_model = _cpu_copy(m)
        with eval_mode(m, cpu_model):
            data = _export_checked(cpu_model, tuple(x.cpu() for x in inputs), opset, True, True, "auto")
        sessions[name] = _session(ort, data, threads, cuda)
    out = {}
    for b in sizes:
        arrays = _numpy(_batch(tuple(x.cpu() for x in inputs), b))
        feeds = {name: _feed(s, arrays) for name, s in sessions.items()}
        calls = {name: (lambda s=s, f=feeds[name]: s.run(None, f)) for name, s in sessions.items()}
        out[b] = time_calls(calls, warmup, repeats)
    return out


def _param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _unaligned_convs(model: nn.Module) -> tuple[int, int]:
    """(convolutions whose filter count is not a multiple of CHANNEL_BLOCK, all convolutions)."""
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return sum(c.out_channels % CHANNEL_BLOCK != 0 for c in convs), len(convs)


def _notes(model: nn.Module, pruned: nn.Module | None, entries: list[LatencyEntry]) -> list[str]:
    """Why a speed-up may be missing, from the models and the measurements themselves."""
    notes = []
    if pruned is not None and _param_count(pruned) >= _param_count(model):
        notes.append(
            "the pruned model has as many parameters as the dense one: masked (zeroed) weights run at the "
            "dense speed; remove the channels physically (prune_filters_) to make it faster"
        )
    if pruned is not None and any(e.runtime == "onnxruntime" for e in entries):
        odd, n = _unaligned_convs(pruned)
        if odd > _unaligned_convs(model)[0]:
            notes.append(
                f"{odd} of the pruned model's {n} convolutions have a number of filters that is not a multiple of "
                f"{CHANNEL_BLOCK}: onnxruntime's fast convolutions work on blocks of {CHANNEL_BLOCK} channels (8 "
                "without AVX-512) and run these padded or on their slower generic path; keep whole blocks of filters"
            )
    for runtime in dict.fromkeys(e.runtime for e in entries):
        mine = sorted((e for e in entries if e.runtime == runtime), key=lambda e: e.batch)
        if len(mine) < 2 or mine[0].batch != 1:
            continue
        one, big = mine[0], mine[-1]
        fixed = one.dense_ms - big.dense_ms / big.batch  # batch 1 time not spent on the image itself
        if fixed > 0.5 * one.dense_ms:
            notes.append(
                f"{runtime} at batch 1: about {fixed:.2f} of {one.dense_ms:.2f} ms is fixed per-call overhead "
                f"(operator launches, thread wake-ups, copies) that pruning does not shrink; batch {big.batch} "
                "shows the compute speed-up"
            )
    return notes


def latency(
    model: nn.Module,
    pruned: nn.Module | None = None,
    *,
    example_inputs: torch.Tensor | Sequence[torch.Tensor],
    runtime: str = "torch",
    batch_sizes: Sequence[int] = (1, 64),
    repeats: int = 20,
    warmup: int = 3,
    threads: int | None = None,
    opset: int | None = None,
) -> LatencyReport:
    """Measured latency of `model` and, if given, `pruned`, with their speed-up (dense / pruned).

    runtime: 'torch', 'onnxruntime' (each model exported with export_onnx's checks) or 'both'.
    For each batch size a batch is made by repeating the first item of each example input; each
    figure is the median of `repeats` timed forward passes after `warmup` untimed ones, the two
    models taking turns so a change in the machine's load biases neither. threads: torch's and
    onnxruntime's intra-op threads (None: the usable cores that other processes leave idle, see
    robustprune.metrics.latency); torch's previous count and both models' train/eval mode are
    restored. Models on CUDA are timed with torch.cuda.synchronize, and onnxruntime uses its CUDA
    provider when installed (else the CPU; its times then include the copies of the batch).

    A pruned model by masks, or one small enough that fixed per-call costs dominate at batch 1,
    shows little speed-up; the report's notes say so (see this module's docstring)."""
    sizes = _check_latency_args(runtime, batch_sizes, repeats, warmup, threads)
    inputs = _as_tuple(example_inputs)
    if runtime != "torch":
        _require_onnx()  # before any timing, not after the torch half
    threads = default_threads() if threads is None else threads
    models = {"dense": model} if pruned is None else {"dense": model, "pruned": pruned}
    measured: dict[str, dict[int, dict[str, list[float]]]] = {}
    if runtime in ("torch", "both"):
        measured["torch"] = _time_torch(models, inputs, sizes, warmup, repeats, threads)
    if runtime in ("onnxruntime", "both"):
        measured["onnxruntime"] = _time_ort(models, inputs, sizes, warmup, repeats, threads, opset)
    entries = []
    for rt, per_batch in measured.items():
        for b in sizes:
            d = summarize(per_batch[b]["dense"])
            p = summarize(per_batch[b]["pruned"]) if pruned is not None else None
            entries.append(
                LatencyEntry(
                    runtime=rt,
                    batch=b,
                    dense_ms=d["median_ms"],
                    pruned_ms=None if p is None else p["median_ms"],
                    dense_spread=(d["p10_ms"], d["p90_ms"]),
                    pruned_spread=None if p is None else (p["p10_ms"], p["p90_ms"]),
                )
            )
    device = str(inputs[0].device)
    return LatencyReport(threads, repeats, device, entries, _notes(model, pruned, entries))
