"""The structured pruning engine: filter pruning on Torch-Pruning's dependency graph (uniform, global,
per-layer), residual-block removal, filters + blocks, iterative pruning (Algorithm 1 of Jordão &
Pedrini), and the errors a user can cause. Tiny models defined here; the criteria are local so the
tests do not depend on the registered ones."""

from __future__ import annotations

import copy
import math
import time
from collections import OrderedDict

import pydantic
import pytest
import torch
from torch import nn

from robustprune.errors import UserError
from robustprune.models.blocks import ResidualBlock
from robustprune.pruning.blocks import prune_blocks_, removable_blocks
from robustprune.pruning.criteria import Criterion
from robustprune.pruning.structured import (
    StructuredParams,
    channel_widths,
    check_ratio,
    filter_count,
    filters_to_remove,
    iterative_prune,
    prune_filters_,
    prune_structured_,
    remove_filters_,
)

X_CIFAR = torch.zeros(1, 3, 16, 16)


# ---- tiny models -------------------------------------------------------------------------------------


class MiniBlock(ResidualBlock):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.body = nn.Sequential(
            OrderedDict(
                [
                    ("conv1", nn.Conv2d(cin, cout, 3, stride, 1, bias=False)),
                    ("bn1", nn.BatchNorm2d(cout)),
                    ("relu", nn.ReLU()),
                    ("conv2", nn.Conv2d(cout, cout, 3, 1, 1, bias=False)),
                    ("bn2", nn.BatchNorm2d(cout)),
                ]
            )
        )
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                OrderedDict([("conv", nn.Conv2d(cin, cout, 1, stride, bias=False)), ("bn", nn.BatchNorm2d(cout))])
            )
        else:
            self.shortcut = nn.Identity()
        self.act = nn.ReLU()


class MiniResNet(nn.Module):
    """Stem (8), stage 1: 2 identity blocks (8), stage 2: a projection block (8 -> 16, stride 2) and
    an identity block (16), pooling, linear classifier."""

    def __init__(self, widths=(8, 16), classes=10):
        super().__init__()
        w1, w2 = widths
        self.stem = nn.Sequential(
            OrderedDict(
                [("conv", nn.Conv2d(3, w1, 3, 1, 1, bias=False)), ("bn", nn.BatchNorm2d(w1)), ("relu", nn.ReLU())]
            )
        )
        self.layer1 = nn.Sequential(MiniBlock(w1, w1), MiniBlock(w1, w1))
        self.layer2 = nn.Sequential(MiniBlock(w1, w2, 2), MiniBlock(w2, w2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(w2, classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class PlainCNN(nn.Module):
    def __init__(self, widths=(8, 12, 16), classes=10):
        super().__init__()
        layers, cin = [], 3
        for i, w in enumerate(widths):
            layers += [
                (f"conv{i}", nn.Conv2d(cin, w, 3, padding=1)),
                (f"bn{i}", nn.BatchNorm2d(w)),
                (f"relu{i}", nn.ReLU()),
            ]
            cin = w
        self.features = nn.Sequential(OrderedDict(layers))
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.hidden = nn.Linear(cin * 4, 20)
        self.fc = nn.Linear(20, classes)

    def forward(self, x):
        return self.fc(torch.relu(self.hidden(torch.flatten(self.pool(self.features(x)), 1))))


def randomize_bn_(model):
    """Non-trivial BN statistics and affine parameters, so eval-mode comparisons mean something."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model.eval()


def resnet(seed=0, **kw):
    torch.manual_seed(seed)
    return randomize_bn_(MiniResNet(**kw))


def plain(seed=0, **kw):
    torch.manual_seed(seed)
    return randomize_bn_(PlainCNN(**kw))


def convs(model):
    return {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def images(n=4, seed=3, size=16):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---- local criteria ------------------------------------------------------------------------------------


class RootL1(Criterion):
    """L1 norm of the group's root conv filters (as channel_l1 scores them); blocks by the L1 norm
    of the last BN of their body (a block whose body output is zero scores 0)."""

    name = "root_l1"

    def __call__(self, group):
        dep, idxs = group[0]
        return dep.target.module.weight.detach()[idxs].abs().flatten(1).sum(1)

    def block_scores(self, model, blocks, x=None, y=None):
        return torch.stack([(b.body.bn2.weight.abs().sum() + b.body.bn2.bias.abs().sum()).detach() for _, b in blocks])


class FixedBlockScores(RootL1):
    def __init__(self, scores):
        self.scores = scores

    def block_scores(self, model, blocks, x=None, y=None):
        return torch.tensor([self.scores[n] for n, _ in blocks])


class NeedsData(RootL1):
    name = "needs_data"
    needs_data = True

    def __init__(self):
        self.prepared = []

    def prepare(self, model, x=None, y=None):
        super().prepare(model, x, y)
        self.prepared.append((convs(model), x.shape, y.shape))


# ---- filter pruning: uniform -----------------------------------------------------------------------------

RESNET_GROUPS = [  # the coupled layers of MiniResNet (out channels pruned together)
    ["stem.conv", "layer1.0.body.conv2", "layer1.1.body.conv2"],
    ["layer1.0.body.conv1"],
    ["layer1.1.body.conv1"],
    ["layer2.0.body.conv1"],
    ["layer2.0.body.conv2", "layer2.0.shortcut.conv", "layer2.1.body.conv2"],
    ["layer2.1.body.conv1"],
]


@pytest.mark.parametrize("ratio", [0.0, 0.1, 0.25, 0.3, 0.5, 0.7])
def test_uniform_shrinks_every_group_by_round_ratio_n(ratio):
    model = resnet()
    before, params = convs(model), n_params(model)
    out = prune_filters_(model, RootL1(), ratio, X_CIFAR)
    assert out is model
    after = convs(model)
    for name, n in before.items():
        assert after[name] == n - round(ratio * n), name
    for group in RESNET_GROUPS:  # coupled channels stay consistent
        assert len({after[n] for n in group}) == 1
    assert model.layer1[0].body.bn1.num_features == after["layer1.0.body.conv1"]
    assert model.layer2[1].body.bn2.num_features == after["layer2.1.body.conv2"]
    assert model.layer2[0].body.conv1.in_channels == after["stem.conv"]
    assert model.fc.in_features == after["layer2.1.body.conv2"] and model.fc.out_features == 10
    with torch.no_grad():
        assert model(images()).shape == (4, 10)
    if ratio:
        assert n_params(model) < params
    else:
        assert n_params(model) == params


def test_uniform_removes_the_lowest_filters_and_matches_zeroed_original():
    """Plain CNN: filters whose conv weight, bias and BN affine are zero output exactly 0 after ReLU;
    the criterion picks them first, and removing them changes no output in eval mode."""
    model = plain()
    planted = {"features.conv0": [1, 5], "features.conv1": [0, 4, 11], "features.conv2": [2, 3, 9, 15]}
    with torch.no_grad():
        for name, idx in planted.items():
            i = name[-1]
            conv, bn = model.get_submodule(name), model.get_submodule(f"features.bn{i}")
            conv.weight[idx] = 0
            conv.bias[idx] = 0
            bn.weight[idx] = 0
            bn.bias[idx] = 0
    original = copy.deepcopy(model)
    prune_filters_(model, RootL1(), 0.25, X_CIFAR)  # round(0.25 * 8, 12, 16) = 2, 3, 4
    assert convs(model) == {"features.conv0": 6, "features.conv1": 9, "features.conv2": 12}
    keep2 = [i for i in range(16) if i not in planted["features.conv2"]]
    keep1 = [i for i in range(12) if i not in planted["features.conv1"]]
    assert torch.equal(model.features.conv2.weight, original.features.conv2.weight[keep2][:, keep1])
    assert model.hidden.in_features == 12 * 4 and model.fc.in_features == 20  # hidden Linear narrowed only
    x = images(8)
    with torch.no_grad():
        assert torch.allclose(model(x), original(x), atol=1e-5)


def test_residual_coupled_channels_are_removed_together():
    """MiniResNet: zero the same channels in every layer of each coupled group (conv + BN, residual
    stream included). The residual stream then carries 0 in those channels at every point, so
    removing them changes no output, which only holds if every coupled layer lost the same ones."""
    model = resnet()
    planted = {8: [1, 5], 16: [0, 3, 7, 15]}
    with torch.no_grad():
        for name, conv in model.named_modules():
            if isinstance(conv, nn.Conv2d):
                bn = model.get_submodule(name.replace("conv", "bn"))
                idx = planted[conv.out_channels]
                conv.weight[idx] = 0
                bn.weight[idx] = 0
                bn.bias[idx] = 0
    original = copy.deepcopy(model)
    prune_filters_(model, RootL1(), 0.25, X_CIFAR)
    assert set(convs(model).values()) == {6, 12}
    x = images(8)
    with torch.no_grad():
        out, ref = model(x), original(x)
    assert torch.allclose(out, ref, atol=1e-5)
    assert not torch.allclose(out, resnet()(x), atol=1e-3)  # the planted model differs from the dense one


def test_matches_channel_l1_on_the_mnist_cnn(tiny_cnn):
    """With a root-L1 criterion the engine gives exactly the MNIST study's channel_l1 model."""
    reference = copy.deepcopy(tiny_cnn)
    x = torch.zeros(1, 1, 28, 28)
    remove_filters_(reference, filters_to_remove(reference, 0.5), x)
    prune_filters_(tiny_cnn, RootL1(), 0.5, x)
    assert channel_widths(tiny_cnn) == channel_widths(reference) == {"conv1": 2, "conv2": 3}
    ref_state = reference.state_dict()
    for k, v in tiny_cnn.state_dict().items():
        assert torch.equal(v, ref_state[k]), k


def test_deterministic_and_keeps_training_mode():
    a, b = resnet(), resnet()
    a.train()
    prune_filters_(a, RootL1(), 0.3, X_CIFAR)
    prune_filters_(b, RootL1(), 0.3, X_CIFAR)
    assert a.training and not b.training
    sb = b.state_dict()
    assert all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())


def test_ties_go_to_the_earlier_channel():
    model = plain()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Conv2d):
                m.weight.fill_(0.1)
        model.features.conv0.weight[6] = 1.0  # stays
    original = copy.deepcopy(model)
    prune_filters_(model, RootL1(), 0.25, X_CIFAR)
    keep = [2, 3, 4, 5, 6, 7]  # channels 0 and 1 go first on a tie
    assert torch.equal(model.features.bn0.running_mean, original.features.bn0.running_mean[keep])


def test_classifier_is_never_pruned_and_ignored_layers_stay():
    model = plain()
    prune_filters_(model, RootL1(), 0.5, X_CIFAR, ignored_layers=["features.conv1", model.features.conv2])
    assert convs(model) == {"features.conv0": 4, "features.conv1": 12, "features.conv2": 16}
    assert model.fc.out_features == 10 and model.hidden.out_features == 20


def test_grouped_channels_are_pruned_in_every_group():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.GroupNorm(2, 8),
        nn.ReLU(),
        nn.Conv2d(8, 6, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 4),
    )
    prune_filters_(model, RootL1(), 0.25, X_CIFAR)  # 4 positions per channel group: 1 removed in each
    assert model[0].out_channels == 6 and model[1].num_channels == 6 and model[1].num_groups == 2
    assert model[3].out_channels == 4  # round(0.25 * 6) = round(1.5) = 2 (half to even)
    with torch.no_grad():
        assert model(images()).shape == (4, 4)


# ---- per-layer ratios -----------------------------------------------------------------------------------


def test_layer_ratios_prune_exactly_the_named_layers():
    model = resnet()
    before = convs(model)
    prune_filters_(
        model, RootL1(), 0.0, X_CIFAR, layer_ratios={"layer1.0.body.conv1": 0.5, "layer2.1.body.conv1": 0.25}
    )
    after = convs(model)
    changed = {n: (before[n], after[n]) for n in before if before[n] != after[n]}
    assert changed == {"layer1.0.body.conv1": (8, 4), "layer2.1.body.conv1": (16, 12)}


def test_layer_ratio_on_a_residual_layer_prunes_its_whole_group():
    model = resnet()
    prune_filters_(model, RootL1(), 0.0, X_CIFAR, layer_ratios={"layer1.1.body.conv2": 0.25})
    after = convs(model)
    assert {n: after[n] for n in RESNET_GROUPS[0]} == dict.fromkeys(RESNET_GROUPS[0], 6)
    assert sum(after.values()) == sum(convs(resnet()).values()) - 3 * 2
    with torch.no_grad():
        assert model(images()).shape == (4, 10)


def test_layer_ratios_override_the_uniform_ratio():
    model = plain()
    prune_filters_(model, RootL1(), 0.5, X_CIFAR, layer_ratios={"features.conv1": 0.25})
    assert convs(model) == {"features.conv0": 4, "features.conv1": 9, "features.conv2": 8}


def test_layer_ratio_errors():
    with pytest.raises(UserError, match=r"'nope' is not a layer of the model.*'features.conv0'"):
        prune_filters_(plain(), RootL1(), 0.0, X_CIFAR, layer_ratios={"nope": 0.5})
    with pytest.raises(UserError, match="'features.relu0' has no prunable filters"):
        prune_filters_(plain(), RootL1(), 0.0, X_CIFAR, layer_ratios={"features.relu0": 0.5})
    with pytest.raises(UserError, match="'fc' has no prunable filters"):
        prune_filters_(plain(), RootL1(), 0.0, X_CIFAR, layer_ratios={"fc": 0.5})
    with pytest.raises(UserError, match="would remove all of them"):
        prune_filters_(plain(), RootL1(), 0.0, X_CIFAR, layer_ratios={"features.conv0": 0.95})
    with pytest.raises(UserError, match="share their channels"):
        prune_filters_(resnet(), RootL1(), 0.0, X_CIFAR, layer_ratios={"stem.conv": 0.25, "layer1.0.body.conv2": 0.5})
    with pytest.raises(UserError, match=r"pruning ratio of layer 'features.conv0' must be a number in \[0, 1\)"):
        prune_filters_(plain(), RootL1(), 0.0, X_CIFAR, layer_ratios={"features.conv0": 1.0})
    prune_filters_(resnet(), RootL1(), 0.0, X_CIFAR, layer_ratios={"stem.conv": 0.25, "layer1.0.body.conv2": 0.25})


# ---- global -------------------------------------------------------------------------------------------


def test_global_removes_the_globally_lowest():
    model = plain()
    tiny = [0, 2, 4, 6, 8]
    with torch.no_grad():
        model.features.conv1.weight[tiny] *= 1e-3
    original = copy.deepcopy(model)
    prune_filters_(model, RootL1(), 5 / 36, X_CIFAR, scope="global")  # round(5/36 * 36) = 5
    assert convs(model) == {"features.conv0": 8, "features.conv1": 7, "features.conv2": 16}
    keep = [i for i in range(12) if i not in tiny]
    assert torch.equal(model.features.bn1.weight, original.features.bn1.weight[keep])


@pytest.mark.parametrize("normalize", [True, False])
def test_global_matches_a_brute_force_ranking(normalize):
    model = plain(widths=(8, 12, 16))
    with torch.no_grad():  # raw scores of similar size, but not the same per layer
        model.features.conv0.weight *= 1.6
        model.features.conv2.weight *= 0.9
    scores = []
    for name in ("features.conv0", "features.conv1", "features.conv2"):
        s = model.get_submodule(name).weight.detach().abs().flatten(1).sum(1)
        scores += [(float(v / s.mean() if normalize else v), name, i) for i, v in enumerate(s)]
    ratio = 0.3
    lowest = sorted(scores, key=lambda t: t[0])[: round(ratio * 36)]
    expected = {n: w - sum(1 for _, m, _ in lowest if m == n) for n, w in convs(model).items()}
    prune_filters_(model, RootL1(), ratio, X_CIFAR, scope="global", normalize=normalize)
    assert convs(model) == expected
    assert sum(expected.values()) == 36 - 11
    assert sum(expected[n] < w for n, w in convs(plain()).items()) >= 2  # ranked across layers


def test_global_normalisation_follows_the_criterion():
    """A criterion that declares its scores comparable across layers (normalized = True, as LAMP's
    are) is ranked raw; others are divided by their group's mean."""

    class Raw(RootL1):
        normalized = True

    def pruned(crit, **kw):
        model = plain()
        with torch.no_grad():
            model.features.conv2.weight *= 10  # raw ranking never reaches conv2
        prune_filters_(model, crit, 0.3, X_CIFAR, scope="global", **kw)
        return convs(model)

    assert pruned(Raw()) == pruned(RootL1(), normalize=False)
    assert pruned(Raw())["features.conv2"] == 16
    assert pruned(RootL1()) == pruned(Raw(), normalize=True) != pruned(Raw())


def test_global_keeps_one_filter_per_group_or_refuses():
    model = plain(widths=(2, 2, 40))
    with torch.no_grad():
        model.features.conv0.weight *= 1e-3
        model.features.conv1.weight *= 1e-3
    prune_filters_(model, RootL1(), 0.1, X_CIFAR, scope="global", normalize=False)  # 4 of 44
    assert convs(model) == {"features.conv0": 1, "features.conv1": 1, "features.conv2": 38}
    with pytest.raises(UserError, match="would empty some layers"):
        prune_filters_(plain(), RootL1(), 0.99, X_CIFAR, scope="global")


# ---- criterion data -----------------------------------------------------------------------------------


def test_data_criterion_is_prepared_on_the_unpruned_model():
    crit, x, y = NeedsData(), images(6), torch.arange(6)
    model = resnet()
    before = convs(model)
    prune_filters_(model, crit, 0.5, X_CIFAR, x=x, y=y)
    assert crit.prepared == [(before, x.shape, y.shape)]
    with pytest.raises(UserError, match="criterion 'needs_data' scores filters from data but none was given"):
        prune_filters_(resnet(), NeedsData(), 0.5, X_CIFAR)
    with pytest.raises(UserError, match="criterion 'needs_data' scores filters from data"):
        prune_blocks_(resnet(), NeedsData(), count=1)


# ---- blocks ---------------------------------------------------------------------------------------------


def test_block_pruning_removes_the_planted_identity_block_first():
    model = resnet()
    with torch.no_grad():  # layer2.1's body outputs 0: the block computes relu(x) = x
        model.layer2[1].body.bn2.weight.zero_()
        model.layer2[1].body.bn2.bias.zero_()
    original = copy.deepcopy(model)
    assert [n for n, _ in removable_blocks(model)] == ["layer1.0", "layer1.1", "layer2.1"]
    assert prune_blocks_(model, RootL1(), count=1) == ["layer2.1"]
    assert isinstance(model.layer2[1], nn.Identity) and len(model.layer2) == 2
    assert [n for n, _ in removable_blocks(model)] == ["layer1.0", "layer1.1"]
    assert n_params(model) < n_params(original)
    x = images(8)
    with torch.no_grad():
        assert torch.allclose(model(x), original(x), atol=1e-6)


@pytest.mark.parametrize("ratio, n", [(0.0, 0), (0.2, 1), (0.34, 1), (0.5, 2), (0.67, 2)])
def test_block_ratio_is_a_share_of_removable_blocks(ratio, n):
    model = resnet()
    scores = {"layer1.0": 3.0, "layer1.1": 1.0, "layer2.1": 2.0}
    removed = prune_blocks_(model, FixedBlockScores(scores), ratio)
    assert removed == ["layer1.1", "layer2.1"][:n]  # round(ratio * 3), lowest first
    with torch.no_grad():
        assert model(images()).shape == (4, 10)


def test_block_ties_go_to_the_earlier_block():
    model = resnet()
    assert prune_blocks_(
        model, FixedBlockScores(dict.fromkeys(["layer1.0", "layer1.1", "layer2.1"], 1.0)), count=1
    ) == ["layer1.0"]


def test_refuses_emptying_a_stage():
    scores = {"layer1.0": 0.0, "layer1.1": 1.0, "layer2.1": 2.0}
    model = resnet()
    with pytest.raises(UserError, match="2 lowest-scored blocks of stage 'layer1' would leave it with no block"):
        prune_blocks_(model, FixedBlockScores(scores), count=2)
    assert not any(isinstance(m, nn.Identity) for m in model.layer1)  # nothing removed
    assert prune_blocks_(model, FixedBlockScores(scores), count=1) == ["layer1.0"]
    with pytest.raises(UserError, match="stage 'layer1' would leave it with no block"):  # later rounds too
        prune_blocks_(model, FixedBlockScores(scores), count=1)


def test_a_stage_that_keeps_a_strided_block_may_lose_all_its_residual_blocks():
    """MobileNetV2-like: the stage's first block is a plain module, so its residual blocks can all go."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.Sequential(nn.Conv2d(8, 8, 1), MiniBlock(8, 8)),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )
    assert prune_blocks_(model, RootL1(), count=1) == ["1.1"]
    assert isinstance(model[1][1], nn.Identity)


def test_refuses_models_without_removable_blocks():
    with pytest.raises(UserError, match="model PlainCNN has no residual blocks to remove; prune filters instead"):
        prune_blocks_(plain(), RootL1(), 0.5)
    projection_only = nn.Sequential(MiniBlock(3, 8, 2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2))
    with pytest.raises(UserError, match="no residual blocks with an identity shortcut"):
        prune_blocks_(projection_only, RootL1(), 0.5)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({}, "either a ratio or a count"),
        ({"ratio": 0.3, "count": 1}, "either a ratio or a count"),
        ({"ratio": 1.0}, r"block pruning ratio must be a number in \[0, 1\)"),
        ({"ratio": -0.1}, "block pruning ratio"),
        ({"count": 4}, "from 0 to 3"),
        ({"count": -1}, "from 0 to 3"),
        ({"count": 1.0}, "whole number"),
        ({"count": True}, "whole number"),
    ],
)
def test_block_argument_errors(kwargs, match):
    with pytest.raises(UserError, match=match):
        prune_blocks_(resnet(), RootL1(), **kwargs)


def test_criterion_without_block_scores_is_refused():
    class FiltersOnly(Criterion):
        name = "filters_only"

        def __call__(self, group):
            return torch.ones(len(group[0][1]))

    with pytest.raises(UserError, match="criterion 'filters_only' cannot score residual blocks"):
        prune_blocks_(resnet(), FiltersOnly(), count=1)


# ---- filters + blocks ---------------------------------------------------------------------------------


def test_both_removes_blocks_first_then_filters():
    model = resnet()
    with torch.no_grad():
        model.layer2[1].body.bn2.weight.zero_()
        model.layer2[1].body.bn2.bias.zero_()
    removed = prune_structured_(model, RootL1(), (0.34, 0.25), X_CIFAR, target="both")
    assert removed == ["layer2.1"]
    assert "layer2.1.body.conv1" not in convs(model)
    assert convs(model) == {
        "stem.conv": 6,
        "layer1.0.body.conv1": 6,
        "layer1.0.body.conv2": 6,
        "layer1.1.body.conv1": 6,
        "layer1.1.body.conv2": 6,
        "layer2.0.body.conv1": 12,
        "layer2.0.body.conv2": 12,
        "layer2.0.shortcut.conv": 12,
    }
    with torch.no_grad():
        assert model(images()).shape == (4, 10)


def test_structured_targets():
    model = resnet()
    assert prune_structured_(model, RootL1(), 0.25, X_CIFAR) == []
    assert convs(model)["stem.conv"] == 6
    model = resnet()
    assert prune_structured_(
        model, FixedBlockScores({"layer1.0": 0, "layer1.1": 1, "layer2.1": 2}), 0.34, X_CIFAR, target="blocks"
    ) == ["layer1.0"]
    assert convs(model)["stem.conv"] == 8
    # a layer ratio naming a layer of a removed block goes with the block
    model = resnet()
    prune_structured_(
        model,
        FixedBlockScores({"layer1.0": 0, "layer1.1": 1, "layer2.1": 2}),
        (0.34, 0.0),
        X_CIFAR,
        target="both",
        layer_ratios={"layer1.0.body.conv1": 0.5, "layer1.1.body.conv1": 0.5},
    )
    assert convs(model)["layer1.1.body.conv1"] == 4 and "layer1.0.body.conv1" not in convs(model)


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda m: prune_structured_(m, RootL1(), 0.3, X_CIFAR, target="layers"), "unknown pruning target 'layers'"),
        (lambda m: prune_structured_(m, RootL1(), (0.3, 0.2), X_CIFAR), "needs target 'both'"),
        (lambda m: prune_structured_(m, RootL1(), (0.3,), X_CIFAR, target="both"), "two numbers"),
        (lambda m: prune_structured_(m, RootL1(), (0.3, 1.2), X_CIFAR, target="both"), r"in \[0, 1\)"),
        (
            lambda m: prune_structured_(m, RootL1(), 0.3, X_CIFAR, target="both", layer_ratios={"x": 0.1}),
            "'x' is not a layer",
        ),
        (lambda m: prune_filters_(m, RootL1(), 0.3, X_CIFAR, scope="local"), "unknown pruning scope 'local'"),
        (lambda m: prune_filters_(m, RootL1(), 1.0, X_CIFAR), r"pruning ratio must be a number in \[0, 1\)"),
        (lambda m: prune_filters_(m, RootL1(), -0.2, X_CIFAR), "pruning ratio must be"),
        (lambda m: prune_filters_(m, RootL1(), float("nan"), X_CIFAR), "pruning ratio must be"),
        (lambda m: prune_filters_(m, RootL1(), "0.3", X_CIFAR), "pruning ratio must be"),
        (lambda m: prune_filters_(m, RootL1(), 0.95, X_CIFAR), "would remove all of them"),
        (lambda m: prune_filters_(m, RootL1(), 0.3, X_CIFAR, ignored_layers=["nope"]), "ignored layer 'nope'"),
    ],
)
def test_bad_inputs_are_user_errors(call, match):
    model = resnet()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(UserError, match=match):
        call(model)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # nothing was pruned


def test_models_without_filters_are_refused():
    for model in (nn.Sequential(), nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 4))):
        with pytest.raises(UserError, match="has no convolution filters to prune"):
            prune_filters_(model, RootL1(), 0.3, X_CIFAR)
    only_head = nn.Sequential(nn.Conv2d(3, 4, 16), nn.Flatten())  # its one conv is the output layer
    with pytest.raises(UserError, match="no filters that can be pruned"):
        prune_filters_(only_head, RootL1(), 0.3, X_CIFAR, ignored_layers=["0"])


def test_check_ratio():
    assert check_ratio(0) == 0.0 and check_ratio(0.5) == 0.5
    for bad in (1, 1.0, -0.01, float("inf"), None, True, [0.1]):
        with pytest.raises(UserError, match=r"must be a number in \[0, 1\)"):
            check_ratio(bad)


# ---- iterative (Algorithm 1) ---------------------------------------------------------------------------


def test_iterative_prunes_the_remaining_share_and_adjusts_each_round():
    model = plain(widths=(64, 64, 64))
    calls = []

    def prune(m, p):
        prune_filters_(m, RootL1(), p, X_CIFAR)

    def adjust(m, k):
        calls.append((k, filter_count(m)))

    assert iterative_prune(model, 3, 0.2, prune, adjust) is model
    # per layer 64 -> 51 -> 41 -> 33 (round(0.2 * n) of what remains each round)
    assert calls == [(1, 3 * 51), (2, 3 * 41), (3, 3 * 33)]
    assert math.isclose(33 / 64, 0.8**3, abs_tol=0.01)


def test_iterative_blocks_and_errors():
    model = resnet()
    removed = []
    crit = FixedBlockScores({"layer1.0": 0.0, "layer1.1": 2.0, "layer2.1": 1.0})
    iterative_prune(model, 2, 0.5, lambda m, p: removed.extend(prune_blocks_(m, crit, count=1)))
    assert removed == ["layer1.0", "layer2.1"]  # block names stay valid after a removal
    for rounds in (0, -1, 1.5, True):
        with pytest.raises(UserError, match="rounds must be a whole number"):
            iterative_prune(resnet(), rounds, 0.2, lambda m, p: None)
    with pytest.raises(UserError, match="pruning ratio must be"):
        iterative_prune(resnet(), 2, 1.0, lambda m, p: None)


def test_structured_params():
    p = StructuredParams()
    assert (p.criterion, p.target, p.scope, p.layer_ratios, p.rounds) == ("l1", "filters", "uniform", None, 1)
    StructuredParams(target="both", block_ratio=0.2, layer_ratios={"layer1.0.body.conv1": 0.5}, rounds=3)
    for bad in (
        {"target": "layers"},
        {"scope": "local"},
        {"rounds": 0},
        {"layer_ratios": {"a": 1.0}},
        {"block_ratio": 1.0},
        {"unknown": 1},
    ):
        with pytest.raises(pydantic.ValidationError):
            StructuredParams(**bad)


# ---- the CIFAR models (when registered) -------------------------------------------------------------------


def _cifar(name):
    from robustprune.models import MODELS, build_model

    if name not in MODELS:
        pytest.skip(f"model '{name}' is not registered yet")
    torch.manual_seed(0)
    return build_model(name, num_classes=10, image_shape=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3).eval()


class BodyL1(RootL1):
    def block_scores(self, model, blocks, x=None, y=None):
        return torch.stack([sum(p.detach().abs().sum() for p in b.body.parameters()) for _, b in blocks])


@pytest.mark.parametrize("name", ["resnet56", "mobilenetv2", "vgg16_bn"])
def test_cifar_models_prune_filters(name):
    model = _cifar(name)
    x = torch.rand(2, 3, 32, 32)
    before, filters = n_params(model), filter_count(model)
    t = time.perf_counter()
    prune_filters_(model, BodyL1(), 0.3, x[:1])
    print(
        f"\n{name}: filters 30% in {time.perf_counter() - t:.2f} s, "
        f"filters {filters} -> {filter_count(model)}, params {before} -> {n_params(model)}"
    )
    assert filter_count(model) < filters and n_params(model) < before
    with torch.no_grad():
        assert model(x).shape == (2, 10)


def test_mobilenetv2_blocks():
    """Every stage of MobileNetV2 starts with a plain (strided or widening) block, so all of its
    residual blocks may go."""
    model = _cifar("mobilenetv2")
    n = len(removable_blocks(model))
    assert len(prune_blocks_(model, BodyL1(), count=n)) == n == 10
    with torch.no_grad():
        assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize("target", ["blocks", "both"])
def test_resnet56_blocks_and_both(target):
    model = _cifar("resnet56")
    x = torch.rand(2, 3, 32, 32)
    n_blocks = len(removable_blocks(model))
    assert n_blocks == 25  # 9 in stage 1, 8 in stages 2 and 3 (their first block has a projection)
    t = time.perf_counter()
    removed = prune_structured_(model, BodyL1(), 0.3, x[:1], target=target)
    print(f"\nresnet56: {target} 30% in {time.perf_counter() - t:.2f} s, {len(removed)} blocks removed")
    assert len(removed) == round(0.3 * 25) == 8
    with torch.no_grad():
        assert model(x).shape == (2, 10)


@pytest.mark.parametrize("scope", ["uniform", "global"])
def test_registered_criteria_drive_the_engine(scope):
    """Every registered criterion (once the criteria module has them) prunes filters, and blocks
    when it can score them, through the engine on the mini ResNet."""
    from robustprune.pruning.criteria import CRITERIA, block_criteria, build_criterion

    if not CRITERIA.names():
        pytest.skip("no criteria registered yet")
    x, y = images(20, size=16), torch.arange(20) % 10
    for name in CRITERIA.names():
        model = resnet()
        target = "both" if name in block_criteria() else "filters"
        removed = prune_structured_(model, build_criterion(name), 0.34, X_CIFAR, target=target, scope=scope, x=x, y=y)
        assert len(removed) == (1 if target == "both" else 0), name
        assert filter_count(model) < filter_count(resnet()), name
        with torch.no_grad():
            assert model(x[:2]).shape == (2, 10), name
