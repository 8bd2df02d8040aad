"""Structured pruning of any nn.Module: a user's own network (residual additions, concatenations,
grouped and depthwise convolutions, nn.MultiheadAttention), layers Torch-Pruning cannot follow (one
UserError naming the layer), and Hugging Face transformers image classifiers built from small configs
(ViT, ResNet, ConvNeXt; no download). A ratio removes round(ratio * n) of the n structures of every
coupled group (uniform), or round(ratio * N) of all N structures (global)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustprune.errors import UserError
from robustprune.pruning.criteria import build_criterion
from robustprune.pruning.structured import filter_groups, prune_attention_heads_, prune_filters_

X = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
Y = torch.tensor([0, 1, 2, 3])


def l1():
    return build_criterion("l1")


def out_width(layer: nn.Module) -> int:
    return layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(x)


def train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """One SGD step: finite loss, a gradient shaped like every parameter, and the weights move."""
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    loss = F.cross_entropy(model(x), y)
    loss.backward()
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and p.grad.shape == p.shape for p in model.parameters() if p.requires_grad)
    assert any(not torch.equal(b, p.detach()) for b, p in zip(before, model.parameters()))


# ---- a user's own networks ---------------------------------------------------------------------------


class Residual(nn.Module):
    """stem (16) + b(a(stem)) (16): one residual group {stem, b}; a (16) alone."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        s = torch.relu(self.bn(self.stem(x)))
        return self.fc((s + self.b(torch.relu(self.a(s)))).mean((2, 3)))


class Concat(nn.Module):
    """Two branches (10 and 6 filters) concatenated into one conv."""

    def __init__(self):
        super().__init__()
        self.left = nn.Conv2d(3, 10, 3, padding=1)
        self.right = nn.Conv2d(3, 6, 1)
        self.mix = nn.Conv2d(16, 8, 3, padding=1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x):
        c = torch.cat([torch.relu(self.left(x)), torch.relu(self.right(x))], 1)
        return self.fc(torch.relu(self.mix(c)).mean((2, 3)))


class Separable(nn.Module):
    """conv (16) -> depthwise (16) -> grouped conv (16 -> 16, 4 groups) -> classifier."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.bn = nn.BatchNorm2d(16)
        self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        h = torch.relu(self.bn(self.dw(torch.relu(self.conv(x)))))
        return self.fc(torch.relu(self.grouped(h)).mean((2, 3)))


class ConcatIntoGroups(Concat):
    """The concatenation read by a grouped conv: each branch fills only some of its groups."""

    def __init__(self):
        super().__init__()
        self.left, self.right = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 8, 1)
        self.mix = nn.Conv2d(16, 8, 3, padding=1, groups=2)


class WithAttention(nn.Module):
    """A CNN with an nn.MultiheadAttention over its pixels, added to the stem's channels."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.conv = nn.Conv2d(16, 12, 3, padding=1)
        self.fc = nn.Linear(12, 10)

    def forward(self, x):
        f = torch.relu(self.stem(x))
        b, c, h, w = f.shape
        t = f.flatten(2).transpose(1, 2)
        f = f + self.attn(t, t, t, need_weights=False)[0].transpose(1, 2).reshape(b, c, h, w)
        return self.fc(torch.relu(self.conv(f)).mean((2, 3)))


def build(cls):
    torch.manual_seed(0)
    return cls().eval()


def test_a_residual_group_is_pruned_once_at_the_ratio():
    model = build(Residual)
    prune_filters_(model, l1(), 0.3, X[:1])
    assert (model.stem.out_channels, model.a.out_channels, model.b.out_channels) == (11, 11, 11)  # not 16 -> 6
    assert model.bn.num_features == 11 and model.fc.in_features == 11
    assert outputs(model, X).shape == (4, 10)
    train_step(model, X, Y)


def test_concatenated_branches_are_pruned_each_at_the_ratio():
    model = build(Concat)
    prune_filters_(model, l1(), 0.3, X[:1])
    assert (model.left.out_channels, model.right.out_channels) == (10 - 3, 6 - 2)
    assert model.mix.in_channels == 11 and model.mix.out_channels == 8 - 2
    assert outputs(model, X).shape == (4, 10)
    train_step(model, X, Y)


def test_depthwise_follows_its_producer_and_grouped_convs_lose_the_same_share_of_every_group():
    model = build(Separable)
    prune_filters_(model, l1(), 0.3, X[:1])
    # conv's 16 channels run through the depthwise conv into 4 groups of 4: round(0.3 * 4) = 1 in each
    assert model.conv.out_channels == model.dw.in_channels == model.dw.out_channels == model.dw.groups == 12
    assert model.bn.num_features == 12 and model.grouped.in_channels == 12 and model.grouped.groups == 4
    assert model.grouped.out_channels == 12 and model.fc.in_features == 12
    assert outputs(model, X).shape == (4, 10)
    train_step(model, X, Y)


def test_a_concatenation_that_splits_the_groups_of_a_grouped_conv_is_refused():
    model = build(ConcatIntoGroups)
    with pytest.raises(
        UserError, match=r"^layer 'mix' \(Conv2d, 2 channel groups\) reads the channels of '(left|right)' in only some"
    ):
        prune_filters_(model, l1(), 0.3, X[:1])
    prune_filters_(model, l1(), 0.3, X[:1], ignored_layers=["left", "right"])
    assert (model.left.out_channels, model.right.out_channels, model.mix.out_channels) == (8, 8, 6)
    assert outputs(model, X).shape == (4, 10)


def test_multihead_attention_keeps_its_width_and_the_rest_is_pruned():
    model = build(WithAttention)
    assert filter_groups(model, X[:1]) == [["conv"]]  # the stem's channels are the attention's embedding
    prune_filters_(model, l1(), 0.3, X[:1])
    assert model.stem.out_channels == 16 and model.attn.embed_dim == 16 and model.attn.num_heads == 4
    assert model.conv.in_channels == 16 and model.conv.out_channels == 12 - 4
    assert outputs(model, X).shape == (4, 10)
    train_step(model, X, Y)


@pytest.mark.parametrize("cls", [Residual, Concat, Separable, WithAttention])
def test_ratio_zero_changes_nothing(cls):
    model = build(cls)
    before, state = outputs(model, X), copy.deepcopy(model.state_dict())
    prune_filters_(model, l1(), 0.0, X[:1])
    assert torch.equal(outputs(model, X), before)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("cls", [Residual, Concat])
def test_global_removes_the_ratio_of_all_structures(cls):
    model = build(cls)
    layers = dict(model.named_modules())
    groups = [g[0] for g in filter_groups(model, X[:1])]
    before = {g: out_width(layers[g]) for g in groups}
    prune_filters_(model, l1(), 0.3, X[:1], scope="global")
    removed = sum(before[g] - out_width(layers[g]) for g in groups)
    assert removed == round(0.3 * sum(before.values()))
    assert outputs(model, X).shape == (4, 10)


# ---- layers Torch-Pruning cannot follow -------------------------------------------------------------


class FunctionalConv(nn.Module):
    """A conv written with F.conv2d: Torch-Pruning sees a loose weight and an unknown op."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3) * 0.1)

    def forward(self, x):
        return F.conv2d(x, self.weight, padding=1)


class PositionBias(nn.Module):
    """A (1, C, H, W) parameter added to the features: Torch-Pruning prunes its last dimension."""

    def __init__(self, c: int, size: int):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(1, c, size, size))

    def forward(self, x):
        return x + self.bias


class FourByFour(nn.Module):
    """Splits 16 channels as 4 x 4: a reshape tied to a fixed channel count."""

    def forward(self, x):
        return x.reshape(x.shape[0], 4, 4, *x.shape[2:]).mean(2)


def stack(mid: nn.Module, width: int) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        mid,
        nn.Conv2d(width, 8, 3, padding=1),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    ).eval()


@pytest.mark.parametrize(
    "mid, width, match, fix",
    [
        (
            FunctionalConv(16, 12),
            12,
            r"^layer '2' \(FunctionalConv\) cannot be pruned through the dependency graph: Torch-Pruning cannot "
            r"tell which dimension of its parameter 'weight' \(12, 16, 3, 3\) follows the channels of '0'.*; "
            r"pass '2' in ignored_layers$",
            "2",
        ),
        (
            PositionBias(16, 8),
            16,
            r"^layer '2' \(PositionBias\) cannot be pruned .*its parameter 'bias' \(1, 16, 8, 8\).*; pass '2' in",
            "2",
        ),
        (
            FourByFour(),
            4,
            r"^layer '0' \(Conv2d\) cannot be pruned through the dependency graph: once its channels are removed, "
            r"layer '2' \(FourByFour\) fails \(RuntimeError: shape .*; pass '0' in ignored_layers$",
            "0",
        ),
    ],
    ids=["functional-conv", "position-bias", "fixed-reshape"],
)
def test_a_layer_torch_pruning_cannot_follow_is_one_user_error_and_ignoring_it_works(mid, width, match, fix):
    model = stack(mid, width)
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(UserError, match=match) as e:
        prune_filters_(model, l1(), 0.3, X[:1])
    assert "\n" not in str(e.value)
    assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())  # nothing was pruned
    prune_filters_(model, l1(), 0.3, X[:1], ignored_layers=[fix])
    assert model[0].out_channels == 16 and model[3].out_channels == 8 - 2
    assert outputs(model, X).shape == (4, 10)


def test_a_loose_parameter_it_can_follow_is_pruned():
    class Scale(nn.Module):  # x * w.view(1, -1, 1, 1): the channel dimension is the last one
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.rand(16))

        def forward(self, x):
            return x * self.weight.view(1, -1, 1, 1)

    model = stack(Scale(), 16)
    prune_filters_(model, l1(), 0.3, X[:1])
    assert model[0].out_channels == 11 and model[2].weight.shape == (11,)
    assert outputs(model, X).shape == (4, 10)


# ---- Hugging Face transformers -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers", reason="the hf extra (transformers) is not installed")


def hf_model(transformers, kind: str) -> nn.Module:
    from robustprune.pruning.hf import HFClassifier

    torch.manual_seed(0)
    if kind == "vit":
        config = transformers.ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            num_labels=10,
        )
        model = transformers.ViTForImageClassification(config)
    elif kind == "resnet":
        config = transformers.ResNetConfig(
            embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic", num_labels=10
        )
        model = transformers.ResNetForImageClassification(config)
    else:
        config = transformers.ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, num_labels=10)
        model = transformers.ConvNextForImageClassification(config)
    return HFClassifier(model).eval()


XH = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def vit_structures(model) -> dict[str, int]:
    """The prunable structures of the ViT: the embedding width, each MLP's width, each attention's heads."""
    layers = model.model.vit.layers
    out = {"embedding": model.model.vit.embeddings.patch_embeddings.projection.out_channels}
    out |= {f"mlp{i}": layer.mlp.fc1.out_features for i, layer in enumerate(layers)}
    out |= {f"heads{i}": layer.attention.num_attention_heads for i, layer in enumerate(layers)}
    return out


def conv_structures(model) -> dict[str, int]:
    """One width per coupled group (its first layer), as filter_groups lists them."""
    groups = filter_groups(model, XH[:1])
    layers = dict(model.named_modules())
    return {g[0]: out_width(layers[g[0]]) for g in groups}


def test_hf_classifier_marks_the_mlp_and_returns_logits(transformers):
    model = hf_model(transformers, "vit")
    assert model.hidden_layers == ["model.vit.layers.0.mlp.fc1", "model.vit.layers.1.mlp.fc1"]
    assert outputs(model, XH).shape == (4, 10)
    assert hf_model(transformers, "convnext").hidden_layers[0].endswith("layers.0.pwconv1")
    with pytest.raises(UserError, match="returns ImageClassifierOutput, not a tensor of logits; wrap it as"):
        prune_filters_(model.model, l1(), 0.3, XH[:1])


def test_vit_uniform_prunes_the_mlps_and_heads_and_the_embedding_once(transformers):
    model = hf_model(transformers, "vit")
    before = vit_structures(model)
    assert before == {"embedding": 64, "mlp0": 128, "mlp1": 128, "heads0": 4, "heads1": 4}
    prune_filters_(model, l1(), 0.3, XH[:1])
    assert vit_structures(model) == {k: v - round(0.3 * v) for k, v in before.items()}  # heads: 4 - 1
    attn = model.model.vit.layers[0].attention
    assert attn.q_proj.out_features == attn.v_proj.out_features == attn.o_proj.in_features == 3 * attn.head_dim
    assert model.model.vit.embeddings.position_embeddings.shape == (1, 17, 45)
    assert model.model.classifier.out_features == 10
    assert outputs(model, XH).shape == (4, 10)
    train_step(model, XH, Y)


def test_vit_keeps_one_head_at_a_high_ratio(transformers):
    model = hf_model(transformers, "vit")
    prune_filters_(model, l1(), 0.9, XH[:1])
    assert vit_structures(model) == {"embedding": 6, "mlp0": 13, "mlp1": 13, "heads0": 1, "heads1": 1}
    assert outputs(model, XH).shape == (4, 10)


def test_removing_vit_heads_equals_zeroing_them(transformers):
    """Only the heads of layer 0 (layer_ratios): the pruned model computes what the original computes
    with the removed heads' value rows zeroed."""
    model = hf_model(transformers, "vit")
    original = copy.deepcopy(model)
    prune_filters_(model, l1(), 0.0, XH[:1], layer_ratios={"model.vit.layers.0.attention": 0.5})
    attn, ref = model.model.vit.layers[0].attention, original.model.vit.layers[0].attention
    d, q, q0 = ref.head_dim, attn.q_proj.weight, ref.q_proj.weight
    rows = [q[j * d : (j + 1) * d] for j in range(attn.num_attention_heads)]
    kept = [h for h in range(4) if any(torch.equal(r, q0[h * d : (h + 1) * d]) for r in rows)]
    assert attn.num_attention_heads == 2 and len(kept) == 2
    l1_rows = sum(layer.weight.detach().abs().sum(1) for layer in (ref.q_proj, ref.k_proj, ref.v_proj))
    assert sorted(kept) == sorted(torch.argsort(l1_rows.view(4, d).mean(1))[2:].tolist())  # the 2 lowest go
    with torch.no_grad():
        for h in set(range(4)) - set(kept):
            ref.v_proj.weight[h * d : (h + 1) * d] = 0
            ref.v_proj.bias[h * d : (h + 1) * d] = 0
    assert torch.allclose(outputs(model, XH), outputs(original, XH), atol=1e-5)
    assert vit_structures(model)["heads1"] == 4 and vit_structures(model)["mlp0"] == 128


@pytest.mark.parametrize("kind", ["resnet", "convnext"])
def test_hf_cnns_lose_the_ratio_in_every_group(transformers, kind):
    model = hf_model(transformers, kind)
    before = conv_structures(model)
    assert sorted(before.values()) == ([16, 16, 32, 32] if kind == "resnet" else [16, 32, 64, 128])
    prune_filters_(model, l1(), 0.3, XH[:1])
    layers = dict(model.named_modules())
    assert {g: out_width(layers[g]) for g in before} == {g: n - round(0.3 * n) for g, n in before.items()}
    assert outputs(model, XH).shape == (4, 10)
    train_step(model, XH, Y)


@pytest.mark.parametrize("kind", ["vit", "resnet", "convnext"])
def test_hf_global_removes_the_ratio_of_all_structures(transformers, kind):
    model = hf_model(transformers, kind)
    count = vit_structures if kind == "vit" else conv_structures
    before = count(model)
    prune_filters_(model, l1(), 0.3, XH[:1], scope="global")
    after = count(model)
    assert after.keys() == before.keys()
    assert sum(before.values()) - sum(after.values()) == round(0.3 * sum(before.values()))
    assert all(n >= 1 for n in after.values())
    assert outputs(model, XH).shape == (4, 10)


@pytest.mark.parametrize("kind", ["vit", "resnet", "convnext"])
def test_hf_ratio_zero_changes_nothing(transformers, kind):
    model = hf_model(transformers, kind)
    before = outputs(model, XH)
    prune_filters_(model, l1(), 0.0, XH[:1])
    assert torch.equal(outputs(model, XH), before)


def test_prune_attention_heads_refuses_removing_every_head(transformers):
    attn = hf_model(transformers, "vit").model.vit.layers[0].attention
    with pytest.raises(ValueError, match="cannot remove heads"):
        prune_attention_heads_(attn, [0, 1, 2, 3])
    prune_attention_heads_(attn, [1])
    assert attn.num_attention_heads == 3 and attn.k_proj.out_features == 3 * attn.head_dim


def test_removing_convnext_mlp_channels_equals_zeroing_them(transformers):
    """pwconv1 is marked HiddenLinear: its width is a group of its own, and removing channels computes
    what the original computes with their pwconv1 rows zeroed (GELU(0) = 0)."""
    model = hf_model(transformers, "convnext")
    original = copy.deepcopy(model)
    name = "model.convnext.encoder.stages.0.layers.0.pwconv1"
    prune_filters_(model, l1(), 0.0, XH[:1], layer_ratios={name: 0.5})
    fc, ref = model.get_submodule(name), original.get_submodule(name)
    assert fc.out_features == 32 and model.get_submodule(name.replace("pwconv1", "pwconv2")).in_features == 32
    gone = [i for i in range(64) if not any(torch.equal(ref.weight[i], w) for w in fc.weight)]
    assert len(gone) == 32
    with torch.no_grad():
        ref.weight[gone] = 0
        ref.bias[gone] = 0
    assert torch.allclose(outputs(model, XH), outputs(original, XH), atol=1e-5)
