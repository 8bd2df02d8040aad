"""Data-free criteria: weight magnitude (L1, L2), LAMP and random.

They are written here rather than wrapped from Torch-Pruning's MagnitudeImportance, LAMPImportance
and RandomImportance because those (1.6) reduce a group by scattering into the root channel
*values*, which fails for a group built on a subset of channels, sort the group's index lists in
place (Taylor/Hessian), and draw random scores from the global RNG, which a seed in the study
file cannot reproduce. The arithmetic is theirs: sum of |w|^p over a channel's weights, LAMP's
normalisation, uniform random scores.
"""

from __future__ import annotations

import torch
from torch import nn

from robustprune.pruning.criteria.base import CRITERIA, Criterion
from robustprune.pruning.criteria.common import WEIGHT_LAYERS, check_scope, weight_group_scores


class _Magnitude(Criterion):
    p: int = 1

    def __init__(self, scope: str = "filter"):
        self.scope = check_scope(self.name, scope)

    def __call__(self, group) -> torch.Tensor:
        return weight_group_scores(group, lambda layer: layer.weight.detach().abs().pow(self.p), self.scope)

    def block_scores(self, model, blocks, x=None, y=None) -> torch.Tensor:
        """Mean |w|^p over the weights of the conv and linear layers of each block's body."""
        scores = []
        for _, block in blocks:
            ws = [
                m.weight.detach().abs().pow(self.p).flatten()
                for m in block.body.modules()
                if isinstance(m, WEIGHT_LAYERS)
            ]
            scores.append(torch.cat(ws).mean().item() if ws else 0.0)
        return torch.tensor(scores, dtype=torch.float32)


@CRITERIA.register("l1")
class L1(_Magnitude):
    """L1 norm of each filter (Li et al. 2017); blocks: mean |w| of the body; data-free.

    scope='filter' (default) sums |w| over the output filter of every conv/linear layer whose
    output channels the group removes: for a plain conv that is the filter's L1 norm, for the
    coupled channels of a residual stage the sum over the stage's convs. scope='group' adds every
    other weight that goes with the channel (next layers' input slices, BatchNorm scale), as
    Torch-Pruning's group importance does."""

    name = "l1"
    p = 1


@CRITERIA.register("l2")
class L2(_Magnitude):
    """Squared L2 norm of each filter (MRPF eq. 15, p = 2); blocks: mean w^2 of the body; data-free.

    Same members and scopes as l1, with |w|^2 (the 'Magnitude' criterion of Bai et al., which is
    Torch-Pruning's MagnitudeImportance with p = 2; use scope='group' for its group reduction)."""

    name = "l2"
    p = 2


@CRITERIA.register("lamp")
class LAMP(Criterion):
    """LAMP score (Lee et al. 2021) of the squared-L2 filter magnitudes; data-free.

    score(u) = m_u / sum of m_v over the channels v with m_v >= m_u (channels sorted by magnitude
    m, from l2 with the same scope). Within a group this ranks exactly as l2; it differs when
    scores from different layers are compared (global pruning), which is what LAMP is for."""

    name = "lamp"
    normalized = True  # already comparable across layers: global pruning must not rescale it

    def __init__(self, scope: str = "filter"):
        self.scope = check_scope(self.name, scope)

    def __call__(self, group) -> torch.Tensor:
        m = weight_group_scores(group, lambda layer: layer.weight.detach().pow(2), self.scope).double()
        order = torch.argsort(m, stable=True)
        sorted_m = m[order]
        tail = sorted_m.flip(0).cumsum(0).flip(0)  # sum over this channel and every larger one
        out = torch.zeros_like(m)
        out[order] = sorted_m / tail.clamp(min=torch.finfo(torch.float64).tiny)
        return out.float()


@CRITERIA.register("random")
class Random(Criterion):
    """Uniform random scores from a seeded generator (the 'Random' baseline); data-free.

    The generator is reset by prepare(), so the same seed and the same order of groups give the
    same scores; block scores depend only on the seed and the number of blocks."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.seed = int(seed)
        self._gen = torch.Generator().manual_seed(self.seed)

    def prepare(self, model: nn.Module, x=None, y=None) -> None:
        super().prepare(model, x, y)
        self._gen = torch.Generator().manual_seed(self.seed)

    def __call__(self, group) -> torch.Tensor:
        return torch.rand(len(group[0].idxs), generator=self._gen)

    def block_scores(self, model, blocks, x=None, y=None) -> torch.Tensor:
        return torch.rand(len(blocks), generator=torch.Generator().manual_seed(self.seed))
