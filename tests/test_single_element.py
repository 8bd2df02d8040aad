"""Algorithm 2 (remove one filter or block at a time, no adjustment) and Fig. 5's fractions."""

from __future__ import annotations

import math
from collections import OrderedDict

import pytest
import torch
from torch import nn

from robustprune.attacks import ATTACKS
from robustprune.models.blocks import ResidualBlock
from robustprune.models.mnist_cnn import MnistCNN
from robustprune.pruning.single_element import (
    improvement_fractions,
    make_evaluator,
    remove_filter_copy,
    single_element_study,
)


def randomise_bn_(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine terms, so a channel's BN output is never 0 by luck."""
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.rand(c, generator=g) - 0.5)
            m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(c, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(c, generator=g) * 0.5 + 0.1)  # > 0: few channels dead after ReLU
    return model.eval()


def cnn():
    torch.manual_seed(0)
    return MnistCNN(conv1=4, conv2=6, fc=8, kernel_size=3, padding=1).eval()


def vgg_bn():
    torch.manual_seed(0)
    return randomise_bn_(
        nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(4, 5, 3, padding=1),
            nn.BatchNorm2d(5),
            nn.ReLU(),
            nn.Conv2d(5, 1, 1),  # 1 filter: skipped
            nn.Flatten(),
            nn.Linear(16, 3),
        )
    )


class Block(ResidualBlock):
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
        self.shortcut = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(
                OrderedDict([("conv", nn.Conv2d(cin, cout, 1, stride, bias=False)), ("bn", nn.BatchNorm2d(cout))])
            )
        )
        self.act = nn.ReLU()


class TinyResNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.layer1 = nn.Sequential(Block(4, 4), Block(4, 6, stride=2), Block(6, 6))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3))

    def forward(self, x):
        return self.head(self.layer1(self.stem(x)))


def resnet():
    torch.manual_seed(0)
    return randomise_bn_(TinyResNet())


def outputs(x):
    """evaluate() that returns the logits, so rows can be compared with a reference network."""

    def evaluate(model):
        with torch.no_grad():
            return {"out": model.eval()(x).clone()}

    return evaluate


def assert_equals_reference(model, rows, x):
    changed = 0
    with torch.no_grad():
        base = model(x)
        for row in rows:
            ref = remove_filter_copy(model, row["layer"], row["index"], x)(x)
            assert torch.allclose(row["out"], ref, rtol=1e-5, atol=1e-5), row["element"]
            changed += not torch.allclose(ref, base, rtol=1e-5, atol=1e-5)
    assert changed >= len(rows) / 2  # the comparison is not vacuous: most removals change the network


@pytest.mark.parametrize("build,shape,n_rows", [(cnn, (1, 28, 28), 4 + 6), (vgg_bn, (3, 8, 8), 4 + 5)])
def test_hook_removal_equals_physical_removal_on_plain_cnns(build, shape, n_rows):
    model = build()
    x = torch.rand(5, *shape)
    before = model(x).detach()
    rows = single_element_study(model, "filters", outputs(x), x)
    assert len(rows) == n_rows  # every filter except those of the 1-filter layer
    assert {r["method"] for r in rows} == {"hook"} and {r["coupled"] for r in rows} == {1}
    assert [r["index"] for r in rows if r["layer"] == rows[0]["layer"]] == list(range(4))
    assert rows[0]["element"] == f"{rows[0]['layer']}:0"
    assert_equals_reference(model, rows, x)
    assert all(not m._forward_hooks for m in model.modules())  # hooks gone
    assert torch.equal(model(x).detach(), before)


def test_physical_method_equals_torch_pruning_reference():
    model, x = vgg_bn(), torch.rand(3, 3, 8, 8)
    rows = single_element_study(model, "filters", outputs(x), x, method="physical")
    assert len(rows) == 9 and {r["method"] for r in rows} == {"physical"}
    assert_equals_reference(model, rows, x)


def test_residual_channels_are_one_element_and_hooks_zero_every_coupled_layer():
    model, x = resnet(), torch.rand(3, 3, 8, 8)
    rows = single_element_study(model, "filters", outputs(x), x)
    per_layer = {}
    for r in rows:
        per_layer.setdefault(r["layer"], []).append(r)
    # stem + block 0's conv2 share channels; block 1's conv2, its projection and block 2's conv2 too
    assert {k: (len(v), v[0]["coupled"]) for k, v in per_layer.items()} == {
        "stem.0": (4, 2),
        "layer1.0.body.conv1": (4, 1),
        "layer1.1.body.conv1": (6, 1),
        "layer1.1.body.conv2": (6, 3),
        "layer1.2.body.conv1": (6, 1),
    }
    assert {r["method"] for r in rows} == {"hook"}
    assert_equals_reference(model, rows, x)
    physical = single_element_study(model, "filters", outputs(x), x, method="physical")
    assert all(torch.allclose(a["out"], b["out"], atol=1e-5) for a, b in zip(rows, physical))


def test_channel_through_a_bias_or_sigmoid_is_removed_physically():
    torch.manual_seed(0)
    model = randomise_bn_(
        nn.Sequential(
            nn.Conv2d(3, 4, 3),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, groups=4),
            nn.BatchNorm2d(4),
            nn.Sigmoid(),
            nn.Conv2d(4, 3, 1),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Linear(3, 2),
        )
    )
    x = torch.rand(3, 3, 10, 10)
    rows = single_element_study(model, "filters", outputs(x), x)
    assert {r["layer"]: r["method"] for r in rows} == {"0": "physical", "6": "hook"}
    assert_equals_reference(model, rows, x)
    with pytest.raises(ValueError, match="hooks"):
        single_element_study(model, "filters", outputs(x), x, method="hook")


def test_dead_filter_leaves_every_metric_at_baseline():
    model = cnn()
    with torch.no_grad():
        model.conv1.weight[2].zero_()
        model.conv1.bias[2] = 0.0
    torch.manual_seed(1)
    x, y = torch.rand(64, 1, 28, 28), torch.randint(0, 10, (64,))
    evaluate = make_evaluator(x, y, {"acc_adv:fgsm@0.1": ATTACKS.get("fgsm")(0.1)})
    baseline = evaluate(model)
    rows = single_element_study(model, "filters", evaluate, x[:4], layers=["conv1"])
    assert [r["element"] for r in rows] == ["conv1:0", "conv1:1", "conv1:2", "conv1:3"]
    dead = rows[2]
    assert {k: dead[k] for k in baseline} == baseline
    assert any(r[k] != baseline[k] for r in rows for k in baseline)  # the live filters matter


def test_layers_and_max_elements_select_elements():
    model, x = resnet(), torch.rand(2, 3, 8, 8)
    ev = outputs(x)
    rows = single_element_study(model, "filters", ev, x, layers=["layer1.0.body.conv2"])  # coupled to the stem
    assert {r["layer"] for r in rows} == {"stem.0"} and len(rows) == 4
    full = [r["element"] for r in single_element_study(model, "filters", ev, x)]
    some = [r["element"] for r in single_element_study(model, "filters", ev, x, max_elements=7, seed=3)]
    again = [r["element"] for r in single_element_study(model, "filters", ev, x, max_elements=7, seed=3)]
    assert len(some) == 7 and some == again and set(some) <= set(full)
    assert some == [e for e in full if e in some]  # module order kept
    with pytest.raises(ValueError, match="no prunable convolution"):
        single_element_study(model, "filters", ev, x, layers=["nope"])


def test_blocks_are_replaced_by_identity_one_at_a_time():
    model, x = resnet(), torch.rand(3, 3, 8, 8)
    before = model(x).detach()
    rows = single_element_study(model, "blocks", outputs(x), x)
    assert [(r["element"], r["index"], r["method"]) for r in rows] == [
        ("layer1.0", 0, "identity"),
        ("layer1.2", 2, "identity"),
    ]  # layer1.1 has a projection shortcut
    with torch.no_grad():
        for r in rows:
            ref = TinyResNet()
            ref.load_state_dict(model.state_dict())
            ref.layer1[r["index"]] = nn.Identity()
            assert torch.allclose(r["out"], ref.eval()(x))
    assert torch.equal(model(x).detach(), before) and isinstance(model.layer1[0], Block)
    with torch.no_grad():  # a block whose body outputs 0 on post-ReLU input changes nothing when removed
        model.layer1[2].body.bn2.weight.zero_()
        model.layer1[2].body.bn2.bias.zero_()
    rows = single_element_study(model, "blocks", outputs(x), x, layers=["layer1.2"])
    assert len(rows) == 1 and torch.allclose(rows[0]["out"], model(x))


def test_improvement_fractions_by_hand():
    baseline = {"acc_clean": 0.90, "acc_adv:fgsm@0.1": 0.30, "acc_occlusion@8": 0.50}
    rows = [
        {"acc_clean": 0.90, "acc_adv:fgsm@0.1": 0.31, "acc_occlusion@8": 0.50},  # no gen loss, fgsm up
        {"acc_clean": 0.89, "acc_adv:fgsm@0.1": 0.35, "acc_occlusion@8": 0.55},  # 1 p.p. loss, both up
        {"acc_clean": 0.875, "acc_adv:fgsm@0.1": 0.40, "acc_occlusion@8": 0.49},  # 2.5 p.p. loss, fgsm up
        {"acc_clean": 0.80, "acc_adv:fgsm@0.1": 0.50, "acc_occlusion@8": 0.60},  # 10 p.p. loss
        {"acc_clean": 0.91, "acc_adv:fgsm@0.1": 0.30, "acc_occlusion@8": 0.50},  # equal robustness: no
    ]
    f = improvement_fractions(rows, baseline, rob_metrics=["acc_adv:fgsm@0.1", "acc_occlusion@8"])
    assert f["acc_adv:fgsm@0.1"] == {0: 0.2, 1: 0.4, 2: 0.4, 3: 0.6, 4: 0.6, 5: 0.6}
    assert f["acc_occlusion@8"] == {0: 0.0, 1: 0.2, 2: 0.2, 3: 0.2, 4: 0.2, 5: 0.2}
    assert improvement_fractions(rows, baseline) == f  # default: every acc_ metric but the generalization one
    strict = improvement_fractions(rows, baseline, rob_metrics=["acc_adv:fgsm@0.1"], strict=True)
    assert strict["acc_adv:fgsm@0.1"] == {0: 0.0, 1: 0.2, 2: 0.4, 3: 0.6, 4: 0.6, 5: 0.6}
    empty = improvement_fractions([], baseline, rob_metrics=["acc_adv:fgsm@0.1"], tolerances=(1,))
    assert math.isnan(empty["acc_adv:fgsm@0.1"][1])
    with pytest.raises(ValueError, match="baseline has no"):
        improvement_fractions(rows, baseline, rob_metrics=["acc_adv:pgd@0.1"])


class ShiftNet(nn.Module):
    """conv -> x + 1 -> conv: the graph check passes (an addition), the numbers do not."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.fc = nn.Conv2d(3, 4, 3), nn.Conv2d(4, 3, 3), nn.Linear(3 * 16, 2)

    def forward(self, x):
        return self.fc(torch.flatten(self.c2(self.c1(x) + 1.0), 1))


def test_verify_falls_back_to_physical_removal_when_hooks_differ():
    torch.manual_seed(0)
    model, x = ShiftNet().eval(), torch.rand(2, 3, 8, 8)
    with pytest.warns(RuntimeWarning, match="hooks differ"):
        rows = single_element_study(model, "filters", outputs(x), x)
    assert {r["layer"]: r["method"] for r in rows} == {"c1": "physical", "c2": "hook"}
    assert_equals_reference(model, rows, x)
    with pytest.raises(ValueError, match="does not give the network"):
        single_element_study(model, "filters", outputs(x), x, method="hook")
