"""Activation-based criteria: HRank, ExpectedABS, PLS (VIP scores) and KL-divergence.

prepare() runs the batch through the unpruned model in eval mode under no_grad, with forward
hooks that are removed afterwards, and stores one statistic per output channel of every conv and
linear layer. A channel's feature map is read where the next layer reads it: after the BatchNorm
that directly follows the layer and after the activation that follows, looking through max-pools
and dropouts (see common.channel_sites), so a filter whose BatchNorm scale and shift are zero, or whose activation
is always zero, has an all-zero map.

Scoring a group reads the statistics of the layers whose output channels the group removes. The
coupled channels of a residual stage are produced by several convs (the stem and every block's
last conv); their statistics are averaged (HRank, ExpectedABS, PLS) or summed (KL, an estimate of
the damage of removing the channel from all of them). A member with no statistics (a layer the
forward pass did not reach) contributes nothing; a group with none scores 0 everywhere.
"""

from __future__ import annotations

import warnings
from abc import abstractmethod
from collections import defaultdict

import numpy as np
import torch
from torch import nn

from robustprune.errors import UserError
from robustprune.pruning.criteria.base import CRITERIA, Criterion
from robustprune.pruning.criteria.common import (
    Site,
    as_batch,
    block_body_outputs,
    channel_sites,
    check_positive,
    chunks,
    collect_site_stats,
    evaluating,
    forward_hooks,
    kl_rows,
    log_probs,
    need_data,
    need_labels,
    out_channels,
    stat_group_scores,
    zero_channels_hook,
)

# ---------------------------------------------------------------------------------------------
# Statistics of feature maps (n, C, ...) -> (n, C)


def mean_abs(a: torch.Tensor) -> torch.Tensor:
    return a.abs().flatten(2).mean(2) if a.dim() > 2 else a.abs()


def global_average(a: torch.Tensor) -> torch.Tensor:
    return a.flatten(2).mean(2) if a.dim() > 2 else a


def feature_map_ranks(a: torch.Tensor) -> torch.Tensor:
    """Rank of each image's and channel's feature map (n, C, H, W) -> (n, C), as HRank computes it
    (torch.linalg.matrix_rank, default tolerance). A Linear unit's 'map' is 1x1 (rank 1 unless it
    is 0); a 1-d map of length L is 1 x L; a 3-d map D x H x W is D x (H*W)."""
    if a.dim() == 2:
        maps = a[:, :, None, None]
    elif a.dim() == 3:
        maps = a[:, :, None, :]
    else:
        maps = a.flatten(3) if a.dim() > 4 else a
    return torch.linalg.matrix_rank(maps.float()).float()


def vip_scores(X, Y, n_components: int = 2) -> np.ndarray:
    """Variable importance in projection of every column of X in a PLS regression of Y on X
    (scikit-learn's PLSRegression, X and Y standardised):

        VIP_j = sqrt(p * sum_a SS_a * (w_ja / |w_a|)^2 / sum_a SS_a),  SS_a = |t_a|^2 * |q_a|^2

    with weights w, scores t and Y-loadings q of component a, p columns. The squares average to 1
    over the columns. Constant columns get 0; so does everything when no column varies."""
    from sklearn.cross_decomposition import PLSRegression

    X = np.asarray(X, dtype=np.float64)
    Y = np.asarray(Y, dtype=np.float64)
    if Y.ndim == 1:
        Y = Y[:, None]
    n, p = X.shape
    varies = X.std(axis=0) > 0
    vip = np.zeros(p)
    if n < 2 or not varies.any() or not (Y.std(axis=0) > 0).any():
        return vip
    Xv = X[:, varies]
    a = max(1, min(int(n_components), Xv.shape[1], n - 1))
    pls = PLSRegression(n_components=a, scale=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 'Y residual is constant' once the components explain Y
        pls.fit(Xv, Y)
    W, T, Q = pls.x_weights_, pls.x_scores_, pls.y_loadings_
    W = W / np.maximum(np.linalg.norm(W, axis=0, keepdims=True), 1e-300)
    ss = (T**2).sum(0) * (Q**2).sum(0)
    ss = np.nan_to_num(ss)
    if ss.sum() <= 0:
        return vip
    vip[varies] = np.sqrt(Xv.shape[1] * (np.nan_to_num(W) ** 2 @ ss) / ss.sum())
    return vip


def one_hot(name: str, y: torch.Tensor) -> np.ndarray:
    labels = y.cpu().numpy()
    classes = np.unique(labels)
    if len(classes) < 2:
        raise UserError(
            f"criterion '{name}' needs images of at least two classes to fit its PLS model; "
            f"the batch has only class {classes[0] if len(classes) else 'none'}"
        )
    return (labels[:, None] == classes[None, :]).astype(np.float64)


# ---------------------------------------------------------------------------------------------
# Criteria


class _ChannelStat(Criterion):
    """Stores stats[layer] = one value per output channel in prepare(); scores groups from them."""

    needs_data = True
    reduce = "mean"

    def __init__(self, max_images: int | None = None, batch_size: int = 128):
        self.max_images = check_positive(self.name, "max_images", max_images, allow_none=True)
        self.batch_size = check_positive(self.name, "batch_size", batch_size)
        self._stats: dict[nn.Module, torch.Tensor] | None = None

    def prepare(self, model: nn.Module, x: torch.Tensor | None = None, y: torch.Tensor | None = None) -> None:
        super().prepare(model, x, y)
        x, y = as_batch(model, x, y, self.max_images)
        sites = channel_sites(model, x[:1])
        self._stats = {k: v.detach().float().cpu() for k, v in self._collect(model, sites, x, y).items()}

    @abstractmethod
    def _collect(self, model, sites: dict[nn.Module, Site], x, y) -> dict[nn.Module, torch.Tensor]:
        """One statistic per output channel of every conv layer, from the images x (and labels y)."""

    def __call__(self, group) -> torch.Tensor:
        if self._stats is None:
            raise RuntimeError(f"criterion '{self.name}' was not prepared: call prepare(model, x, y) first")
        return stat_group_scores(group, self._stats, self.name, self.reduce)

    def _block_data(self, model, x, y, labels: bool = False):
        need_data(self, x)
        if labels:
            need_labels(self.name, x, y)
        return as_batch(model, x, y, self.max_images)


@CRITERIA.register("expected_abs")
class ExpectedABS(_ChannelStat):
    """Mean |activation| of each channel over images and positions (DropNet, Tan & Motani 2020); needs data.

    Cost: one forward pass over the batch. Blocks: mean |body output| (before the addition)."""

    name = "expected_abs"

    def _collect(self, model, sites, x, y):
        means = collect_site_stats(model, x, sites, mean_abs, self.batch_size)
        return {k: v.mean(0) for k, v in means.items()}

    def block_scores(self, model, blocks, x=None, y=None) -> torch.Tensor:
        x, _ = self._block_data(model, x, y)
        outs = block_body_outputs(model, blocks, x, lambda a: a.abs().flatten(1).mean(1), self.batch_size)
        return torch.stack([o.mean() for o in outs]).float()


@CRITERIA.register("hrank")
class HRank(_ChannelStat):
    """Mean over images of the rank of each channel's feature map (Lin et al. 2020); needs data.

    Cost: one forward pass and one small SVD per image and channel; max_images defaults to 256.
    Blocks: mean over images and channels of the rank of the body's output maps."""

    name = "hrank"

    def __init__(self, max_images: int | None = 256, batch_size: int = 128):
        super().__init__(max_images=max_images, batch_size=batch_size)

    def _collect(self, model, sites, x, y):
        ranks = collect_site_stats(model, x, sites, feature_map_ranks, self.batch_size)
        return {k: v.mean(0) for k, v in ranks.items()}

    def block_scores(self, model, blocks, x=None, y=None) -> torch.Tensor:
        x, _ = self._block_data(model, x, y)
        outs = block_body_outputs(model, blocks, x, lambda a: feature_map_ranks(a).flatten(1).mean(1), self.batch_size)
        return torch.stack([o.mean() for o in outs]).float()


@CRITERIA.register("pls")
class PLS(_ChannelStat):
    """VIP score of each channel in one PLS regression of the labels on all channels (Jordao et al. 2020); needs data.

    Every channel of every conv/linear layer is one feature, its feature map global-average-pooled
    per image; one PLS model (n_components, default 2) regresses the one-hot labels on all of them
    at once, so VIP scores are comparable across layers. Cost: one forward pass and one PLS fit on
    an (images x channels) matrix.
    Blocks (Jordao et al.'s layer criterion): each block's pooled body output is projected on its
    first PLS component, the per-block projections form an (images x blocks) matrix, and a second
    PLS fit on it gives each block's VIP score. A block whose output does not vary scores 0."""

    name = "pls"

    def __init__(self, n_components: int = 2, max_images: int | None = None, batch_size: int = 128):
        super().__init__(max_images=max_images, batch_size=batch_size)
        self.n_components = check_positive(self.name, "n_components", n_components)

    def prepare(self, model, x=None, y=None) -> None:
        Criterion.prepare(self, model, x, y)
        need_labels(self.name, x, y)
        super().prepare(model, x, y)

    def _collect(self, model, sites, x, y):
        feats = collect_site_stats(model, x, sites, global_average, self.batch_size)
        layers = list(feats)
        if not layers:
            return {}
        X = torch.cat([feats[m] for m in layers], dim=1).double().numpy()
        vip = torch.from_numpy(vip_scores(X, one_hot(self.name, y), self.n_components))
        sizes = [feats[m].shape[1] for m in layers]
        return dict(zip(layers, vip.split(sizes)))

    def block_scores(self, model, blocks, x=None, y=None) -> torch.Tensor:
        x, y = self._block_data(model, x, y, labels=True)
        Y = one_hot(self.name, y)
        outs = block_body_outputs(model, blocks, x, lambda a: global_average(a), self.batch_size)
        from sklearn.cross_decomposition import PLSRegression

        cols = []
        for f in outs:
            f = f.double().numpy()
            varies = f.std(axis=0) > 0
            if not varies.any():
                cols.append(np.zeros(len(x)))
                continue
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cols.append(PLSRegression(n_components=1).fit(f[:, varies], Y).x_scores_[:, 0])
        return torch.from_numpy(vip_scores(np.stack(cols, axis=1), Y, self.n_components)).float()


@CRITERIA.register("kl")
class KL(_ChannelStat):
    """KL(p_full || p_without) of the softmax outputs when one channel is zeroed (Luo & Wu 2020); needs data (costly).

    For every channel of every conv/linear layer, the channel's feature map is set to zero by a
    forward hook (that is removing the filter, see the module notes) and the KL divergence of the
    full model's class distribution from the pruned one's is averaged over max_images images
    (default 64). Cost: one forward pass over those images per channel of the network, batched
    several channels at a time (batch_size rows per pass). Blocks: the same with a block's body
    output set to zero, i.e. the block replaced by its shortcut; one pass per block."""

    name = "kl"
    reduce = "sum"

    def __init__(self, max_images: int | None = 64, batch_size: int = 256):
        super().__init__(max_images=max_images, batch_size=batch_size)

    def _collect(self, model, sites, x, y):
        n = len(x)
        per = max(1, self.batch_size // n)  # channels zeroed side by side in one pass
        rows = max(1, self.batch_size // per)  # images per pass (all of them unless n > batch_size)
        stats: dict[nn.Module, torch.Tensor] = {}
        with evaluating(model), torch.no_grad():
            logp = log_probs(model, x, self.batch_size)
            for layer, site in sites.items():
                width = out_channels(layer)
                kl = torch.zeros(width, dtype=torch.float64)
                for c in chunks(width, per):
                    k = c.stop - c.start
                    mask = torch.ones(k, width)
                    mask[torch.arange(k), torch.arange(c.start, c.stop)] = 0
                    for s in chunks(n, rows):
                        m = s.stop - s.start
                        hook = zero_channels_hook(site, mask.repeat_interleave(m, 0), defaultdict(int))
                        with forward_hooks([(site.module, hook)]):
                            logq = model(x[s].repeat(k, *[1] * (x.dim() - 1))).float().log_softmax(-1)
                        kl[c] += kl_rows(logp[s].repeat(k, 1), logq).cpu().view(k, m).sum(1)
                stats[layer] = kl / n
        return stats

    def block_scores(self, model, blocks, x=None, y=None) -> torch.Tensor:
        x, _ = self._block_data(model, x, y)
        scores = []
        with evaluating(model), torch.no_grad():
            logp = log_probs(model, x, self.batch_size)
            for _, block in blocks:
                with forward_hooks([(block.body, lambda m, i, o: torch.zeros_like(o))]):
                    logq = log_probs(model, x, self.batch_size)
                scores.append(kl_rows(logp, logq).mean().item())
        return torch.tensor(scores, dtype=torch.float32)
