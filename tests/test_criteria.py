"""Importance criteria on tiny models: one score per channel of a Torch-Pruning group, a planted dead
filter or block ranked last, seeded randomness, the data checks, VIP and HRank on hand-checkable
cases."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch_pruning as tp
from torch import nn

from robustprune.errors import UserError
from robustprune.models.blocks import ResidualBlock, residual_blocks
from robustprune.pruning.criteria import CRITERIA, block_criteria, build_criterion
from robustprune.pruning.criteria.activation import feature_map_ranks, vip_scores

ALL = CRITERIA.names()
SCORED = [n for n in ALL if n != "random"]
DATA = [n for n in ALL if CRITERIA.get(n).needs_data]
BLOCK = block_criteria()


class TinyCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6)
        self.conv2, self.bn2 = nn.Conv2d(6, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.relu = nn.ReLU(inplace=True)  # shared by both layers, as in the MNIST CNN
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.pool(self.relu(self.bn2(self.conv2(x))))
        return self.fc(x.flatten(1))


class Block(ResidualBlock):
    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(),
            nn.Conv2d(c, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
        )
        self.shortcut = nn.Identity()
        self.act = nn.ReLU()


class TinyResNet(nn.Module):
    def __init__(self, blocks=3):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU())
        self.layer = nn.Sequential(*[Block(6) for _ in range(blocks)])
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(6, 3)

    def forward(self, x):
        return self.fc(self.pool(self.layer(self.stem(x))).flatten(1))


def _calibrate(model):
    """BatchNorm statistics of the data and random affine parameters, as in a trained model: every
    channel is then active on part of the images (none is dead by accident)."""
    gen = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None  # cumulative average: the statistics of the batch below
            m.weight.data.uniform_(0.5, 1.5, generator=gen)
            m.bias.data.normal_(0, 0.1, generator=gen)
    with torch.no_grad():
        model.train()(data()[0])
    return model.eval()


def _kill(conv, bn, c):
    """Filter c of conv is dead: weights near zero, BatchNorm scale and shift zero."""
    with torch.no_grad():
        conv.weight[c] *= 1e-4
        bn.weight[c] = 0
        bn.bias[c] = 0


def tiny_cnn(plant=True):
    torch.manual_seed(0)
    m = _calibrate(TinyCNN())
    if plant:
        _kill(m.conv1, m.bn1, 2)
        _kill(m.conv2, m.bn2, 5)
    return m.eval()


def tiny_resnet(plant=True, dead_block=None):
    torch.manual_seed(0)
    m = _calibrate(TinyResNet())
    if plant:
        _kill(m.stem[0], m.stem[1], 1)  # channel 1 of the residual stream, in every conv feeding it
        for blk in m.layer:
            _kill(blk.body[3], blk.body[4], 1)
        _kill(m.layer[0].body[0], m.layer[0].body[1], 4)  # an internal channel of block 0
    if dead_block is not None:
        body = m.layer[dead_block].body
        with torch.no_grad():
            body[0].weight *= 1e-4
            body[3].weight *= 1e-4
            body[4].weight.zero_()
            body[4].bias.zero_()
    return m.eval()


def data(n=48):
    """Images whose class is the brightest of three vertical strips (a signal the labels follow)."""
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 3
    x = torch.rand(n, 1, 8, 8, generator=g) * 0.5
    for i in range(n):
        x[i, :, :, 3 * y[i] : 3 * y[i] + 2] += 0.5
    return x, y


def group(model, layer, fn=tp.prune_conv_out_channels, idxs=None):
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=torch.zeros(1, 1, 8, 8))
    n = layer.weight.shape[0]
    return dg.get_pruning_group(layer, fn, idxs=list(range(n)) if idxs is None else idxs)


def lowest(s: torch.Tensor) -> int:
    """The index of the strictly lowest score (-1 when the minimum is shared)."""
    k = int(torch.argmin(s))
    return k if (s > s[k]).sum() == len(s) - 1 else -1


def prepared(name, model, **params):
    c = build_criterion(name, **params)
    x, y = data()
    c.prepare(model, x, y)
    return c


def test_every_issue_criterion_is_registered():
    expected = {"l1", "l2", "lamp", "random", "taylor", "hessian", "hrank", "expected_abs", "pls", "kl"}
    assert expected <= set(ALL)
    assert set(BLOCK) == {"l1", "l2", "random", "expected_abs", "hrank", "pls", "kl", "taylor"}
    assert set(DATA) == {"taylor", "hessian", "hrank", "expected_abs", "pls", "kl"}


@pytest.mark.parametrize("name", ALL)
def test_scores_per_channel_and_dead_filter_last_plain_cnn(name):
    m = tiny_cnn()
    c = prepared(name, m)
    for layer, dead in ((m.conv1, 2), (m.conv2, 5)):
        s = c(group(m, layer))
        assert s.shape == (layer.out_channels,) and torch.isfinite(s).all()
        if name != "random":
            assert lowest(s) == dead, (name, s)
    # groups rooted at a BatchNorm or at a Linear layer score too
    s = c(group(m, m.bn1, tp.prune_batchnorm_out_channels))
    assert s.shape == (6,) and torch.isfinite(s).all()
    if name != "random":
        assert lowest(s) == 2
    s = c(group(m, m.fc, tp.prune_linear_out_channels))
    assert s.shape == (3,) and torch.isfinite(s).all()


@pytest.mark.parametrize("name", ALL)
def test_scores_per_channel_and_dead_filter_last_resnet(name):
    m = tiny_resnet()
    c = prepared(name, m)
    for layer, dead in ((m.stem[0], 1), (m.layer[0].body[0], 4), (m.layer[1].body[0], None)):
        s = c(group(m, layer))
        assert s.shape == (6,) and torch.isfinite(s).all()
        if dead is not None and name != "random":
            assert lowest(s) == dead, (name, s)
    # the residual group is the same whichever of its convs is the root
    if name != "random":
        a, b = c(group(m, m.stem[0])), c(group(m, m.layer[2].body[3]))
        assert torch.allclose(a, b)


@pytest.mark.parametrize("name", BLOCK)
def test_dead_block_ranked_last(name):
    m = tiny_resnet(plant=False, dead_block=1)
    x, y = data()
    blocks = residual_blocks(m)
    s = build_criterion(name).block_scores(m, blocks, x, y)
    assert s.shape == (3,) and torch.isfinite(s).all()
    if name != "random":
        assert lowest(s) == 1, (name, s)


def test_random_is_seeded():
    m = tiny_resnet(plant=False)
    blocks = residual_blocks(m)

    def scores(seed):
        c = build_criterion("random", seed=seed)
        c.prepare(m)
        return torch.cat([c(group(m, m.stem[0])), c(group(m, m.layer[0].body[0])), c.block_scores(m, blocks)])

    assert torch.equal(scores(0), scores(0))
    assert not torch.equal(scores(0), scores(1))


@pytest.mark.parametrize("name", DATA)
def test_data_criteria_without_data_raise(name):
    m = tiny_resnet(plant=False)
    with pytest.raises(UserError, match=name):
        build_criterion(name).prepare(m)
    if name in BLOCK:
        with pytest.raises(UserError, match=name):
            build_criterion(name).block_scores(m, residual_blocks(m))


@pytest.mark.parametrize("name", ["taylor", "hessian", "pls"])
def test_label_criteria_without_labels_raise(name):
    x, _ = data()
    with pytest.raises(UserError, match="labels"):
        build_criterion(name).prepare(tiny_cnn(), x)


def test_bad_parameters_are_user_errors():
    with pytest.raises(UserError, match="scope"):
        build_criterion("l1", scope="layer")
    with pytest.raises(UserError, match="n_components"):
        build_criterion("pls", n_components=0)
    with pytest.raises(UserError, match="max_images"):
        build_criterion("kl", max_images=-3)


def test_vip_of_the_label_feature_is_highest():
    rng = np.random.default_rng(0)
    n = 200
    y = rng.integers(0, 2, n)
    X = np.column_stack([y.astype(float), rng.normal(size=(n, 4))])
    Y = np.eye(2)[y]
    vip = vip_scores(X, Y, n_components=2)
    assert int(np.argmax(vip)) == 0 and vip[0] > 2 * vip[1:].max()
    assert np.isclose((vip**2).sum(), X.shape[1])  # VIP^2 averages to 1 over the features
    X[:, 3] = 7.0  # a constant feature explains nothing
    assert vip_scores(X, Y)[3] == 0


def test_hrank_of_rank_one_maps_is_one():
    g = torch.Generator().manual_seed(0)
    u, v = torch.rand(5, 2, 8, 1, generator=g) + 0.1, torch.rand(5, 2, 1, 8, generator=g) + 0.1
    assert torch.equal(feature_map_ranks(u * v), torch.ones(5, 2))
    assert torch.equal(feature_map_ranks(torch.zeros(1, 3, 4, 4)), torch.zeros(1, 3))
    # through the criterion: a 1x1 conv maps rank-1 images to rank-1 feature maps
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 1, bias=False), nn.Flatten(), nn.Linear(3 * 64, 2)).eval()
    x = (torch.rand(10, 1, 8, 1, generator=g) + 0.1) * (torch.rand(10, 1, 1, 8, generator=g) + 0.1)
    c = build_criterion("hrank")
    c.prepare(model, x)
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=x[:1])
    s = c(dg.get_pruning_group(model[0], tp.prune_conv_out_channels, idxs=[0, 1, 2]))
    assert torch.equal(s, torch.ones(3))


def test_group_scope_sums_every_weight_of_the_channel():
    m = tiny_cnn(plant=False)
    c = build_criterion("l1", scope="group")
    s = c(group(m, m.conv2))
    k = 3
    manual = (
        m.conv2.weight[k].abs().sum() + m.bn2.weight[k].abs() + m.fc.weight[:, 16 * k : 16 * (k + 1)].abs().sum()
    )  # flatten: 4x4 inputs of fc per channel
    assert torch.isclose(s[k], manual)
    assert torch.isclose(build_criterion("l1")(group(m, m.conv2))[k], m.conv2.weight[k].abs().sum())


def test_subset_of_channels_scores_those_channels():
    m = tiny_cnn()
    for name in ("l2", "expected_abs"):
        c = prepared(name, m)
        full = c(group(m, m.conv2))
        assert torch.allclose(c(group(m, m.conv2, idxs=[1, 5, 6])), full[[1, 5, 6]])


def test_lamp_ranks_as_l2_and_tops_at_one():
    m = tiny_cnn(plant=False)
    lamp, l2 = build_criterion("lamp")(group(m, m.conv2)), build_criterion("l2")(group(m, m.conv2))
    assert torch.equal(torch.argsort(lamp), torch.argsort(l2))
    assert torch.isclose(lamp.max(), torch.tensor(1.0))


def test_kl_batching_does_not_change_scores():
    m = tiny_cnn()
    a = prepared("kl", m, max_images=12)(group(m, m.conv2))
    b = prepared("kl", m, max_images=12, batch_size=5)(group(m, m.conv2))  # 1 channel, 5 images a pass
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-9)


@pytest.mark.parametrize("name", DATA)
def test_scores_use_eval_mode_and_leave_model_alone(name):
    m = tiny_resnet()
    blocks = residual_blocks(m)
    x, y = data()
    g = group(m, m.stem[0])  # (Torch-Pruning's tracing leaves the model in eval mode)

    def scores():
        c = build_criterion(name)
        c.prepare(m, x, y)
        out = [c(g)] + ([build_criterion(name).block_scores(m, blocks, x, y)] if name in BLOCK else [])
        return out, m.training

    ref, _ = scores()
    m.train()
    got, training = scores()
    assert all(torch.equal(a, b) for a, b in zip(ref, got))  # BatchNorm on running statistics
    assert training and all(p.grad is None for p in m.parameters())


def test_layers_without_statistics_score_zero_and_stale_ones_raise():
    other = tiny_cnn(plant=False)
    for name in ("expected_abs", "taylor"):
        c = prepared(name, tiny_cnn())
        assert torch.equal(c(group(other, other.conv1)), torch.zeros(6))
    m = tiny_cnn(plant=False)
    c = prepared("hrank", m)
    group(m, m.conv1, idxs=[0, 1]).prune()
    with pytest.raises(RuntimeError, match="prepare"):
        c(group(m, m.conv1))


def test_feature_maps_are_read_after_bn_and_activation():
    from robustprune.models import build_model
    from robustprune.pruning.criteria.common import channel_sites

    m = tiny_cnn(plant=False)
    sites = channel_sites(m, data()[0][:1])
    assert (sites[m.conv1].module, sites[m.conv1].call) == (m.relu, 0)  # conv-bn-relu (shared, in-place)
    assert (sites[m.conv2].module, sites[m.conv2].call) == (m.relu, 1)
    assert sites[m.fc].module is m.fc and sites[m.fc].last_dim
    r = tiny_resnet(plant=False)
    sites = channel_sites(r, data()[0][:1])
    assert sites[r.layer[0].body[3]].module is r.layer[0].body[4]  # a block's last BN, before the addition
    cnn = build_model("mnist_cnn", num_classes=10, image_shape=(1, 28, 28), mean=(0.1,), std=(0.3,))
    sites = channel_sites(cnn, torch.rand(1, 1, 28, 28))
    assert [(sites[layer].module, sites[layer].call) for layer in (cnn.conv1, cnn.conv2, cnn.fc1)] == [
        (cnn.act, 0),
        (cnn.act, 1),
        (cnn.act, 2),
    ]  # conv-pool-relu: after the relu, through the pool


def test_kl_of_a_channel_is_the_kl_of_removing_its_filter():
    import copy

    import torch.nn.functional as F

    m = tiny_cnn(plant=False)
    x, _ = data(16)
    s = prepared("kl", m, max_images=16)(group(m, m.conv1))
    pruned = copy.deepcopy(m)
    group(pruned, pruned.conv1, idxs=[3]).prune()
    with torch.no_grad():
        logp, logq = F.log_softmax(m(x), -1), F.log_softmax(pruned(x), -1)
    expected = (logp.exp() * (logp - logq)).sum(-1).mean()
    assert torch.isclose(s[3], expected.float(), rtol=1e-3)
