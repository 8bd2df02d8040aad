"""Training dynamics (gradient confusion, layer rotation) and the Pearson correlation helpers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from robustprune.metrics.correlation import generalization_vs_robustness, pearson
from robustprune.metrics.dynamics import (
    EpochDynamics,
    confusion_from_cosines,
    gradient_confusion,
    gradient_cosines,
    last_conv,
    layer_rotation,
    snapshot,
)
from robustprune.models.mnist_cnn import MnistCNN


class TwoParam(nn.Module):
    """logits = (a * x1, b * x2): two parameters, so gradients can be worked out by hand."""

    def __init__(self, a=0.0, b=0.0):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(a))
        self.b = nn.Parameter(torch.tensor(b))

    def forward(self, x):
        return torch.stack([self.a * x[:, 0], self.b * x[:, 1]], dim=1)


def hand_gradient(a, b, x, y):
    """d CE / d(a, b) of one sample: (softmax - onehot) * x per logit."""
    z = np.array([a * x[0], b * x[1]])
    p = np.exp(z - z.max())
    p /= p.sum()
    p[y] -= 1.0
    return np.array([p[0] * x[0], p[1] * x[1]])


def cos(u, v):
    return float(u @ v / (np.linalg.norm(u) * np.linalg.norm(v)))


X3 = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
Y3 = torch.tensor([0, 0, 1])


def test_gradient_cosines_two_parameter_hand_example_at_zero():
    # At a = b = 0 the softmax is (1/2, 1/2): g1 = (-1/2, 0), g2 = (0, 1/2), g3 = (1/2, -1/2).
    cosm = gradient_cosines(TwoParam(), [(X3[i : i + 1], Y3[i : i + 1]) for i in range(3)])
    r = -1 / math.sqrt(2)
    expected = torch.tensor([[1.0, 0.0, r], [0.0, 1.0, r], [r, r, 1.0]], dtype=torch.float64)
    assert torch.allclose(cosm, expected, atol=1e-12)
    assert confusion_from_cosines(cosm, "similarity") == pytest.approx(r)
    assert confusion_from_cosines(cosm, "distance") == pytest.approx(1.0)  # min(1, 1 - r, 1 - r)


@pytest.mark.parametrize("a,b", [(0.3, -0.7), (1.5, 0.2)])
def test_gradient_confusion_matches_hand_computation(a, b):
    x = torch.tensor([[1.0, 2.0], [-1.0, 0.5], [0.3, -2.0], [2.0, 1.0]])
    y = torch.tensor([0, 1, 1, 0])
    g = [hand_gradient(a, b, x[i].numpy(), int(y[i])) for i in range(4)]
    sims = [cos(g[i], g[j]) for i in range(4) for j in range(i + 1, 4)]
    model = TwoParam(a, b)
    # batch_size 1 over 4 images: the 4 batches are the 4 images in a seeded order; min is order-free
    assert gradient_confusion(model, x, y, n_batches=4, batch_size=1, measure="similarity") == pytest.approx(min(sims))
    assert gradient_confusion(model, x, y, n_batches=4, batch_size=1) == pytest.approx(min(1 - s for s in sims))


def test_identical_batches_have_similarity_one_and_distance_zero(tiny_cnn):
    torch.manual_seed(0)
    xb, yb = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    cosm = gradient_cosines(tiny_cnn, [(xb, yb)] * 3)
    assert torch.allclose(cosm, torch.ones(3, 3, dtype=torch.float64), atol=1e-6)
    # the same image and label everywhere: every drawn batch is the same
    x, y = xb[:1].repeat(16, 1, 1, 1), yb[:1].repeat(16)
    assert gradient_confusion(tiny_cnn, x, y, n_batches=4, batch_size=4) == pytest.approx(0.0, abs=1e-6)
    assert gradient_confusion(tiny_cnn, x, y, n_batches=4, batch_size=4, measure="similarity") == pytest.approx(1.0)


def test_gradient_confusion_is_seeded_and_has_no_side_effects():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 36, 4))
    x, y = torch.rand(40, 1, 8, 8), torch.randint(0, 4, (40,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    a = gradient_confusion(model, x, y, n_batches=4, batch_size=8, seed=3)
    b = gradient_confusion(model, x, y, n_batches=4, batch_size=8, seed=3)
    assert a == b and 0.0 <= a <= 2.0
    assert model.training  # mode restored
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # BN stats untouched
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="n_batches"):
        gradient_confusion(model, x, y, n_batches=1)


def test_layer_rotation_zero_orthogonal_negated():
    torch.manual_seed(0)
    model = MnistCNN(conv1=2, conv2=3, fc=4, kernel_size=3, padding=1)
    init = snapshot(model)
    assert last_conv(model)[0] == "conv2"
    assert layer_rotation(model, init) == pytest.approx(0.0, abs=1e-12)
    with torch.no_grad():
        w0 = model.conv2.weight.clone()
        model.conv1.weight.mul_(-1)  # another layer: the default (last conv) does not see it
        assert layer_rotation(model, init) == pytest.approx(0.0, abs=1e-12)
        assert layer_rotation(model, init, layer="conv1") == pytest.approx(2.0)
        model.conv2.weight.copy_(-w0)
        assert layer_rotation(model, init) == pytest.approx(2.0)
        v = torch.randn_like(w0)
        v -= (v.flatten() @ w0.flatten()) / (w0.flatten() @ w0.flatten()) * w0  # orthogonal to w0
        model.conv2.weight.copy_(v)
        assert layer_rotation(model, init) == pytest.approx(1.0, abs=1e-6)
        model.conv2.weight.copy_(3 * w0)  # scale does not rotate
        assert layer_rotation(model, model) == pytest.approx(0.0, abs=1e-12)  # a model works as init too
        assert layer_rotation(model, init) == pytest.approx(0.0, abs=1e-6)


def test_layer_rotation_refuses_a_differently_shaped_init():
    model = MnistCNN(conv1=2, conv2=3, fc=4, kernel_size=3, padding=1)
    smaller = MnistCNN(conv1=2, conv2=2, fc=4, kernel_size=3, padding=1)
    with pytest.raises(ValueError, match="same .pruned. architecture"):
        layer_rotation(smaller, model.state_dict())
    with pytest.raises(ValueError, match="no layer"):
        layer_rotation(model, model.state_dict(), layer="conv9")


def test_epoch_dynamics_records_both_confusions_and_rotation(tiny_cnn):
    torch.manual_seed(0)
    x, y = (torch.rand(100, 1, 28, 28) * 255).to(torch.uint8), torch.randint(0, 10, (100,))
    dyn = EpochDynamics(x, y, tiny_cnn, n_batches=3, batch_size=8)
    assert len(dyn.x) == 24
    first = dyn(0, tiny_cnn)
    assert set(first) == {"grad_confusion", "grad_cos_min", "layer_rotation"}
    assert first["layer_rotation"] == pytest.approx(0.0, abs=1e-12)
    assert 0 <= first["grad_confusion"] <= 2 and -1 <= first["grad_cos_min"] <= 1
    assert first["grad_confusion"] <= 1 - first["grad_cos_min"] + 1e-12  # 1 - max cos <= 1 - min cos
    with torch.no_grad():
        tiny_cnn.conv2.weight.add_(0.1 * torch.randn_like(tiny_cnn.conv2.weight))
    second = dyn(1, tiny_cnn)
    assert second["layer_rotation"] > 0
    assert dyn(1, tiny_cnn) == second  # same probe batches every call
    assert [h["epoch"] for h in dyn.history] == [0, 1, 1]


# ---- correlation ------------------------------------------------------------------------------


def test_pearson_matches_formula_and_scipy():
    xs, ys = [1.0, 2.0, 3.0, 4.0, 5.0], [2.0, 4.0, 5.0, 4.0, 5.0]
    mx, my = sum(xs) / 5, sum(ys) / 5
    sxy = sum((a - mx) * (b - my) for a, b in zip(xs, ys))
    sxx, syy = sum((a - mx) ** 2 for a in xs), sum((b - my) ** 2 for b in ys)
    r_hand = sxy / math.sqrt(sxx * syy)  # = 6 / sqrt(10 * 6)
    r, p = pearson(xs, ys)
    assert r == pytest.approx(r_hand) and r == pytest.approx(6 / math.sqrt(60))
    ref = stats.pearsonr(xs, ys)
    assert (r, p) == pytest.approx((ref.statistic, ref.pvalue))
    # t-test of r with n - 2 degrees of freedom, as scipy does
    t = r * math.sqrt(3 / (1 - r * r))
    assert p == pytest.approx(2 * stats.t.sf(abs(t), 3))


def test_pearson_returns_nan_when_r_says_nothing():
    assert all(math.isnan(v) for v in pearson([1, 2], [3, 5]))  # 2 points: always +-1
    assert all(math.isnan(v) for v in pearson([1, 2, 3], [4, 4, 4]))  # constant input
    assert all(math.isnan(v) for v in pearson([], []))
    r, _ = pearson([1, 2, float("nan"), 3], [1, 2, 9, 3])  # NaN pair dropped
    assert r == pytest.approx(1.0)
    with pytest.raises(ValueError):
        pearson([1, 2, 3], [1, 2])


def test_generalization_vs_robustness_over_rows():
    rows = [
        {"acc_clean": 0.9, "acc_adv:fgsm@0.1": 0.3},
        {"acc_clean": 0.8, "acc_adv:fgsm@0.1": 0.35},
        {"acc_clean": 0.85, "acc_adv:fgsm@0.1": 0.2},
        {"acc_clean": 0.7},  # no robustness: left out
        {"acc_clean": 0.6, "acc_adv:fgsm@0.1": float("nan")},
    ]
    res = generalization_vs_robustness(rows, "acc_clean", "acc_adv:fgsm@0.1")
    ref = stats.pearsonr([0.9, 0.8, 0.85], [0.3, 0.35, 0.2])
    assert res.n == 3 and res.r == pytest.approx(ref.statistic) and res.p == pytest.approx(ref.pvalue)
    r, p, n = generalization_vs_robustness(rows[:2], "acc_clean", "acc_adv:fgsm@0.1")
    assert n == 2 and math.isnan(r) and math.isnan(p)
