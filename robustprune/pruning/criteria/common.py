"""What the criteria share: reading a Torch-Pruning group, running a batch through a model, and
finding where a channel's signal is read.

A group is a list of items `(dep, idxs)` with `dep.target.module` (a layer or a graph op),
`dep.handler` (the Torch-Pruning function that prunes it) and `root_idxs` (the root channel each
index belongs to). Scores are indexed by the position of the root channel in the root item's
`idxs`, so a group built with `idxs=range(n)` gets score `i` for channel `i`.
"""

from __future__ import annotations

from collections import defaultdict
from contextlib import contextmanager
from typing import Callable, NamedTuple

import torch
import torch_pruning as tp
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.conv import _ConvNd

from robustprune.errors import UserError

# Handlers that remove output channels of a weight layer (a depthwise conv's in- and out-channels
# are one handler), input channels of a weight layer, and channels of a BatchNorm.
OUT_FNS = (tp.prune_conv_out_channels, tp.prune_depthwise_conv_out_channels, tp.prune_linear_out_channels)
IN_FNS = (tp.prune_conv_in_channels, tp.prune_linear_in_channels)
NORM_FNS = (tp.prune_batchnorm_out_channels,)
WEIGHT_LAYERS = (_ConvNd, nn.Linear)
SCOPES = ("filter", "group")


def check_scope(name: str, scope: str) -> str:
    if scope not in SCOPES:
        raise UserError(f"criterion '{name}': scope must be 'filter' or 'group', got '{scope}'")
    return scope


def check_positive(name: str, what: str, value, allow_none: bool = False):
    if value is None and allow_none:
        return value
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise UserError(f"criterion '{name}': {what} must be a positive integer, got {value!r}")
    return value


def out_channels(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


class GroupScores:
    """Accumulates per-item contributions into one score per root channel of a group."""

    def __init__(self, group):
        root = group[0]
        roots = root.root_idxs if root.root_idxs is not None else root.idxs
        self.pos = {int(r): k for k, r in enumerate(roots)}
        self.total = torch.zeros(len(root.idxs), dtype=torch.float64)
        self.count = torch.zeros(len(root.idxs), dtype=torch.float64)

    def add(self, item, local: torch.Tensor) -> None:
        roots = item.root_idxs if item.root_idxs is not None else item.idxs
        keep = [(k, self.pos[int(r)]) for k, r in enumerate(roots) if r is not None and int(r) in self.pos]
        if not keep:
            return
        src, dst = zip(*keep)
        local = local.detach().to("cpu", torch.float64).reshape(-1)[list(src)]
        dst = torch.tensor(dst)
        self.total.index_add_(0, dst, local)
        self.count.index_add_(0, dst, torch.ones_like(local))

    def sum(self) -> torch.Tensor:
        return self.total.float()

    def mean(self) -> torch.Tensor:
        """Mean over the contributions each channel got (0 where it got none)."""
        return (self.total / self.count.clamp(min=1)).float()


def channel_rows(layer: nn.Module, fn, idxs, values: torch.Tensor) -> torch.Tensor:
    """The entries of `values` (a tensor shaped like `layer.weight`) that belong to each channel
    `idxs` of this group item, one row per index (Torch-Pruning's reading of a group item)."""
    transposed = isinstance(layer, _ConvNd) and layer.transposed
    if fn in OUT_FNS:
        v = values.transpose(0, 1) if transposed else values
        return v.flatten(1)[idxs]
    if fn in IN_FNS:
        v = (values if transposed else values.transpose(0, 1)).flatten(1)
        if isinstance(layer, _ConvNd) and layer.groups not in (1, layer.in_channels):
            v = v.repeat(layer.groups, 1)  # grouped conv: every group sees its slice (as Torch-Pruning)
        return v[idxs]
    return values.reshape(-1, 1)[idxs]  # BatchNorm: one value per channel


def weight_group_scores(group, values: Callable[[nn.Module], torch.Tensor | None], scope: str) -> torch.Tensor:
    """Sum over the group's weight entries of `values(layer)`, per channel. scope 'filter': only the
    output filters of the conv/linear layers the group prunes (one filter per layer and channel);
    'group': also the next layers' input-channel slices and the BatchNorm scales, i.e. every weight
    that goes away with the channel (Torch-Pruning's group importance)."""
    acc = GroupScores(group)
    for item in group:
        layer, fn = item.dep.target.module, item.dep.handler
        if fn in OUT_FNS and isinstance(layer, WEIGHT_LAYERS):
            pass
        elif scope == "group" and (
            (fn in IN_FNS and isinstance(layer, WEIGHT_LAYERS)) or (fn in NORM_FNS and isinstance(layer, _BatchNorm))
        ):
            pass
        else:
            continue
        v = values(layer)
        if v is None:
            continue
        acc.add(item, channel_rows(layer, fn, item.idxs, v).sum(1))
    return acc.sum()


def stat_group_scores(group, stats: dict[nn.Module, torch.Tensor], name: str, how: str) -> torch.Tensor:
    """Per-channel statistics stored per conv/linear layer (`stats[layer][c]`), read for the layers
    whose output channels the group prunes and reduced over them ('mean' or 'sum'). A member without
    statistics contributes nothing; a channel with none scores 0."""
    acc = GroupScores(group)
    for item in group:
        layer, fn = item.dep.target.module, item.dep.handler
        if fn not in OUT_FNS or not isinstance(layer, WEIGHT_LAYERS) or layer not in stats:
            continue
        s = stats[layer]
        if len(s) != out_channels(layer):
            raise RuntimeError(
                f"criterion '{name}' collected {len(s)} channels for a layer that now has "
                f"{out_channels(layer)}; call prepare() again after the model changed"
            )
        acc.add(item, s[list(item.idxs)])
    return acc.mean() if how == "mean" else acc.sum()


# ---------------------------------------------------------------------------------------------
# Running data through a model


def model_device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def as_batch(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None, max_images: int | None):
    """The first `max_images` images (uint8 images scaled to [0, 1], as the training loop does) and
    labels, on the model's device."""
    if max_images is not None:
        x = x[:max_images]
        y = None if y is None else y[:max_images]
    x = x.float().div(255.0) if x.dtype == torch.uint8 else x.float()
    device = model_device(model)
    return x.to(device), (None if y is None else y.to(device).long())


def need_labels(name: str, x: torch.Tensor, y: torch.Tensor | None) -> None:
    if y is None:
        raise UserError(f"criterion '{name}' needs the labels of the batch as well as the images")
    if len(y) != len(x):
        raise UserError(f"criterion '{name}' got {len(x)} images but {len(y)} labels")


def need_data(criterion, x) -> None:
    """The base class's 'no data' UserError, for block scoring that does not go through prepare()."""
    from robustprune.pruning.criteria.base import Criterion

    Criterion.prepare(criterion, None, x)


@contextmanager
def evaluating(model: nn.Module):
    """Eval mode (BatchNorm on its running statistics, dropout off) for the duration."""
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)


@contextmanager
def forward_hooks(pairs):
    handles = [m.register_forward_hook(h) for m, h in pairs]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def chunks(n: int, size: int):
    for i in range(0, n, size):
        yield slice(i, min(n, i + size))


def log_probs(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(x[s]).float().log_softmax(-1) for s in chunks(len(x), batch_size)])


def kl_rows(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) per row from log-probabilities, in float64, clamped at 0 against rounding."""
    logp, logq = logp.double(), logq.double()
    return (logp.exp() * (logp - logq)).sum(-1).clamp(min=0)


# ---------------------------------------------------------------------------------------------
# Where a channel's signal is read

# Modules that keep each channel separate and map 0 to 0, so a channel that is zero before them is
# zero after them: zeroing a channel at their output is the same as removing the filter.
ACTIVATIONS = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.ELU,
    nn.CELU,
    nn.SELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Hardswish,
    nn.Hardtanh,
    nn.Tanh,
    nn.Softsign,
)
# The same, but only moving values around: looked through, never where a map is read.
LOOK_THROUGH = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d)


class Site(NamedTuple):
    module: nn.Module  # the module whose output carries the channel's feature map
    call: int  # which call of that module in one forward pass (shared modules)
    last_dim: bool  # channels on the last dimension (Linear) rather than dimension 1 (conv)


def channel_sites(model: nn.Module, x1: torch.Tensor) -> dict[nn.Module, Site]:
    """For every conv/linear layer, the place its output channels are read: after the BatchNorm that
    directly follows it, if any, and after the activation modules that follow (looking through
    max-pools and dropouts, so VGG's conv-bn-relu-pool is read after the relu and the MNIST CNN's
    conv-pool-relu after the relu). That is the channel's feature map as the next layer sees it,
    HRank's and DropNet's 'activation'. The chain is traced by tensor identity on one forward pass
    and stops at anything that mixes channels or is not a module (an addition, a functional relu),
    so a residual block's last BatchNorm is read before the addition."""
    calls = []  # (module, call index, input, output)
    counters: dict[nn.Module, int] = defaultdict(int)

    def record(module, inputs, output):
        k = counters[module]
        counters[module] += 1
        calls.append((module, k, inputs[0] if inputs else None, output))

    kinds = WEIGHT_LAYERS + (_BatchNorm,) + ACTIVATIONS + LOOK_THROUGH
    watched = [m for m in model.modules() if isinstance(m, kinds)]
    with evaluating(model), torch.no_grad(), forward_hooks([(m, record) for m in watched]):
        model(x1)

    def successor(i):
        out = calls[i][3]
        if not isinstance(out, torch.Tensor):
            return None
        for j in range(i + 1, len(calls)):
            if calls[j][2] is out:
                return j
        return None

    sites: dict[nn.Module, Site] = {}
    for i, (module, _kind, _, _) in enumerate(calls):
        if not isinstance(module, WEIGHT_LAYERS) or module in sites:
            continue  # a layer called twice is read at its first call
        read, j = i, successor(i)
        if j is not None and isinstance(calls[j][0], _BatchNorm):
            read, j = j, successor(j)
        while j is not None and isinstance(calls[j][0], ACTIVATIONS + LOOK_THROUGH):
            if isinstance(calls[j][0], ACTIVATIONS):
                read = j
            j = successor(j)
        sites[module] = Site(calls[read][0], calls[read][1], isinstance(module, nn.Linear))
    return sites


def channels_first(a: torch.Tensor, last_dim: bool) -> torch.Tensor:
    """(N, C, ...) whatever the layer type; a Linear's (N, C) stays (N, C)."""
    return a.movedim(-1, 1) if last_dim and a.dim() > 2 else a


def collect_site_stats(
    model: nn.Module,
    x: torch.Tensor,
    sites: dict[nn.Module, Site],
    fn: Callable[[torch.Tensor], torch.Tensor],
    batch_size: int,
) -> dict[nn.Module, torch.Tensor]:
    """fn(feature maps (n, C, ...)) -> (n, C) at every layer's site, over the batch: {layer: (N, C)}."""
    by_site: dict[tuple[nn.Module, int], list[nn.Module]] = defaultdict(list)
    for layer, site in sites.items():
        by_site[(site.module, site.call)].append(layer)
    out: dict[nn.Module, list[torch.Tensor]] = defaultdict(list)
    counters: dict[nn.Module, int] = defaultdict(int)

    def hook(module, inputs, output):
        k = counters[module]
        counters[module] += 1
        for layer in by_site.get((module, k), ()):
            out[layer].append(fn(channels_first(output.detach(), sites[layer].last_dim).float()).cpu())

    modules = {s.module for s in sites.values()}
    with evaluating(model), torch.no_grad(), forward_hooks([(m, hook) for m in modules]):
        for s in chunks(len(x), batch_size):
            counters.clear()
            model(x[s])
    return {layer: torch.cat(v) for layer, v in out.items()}


def zero_channels_hook(site: Site, mask: torch.Tensor, counters: dict):
    """A forward hook that multiplies the site's output by `mask` (rows of the batch x channels)."""

    def hook(module, inputs, output):
        k = counters[module]
        counters[module] += 1
        if k != site.call:
            return None
        shape = [1] * output.dim()
        shape[0] = mask.shape[0]
        shape[-1 if site.last_dim else 1] = mask.shape[1]
        return output * mask.to(output.device, output.dtype).view(shape)

    return hook


def block_body_outputs(
    model: nn.Module, blocks, x: torch.Tensor, fn: Callable[[torch.Tensor], torch.Tensor], batch_size: int
) -> list[torch.Tensor]:
    """fn(body output of each block (n, ...)) over the batch, concatenated per block."""
    out: list[list[torch.Tensor]] = [[] for _ in blocks]

    def hook_for(b):
        def hook(module, inputs, output):
            out[b].append(fn(output.detach().float()).cpu())

        return hook

    hooks = [(blk.body, hook_for(b)) for b, (_, blk) in enumerate(blocks)]
    with evaluating(model), torch.no_grad(), forward_hooks(hooks):
        for s in chunks(len(x), batch_size):
            model(x[s])
    return [torch.cat(v) if v else torch.zeros(0) for v in out]


def weight_params(model: nn.Module) -> dict[nn.Module, nn.Parameter]:
    """The weight of every conv, linear and BatchNorm layer (what group items can refer to)."""
    return {
        m: m.weight
        for m in model.modules()
        if isinstance(m, WEIGHT_LAYERS + (_BatchNorm,)) and isinstance(getattr(m, "weight", None), nn.Parameter)
    }


@contextmanager
def grads_enabled(params):
    """requires_grad on the given parameters for the duration (a frozen model can still be scored)."""
    before = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            yield
    finally:
        for p, r in zip(params, before):
            p.requires_grad_(r)
