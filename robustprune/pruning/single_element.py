"""Algorithm 2 of Jordão & Pedrini (Fig. 5): remove one element (a filter or a residual block) at a
time from the unpruned network, with no fine-tuning, and measure the network without it; then
count the elements whose removal improves robustness at a generalization loss of at most
{0, ..., 5} percentage points.

Filters. An element is one output channel of a Torch-Pruning group: the filter of a convolution
together with everything coupled to it (its BatchNorm channel, the input channel of the next
layer, flatten -> linear included, and, in a residual stage, the same channel of every layer whose
output is added to it, which is one element, listed under the first convolution in module order).
Two ways to remove it, which give the same network function:
  - "hook": a forward hook zeroes the channel at the output of every producer of the group (the
    BatchNorm after a convolution, else the convolution itself, so its bias goes too). When every
    consumer of the channel mixes channels (a non-grouped convolution or a linear layer reading it)
    and every operation in between maps 0 to 0 (ReLU, pooling, addition of two zeroed channels,
    flatten, ...), the consumers see exactly what they would see with the channel removed. No copy
    of the model; hooks are registered once and removed at the end.
  - "physical": a deep copy of the model with the group's channels removed by Torch-Pruning's
    pruning functions (the dependency graph is built once, on the original model).
`method="auto"` checks each group's layers and operations against those rules and uses hooks
where they hold, else physical removal (e.g. depthwise convolutions, whose zeroed input channel
still gets a bias). With `verify=True` it also compares the two on `example_input` for the first
filter of every hook-removed group, and falls back to physical removal for that group if they
differ; pass real images as `example_input`, since a zero image can hide a difference.

Blocks. An element is a residual block with an identity shortcut (`ResidualBlock.removable`);
it is replaced by nn.Identity while it is measured. Blocks with a projection shortcut cannot go
(the paper's footnote 2: mismatching feature maps) and are not elements.

Elements whose removal would leave a layer without filters (a convolution with one filter) are
skipped. The model is measured in place (hooks, a swapped block) and restored afterwards."""

from __future__ import annotations

import copy
import math
import random
import re
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning import _helpers

from robustprune.models.blocks import residual_blocks
from robustprune.pruning.structured import conv_layers

Evaluate = Callable[[nn.Module], Mapping[str, float]]

# Element-wise operations (grad_fn names without "Backward<n>", lower case) that map a zero channel
# to a zero channel; a group whose channel passes through anything else is removed physically.
# Autograd names "x + y" and "x + 1" alike (AddBackward0); the second does not keep 0 at 0, and the
# numerical check of `verify` is what catches it.
_ZERO_PRESERVING = {
    "relu",
    "hardtanh",
    "silu",
    "gelu",
    "hardswish",
    "elu",
    "selu",
    "celu",
    "leakyrelu",
    "tanh",
    "threshold",
    "add",
    "sub",
    "mul",
    "neg",
    "maxpool2dwithindices",
    "maxpool2d",
    "avgpool2d",
    "adaptiveavgpool2d",
    "adaptivemaxpool2d",
    "mean",
    "sum",
    "max",
    "amax",
    "view",
    "t",
    "unsafeview",
    "reshapealias",
    "flatten",
    "permute",
    "transpose",
    "clone",
    "cat",
    "split",
    "splitwithsizes",
    "slice",
    "select",
    "squeeze",
    "unsqueeze",
    "expand",
    "alias",
    "asstrided",
    "tocopy",
}
_PASS_THROUGH_OPS = ("RESHAPE", "CONCAT", "SPLIT", "SLICE", "UNBIND", "EXPAND")


def _keeps_zero(grad_fn) -> bool:
    """grad_fn: its name (Torch-Pruning keeps a string) or the autograd node itself."""
    name = (grad_fn if isinstance(grad_fn, str) else type(grad_fn).__name__).lower()
    return re.sub(r"backward\d*$", "", name) in _ZERO_PRESERVING


class _ZeroChannels:
    """Forward hook: when `idx` is set, the output with those channels (dim 1) set to 0."""

    def __init__(self):
        self.idx: torch.Tensor | None = None

    def __call__(self, module, inputs, output):
        if self.idx is None:
            return None
        return output.index_fill(1, self.idx.to(output.device), 0.0)


@dataclass
class _FilterGroup:
    """The coupled layers of one family of elements, named after its first convolution."""

    name: str
    conv: nn.Conv2d
    coupled: list[str]  # convolutions that lose a filter
    method: str  # hook, physical or reference
    reason: str  # why hooks would not be exact ('' when they are)
    terminals: list[str]  # modules whose output the hooks zero


def _op_type(dep) -> str:
    return dep.target.type.name if hasattr(dep.target.type, "name") else str(dep.target.type)


def _analyse(graph: tp.DependencyGraph, group, names: dict) -> tuple[list[str], list[str], str]:
    """(convs losing a filter, modules to hook, '' if hooks are exact else why not) for one group."""
    coupled, outs, reason = [], {}, ""
    for dep, _ in group:
        m = dep.target.module
        out = graph.is_out_channel_pruning_fn(dep.handler)
        if m in names:
            if isinstance(m, nn.Conv2d) and m.groups == 1:
                if out:
                    coupled.append(names[m])
                    outs[names[m]] = m
            elif isinstance(m, nn.BatchNorm2d) and out:
                outs[names[m]] = m
            elif isinstance(m, nn.Linear) and not out:
                pass
            else:
                reason = reason or f"{type(m).__name__} '{names[m]}' is coupled to the channel"
        else:
            kind = _op_type(dep)
            if kind == "ELEMENTWISE":
                fn = getattr(m, "_grad_fn", None)
                if not _keeps_zero(fn):
                    reason = reason or f"the channel passes through {fn}, which may not keep 0 at 0"
            elif kind not in _PASS_THROUGH_OPS:
                reason = reason or f"the channel passes through a {kind} operation"
    # Hook at the BatchNorm after a convolution, else at the convolution (its bias included).
    terminals = []
    for name, m in outs.items():
        node = graph.module2node[m]
        nxt = [o.module for o in node.outputs]
        if isinstance(m, nn.Conv2d) and any(
            isinstance(o, nn.BatchNorm2d) and o in names and names[o] in outs for o in nxt
        ):
            if len(nxt) > 1:
                reason = reason or f"the output of '{name}' feeds its BatchNorm and other layers"
            continue
        terminals.append(name)
    return coupled, terminals, reason


def _filter_groups(
    model: nn.Module, graph: tp.DependencyGraph, layers: Iterable[str] | None, method: str
) -> list[_FilterGroup]:
    names = {m: n for n, m in model.named_modules()}
    wanted = set(layers) if layers is not None else None
    covered: set[str] = set()
    groups = []
    for name, conv in conv_layers(model):
        if name in covered:
            continue
        group = graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=[0])
        coupled, terminals, reason = _analyse(graph, group, names)
        covered.update(coupled)
        if wanted is not None and not wanted.intersection(coupled):
            continue
        if any(_op_type(dep) == "PARAMETER" for dep, _ in group):
            chosen = "reference"  # unwrapped nn.Parameter: only Torch-Pruning's own group.prune handles it
        elif method == "auto":
            chosen = "physical" if reason else "hook"
        else:
            chosen = method
        if chosen == "hook" and reason:
            raise ValueError(
                f"filters of '{name}' cannot be removed with hooks: {reason}; use method='physical' or 'auto'"
            )
        groups.append(_FilterGroup(name, conv, coupled, chosen, reason, terminals))
    if wanted is not None and (missing := wanted - covered):
        raise ValueError(
            f"no prunable convolution named {', '.join(sorted(missing))}; "
            f"known: {', '.join(n for n, _ in conv_layers(model))}"
        )
    return groups


def _physical_copy(model: nn.Module, graph: tp.DependencyGraph, group) -> nn.Module:
    """A deep copy of the model with the group removed: Torch-Pruning's pruning functions applied to
    the copy's modules of the same names (what group.prune() does to the original)."""
    clone = copy.deepcopy(model)
    modules = dict(clone.named_modules())
    for dep, idxs in group:
        name = graph._module2name.get(dep.target.module)
        if name is None:  # an operation node of the graph, not a layer: nothing to remove
            continue
        if len(idxs) > 0 and isinstance(idxs[0], _helpers._HybridIndex):
            idxs = _helpers.to_plain_idxs(idxs)
        dep.handler.__self__.pruning_dim = dep.target.pruning_dim
        dep.handler(modules[name], idxs)
    return clone


def remove_filter_copy(model: nn.Module, layer: str, index: int, example_input: torch.Tensor) -> nn.Module:
    """A deep copy of the model without filter `index` of convolution `layer` (and everything
    coupled to it), through Torch-Pruning's own dependency graph built on the copy (the reference
    the faster paths are checked against)."""
    clone = copy.deepcopy(model).eval()
    with torch.enable_grad():  # Torch-Pruning traces the graph through autograd
        graph = tp.DependencyGraph().build_dependency(clone, example_inputs=example_input)
    conv = dict(clone.named_modules())[layer]
    graph.get_pruning_group(conv, tp.prune_conv_out_channels, idxs=[index]).prune()
    return clone


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = max(1.0, float(a.abs().max())) if a.numel() else 1.0
    return a.shape == b.shape and bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5 * scale))


def _pick(elements: list, max_elements: int | None, seed: int) -> list:
    if max_elements is None or max_elements >= len(elements):
        return elements
    keep = sorted(random.Random(seed).sample(range(len(elements)), max_elements))
    return [elements[i] for i in keep]


def single_element_study(
    model: nn.Module,
    kind: str,
    evaluate: Evaluate,
    example_input: torch.Tensor,
    layers: Iterable[str] | None = None,
    max_elements: int | None = None,
    *,
    method: str = "auto",
    verify: bool = True,
    seed: int = 0,
    on_element: Callable[[int, int, dict], None] | None = None,
) -> list[dict]:
    """Algorithm 2: for every element e (kind "filters" or "blocks"), evaluate(model without e) with
    no adjustment. Returns one row per element, in module order:
    {element, kind, layer, index, method, coupled (convolutions losing a filter; filters only),
    **evaluate(...)}; `element` is "layer:index" for a filter and the block's name for a block.

    layers: only these convolutions (a coupled group is included when any of its convolutions is
    named) or these blocks. max_elements: a uniform sample of that many elements drawn with `seed`
    (kept in module order), for a quick estimate of the fractions. method: "auto", "hook" or
    "physical" (filters; see the module docstring). on_element(i, n, row) reports progress.
    The baseline is evaluate(model) on the unchanged model; call it yourself."""
    if kind in ("filter", "filters"):
        return _filters(model, evaluate, example_input, layers, max_elements, method, verify, seed, on_element)
    if kind in ("block", "blocks", "layer", "layers"):
        return _blocks(model, evaluate, layers, max_elements, seed, on_element)
    raise ValueError(f"kind must be 'filters' or 'blocks', got {kind!r}")


def _filters(model, evaluate, example_input, layers, max_elements, method, verify, seed, on_element):
    if method not in ("auto", "hook", "physical"):
        raise ValueError(f"method must be 'auto', 'hook' or 'physical', got {method!r}")
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():  # Torch-Pruning traces the graph through autograd
            graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
        groups = _filter_groups(model, graph, layers, method)
    finally:
        model.train(was_training)
    modules = dict(model.named_modules())
    zeroers: dict[str, _ZeroChannels] = {}
    handles = []
    try:
        groups = [g for g in groups if g.conv.out_channels > 1]  # one filter: removing it empties the layer
        for g in groups:
            if g.method != "hook":
                continue
            for t in g.terminals:
                if t not in zeroers:
                    zeroers[t] = _ZeroChannels()
                    handles.append(modules[t].register_forward_hook(zeroers[t]))
            if verify and not _hook_matches_physical(model, graph, g, zeroers, example_input):
                if method == "hook":
                    raise ValueError(
                        f"removing a filter of '{g.name}' with hooks does not give the network "
                        f"without it; use method='physical' or 'auto'"
                    )
                warnings.warn(
                    f"filters of '{g.name}': hooks differ from physical removal; removing them physically",
                    RuntimeWarning,
                    stacklevel=3,
                )
                g.method = "physical"
        elements = [(g, i) for g in groups for i in range(g.conv.out_channels)]
        elements = _pick(elements, max_elements, seed)
        rows = []
        for k, (g, i) in enumerate(elements):
            if g.method == "hook":
                group = graph.get_pruning_group(g.conv, tp.prune_conv_out_channels, idxs=[i])
                metrics = _evaluate_hooked(model, graph, group, zeroers, evaluate)
            elif g.method == "physical":
                group = graph.get_pruning_group(g.conv, tp.prune_conv_out_channels, idxs=[i])
                metrics = evaluate(_physical_copy(model, graph, group))
            else:
                metrics = evaluate(remove_filter_copy(model, g.name, i, example_input))
            row = {
                "element": f"{g.name}:{i}",
                "kind": "filter",
                "layer": g.name,
                "index": i,
                "method": g.method,
                "coupled": len(g.coupled),
                **dict(metrics),
            }
            rows.append(row)
            if on_element is not None:
                on_element(k + 1, len(elements), row)
        return rows
    finally:
        for h in handles:
            h.remove()


def _set_zero(graph, group, zeroers, on: bool) -> None:
    for dep, idxs in group:
        name = graph._module2name.get(dep.target.module)
        if name in zeroers and graph.is_out_channel_pruning_fn(dep.handler):
            plain = _helpers.to_plain_idxs(idxs) if idxs and isinstance(idxs[0], _helpers._HybridIndex) else idxs
            zeroers[name].idx = torch.as_tensor(list(plain), dtype=torch.long) if on else None


def _evaluate_hooked(model, graph, group, zeroers, evaluate):
    _set_zero(graph, group, zeroers, True)
    try:
        return evaluate(model)
    finally:
        _set_zero(graph, group, zeroers, False)


def _hook_matches_physical(model, graph, g: _FilterGroup, zeroers, example_input) -> bool:
    group = graph.get_pruning_group(g.conv, tp.prune_conv_out_channels, idxs=[0])
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            hooked = _evaluate_hooked(model, graph, group, zeroers, lambda m: m(example_input))
            removed = _physical_copy(model, graph, group).eval()(example_input)
    finally:
        model.train(was_training)
    return _close(hooked, removed)


def _blocks(model, evaluate, layers, max_elements, seed, on_element):
    blocks = [(i, n, b) for i, (n, b) in enumerate(residual_blocks(model)) if b.removable]
    if layers is not None:
        wanted = set(layers)
        if missing := wanted - {n for _, n, _ in blocks}:
            raise ValueError(
                f"no removable residual block named {', '.join(sorted(missing))}; "
                f"known: {', '.join(n for _, n, _ in blocks)}"
            )
        blocks = [e for e in blocks if e[1] in wanted]
    blocks = _pick(blocks, max_elements, seed)
    modules = dict(model.named_modules())
    rows = []
    for k, (i, name, block) in enumerate(blocks):
        parent_name, _, attr = name.rpartition(".")
        parent = modules[parent_name]
        setattr(parent, attr, nn.Identity())
        try:
            metrics = evaluate(model)
        finally:
            setattr(parent, attr, block)
        row = {"element": name, "kind": "block", "layer": name, "index": i, "method": "identity", **dict(metrics)}
        rows.append(row)
        if on_element is not None:
            on_element(k + 1, len(blocks), row)
    return rows


_EPS = 1e-9  # accuracies are k / n with n far below 1e9: absorbs float noise, never a real image


def improvement_fractions(
    rows: Sequence[Mapping[str, float]],
    baseline: Mapping[str, float],
    gen_metric: str = "acc_clean",
    rob_metrics: Sequence[str] | None = None,
    tolerances: Sequence[float] = (0, 1, 2, 3, 4, 5),
    strict: bool = False,
) -> dict[str, dict[float, float]]:
    """Fig. 5: for each robustness metric and tolerance t (percentage points), the fraction of
    elements e with rob(F \\ e) > rob(F) and gen(F \\ e) >= gen(F) - t/100 (accuracies are fractions
    in [0, 1]). This follows the text ("a loss in generalization of up to t p.p."); the pseudo-code
    of Algorithm 2 writes a strict gen > gen(F) - t, which `strict=True` reproduces (at t = 0 it
    demands a gain in clean accuracy). The denominator is the number of rows where both metrics are
    finite; NaN if none. rob_metrics default: every 'acc_' metric of `baseline` other than gen_metric."""
    if gen_metric not in baseline:
        raise ValueError(f"the baseline has no '{gen_metric}'")
    if rob_metrics is None:
        rob_metrics = [k for k in baseline if k.startswith("acc_") and k != gen_metric]
    base_gen = float(baseline[gen_metric])
    out: dict[str, dict[float, float]] = {}
    for rob in rob_metrics:
        if rob not in baseline:
            raise ValueError(f"the baseline has no '{rob}'")
        base_rob = float(baseline[rob])
        valid = [
            (float(r[gen_metric]), float(r[rob]))
            for r in rows
            if r.get(gen_metric) is not None
            and r.get(rob) is not None
            and math.isfinite(float(r[gen_metric]))
            and math.isfinite(float(r[rob]))
        ]
        out[rob] = {}
        for t in tolerances:
            floor = base_gen - t / 100.0
            if strict:
                ok = [g > floor + _EPS and v > base_rob + _EPS for g, v in valid]
            else:
                ok = [g >= floor - _EPS and v > base_rob + _EPS for g, v in valid]
            out[rob][t] = sum(ok) / len(valid) if valid else math.nan
    return out


def make_evaluator(
    x: torch.Tensor, y: torch.Tensor, attacks: Mapping[str, Callable] | None = None, batch_size: int = 1000
) -> Evaluate:
    """evaluate(model) -> {'acc_clean': ..., <name>: adversarial accuracy, ...} on (x, y), one
    entry per attack keyed by its metric name, e.g.
    {"acc_adv:fgsm@0.1": ATTACKS.get("fgsm")(0.1)}."""
    from robustprune.attacks import adversarial_accuracy
    from robustprune.train import accuracy

    def evaluate(model: nn.Module) -> dict[str, float]:
        out = {"acc_clean": accuracy(model, x, y, batch_size)}
        for name, attack in (attacks or {}).items():
            out[name] = adversarial_accuracy(model, attack, x, y, batch_size)
        return out

    return evaluate
