"""Structured pruning that physically removes filters, on Torch-Pruning's dependency graph: the
matching input channels of the next layers (flatten->linear included) and every layer coupled
through a residual addition or a concatenation go with them.

Two layers of API:

- `filters_to_remove` / `remove_filters_` / `channel_widths` / `conv_layers`: per conv layer, the
  lowest-L1 filters (the MNIST study's `channel_l1`; its stored numbers depend on them, keep them
  as they are);
- the engine for any model and any criterion:
  - `prune_filters_(model, criterion, ratio, example_input, scope=..., layer_ratios=...)` removes a
    share of the filters of every group of coupled channels (uniform), or the globally lowest
    (global), or per-layer shares; a transformer's MLP hidden units and attention heads are groups
    too (ROOT_TYPES, UNIT_KINDS);
  - `prune_blocks_` (robustprune.prune.blocks) removes whole residual blocks (layer pruning);
  - `prune_structured_` runs filters, blocks or both; `iterative_prune` is Algorithm 1 of Jordão &
    Pedrini (K rounds of prune p % of what remains, then adjust).

A criterion is a Torch-Pruning importance callable, `criterion(group) -> one score per channel`
(robustprune.prune.criteria); the lowest scores go first. Counts are exact: round(ratio * n)
(Python's round, half to even), ties broken by channel position, so the same model and criterion
always give the same pruned model.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Literal

import torch
import torch_pruning as tp
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from robustprune.errors import UserError
from robustprune.models.blocks import HiddenLinear, MultiHeadSelfAttention
from robustprune.prune.criteria.base import Criterion
from robustprune.registry import Registry

TARGETS = ("filters", "blocks", "both")
SCOPES = ("uniform", "global")


# ---- per-layer L1 (the MNIST study's channel_l1) -------------------------------------------------


def l1_filter_scores(conv: nn.Conv2d) -> torch.Tensor:
    return conv.weight.detach().abs().flatten(1).sum(1)


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """Prunable conv layers: ordinary (non-grouped) 2-d convolutions."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1]


def filters_to_remove(model: nn.Module, fraction: float, score=l1_filter_scores) -> dict[str, list[int]]:
    """Per conv layer, the round(fraction * filters) indices with the lowest score, all scored on the
    unpruned model (as torch.nn.utils.prune.ln_structured does layer by layer)."""
    plan = {}
    for name, conv in conv_layers(model):
        n = int(round(fraction * conv.out_channels))
        if n >= conv.out_channels:
            raise UserError(
                f"pruning {fraction:.0%} of the {conv.out_channels} filters of layer '{name}' "
                f"would remove all of them; use a smaller ratio"
            )
        plan[name] = torch.argsort(score(conv), stable=True)[:n].tolist()
    return plan


def remove_filters_(model: nn.Module, plan: dict[str, list[int]], example_input: torch.Tensor) -> nn.Module:
    """Physically remove the planned filters (and everything that depends on them).

    Convolutions coupled by a residual addition share their output channels: removing one's filters
    removes the same channels of the others. Each coupled group is therefore pruned once, by the
    plan of its first planned layer; the other layers' plans are not applied on top (they would
    compound the ratio and name channels that no longer exist)."""
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
    modules = dict(model.named_modules())
    name_of = {id(m): n for n, m in modules.items()}
    done: set[str] = set()
    for name, idxs in plan.items():
        if not idxs or name in done:
            continue
        # built only now, on the model as earlier groups left it, so every index is current
        group = graph.get_pruning_group(modules[name], tp.prune_conv_out_channels, idxs=sorted(idxs))
        for item in group:
            module = item.dep.target.module
            if isinstance(module, nn.Conv2d) and item.dep.handler.__name__ == "prune_out_channels":
                done.add(name_of.get(id(module), ""))
        group.prune()
    return model


def channel_widths(model: nn.Module) -> dict[str, int]:
    return {name: conv.out_channels for name, conv in conv_layers(model)}


# ---- validation ------------------------------------------------------------------------------------


def check_ratio(value: Any, what: str = "pruning ratio") -> float:
    """A share of structures to remove: a number in [0, 1). Returns it as a float."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or not 0 <= value < 1:
        raise UserError(
            f"{what} must be a number in [0, 1), the share of structures removed, not {value!r}; use e.g. 0.3"
        )
    return float(value)


def check_choice(value: Any, choices: tuple[str, ...], what: str) -> str:
    if value not in choices:
        raise UserError(f"unknown {what} {value!r}; use one of {', '.join(choices)}")
    return value


def _names_hint(names: list[str], n: int = 6) -> str:
    shown = ", ".join(f"'{s}'" for s in names[:n])
    return shown + (f" and {len(names) - n} more" if len(names) > n else "")


def _resolve_modules(model: nn.Module, names, what: str) -> list[nn.Module]:
    """Modules given by name (as in model.named_modules()) or directly; unknown names are a UserError."""
    modules = dict(model.named_modules())
    convs = [n for n, m in modules.items() if isinstance(m, nn.modules.conv._ConvNd)]
    out = []
    for item in names or ():
        if isinstance(item, nn.Module):
            out.append(item)
        elif item in modules and item != "":
            out.append(modules[item])
        else:
            raise UserError(
                f"{what} '{item}' is not a layer of the model; use names as in "
                f"model.named_modules(), e.g. {_names_hint(convs)}"
            )
    return out


# ---- filter pruning on the dependency graph -----------------------------------------------------------


def output_layer(model: nn.Module, example_input: torch.Tensor) -> nn.Module | None:
    """The final classifier: the last nn.Linear whose out_features is the model's output width
    (None when the output is not a (batch, width, ...) tensor or no such layer exists)."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(example_input[:1])
    finally:
        model.train(was_training)
    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        return None
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == out.shape[1]]
    return linears[-1] if linears else None


def _channel_groups(graph, group) -> int:
    """How many interleaved channel groups a group has (grouped convs, GroupNorm), as Torch-Pruning's
    pruner counts them; depthwise convs are not grouping (their channels follow their input)."""
    counts = [1]
    for dep, _ in group:
        m = dep.target.module
        if not isinstance(m, nn.Module) or (isinstance(m, nn.modules.conv._ConvNd) and m.groups == m.out_channels):
            continue
        pruner = graph.get_pruner_of_module(m)
        if pruner is None:
            continue
        out = graph.is_out_channel_pruning_fn(dep.handler)
        counts.append(pruner.get_out_channel_groups(m) if out else pruner.get_in_channel_groups(m))
    return max(counts)


class _Unit:
    """One group of coupled filters: its root layer, the layers whose filters it removes, its scores
    (one per channel of a channel group) and how many of them to remove."""

    keeps_one = False  # True: a ratio that would remove every structure removes all but one instead

    def __init__(self, root, pruning_fn, layers: list[str], scores: torch.Tensor, ch_groups: int):
        self.root, self.pruning_fn, self.layers = root, pruning_fn, layers
        self.scores, self.ch_groups = scores, ch_groups
        self.remove: list[int] = []

    @property
    def size(self) -> int:
        return len(self.scores)

    def idxs(self) -> list[int]:
        """Chosen positions, repeated in every channel group."""
        return sorted(g * self.size + i for g in range(self.ch_groups) for i in self.remove)

    def prune(self, graph) -> None:
        graph.get_pruning_group(self.root, self.pruning_fn, self.idxs()).prune()


class _HeadUnit(_Unit):
    """The heads of one MultiHeadSelfAttention (root), one score per head. An attention has few
    heads, so a high ratio keeps one rather than failing."""

    keeps_one = True

    def prune(self, graph) -> None:
        self.root.prune_heads_(self.remove)


# Layers whose output channels root a group of coupled filters: convolutions, and the Linear layers
# a model marks as a hidden width (HiddenLinear, a transformer MLP); other Linear layers (classifiers,
# the MNIST CNN's fc) are only narrowed as consumers, so the stored MNIST/VGG numbers stay as they are.
ROOT_TYPES = (nn.modules.conv._ConvNd, HiddenLinear)

# What filter pruning removes besides Torch-Pruning's channel groups: name -> fn(model, graph,
# criterion, ignored) -> units. Kinds run in name order, so the criterion is called in a fixed order
# (Replay depends on it); a new kind of structure is one registered function.
UNIT_KINDS: Registry = Registry("prunable structure")


def _scores(criterion, group) -> torch.Tensor | None:
    with torch.no_grad():
        imp = criterion(group)
    if imp is None:  # Torch-Pruning's convention: the criterion skips this group
        return None
    return torch.as_tensor(imp).detach().float().cpu().flatten()


def _units(model, graph, criterion, ignored) -> list[_Unit]:
    return [u for kind in UNIT_KINDS.names() for u in UNIT_KINDS.get(kind)(model, graph, criterion, ignored)]


@UNIT_KINDS.register("channels")
def _channel_units(model, graph, criterion, ignored) -> list[_Unit]:
    """Torch-Pruning's groups of coupled channels rooted at ROOT_TYPES layers."""
    names = {m: n for n, m in model.named_modules()}
    units = []
    groups = graph.get_all_groups(ignored_layers=ignored, root_module_types=list(ROOT_TYPES))
    for group in groups:
        imp = _scores(criterion, group)
        if imp is None:
            continue
        ch_groups = _channel_groups(graph, group)
        if imp.numel() % ch_groups:
            raise ValueError(f"criterion returned {imp.numel()} scores for a group of {ch_groups} channel groups")
        scores = imp.view(ch_groups, -1).mean(0)  # as Torch-Pruning: one score per position of a channel group
        layers = [
            names[dep.target.module]
            for dep, _ in group
            if graph.is_out_channel_pruning_fn(dep.handler)
            and isinstance(dep.target.module, nn.Module)
            and dep.target.module in names
        ]
        units.append(_Unit(group[0].dep.target.module, group[0].dep.handler, layers, scores, ch_groups))
    return units


def _head_group(graph, attn: MultiHeadSelfAttention):
    """A Torch-Pruning group for scoring an attention's heads, built by hand (Torch-Pruning's own
    index mapping through the head reshapes is wrong): every qkv row (the root), and the proj
    columns that read the value rows. Criteria score it as any group, one score per qkv row."""
    qkv, proj = graph.module2node[attn.qkv], graph.module2node[attn.proj]
    rows, inner = attn.qkv.out_features, attn.proj.in_features
    group = tp.dependency.Group()
    out_fn, in_fn = tp.prune_linear_out_channels, tp.prune_linear_in_channels
    group.add_dep(tp.dependency.Dependency(out_fn, out_fn, source=qkv, target=qkv), list(range(rows)))
    group.add_dep(tp.dependency.Dependency(out_fn, in_fn, source=qkv, target=proj), list(range(inner)))
    group[0].root_idxs = list(range(rows))
    group[1].root_idxs = [2 * inner + i for i in range(inner)]  # column i reads value row i
    return group


@UNIT_KINDS.register("heads")
def _head_units(model, graph, criterion, ignored) -> list[_Unit]:
    """One unit per MultiHeadSelfAttention with at least two heads: a head's score is the mean of
    its query, key and value rows' scores."""
    units = []
    for name, attn in model.named_modules():
        if (
            not isinstance(attn, MultiHeadSelfAttention)
            or attn.num_heads < 2
            or any(m in ignored for m in (attn, attn.qkv, attn.proj))
        ):
            continue
        imp = _scores(criterion, _head_group(graph, attn))
        if imp is None:
            continue
        heads = range(attn.num_heads)
        scores = torch.stack([imp[attn.head_rows([h])].mean() for h in heads])
        units.append(_HeadUnit(attn, None, [f"{name}.qkv", name], scores, 1))
    return units


def _plan_local(unit: _Unit, ratio: float, why: str) -> None:
    n = int(round(ratio * unit.size))
    if n >= unit.size and unit.keeps_one:
        n = unit.size - 1
    if n >= unit.size:
        raise UserError(
            f"pruning {ratio:.0%} of the {unit.size} filters of layer '{unit.layers[0]}' ({why}) "
            f"would remove all of them; use a smaller ratio"
        )
    unit.remove = torch.argsort(unit.scores, stable=True)[:n].tolist()


def _plan_global(units: list[_Unit], ratio: float, normalize: bool) -> None:
    """round(ratio * all filters) lowest scores over every unit, each unit keeping at least one."""
    if not units:
        return
    scores = []
    for u in units:
        s = u.scores
        mean = s.mean().abs()
        scores.append(s / mean if normalize and torch.isfinite(mean) and mean > 0 else s)
    flat = torch.cat(scores)
    owner = torch.cat([torch.full((u.size,), k) for k, u in enumerate(units)])
    pos = torch.cat([torch.arange(u.size) for u in units])
    left = [u.size for u in units]
    n = int(round(ratio * len(flat)))
    for j in torch.argsort(flat, stable=True).tolist():
        if n == 0:
            break
        k = int(owner[j])
        if left[k] > 1:
            units[k].remove.append(int(pos[j]))
            left[k] -= 1
            n -= 1
    if n:
        raise UserError(f"global pruning of {ratio:.0%} of the filters would empty some layers; use a smaller ratio")


def _prepare(criterion, model, x, y) -> None:
    """criterion.prepare on the unpruned model; a data-driven criterion without data raises its own
    UserError (the base class's check runs even when a subclass's prepare forgets it)."""
    if getattr(criterion, "needs_data", False) and x is None:
        Criterion.prepare(criterion, model, x, y)
    if hasattr(criterion, "prepare"):
        criterion.prepare(model, x, y)


def prune_filters_(
    model: nn.Module,
    criterion,
    ratio: float,
    example_input: torch.Tensor,
    *,
    scope: str = "uniform",
    layer_ratios: dict[str, float] | None = None,
    x: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    ignored_layers=None,
    normalize: bool | None = None,
) -> nn.Module:
    """Physically remove filters from any model, residual connections and concatenations included.

    Filters are grouped as Torch-Pruning couples them (a conv, its BN and the next layers' input
    channels; every conv feeding the same residual addition), one group per set of coupled output
    channels of the convolutions. `criterion(group)` scores each group's channels on the unpruned
    model (after `criterion.prepare(model, x, y)`), then the lowest-scored ones are removed:

    - scope="uniform": round(ratio * n) of the n channels of every group;
    - scope="global": round(ratio * N) of all N channels, ranked across groups on scores divided
      by their group's mean (Torch-Pruning's default normaliser). normalize=False ranks raw
      scores, for criteria such as LAMP that are already comparable across layers; the default
      (None) is False for a criterion whose class sets `normalized = True`, else True. Every
      group keeps at least one channel. As in Torch-Pruning, a set of coupled channels counts
      once, so removing a channel of a residual stream (shared by every conv feeding its
      additions) removes more filters than a channel inside a block: the share of filters
      removed can differ from `ratio`;
    - layer_ratios {module name: ratio}: the group holding that layer's filters is pruned at that
      ratio instead (a residual group is pruned as a whole: every conv feeding one addition gets
      the ratio), ranked within the group; the other groups follow `ratio` and `scope`. Pass
      ratio=0 to prune only the named layers.

    The final classifier (the last nn.Linear whose out_features is the output width) and
    `ignored_layers` (names or modules) are never pruned, nor any group coupled to them. Linear
    layers are only narrowed as consumers of pruned filters, except HiddenLinear layers (a
    transformer MLP's hidden width), whose output features are filters like a conv's. Every
    MultiHeadSelfAttention with two or more heads is one more group whose structures are its heads
    (scored by the mean of their q/k/v rows' scores; at least one head stays, even at high ratios;
    `layer_ratios` may name the attention or its qkv layer; ignoring either keeps its heads). The
    model keeps its train/eval mode and is returned, smaller."""
    ratio = check_ratio(ratio)
    check_choice(scope, SCOPES, "pruning scope")
    layer_ratios = {k: check_ratio(v, f"pruning ratio of layer '{k}'") for k, v in (layer_ratios or {}).items()}
    if not any(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules()):
        raise UserError(
            f"model {type(model).__name__} has no convolution filters to prune; "
            f"pick a model with conv layers or use unstructured pruning"
        )
    param = next(model.parameters(), None)
    if param is not None:  # tracing runs the model: the example goes where the model is
        example_input = example_input.to(param.device)
    by_name = dict(zip(layer_ratios, _resolve_modules(model, layer_ratios, "layer")))
    ignored = _never_pruned(model, example_input, ignored_layers)

    _prepare(criterion, model, x, y)

    was_training = model.training
    try:
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
        units = _units(model, graph, criterion, ignored)
        if not units:
            raise UserError(
                f"model {type(model).__name__} has no filters that can be pruned "
                f"(every conv is ignored or feeds the output); check ignored_layers"
            )
        own: dict[int, tuple[str, float]] = {}
        for name in by_name:
            hits = [k for k, u in enumerate(units) if name in u.layers]
            if not hits:
                valid = [n for u in units for n in u.layers]
                raise UserError(
                    f"layer '{name}' has no prunable filters (not a conv, ignored, or coupled "
                    f"to the output); name a conv layer, e.g. {_names_hint(valid)}"
                )
            k = hits[0]
            if k in own and own[k][1] != layer_ratios[name]:
                raise UserError(
                    f"layers '{own[k][0]}' and '{name}' share their channels (one residual group) "
                    f"and must be pruned together; give them the same ratio"
                )
            own[k] = (name, layer_ratios[name])
        for k, (name, r) in own.items():
            _plan_local(units[k], r, f"ratio of '{name}'")
        rest = [u for k, u in enumerate(units) if k not in own]
        if scope == "uniform":
            for u in rest:
                _plan_local(u, ratio, "uniform ratio")
        else:
            if normalize is None:
                normalize = not getattr(criterion, "normalized", False)
            _plan_global(rest, ratio, normalize)
        for u in units:
            if u.remove:
                u.prune(graph)
    finally:
        model.train(was_training)  # Torch-Pruning's tracing leaves the model in eval mode
    return model


def _never_pruned(model: nn.Module, example_input: torch.Tensor, ignored_layers) -> list[nn.Module]:
    """The classifier and the ignored layers, with all their submodules."""
    ignored = _resolve_modules(model, ignored_layers, "ignored layer")
    head = output_layer(model, example_input)
    if head is not None:
        ignored.append(head)
    return [sub for m in ignored for sub in m.modules()]


def filter_groups(model: nn.Module, example_input: torch.Tensor, ignored_layers=None) -> list[list[str]]:
    """Every group of coupled filters prune_filters_ can remove, as the names of the conv and linear
    layers whose output channels it removes (a residual stream's group lists every conv feeding its
    additions); the first name is the one `layer_ratios` can use for the group."""
    param = next(model.parameters(), None)
    if param is not None:
        example_input = example_input.to(param.device)
    ignored = _never_pruned(model, example_input, ignored_layers)
    was_training = model.training
    try:
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input)
        units = _units(model, graph, lambda group: torch.zeros(len(group[0].idxs)), ignored)
    finally:
        model.train(was_training)
    modules = dict(model.named_modules())
    weighted = (nn.modules.conv._ConvNd, nn.Linear)
    return [names for u in units if (names := [n for n in u.layers if isinstance(modules[n], weighted)])]


def filter_count(model: nn.Module) -> int:
    """Total output channels of the (non-depthwise) convolutions: what filter pruning removes."""
    return sum(
        m.out_channels
        for m in model.modules()
        if isinstance(m, nn.modules.conv._ConvNd) and not (m.groups == m.out_channels > 1)
    )


# ---- filters, blocks or both; iterative -------------------------------------------------------------


def prune_structured_(
    model: nn.Module,
    criterion,
    ratio: float | tuple[float, float],
    example_input: torch.Tensor,
    *,
    target: str = "filters",
    scope: str = "uniform",
    layer_ratios: dict[str, float] | None = None,
    x: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    ignored_layers=None,
) -> list[str]:
    """Prune filters, residual blocks or both; returns the names of the removed blocks.

    target="both" removes blocks first, then filters of what is left (the filter scores then
    describe the network that will actually be fine-tuned, and no filter work is spent on blocks
    about to go). `ratio` is one share for both, or a pair (block ratio, filter ratio). Layer
    ratios naming a layer inside a removed block are dropped with the block."""
    check_choice(target, TARGETS, "pruning target")
    if isinstance(ratio, (tuple, list)):
        if target != "both" or len(ratio) != 2:
            raise UserError(
                f"a pair of ratios (blocks, filters) needs target 'both' and two numbers, "
                f"not {ratio!r} with target '{target}'; give one ratio"
            )
        block_ratio, filter_ratio = (check_ratio(r) for r in ratio)
    else:
        block_ratio = filter_ratio = check_ratio(ratio)
    if layer_ratios:
        _resolve_modules(model, layer_ratios, "layer")  # typos are refused before anything is removed
    removed: list[str] = []
    if target in ("blocks", "both"):
        from robustprune.prune.blocks import prune_blocks_

        removed = prune_blocks_(model, criterion, block_ratio, x=x, y=y)
    if target in ("filters", "both"):
        alive = dict(model.named_modules())
        kept = {k: v for k, v in (layer_ratios or {}).items() if k in alive}
        prune_filters_(
            model,
            criterion,
            filter_ratio,
            example_input,
            scope=scope,
            layer_ratios=kept,
            x=x,
            y=y,
            ignored_layers=ignored_layers,
        )
    return removed


def iterative_prune(
    model: nn.Module,
    rounds: int,
    ratio: float,
    prune_fn: Callable[[nn.Module, float], Any],
    adjust_fn: Callable[[nn.Module, int], Any] | None = None,
) -> nn.Module:
    """Algorithm 1 of Jordão & Pedrini: for k = 1..K, prune the share `ratio` of the structures that
    remain (`prune_fn(model, ratio)`, e.g. a prune_structured_ call), then adjust the pruned model
    (`adjust_fn(model, k)`, e.g. fine-tune on clean images; also the place to evaluate each round).
    After K rounds about (1 - ratio)^K of the structures remain."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise UserError(f"rounds must be a whole number of at least 1, not {rounds!r}; use e.g. 1 (one-shot)")
    ratio = check_ratio(ratio)
    for k in range(1, rounds + 1):
        prune_fn(model, ratio)
        if adjust_fn is not None:
            adjust_fn(model, k)
    return model


class StructuredParams(BaseModel):
    """Settings of a structured pruning method for a study file (the sparsity of the pruning entry
    is the ratio; for target 'both' it is the filter ratio and `block_ratio` the block ratio,
    default the same). Same config as methods.MethodParams (not imported: methods imports this
    module)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    criterion: str = Field("l1", description="a registered criterion (robustprune.prune.criteria)")
    criterion_params: dict[str, Any] = Field(default_factory=dict, description="arguments of the criterion")
    target: Literal["filters", "blocks", "both"] = Field("filters", description="what is removed")
    scope: Literal["uniform", "global"] = Field("uniform", description="same share per group, or ranked across layers")
    layer_ratios: dict[str, float] | None = Field(None, description="module name -> share of its filters removed")
    block_ratio: float | None = Field(None, ge=0, lt=1, description="share of removable blocks removed (target both)")
    rounds: int = Field(1, ge=1, description="iterations of prune + fine-tune (Algorithm 1's K)")

    @field_validator("layer_ratios")
    @classmethod
    def _ratios_in_range(cls, v):
        for k, r in (v or {}).items():
            if not 0 <= r < 1:
                raise ValueError(f"the pruning ratio of layer '{k}' must be in [0, 1), not {r}")
        return v
