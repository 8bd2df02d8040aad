"""Loss-based criteria: first-order Taylor (Molchanov et al. 2019) and the diagonal-Hessian / OBD
saliency (LeCun et al. 1990), as Bai et al. (MRPF) use them through Torch-Pruning.

prepare() runs the batch in eval mode (BatchNorm on running statistics, so every image is scored
on its own) and stores, per weight of every conv, linear and BatchNorm layer, the saliency of that
weight. Scoring a group sums the saliencies of a channel's weights (scope 'filter': its output
filters; 'group': every weight that goes with it, Torch-Pruning's group reduction). Gradients are
taken with torch.autograd.grad, so the model's .grad fields are left as they were.
"""

from __future__ import annotations

from abc import abstractmethod

import torch
import torch.nn.functional as F
from torch import nn

from robustprune.pruning.criteria.base import CRITERIA, Criterion
from robustprune.pruning.criteria.common import (
    as_batch,
    check_positive,
    check_scope,
    chunks,
    evaluating,
    forward_hooks,
    grads_enabled,
    need_data,
    need_labels,
    weight_group_scores,
    weight_params,
)


class _WeightSaliency(Criterion):
    needs_data = True

    def __init__(self, scope: str = "filter", max_images: int | None = None, batch_size: int = 128):
        self.scope = check_scope(self.name, scope)
        self.max_images = check_positive(self.name, "max_images", max_images, allow_none=True)
        self.batch_size = check_positive(self.name, "batch_size", batch_size)
        self._saliency: dict[nn.Module, torch.Tensor] | None = None

    @abstractmethod
    def _weight_saliency(self, model, params, x, y) -> list[torch.Tensor]:
        """One saliency tensor per weight in `params` (same shapes), from the images x and labels y."""

    def prepare(self, model: nn.Module, x: torch.Tensor | None = None, y: torch.Tensor | None = None) -> None:
        super().prepare(model, x, y)
        need_labels(self.name, x, y)
        x, y = as_batch(model, x, y, self.max_images)
        layers = weight_params(model)
        params = list(layers.values())
        with evaluating(model), grads_enabled(params):
            sal = self._weight_saliency(model, params, x, y)
        self._saliency = {m: s.detach().cpu() for m, s in zip(layers, sal)}

    def _values(self, layer: nn.Module) -> torch.Tensor | None:
        s = self._saliency.get(layer)
        if s is not None and s.shape != layer.weight.shape:
            raise RuntimeError(
                f"criterion '{self.name}' scored a layer of weight shape {tuple(s.shape)} that now "
                f"has {tuple(layer.weight.shape)}; call prepare() again after the model changed"
            )
        return s

    def __call__(self, group) -> torch.Tensor:
        if self._saliency is None:
            raise RuntimeError(f"criterion '{self.name}' was not prepared: call prepare(model, x, y) first")
        return weight_group_scores(group, self._values, self.scope)


def _grad_sum(model, params, x, y, batch_size) -> list[torch.Tensor]:
    """Gradient of the summed cross-entropy over the batch, per parameter."""
    total = [torch.zeros_like(p) for p in params]
    for s in chunks(len(x), batch_size):
        loss = F.cross_entropy(model(x[s]), y[s], reduction="sum")
        for t, g in zip(total, torch.autograd.grad(loss, params, allow_unused=True)):
            if g is not None:
                t += g
    return total


@CRITERIA.register("taylor")
class Taylor(_WeightSaliency):
    """First-order Taylor |w * dL/dw| summed over each filter (Molchanov 2019; MRPF eq. 16); needs data.

    L is the mean cross-entropy over the batch (one forward and backward pass over it); the
    saliency of a weight is |w * dL/dw| (Torch-Pruning's TaylorImportance, multivariable=False).
    Blocks: mean over images of |sum of body output * dL_i/d(body output)|, the first-order change
    of image i's loss when the block's body is removed (the block becomes its shortcut)."""

    name = "taylor"

    def _weight_saliency(self, model, params, x, y):
        grads = _grad_sum(model, params, x, y, self.batch_size)
        return [(p.detach() * g / len(x)).abs() for p, g in zip(params, grads)]

    def block_scores(self, model, blocks, x=None, y=None) -> torch.Tensor:
        need_data(self, x)
        need_labels(self.name, x, y)
        x, y = as_batch(model, x, y, self.max_images)
        scores = torch.zeros(len(blocks), dtype=torch.float64)
        for s in chunks(len(x), self.batch_size):
            outs: list[torch.Tensor | None] = [None] * len(blocks)

            def keep(b, outs=outs):
                def hook(module, inputs, output):
                    outs[b] = output

                return hook

            with (
                evaluating(model),
                torch.enable_grad(),
                forward_hooks([(blk.body, keep(b)) for b, (_, blk) in enumerate(blocks)]),
            ):
                xs = x[s].clone().requires_grad_(True)  # a graph even if every parameter is frozen
                loss = F.cross_entropy(model(xs), y[s], reduction="sum")
                live = [b for b, o in enumerate(outs) if o is not None and o.requires_grad]
                grads = torch.autograd.grad(loss, [outs[b] for b in live], allow_unused=True)
            for b, g in zip(live, grads):
                if g is not None:
                    scores[b] += (outs[b].detach() * g).flatten(1).sum(1).abs().double().sum().cpu()
        return (scores / len(x)).float()


@CRITERIA.register("hessian")
class Hessian(_WeightSaliency):
    """OBD saliency w^2 * H_ww summed over each filter, H the diagonal Fisher; needs data (costly).

    The Hessian diagonal is approximated by the empirical Fisher, the mean over images of the
    squared per-image gradient (as Torch-Pruning's HessianImportance accumulates it); OBD's factor
    1/2 is dropped. Per-image gradients cost one backward pass per image, so max_images defaults
    to 64."""

    name = "hessian"

    def __init__(self, scope: str = "filter", max_images: int | None = 64, batch_size: int = 128):
        super().__init__(scope=scope, max_images=max_images, batch_size=batch_size)

    def _weight_saliency(self, model, params, x, y):
        fisher = [torch.zeros_like(p) for p in params]
        for i in range(len(x)):
            loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
            for f, g in zip(fisher, torch.autograd.grad(loss, params, allow_unused=True)):
                if g is not None:
                    f += g.pow(2)
        return [p.detach().pow(2) * f / len(x) for p, f in zip(params, fisher)]
