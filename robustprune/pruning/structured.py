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
  - `prune_blocks_` (robustprune.pruning.blocks) removes whole residual blocks (layer pruning);
  - `prune_structured_` runs filters, blocks or both; `iterative_prune` is Algorithm 1 of Jordão &
    Pedrini (K rounds of prune p % of what remains, then adjust).

A criterion is a Torch-Pruning importance callable, `criterion(group) -> one score per channel`
(robustprune.pruning.criteria); the lowest scores go first. Counts are exact: round(ratio * n)
(Python's round, half to even), ties broken by channel position, so the same model and criterion
always give the same pruned model.
"""

from __future__ import annotations

import copy
from typing import Any, Callable, Literal

import torch
import torch_pruning as tp
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from robustprune.errors import UserError, excerpt
from robustprune.models.blocks import HiddenLinear, MultiHeadSelfAttention
from robustprune.pruning.checks import check_choice, check_ratio
from robustprune.pruning.criteria.base import Criterion
from robustprune.pruning.record import record_step_
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
    history = graph.pruning_history()
    if history:  # the record rp.save keeps, so a fresh model can be given the same shapes
        recorder = _Recorder(model, graph, example_input)
        recorder.seen = 0
        recorder(None)
    return model


def channel_widths(model: nn.Module) -> dict[str, int]:
    return {name: conv.out_channels for name, conv in conv_layers(model)}


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
    if not isinstance(out, torch.Tensor) and hasattr(out, "logits"):  # a Hugging Face ModelOutput
        raise UserError(
            f"model {type(model).__name__} returns {type(out).__name__}, not a tensor of logits; "
            f"wrap it as robustprune.pruning.hf.HFClassifier(model)"
        )
    if not isinstance(out, torch.Tensor) or out.dim() < 2:
        return None
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and m.out_features == out.shape[1]]
    return linears[-1] if linears else None


def _channel_groups(graph, group, names: dict | None = None) -> int:
    """How many interleaved channel groups a group has (grouped convs, GroupNorm), as Torch-Pruning's
    pruner counts them; depthwise convs are not grouping (their channels follow their input). A group
    that fills only some of a layer's channel groups (one branch of a concatenation read by a grouped
    conv) is refused: Torch-Pruning can only remove the same positions from every channel group."""
    counts = [1]
    for dep, idxs in group:
        m = dep.target.module
        if not isinstance(m, nn.Module) or (isinstance(m, nn.modules.conv._ConvNd) and m.groups == m.out_channels):
            continue
        pruner = graph.get_pruner_of_module(m)
        if pruner is None:
            continue
        out = graph.is_out_channel_pruning_fn(dep.handler)
        n = pruner.get_out_channel_groups(m) if out else pruner.get_in_channel_groups(m)
        width = graph.get_out_channels(m) if out else graph.get_in_channels(m)
        if n > 1 and len(idxs) != width:
            names = names or {}
            root = names.get(group[0].dep.target.module, "?")
            raise UserError(
                f"layer '{names.get(m, '?')}' ({type(m).__name__}, {n} channel groups) reads the channels of "
                f"'{root}' in only some of its groups (a concatenation), and Torch-Pruning can only remove the "
                f"same channels from every group; pass '{root}' and the layers concatenated with it in ignored_layers"
            )
        counts.append(n)
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


class _SplitHeadUnit(_Unit):
    """The heads of an attention with separate q, k, v and output layers (root: the attention, see
    _split_attention), one score per head; as for _HeadUnit, a high ratio keeps one head."""

    keeps_one = True

    def prune(self, graph) -> None:
        prune_attention_heads_(self.root, self.remove)


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
    own = {id(p) for m in ignored for p in m.parameters(recurse=False)}
    units = []
    groups = graph.get_all_groups(ignored_layers=ignored, root_module_types=list(ROOT_TYPES))
    for group in groups:
        if any(id(dep.target.module) in own for dep, _ in group):
            continue  # Torch-Pruning sees an ignored layer's weight as a loose parameter of this group
        imp = _scores(criterion, group)
        if imp is None:
            continue
        ch_groups = _channel_groups(graph, group, names)
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
    """One unit per attention with at least two heads: a MultiHeadSelfAttention (a head's score is
    the mean of its query, key and value rows' scores), or an attention with separate q, k, v and
    output layers (_split_head_unit)."""
    units = []
    for name, attn in model.named_modules():
        if not isinstance(attn, MultiHeadSelfAttention):
            if (unit := _split_head_unit(name, attn, graph, criterion, ignored)) is not None:
                units.append(unit)
            continue
        if attn.num_heads < 2 or any(m in ignored for m in (attn, attn.qkv, attn.proj)):
            continue
        imp = _scores(criterion, _head_group(graph, attn))
        if imp is None:
            continue
        heads = range(attn.num_heads)
        scores = torch.stack([imp[attn.head_rows([h])].mean() for h in heads])
        units.append(_HeadUnit(attn, None, [f"{name}.qkv", name], scores, 1))
    return units


def _split_attention(module: nn.Module) -> tuple[nn.Linear, nn.Linear, nn.Linear, nn.Linear, int] | None:
    """The q, k, v and output layers and the head size of an attention that keeps them apart, as
    Hugging Face's do (q_proj, k_proj, v_proj, o_proj, num_attention_heads, head_dim: ViT, DeiT,
    CLIP...), else None; grouped-query attention (fewer key/value heads) is not one."""
    layers = [getattr(module, n, None) for n in ("q_proj", "k_proj", "v_proj", "o_proj")]
    heads, d = getattr(module, "num_attention_heads", None), getattr(module, "head_dim", None)
    if not all(isinstance(m, nn.Linear) for m in layers) or not isinstance(heads, int) or not isinstance(d, int):
        return None
    q, k, v, o = layers
    if not q.out_features == k.out_features == v.out_features == o.in_features == heads * d:
        return None
    return q, k, v, o, d


def _split_head_group(graph, q: nn.Linear, k: nn.Linear, v: nn.Linear, o: nn.Linear):
    """A group for scoring the heads of a split attention, built by hand as _head_group: position i
    is row i of q (the root), k and v, and column i of o."""
    n = q.out_features
    out_fn, in_fn = tp.prune_linear_out_channels, tp.prune_linear_in_channels
    root = graph.module2node[q]
    group = tp.dependency.Group()
    for layer, fn in ((q, out_fn), (k, out_fn), (v, out_fn), (o, in_fn)):
        dep = tp.dependency.Dependency(out_fn, fn, source=root, target=graph.module2node[layer])
        group.add_dep(dep, list(range(n)))
    for item in group:
        item.root_idxs = list(range(n))
    return group


def _split_head_unit(name: str, attn: nn.Module, graph, criterion, ignored) -> _Unit | None:
    """The heads of a split attention with at least two heads: a head's score is the mean over its
    positions of the group's per-position scores (its q, k and v rows, as the criterion combines them)."""
    parts = _split_attention(attn)
    if parts is None or attn.num_attention_heads < 2:
        return None
    q, k, v, o, d = parts
    if any(m in ignored for m in (attn, q, k, v, o)) or any(m not in graph.module2node for m in (q, k, v, o)):
        return None
    imp = _scores(criterion, _split_head_group(graph, q, k, v, o))
    if imp is None:
        return None
    scores = imp.reshape(attn.num_attention_heads, d).mean(1)
    return _SplitHeadUnit(attn, None, [f"{name}.q_proj", name], scores, 1)


def prune_attention_heads_(attn: nn.Module, heads) -> None:
    """Remove the given heads (indices into the current ones) of a MultiHeadSelfAttention or of an
    attention with separate q/k/v/o layers (_split_attention: their rows of q, k and v, their columns
    of o, and `num_attention_heads`). At least one head must stay."""
    if isinstance(attn, MultiHeadSelfAttention):
        attn.prune_heads_(heads)
        return
    parts = _split_attention(attn)
    if parts is None:
        raise ValueError(f"{type(attn).__name__} is not an attention whose heads can be removed")
    q, k, v, o, d = parts
    gone = sorted({int(h) for h in heads})
    if not set(gone) <= set(range(attn.num_attention_heads)) or len(gone) >= attn.num_attention_heads:
        raise ValueError(f"cannot remove heads {gone} of {attn.num_attention_heads}")
    if not gone:
        return
    rows = [h * d + i for h in gone for i in range(d)]
    for layer in (q, k, v):
        tp.prune_linear_out_channels(layer, rows)
    tp.prune_linear_in_channels(o, rows)
    attn.num_attention_heads -= len(gone)


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

    - scope="uniform": round(ratio * n) of the n channels of every group (a group that runs through
      a grouped conv or GroupNorm of g groups: round(ratio * n / g) positions, removed from each of
      the g groups);
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
    `layer_ratios` may name the attention or its qkv layer; ignoring either keeps its heads). So is
    every attention with separate q_proj/k_proj/v_proj/o_proj layers and `num_attention_heads`
    (Hugging Face's; `layer_ratios` may name it or its q_proj). A transformers model is pruned
    through robustprune.pruning.hf.HFClassifier, which returns its logits and marks its MLP expansion
    layers as HiddenLinear; a ViT's groups are its embedding width (patch conv, class token,
    position embeddings and every residual addition: one group), each MLP width and each
    attention's heads. An nn.MultiheadAttention cannot lose single channels or heads: it and every
    group coupled to it stay whole.

    The plan is first carried out on a copy of the model, which must still run: a layer
    Torch-Pruning cannot follow (a weight used through a functional op, a parameter whose channel
    dimension it guesses wrong, a reshape to a fixed size) is a UserError naming it and what to pass
    in `ignored_layers`, and the model is left as it was. The model keeps its train/eval mode and
    is returned, smaller."""
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
        _dry_run(model, units, example_input)
        record = _Recorder(model, graph, example_input)
        for u in units:
            if u.remove:
                u.prune(graph)
                record(u)
    finally:
        model.train(was_training)  # Torch-Pruning's tracing leaves the model in eval mode
    return model


# ---- the record of what structured pruning removed (robustprune.saving replays it; record.py) ------


def _plain_history(entries) -> list:
    """Torch-Pruning history entries [root layer name, out-channel pruning?, root indices] as plain
    JSON values (an index may be a (idx, root_idx) pair, both equal at the root)."""
    return [[str(name), bool(out), [int(getattr(i, "idx", i)) for i in idxs]] for name, out, idxs in entries]


class _Recorder:
    """Records each pruned unit on the model as it goes, so the record always matches the model.
    Channel groups become Torch-Pruning's own history (replayed on a graph traced from an input of
    the same shape); consecutive groups of one graph share a step. Heads are their own step."""

    def __init__(self, model: nn.Module, graph, example_input: torch.Tensor):
        self.model, self.graph, self.seen, self.step = model, graph, len(graph.pruning_history()), None
        one = isinstance(example_input, torch.Tensor)  # other inputs cannot be rebuilt: load then asks for them
        dtype = str(example_input.dtype).removeprefix("torch.") if one else None
        self.input = {"input_shape": [1, *example_input.shape[1:]] if one else None, "input_dtype": dtype}

    def __call__(self, unit: _Unit) -> None:
        new = self.graph.pruning_history()[self.seen :]
        self.seen += len(new)
        if new:
            if self.step is None:
                self.step = {"kind": "channels", **self.input, "history": []}
                record_step_(self.model, self.step)
            self.step["history"].extend(_plain_history(new))
            return
        self.step = None  # a later channel group is replayed on a graph traced after this step
        if isinstance(unit, (_HeadUnit, _SplitHeadUnit)):
            name = next(n for n, m in self.model.named_modules() if m is unit.root)
            record_step_(self.model, {"kind": "heads", "name": name, "heads": sorted(int(h) for h in unit.remove)})
        else:  # a kind of structure that does not say what it removed: saving refuses this model
            record_step_(self.model, {"kind": "unrecorded", "unit": type(unit).__name__})


def _never_pruned(model: nn.Module, example_input: torch.Tensor, ignored_layers) -> list[nn.Module]:
    """The classifier, the ignored layers and every nn.MultiheadAttention, with all their submodules.
    nn.MultiheadAttention cuts its width into equal heads (head_dim = embed_dim // num_heads) and
    has no way to drop a head, so the channels it reads and writes stay: Torch-Pruning would remove
    single channels and leave heads that mix or a module that fails."""
    ignored = _resolve_modules(model, ignored_layers, "ignored layer")
    head = output_layer(model, example_input)
    if head is not None:
        ignored.append(head)
    ignored += [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    return [sub for m in ignored for sub in m.modules()]


# ---- a dry run on a copy: what Torch-Pruning cannot follow fails there, as one UserError ------------


def _dry_run(model: nn.Module, units: list[_Unit], example_input: torch.Tensor) -> None:
    """Prune a copy of the model as planned and run it. Where Torch-Pruning cannot trace (a weight
    used by a functional op, a loose parameter whose channel dimension it guesses, a reshape to a
    fixed size) it mis-prunes without an error and the model fails later; here the copy fails, and
    the first unit that breaks it becomes one UserError naming the layer, before the model changes.
    A model that cannot be deep-copied is pruned unchecked."""
    planned = [u for u in units if u.remove]
    if not planned:
        return
    try:
        twin = _Twin(model, example_input)
    except Exception:
        return
    if twin.survives(planned):
        return
    twin = _Twin(model, example_input)  # again, one unit at a time, to name the one that breaks it
    for unit in planned:
        error = twin.failure(unit)
        if error is not None:
            raise UserError(error)


class _Twin:
    """A deep copy of a model with its own dependency graph, on which units are pruned on trial."""

    def __init__(self, model: nn.Module, example_input: torch.Tensor):
        self.names = {id(m): n for n, m in model.named_modules()}
        self.model = copy.deepcopy(model)
        self.modules = dict(self.model.named_modules())
        self.input = example_input
        self.graph = tp.DependencyGraph().build_dependency(self.model, example_inputs=example_input, verbose=False)

    def prune(self, unit: _Unit) -> None:
        twin = copy.copy(unit)
        twin.root = self.modules[self.names[id(unit.root)]]
        twin.prune(self.graph)

    def survives(self, units: list[_Unit]) -> bool:
        try:
            for unit in units:
                self.prune(unit)
            return _failing_layer(self.model, self.input) is None
        except Exception:
            return False

    def failure(self, unit: _Unit) -> str | None:
        """Prune one more unit and run the copy: None if it still works, else why it does not."""
        root = self.names[id(unit.root)]
        loose = self._loose_parameters(unit)
        try:
            self.prune(unit)
        except Exception as e:
            return _cannot_prune(_layer_label(self.model, root), f"Torch-Pruning fails ({_short(e)})", root)
        failed = _failing_layer(self.model, self.input)
        if failed is None:
            return None
        where, e = failed
        if loose:  # the likely culprit: a layer whose weight Torch-Pruning only saw as a loose tensor
            (owner, _, param), shape = loose[0][0].rpartition("."), loose[0][1]
            why = (
                f"Torch-Pruning cannot tell which dimension of its parameter '{param}' {shape} follows the "
                f"channels of '{root}', and the pruned model fails ({_short(e)})"
            )
            return _cannot_prune(_layer_label(self.model, owner), why, owner)
        why = (
            f"once its channels are removed, {_layer_label(self.model, where)} fails ({_short(e)}), as Torch-Pruning "
            f"cannot follow channels through a functional op, a custom layer or a reshape to a fixed size"
        )
        return _cannot_prune(_layer_label(self.model, root), why, root)

    def _loose_parameters(self, unit: _Unit) -> list[tuple[str, tuple[int, ...]]]:
        """Name and shape of each parameter outside any layer Torch-Pruning knows that the unit prunes."""
        if unit.pruning_fn is None:
            return []
        group = self.graph.get_pruning_group(self.modules[self.names[id(unit.root)]], unit.pruning_fn, unit.idxs())
        params = {id(p): (n, tuple(p.shape)) for n, p in self.model.named_parameters()}
        return [params[id(dep.target.module)] for dep, _ in group if id(dep.target.module) in params]


def _failing_layer(model: nn.Module, x: torch.Tensor) -> tuple[str, Exception] | None:
    """Run the model; on an error, the name of the innermost module that was running ('' for the
    model's own forward) and the error."""
    running: list[str] = []

    def enter(name: str):
        return lambda module, args: running.append(name)  # (None: the input is left as it is)

    def leave(module, args, out) -> None:
        running.pop()

    hooks = []
    for name, m in model.named_modules():
        hooks += [m.register_forward_pre_hook(enter(name)), m.register_forward_hook(leave)]
    try:
        with torch.no_grad():
            model(x)
    except Exception as e:
        return (running[-1] if running else ""), e
    finally:
        for h in hooks:
            h.remove()
    return None


def _layer_label(model: nn.Module, name: str) -> str:
    if not name:
        return f"the forward of {type(model).__name__}"
    return f"layer '{name}' ({type(model.get_submodule(name)).__name__})"


def _short(e: Exception) -> str:
    return excerpt(f"{type(e).__name__}: {e}")


def _cannot_prune(label: str, why: str, fix: str) -> str:
    return f"{label} cannot be pruned through the dependency graph: {why}; pass '{fix}' in ignored_layers"


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
        from robustprune.pruning.blocks import prune_blocks_

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

    criterion: str = Field("l1", description="a registered criterion (robustprune.pruning.criteria)")
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
