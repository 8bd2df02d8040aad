"""Pruning: global magnitude masks, rewinding, structured filter removal, size metrics, registry."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from robustprune.errors import UserError
from robustprune.metrics.size import count_macs, count_params, size_metrics
from robustprune.models.mnist_cnn import MnistCNN
from robustprune.pruning import PRUNING_METHODS
from robustprune.pruning.structured import channel_widths, filters_to_remove, l1_filter_scores, remove_filters_
from robustprune.pruning.unstructured import apply_masks_, global_magnitude_masks, prunable_weights, rewind_

X1 = torch.zeros(1, 1, 28, 28)


def tiny_net() -> nn.Module:
    """conv (2x1x3x3 = 18 weights) + linear (3x8 = 24 weights) = 42 prunable weights, all distinct."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8, 3))


def flat_abs(model: nn.Module) -> torch.Tensor:
    return torch.cat([w.detach().abs().flatten() for w in prunable_weights(model).values()])


def flat_mask(masks: dict, model: nn.Module) -> torch.Tensor:
    return torch.cat([masks[n].flatten() for n in prunable_weights(model)])


# ---- unstructured -----------------------------------------------------------------------------


def test_prunable_weights_are_conv_and_linear_weights_only():
    net = tiny_net()
    assert list(prunable_weights(net)) == ["0.weight", "3.weight"]
    assert list(prunable_weights(MnistCNN(conv1=4, conv2=6, fc=8, kernel_size=3, padding=1))) == [
        "conv1.weight",
        "conv2.weight",
        "fc1.weight",
        "fc2.weight",
    ]


@pytest.mark.parametrize("fraction", [0.0, 0.1, 0.3, 0.5, 0.7, 0.99])
def test_global_magnitude_removes_exactly_the_smallest(fraction):
    net = tiny_net()
    w = flat_abs(net)
    assert w.numel() == 42 and len(set(w.tolist())) == 42  # no ties: the reference is unique
    masks = global_magnitude_masks(net, fraction)
    assert set(masks) == {"0.weight", "3.weight"}  # biases never get a mask
    for n, p in prunable_weights(net).items():
        assert masks[n].shape == p.shape and masks[n].dtype == torch.bool
    keep = flat_mask(masks, net)
    n_remove = round(fraction * 42)
    assert int((~keep).sum()) == n_remove
    removed_ref = set(torch.sort(w).indices[:n_remove].tolist())
    assert set((~keep).nonzero().flatten().tolist()) == removed_ref


def test_global_magnitude_largest_removes_the_largest():
    net = tiny_net()
    w = flat_abs(net)
    keep = flat_mask(global_magnitude_masks(net, 0.25, largest=True), net)
    n_remove = round(0.25 * 42)  # 10
    assert int((~keep).sum()) == n_remove == 10
    assert set((~keep).nonzero().flatten().tolist()) == set(torch.sort(w, descending=True).indices[:10].tolist())


def test_global_magnitude_exact_count_on_mnist_cnn(tiny_cnn):
    n = sum(w.numel() for w in prunable_weights(tiny_cnn).values())
    assert n == 4 * 9 + 6 * 4 * 9 + 6 * 49 * 8 + 8 * 10 == 2684
    for s in (0.1, 0.3, 0.5, 0.7):
        keep = flat_mask(global_magnitude_masks(tiny_cnn, s), tiny_cnn)
        assert int((~keep).sum()) == round(s * 2684)


def test_global_magnitude_ties_are_broken_exactly():
    net = nn.Linear(10, 1, bias=False)
    with torch.no_grad():
        net.weight.fill_(0.5)
    keep = global_magnitude_masks(net, 0.3)["weight"]
    assert int((~keep).sum()) == 3


def test_lottery_round_prunes_only_alive_weights():
    """With an existing mask, round(rate * remaining) of the still-alive weights go, smallest first;
    masked weights stay masked even when their (unzeroed) value is large."""
    net = tiny_net()
    w = flat_abs(net)
    # First mask: remove the 10 LARGEST weights, so a magnitude-only rule would be visibly wrong.
    first = global_magnitude_masks(net, 10 / 42, largest=True)
    alive = flat_mask(first, net)
    assert int(alive.sum()) == 32
    second = global_magnitude_masks(net, 0.2, first)
    keep = flat_mask(second, net)
    assert not keep[~alive].any()  # once pruned, always pruned
    newly = alive & ~keep
    assert int(newly.sum()) == round(0.2 * 32) == 6
    alive_idx = alive.nonzero().flatten()
    ref = set(alive_idx[torch.sort(w[alive_idx]).indices[:6]].tolist())
    assert set(newly.nonzero().flatten().tolist()) == ref
    # the input masks are not modified
    assert torch.equal(flat_mask(first, net), alive)


def test_lottery_rounds_compound():
    net = MnistCNN(conv1=4, conv2=6, fc=8, kernel_size=3, padding=1)
    masks, remaining = None, 2684
    for _ in range(3):
        masks = global_magnitude_masks(net, 0.2, masks)
        remaining -= round(0.2 * remaining)
        assert int(flat_mask(masks, net).sum()) == remaining
    assert remaining == 2684 - 537 - 429 - 344


def test_apply_masks_zeroes_exactly_masked_weights():
    net = tiny_net()
    before = copy.deepcopy(net.state_dict())
    masks = global_magnitude_masks(net, 0.5)
    apply_masks_(net, masks)
    for name in ("0.weight", "3.weight"):
        p = net.state_dict()[name]
        assert torch.equal(p[~masks[name]], torch.zeros(int((~masks[name]).sum())))
        assert torch.equal(p[masks[name]], before[name][masks[name]])
    for name in ("0.bias", "3.bias"):
        assert torch.equal(net.state_dict()[name], before[name])
    assert int(sum((p == 0).sum() for p in prunable_weights(net).values())) == 21


def test_rewind_restores_init_exactly(tiny_cnn):
    init = copy.deepcopy(tiny_cnn.state_dict())
    with torch.no_grad():  # "training": every parameter moves, buffers too
        for p in tiny_cnn.parameters():
            p.add_(torch.randn_like(p))
        tiny_cnn.normalize.mean.fill_(0.5)
    masks = global_magnitude_masks(tiny_cnn, 0.4)
    rewind_(tiny_cnn, init, masks)
    state = tiny_cnn.state_dict()
    assert set(state) == set(init)
    for k, v in init.items():
        expected = v * masks[k] if k in masks else v
        assert torch.equal(state[k], expected), k
    for k, m in masks.items():
        assert torch.equal(state[k][~m], torch.zeros(int((~m).sum())))
    # the init state itself is untouched (it is rewound to again in later rounds)
    assert all((init[k] != 0).all() for k in masks)


def test_masks_are_kept_during_finetuning(tiny_cnn):
    from robustprune.train import TrainConfig, train

    masks = global_magnitude_masks(tiny_cnn, 0.5)
    apply_masks_(tiny_cnn, masks)
    before = {n: w.detach().clone() for n, w in prunable_weights(tiny_cnn).items()}
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (64, 1, 28, 28), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (64,), generator=g)
    hist = train(tiny_cnn, x, y, TrainConfig(epochs=1, batch_size=32, lr=0.1), seed=0, masks=masks)
    assert len(hist) == 1 and hist[0]["epoch"] == 1
    for n, w in prunable_weights(tiny_cnn).items():
        assert torch.equal(w.detach()[~masks[n]], torch.zeros(int((~masks[n]).sum()))), n
        assert not torch.equal(w.detach()[masks[n]], before[n][masks[n]]), n  # the rest did train


def test_global_magnitude_method_prunes_and_returns_masks(tiny_cnn):
    method = PRUNING_METHODS.get("global_magnitude")()
    masks = method.prune(tiny_cnn, 0.5, X1, method.Params())
    zeros = sum(int((w == 0).sum()) for w in prunable_weights(tiny_cnn).values())
    assert zeros == 1342 == int(sum((~m).sum() for m in masks.values()))


# ---- structured -------------------------------------------------------------------------------


def test_l1_filter_scores():
    conv = nn.Conv2d(2, 3, 1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[1.0, -2.0], [0.5, 0.5], [-3.0, 0.0]]).view(3, 2, 1, 1))
    assert torch.equal(l1_filter_scores(conv), torch.tensor([3.0, 1.0, 3.0]))


@pytest.mark.parametrize("fraction, n1, n2", [(0.1, 0, 1), (0.3, 1, 2), (0.5, 2, 3), (0.7, 3, 4)])
def test_filters_to_remove_lowest_l1(tiny_cnn, fraction, n1, n2):
    plan = filters_to_remove(tiny_cnn, fraction)
    assert set(plan) == {"conv1", "conv2"}
    assert len(plan["conv1"]) == n1 == round(fraction * 4)
    assert len(plan["conv2"]) == n2 == round(fraction * 6)
    for name, n in (("conv1", n1), ("conv2", n2)):
        l1 = getattr(tiny_cnn, name).weight.detach().abs().sum(dim=(1, 2, 3)).tolist()
        ref = sorted(range(len(l1)), key=lambda i: l1[i])[:n]
        assert sorted(plan[name]) == sorted(ref)


def test_filters_to_remove_hand_made_order():
    model = MnistCNN(conv1=4, conv2=6, fc=8, kernel_size=3, padding=1)
    with torch.no_grad():
        for i, scale in enumerate([3.0, 1.0, 4.0, 2.0]):
            model.conv1.weight[i].fill_(scale)
    assert filters_to_remove(model, 0.5)["conv1"] == [1, 3]


def test_all_filters_removed_is_a_user_error(tiny_cnn):
    with pytest.raises(UserError, match="would remove all"):
        filters_to_remove(tiny_cnn, 0.9)  # round(0.9 * 4) == 4


def test_remove_filters_shrinks_and_matches_zeroed_original(tiny_cnn):
    original = copy.deepcopy(tiny_cnn)
    plan = filters_to_remove(tiny_cnn, 0.5)
    assert len(plan["conv1"]) == 2 and len(plan["conv2"]) == 3
    pruned = remove_filters_(tiny_cnn, plan, X1)
    assert pruned.conv1.out_channels == 2 and pruned.conv1.weight.shape == (2, 1, 3, 3)
    assert pruned.conv2.in_channels == 2 and pruned.conv2.out_channels == 3
    assert pruned.conv2.weight.shape == (3, 2, 3, 3) and pruned.conv2.bias.shape == (3,)
    assert pruned.fc1.in_features == 3 * 7 * 7 and pruned.fc1.weight.shape == (8, 147)
    assert pruned.fc2.weight.shape == (10, 8)
    assert channel_widths(pruned) == {"conv1": 2, "conv2": 3}
    # surviving filters are exactly the original ones that were kept, in order
    keep1 = [i for i in range(4) if i not in plan["conv1"]]
    keep2 = [i for i in range(6) if i not in plan["conv2"]]
    assert torch.equal(pruned.conv1.weight, original.conv1.weight[keep1])
    assert torch.equal(pruned.conv2.weight, original.conv2.weight[keep2][:, keep1])
    fc_cols = torch.arange(6 * 49).view(6, 49)[keep2].flatten()
    assert torch.equal(pruned.fc1.weight, original.fc1.weight[:, fc_cols])
    # same function as the original with the removed filters' weights and biases zeroed
    zeroed = copy.deepcopy(original)
    with torch.no_grad():
        zeroed.conv1.weight[plan["conv1"]] = 0
        zeroed.conv1.bias[plan["conv1"]] = 0
        zeroed.conv2.weight[plan["conv2"]] = 0
        zeroed.conv2.bias[plan["conv2"]] = 0
    torch.manual_seed(3)
    x = torch.rand(5, 1, 28, 28)
    with torch.no_grad():
        out_pruned, out_zeroed, out_orig = pruned.eval()(x), zeroed.eval()(x), original.eval()(x)
    assert out_pruned.shape == (5, 10)
    assert torch.allclose(out_pruned, out_zeroed, atol=1e-5)
    assert not torch.allclose(out_pruned, out_orig, atol=1e-3)  # the comparison is not vacuous


def test_channel_l1_method_returns_none_and_shrinks(tiny_cnn):
    method = PRUNING_METHODS.get("channel_l1")()
    assert method.prune(tiny_cnn, 0.3, X1, method.Params()) is None
    assert channel_widths(tiny_cnn) == {"conv1": 3, "conv2": 4}
    assert tiny_cnn.fc1.in_features == 4 * 49


# ---- size metrics -------------------------------------------------------------------------------

DENSE_MACS = 28 * 28 * (4 * 1 * 9) + 14 * 14 * (6 * 4 * 9) + 6 * 49 * 8 + 8 * 10


def test_count_macs_by_hand(tiny_cnn):
    assert DENSE_MACS == 72992
    assert count_macs(tiny_cnn, torch.zeros(3, 1, 28, 28)) == (72992, 72992)
    total, nonzero = count_params(tiny_cnn)
    assert total == 2684 + 4 + 6 + 8 + 10 == nonzero


def test_count_macs_restores_training_mode(tiny_cnn):
    tiny_cnn.train()
    count_macs(tiny_cnn, X1)
    assert tiny_cnn.training


def test_size_after_global_magnitude(tiny_cnn):
    masks = global_magnitude_masks(tiny_cnn, 0.3)
    apply_masks_(tiny_cnn, masks)
    m = size_metrics(tiny_cnn, X1, 2684)
    removed = round(0.3 * 2684)
    assert removed == 805
    assert m["sparsity"] == pytest.approx(805 / 2684, abs=1e-12)
    assert m["params"] == 2712 and m["params_nonzero"] == 2712 - 805
    uses = {"conv1.weight": 784, "conv2.weight": 196, "fc1.weight": 1, "fc2.weight": 1}
    expected_nz = sum(int(masks[n].sum()) * u for n, u in uses.items())
    assert m["flops"] == 2 * 72992
    assert m["flops_nonzero"] == 2 * expected_nz < 2 * 72992


def test_size_after_structured(tiny_cnn):
    remove_filters_(tiny_cnn, filters_to_remove(tiny_cnn, 0.5), X1)
    m = size_metrics(tiny_cnn, X1, 2684)
    weights = 2 * 9 + 3 * 2 * 9 + 3 * 49 * 8 + 8 * 10  # 1328
    assert m["params"] == weights + 2 + 3 + 8 + 10 == m["params_nonzero"]
    assert m["flops"] == 2 * (784 * 18 + 196 * 54 + 3 * 49 * 8 + 80) == 2 * 25952 == m["flops_nonzero"]
    assert m["sparsity"] == pytest.approx(1 - 1328 / 2684, abs=1e-12)


# ---- registry -----------------------------------------------------------------------------------


def test_unknown_pruning_method_lists_known_names():
    with pytest.raises(UserError) as e:
        PRUNING_METHODS.get("nope")
    msg = str(e.value)
    assert "unknown pruning method 'nope'" in msg
    for name in ("channel_l1", "global_magnitude", "lottery_ticket", "mrpf", "structured"):
        assert name in msg
    assert PRUNING_METHODS.names() == [
        "channel_l1",
        "global_magnitude",
        "lottery_ticket",
        "mrpf",
        "reverse_magnitude",
        "structured",
    ]


def test_near_miss_suggests_the_name():
    with pytest.raises(UserError, match="did you mean 'global_magnitude'"):
        PRUNING_METHODS.get("global_magnitud")


def test_filter_plan_on_a_residual_model_removes_the_ratio_once_per_coupled_group():
    """The channels tied by a residual addition are one group: a 30 % plan leaves 11 of 16 in it,
    not 6 (each coupled conv's plan applied on top of the others')."""
    from torch import nn

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 16, 3, padding=1)
            self.a = nn.Conv2d(16, 16, 3, padding=1)
            self.b = nn.Conv2d(16, 16, 3, padding=1)
            self.head = nn.Linear(16, 10)

        def forward(self, x):
            s = self.stem(x)
            return self.head((s + self.b(torch.relu(self.a(s)))).mean((2, 3)))

    torch.manual_seed(0)
    model, x = Residual(), torch.rand(2, 3, 8, 8)
    plan = filters_to_remove(model, 0.3)
    remove_filters_(model, plan, x[:1])
    assert channel_widths(model) == {"stem": 11, "a": 11, "b": 11}
    assert model(x).shape == (2, 10)
    assert all(len(idxs) == 5 for idxs in plan.values())


def test_channel_l1_on_resnet20_keeps_the_ratio_in_every_group():
    from robustprune.models import build_model

    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, image_shape=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3, width=8)
    model.eval()
    before = channel_widths(model)
    remove_filters_(model, filters_to_remove(model, 0.5), torch.rand(1, 3, 32, 32))
    after = channel_widths(model)
    assert all(after[name] == before[name] - round(0.5 * before[name]) for name in before), (before, after)
