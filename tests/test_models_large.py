"""ResNet-34/50 (basic and bottleneck blocks, ImageNet and CIFAR stems) and MobileViT-XS: published
parameter counts, a few training steps, filter pruning with every criterion (through bottlenecks,
projection shortcuts, concatenations, the transformer's MLP and its attention heads), block pruning
and MRPF ratios. Narrow widths and 16x16 or 32x32 images keep the file fast on one core."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustprune.errors import UserError
from robustprune.metrics.size import count_macs
from robustprune.models import MODELS, Normalize, build_model
from robustprune.models.blocks import HiddenLinear, MultiHeadSelfAttention, residual_blocks
from robustprune.models.mobilevit import MobileViTBlock, fold, unfold
from robustprune.models.resnet_imagenet import Bottleneck
from robustprune.pruning.blocks import prune_blocks_, removable_blocks
from robustprune.pruning.criteria import CRITERIA, build_criterion
from robustprune.pruning.criteria.replay import Recording, Replay
from robustprune.pruning.mrpf import adaptive_ratios, module_robust_sensitivity
from robustprune.pruning.structured import filter_groups, prune_filters_, prune_structured_

MEAN, STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
NARROW = {"resnet34": {"width": 8}, "resnet50": {"width": 8}, "mobilevit_xs": {"width_mult": 0.5}}
LARGE = list(NARROW)


def build(name, num_classes=10, image_shape=(3, 32, 32), seed=0, **args):
    torch.manual_seed(seed)
    return build_model(name, num_classes=num_classes, image_shape=image_shape, mean=MEAN, std=STD, **args)


def narrow(name, side=16, **args):
    return build(name, image_shape=(3, side, side), **{**NARROW[name], **args}).eval()


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def macs(model, x):
    """Multiply-accumulates per image with a Linear counted once per token (count_macs counts a
    Linear once per image, which undercounts a transformer)."""
    total = [0]

    def hook(m, inputs, out):
        channels = out.shape[1] if isinstance(m, nn.Conv2d) else out.shape[-1]
        total[0] += m.weight.numel() * (out.numel() // channels)

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(x[:1])
    for h in handles:
        h.remove()
    return total[0]


def data(n=8, side=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, side, side, generator=g), torch.arange(n) % 10


# ---- architectures ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, side, count",
    [
        ("resnet34", 224, 21_797_672),  # torchvision resnet34
        ("resnet50", 224, 25_557_032),  # torchvision resnet50
        ("mobilevit_xs", 256, 2_317_848),  # "2.3 M" (Mehta & Rastegari 2021, Table 1)
    ],
)
def test_published_parameter_counts(name, side, count):
    model = build(name, num_classes=1000, image_shape=(3, side, side))
    assert name in MODELS and model.stem_kind == "imagenet"
    assert isinstance(next(model.children()), Normalize)
    assert n_params(model) == count


def test_cifar_stem_parameter_counts():
    # 3x3 stem instead of 7x7 (27 * 64 instead of 147 * 64 weights), 10 classes instead of 1000
    assert n_params(build("resnet50")) == 25_557_032 - 147 * 64 + 27 * 64 - 990 * 2049 == 23_520_842
    assert n_params(build("resnet34")) == 21_797_672 - 147 * 64 + 27 * 64 - 990 * 513 == 21_282_122
    # MobileViT: the stride changes no weight, only the classifier shrinks
    assert n_params(build("mobilevit_xs")) == 2_317_848 - 990 * 385 == 1_936_698


def test_block_structure():
    r50, r34 = build("resnet50"), build("resnet34")
    blocks = residual_blocks(r50)
    assert len(blocks) == 16 and all(isinstance(b, Bottleneck) for _, b in blocks)
    assert [r50.get_submodule(f"layer{i}")[0].body.conv3.out_channels for i in (1, 2, 3, 4)] == [256, 512, 1024, 2048]
    assert len(removable_blocks(r50)) == 12  # the first block of every stage projects (64 -> 256 in layer1)
    assert len(removable_blocks(r34)) == 13  # layer1 keeps 64 channels: all 3 of its blocks are identity blocks
    vit = build("mobilevit_xs")
    vits = [m for m in vit.modules() if isinstance(m, MobileViTBlock)]
    assert [len(b.transformer) for b in vits] == [2, 4, 3]
    assert [b.norm.normalized_shape[0] for b in vits] == [96, 120, 144]
    assert [b.fuse.conv.out_channels for b in vits] == [64, 80, 96] and vit.head.conv.out_channels == 384
    attn = vits[0].transformer[0].attn
    assert (attn.num_heads, attn.head_dim) == (4, 24) and vits[0].transformer[0].mlp.fc1.out_features == 192
    assert [vit.stages[1][0].body.expand.conv.out_channels] == [128]  # expansion 4 of 32


def test_stems_and_feature_map_sizes():
    assert [build("resnet50", image_shape=(3, s, s), width=8).stem_kind for s in (32, 64, 128)] == [
        "cifar",
        "cifar",
        "imagenet",
    ]
    r = build("resnet50", image_shape=(3, 64, 64), width=8, stem="imagenet").eval()
    assert isinstance(r.stem.pool, nn.MaxPool2d) and r.stem.conv.kernel_size == (7, 7)
    with torch.no_grad():
        assert r(torch.rand(2, 3, 64, 64)).shape == (2, 10)
    with pytest.raises(UserError, match="unknown stem"):
        build("resnet34", stem="tiny")

    def transformer_sides(model, side):
        sides = []
        hooks = [
            b.local.register_forward_hook(lambda m, i, o: sides.append(o.shape[-1]))
            for b in model.modules()
            if isinstance(b, MobileViTBlock)
        ]
        with torch.no_grad():
            out = model(torch.rand(1, 3, side, side))
        for h in hooks:
            h.remove()
        return sides, out.shape

    assert transformer_sides(narrow("mobilevit_xs", 32), 32) == ([16, 8, 4], (1, 10))  # CIFAR: 8x downsampling
    assert transformer_sides(narrow("mobilevit_xs", 64, stem="imagenet"), 64) == ([8, 4, 2], (1, 10))
    assert transformer_sides(narrow("mobilevit_xs", 36), 36) == ([18, 9, 5], (1, 10))  # odd sides are resized


def test_unfold_fold_patch_layout():
    x = torch.rand(2, 5, 4, 6)
    t = unfold(x, 2)  # (batch, 4 pixel positions, 2 x 3 patches, channels)
    assert t.shape == (2, 4, 6, 5) and torch.equal(fold(t, 4, 6, 2), x)
    assert torch.equal(t[:, 0, 0], x[:, :, 0, 0]) and torch.equal(t[:, 1, 0], x[:, :, 0, 1])
    assert torch.equal(t[:, 3, 4], x[:, :, 3, 3])  # patch 4 = row 1, column 1; position 3 = (1, 1) within it


@pytest.mark.parametrize("name", LARGE)
def test_trains_a_few_sgd_steps(name):
    model = narrow(name, 32).train()
    x, y = data(8, 32)
    before = {k: p.detach().clone() for k, p in model.named_parameters()}
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):
        loss = F.cross_entropy(model(x), y)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert all(not torch.equal(before[k], p) for k, p in model.named_parameters())  # every weight moved


# ---- filter pruning ---------------------------------------------------------------------------------


def criterion(name):
    if name == "kl":
        return build_criterion("kl", max_images=2)  # one forward pass per channel: keep it small
    return build_criterion(name)


@pytest.mark.parametrize("crit", CRITERIA.names())
@pytest.mark.parametrize("name", ["resnet34", "resnet50"])
def test_resnet_filter_pruning_every_criterion(name, crit):
    model = narrow(name)
    x, y = data()
    p0, f0 = n_params(model), count_macs(model, x)[0]
    widths = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    prune_filters_(model, criterion(crit), 0.5, x[:1], x=x, y=y)
    # every group (inside the blocks, every stage's residual stream with its projection) loses half
    assert {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)} == {
        n: w // 2 for n, w in widths.items()
    }
    # in and out channels both halve: about a quarter of the weights and MACs stay
    assert 0.24 < n_params(model) / p0 < 0.27
    assert 0.24 < count_macs(model, x)[0] / f0 < 0.27
    assert model.classifier.out_features == 10
    with torch.no_grad():
        out = model(x)
    assert out.shape == (8, 10) and torch.isfinite(out).all()


def test_mobilevit_filter_pruning_channels_mlp_and_heads():
    model = narrow("mobilevit_xs")
    x, _ = data()
    p0, f0 = n_params(model), macs(model, x)
    layer = model.stages[2][1]  # the first MobileViT block: 64 channels, d = 48
    t0 = layer.transformer[0]
    assert (t0.mlp.fc1.out_features, t0.attn.num_heads, layer.local.conv1x1.out_channels) == (96, 4, 48)
    prune_filters_(model, build_criterion("l1"), 0.5, x[:1])
    assert isinstance(t0.mlp.fc1, HiddenLinear)
    assert (t0.mlp.fc1.out_features, t0.mlp.fc2.in_features) == (48, 48)  # MLP hidden width
    assert layer.local.conv1x1.out_channels == 24 == t0.attn_norm.normalized_shape[0] == layer.norm.weight.numel()
    assert (t0.attn.qkv.in_features, t0.attn.proj.out_features) == (24, 24)  # the d stream
    for attn in (m for m in model.modules() if isinstance(m, MultiHeadSelfAttention)):
        assert attn.num_heads == 2 and attn.head_dim in (12, 16, 18)  # heads go, head size stays
        assert attn.qkv.out_features == 3 * attn.num_heads * attn.head_dim == 3 * attn.proj.in_features
    assert 0.22 < n_params(model) / p0 < 0.30
    assert 0.22 < macs(model, x) / f0 < 0.32
    with torch.no_grad():
        out = model(x)
    assert out.shape == (8, 10) and torch.isfinite(out).all()


@pytest.mark.parametrize("crit", ["l2", "lamp", "random", "taylor", "hessian", "expected_abs", "hrank", "pls"])
def test_mobilevit_filter_pruning_criteria(crit):
    """kl is left out here only for time: it scores every qkv row and MLP unit by a forward pass each."""
    model = narrow("mobilevit_xs")
    x, y = data()
    recording = Recording(build_criterion(crit))
    prune_filters_(model, recording, 0.3, x[:1], x=x, y=y, scope="global")
    heads = [m.num_heads for m in model.modules() if isinstance(m, MultiHeadSelfAttention)]
    assert len(heads) == 9 and all(1 <= h <= 4 for h in heads)
    # heads are scored last, one score per qkv row (3 x 4 heads x head_dim), all informative
    head_scores = recording.group_scores[-9:]
    assert [len(s) for s in head_scores] == [144] * 2 + [192] * 4 + [216] * 3
    assert all(torch.isfinite(s).all() for s in head_scores)
    # hrank excepted: a token channel's "map" is 4 pixel positions x N patches, always of full rank min(4, N)
    assert crit == "hrank" or all(s.std() > 0 for s in head_scores)
    with torch.no_grad():
        assert model(x).shape == (8, 10)


def test_head_removal_equals_zeroing_the_heads_output():
    torch.manual_seed(0)
    attn = MultiHeadSelfAttention(12, 4).eval()
    x = torch.rand(2, 3, 5, 12)  # any leading dimensions, 5 tokens
    ref = copy.deepcopy(attn)
    with torch.no_grad():
        ref.proj.weight[:, 3:6] = 0  # head 1's columns
        ref.proj.weight[:, 9:12] = 0  # head 3's
        expected = ref(x)
    attn.prune_heads_([1, 3])
    assert (attn.num_heads, attn.qkv.out_features, attn.proj.in_features) == (2, 18, 6)
    with torch.no_grad():
        torch.testing.assert_close(attn(x), expected)
    with pytest.raises(ValueError, match="cannot remove heads"):
        attn.prune_heads_([0, 1])


def test_engine_removes_the_weakest_heads_and_keeps_one():
    model = narrow("mobilevit_xs")
    x, _ = data()
    attn = model.stages[3][1].transformer[1].attn
    name = next(n for n, m in model.named_modules() if m is attn)
    d = attn.head_dim
    with torch.no_grad():
        attn.qkv.weight[attn.head_rows([2])] *= 1e-3  # head 2 is the weakest by L1
    kept = attn.qkv.weight[attn.head_rows([0, 1, 3])].clone()
    with torch.no_grad():
        before = model(x)
    prune_filters_(model, build_criterion("l1"), 0.0, x[:1], layer_ratios={name: 0.25})
    assert attn.num_heads == 3 and torch.equal(attn.qkv.weight, kept)
    assert attn.proj.in_features == 3 * d
    others = [m.num_heads for m in model.modules() if isinstance(m, MultiHeadSelfAttention) and m is not attn]
    assert set(others) == {4}
    with torch.no_grad():
        assert model(x).shape == before.shape
    # a ratio that would remove every head keeps one; the qkv layer's name addresses the heads too
    prune_filters_(model, build_criterion("l1"), 0.0, x[:1], layer_ratios={f"{name}.qkv": 0.9})
    assert attn.num_heads == 1
    # ignoring the attention keeps its heads (and the d stream it belongs to)
    other = model.stages[2][1].transformer[0].attn
    other_name = next(n for n, m in model.named_modules() if m is other)
    prune_filters_(model, build_criterion("l1"), 0.5, x[:1], ignored_layers=[other_name])
    assert other.num_heads == 4 and other.qkv.in_features == 48
    with torch.no_grad():
        assert model(x).shape == (8, 10)


def test_mobilevit_iterative_pruning_and_replay():
    x, _ = data()
    model, twin = narrow("mobilevit_xs"), narrow("mobilevit_xs")
    recording = Recording(build_criterion("l2"))
    for _ in range(2):  # the graph is rebuilt on the pruned model: head counts must stay consistent
        prune_filters_(model, recording, 0.5, x[:1])
    assert {m.num_heads for m in model.modules() if isinstance(m, MultiHeadSelfAttention)} == {1}
    replay = Replay(recording.state())
    for _ in range(2):
        prune_filters_(twin, replay, 0.5, x[:1])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))


# ---- block pruning -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name, removable, half", [("resnet50", 12, 6), ("resnet34", 13, 6)])
def test_block_pruning(name, removable, half):
    model = narrow(name)
    x, y = data()
    p0 = n_params(model)
    removed = prune_blocks_(model, build_criterion("taylor"), 0.5, x=x, y=y)
    assert len(removed) == half  # round(0.5 * 13) = 6: half to even
    assert len(residual_blocks(model)) == 16 - half and len(removable_blocks(model)) == removable - half
    assert n_params(model) < p0
    with torch.no_grad():
        assert model(x).shape == (8, 10)


def test_every_bottleneck_with_an_identity_shortcut_can_go():
    model = narrow("resnet50")
    assert len(prune_blocks_(model, build_criterion("l1"), count=12)) == 12
    assert [n for n, _ in residual_blocks(model)] == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    with torch.no_grad():
        assert model(torch.rand(2, 3, 16, 16)).shape == (2, 10)
    with pytest.raises(UserError, match="would leave it with no block"):
        prune_blocks_(narrow("resnet34"), build_criterion("l1"), count=13)  # layer1 has only identity blocks


def test_blocks_and_filters_together():
    for name in LARGE:
        model = narrow(name)
        p0 = n_params(model)
        removed = prune_structured_(model, build_criterion("l1"), (0.5, 0.3), torch.rand(1, 3, 16, 16), target="both")
        assert removed and n_params(model) < 0.7 * p0, name
        with torch.no_grad():
            assert model(torch.rand(2, 3, 16, 16)).shape == (2, 10)


# ---- MRPF ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", LARGE)
def test_mrpf_ratios_over_every_prunable_group(name):
    model = narrow(name)
    x, y = data()
    groups = filter_groups(model, x[:1])
    first = [g[0] for g in groups]
    if name == "mobilevit_xs":  # the d streams, the MLP hidden widths and the heads are groups too
        assert sum(n.endswith(".local.conv1x1") for n in first) == 3
        assert sum(n.endswith(".mlp.fc1") for n in first) == 9
        assert sum(n.endswith(".attn.qkv") for n in first) == 9
    else:  # every group of coupled filters; a residual stream lists its projection shortcuts
        assert any(any(n.endswith("shortcut.conv") for n in g) for g in groups)
    mrs = module_robust_sensitivity(model, groups, x, y, lr=0.01, epochs=1, eps=0.05)
    assert set(mrs) == set(first) and all(torch.isfinite(torch.tensor(v)) for v in mrs.values())
    ratios = adaptive_ratios(mrs, 0.5, 0.2, 0.8)
    assert abs(sum(ratios.values()) / len(ratios) - 0.5) < 1e-6
    p0 = n_params(model)
    prune_filters_(model, build_criterion("l1"), 0.0, x[:1], layer_ratios=ratios)
    assert n_params(model) < 0.6 * p0
    with torch.no_grad():
        assert model(x).shape == (8, 10)
