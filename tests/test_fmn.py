"""FMN, the fast minimum-norm attack (robustprune.attacks.fmn): argument checks, determinism, and what
its norms mean (the fp32 distance of a point the fp32 model misclassifies), on tiny tensors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from robustprune.attacks.base import ATTACKS, build_attack
from robustprune.attacks.fmn import FMN, cosine, feasible, margin_loss
from robustprune.attacks.norms import EPS_TOLERANCE, distance
from robustprune.errors import UserError


def _batch(model, n=12, seed=0, wrong=(0, 5)):
    """Random images labelled with the model's own prediction (correct), except rows `wrong`."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 28, 28, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    for i in wrong:
        y[i] = (y[i] + 1) % 10
    return x, y


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: FMN(norm="L1"), "norm"),
        (lambda: FMN(steps=0), "steps"),
        (lambda: FMN(steps=2.5), "steps"),
        (lambda: FMN(alpha_init=0), "alpha_init"),
        (lambda: FMN(alpha_init=float("inf")), "alpha_init"),
        (lambda: FMN(alpha_final=-1.0), "alpha_final"),
        (lambda: FMN(alpha_init=1.0, alpha_final=2.0), "alpha_final"),
        (lambda: FMN(gamma_init=1.0), "gamma_init"),
        (lambda: FMN(gamma_final=-0.1), "gamma_final"),
        (lambda: FMN(gamma_init=0.01, gamma_final=0.05), "gamma_final"),
        (lambda: FMN(seed="0"), "seed"),
        (lambda: FMN(eps=-0.1), "eps"),
        (lambda: FMN(norm="Linf", eps=2.0), "eps"),
        (lambda: FMN(eps=True), "eps"),
    ],
)
def test_invalid_parameters(make, match):
    with pytest.raises(UserError, match=match) as e:
        make()
    assert "\n" not in str(e.value)


def test_defaults_follow_the_paper():
    linf, l2 = FMN(), FMN(norm="l2")
    assert (linf.norm, linf.steps, linf.alpha_init, linf.alpha_final) == ("Linf", 100, 10.0, 0.1)
    assert (l2.norm, l2.alpha_init, l2.alpha_final) == ("L2", 1.0, 0.01)
    assert (linf.gamma_init, linf.gamma_final) == (0.05, 0.001)
    assert cosine(0.05, 0.001, 0, 100) == 0.05 and math.isclose(cosine(0.05, 0.001, 100, 100), 0.001)
    assert math.isclose(cosine(1.0, 0.0, 50, 100), 0.5)


def test_registered_and_built_like_every_attack():
    assert ATTACKS.get("fmn") is FMN
    a = build_attack("fmn", 0.3, {"steps": 5})
    assert (a.eps, a.norm, a.steps) == (0.3, "Linf", 5)
    assert build_attack("fmn", 1.5, {"norm": "L2"}).eps == 1.5
    with pytest.raises(ValueError, match="fmn"):
        build_attack("fmn", 0.3, {"steps": 0})


def test_margin_loss():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 1.0]])
    assert torch.equal(margin_loss(logits, torch.tensor([0, 2])), torch.tensor([1.0, -4.0]))


def test_feasible_drops_steps_out_of_the_box():
    """The descent step is -grad: at x = 0 a positive component would lower the pixel below 0, at
    x = 1 a negative one would raise it above 1; both are dropped, everything else is kept."""
    x = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.5, 0.5]])
    g = torch.tensor([[1.0, -1.0, 1.0, -1.0, 1.0, -1.0]])
    assert feasible(g, x).tolist() == [[0.0, -1.0, 1.0, 0.0, 1.0, -1.0]]


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_norms_are_fp32_distances_of_misclassified_points(tiny_cnn, norm):
    x, y = _batch(tiny_cnn)
    x_adv, norms = FMN(norm=norm, steps=30).min_norms(tiny_cnn, x, y)
    assert norms.shape == (len(x),) and x_adv.shape == x.shape
    # misclassified clean: norm 0, not attacked
    assert norms[[0, 5]].tolist() == [0.0, 0.0] and torch.equal(x_adv[[0, 5]], x[[0, 5]])
    found = torch.isfinite(norms) & (norms > 0)
    assert found.sum() >= 8, norms  # a random tiny CNN breaks easily
    assert torch.equal(norms[found], distance(x_adv, x, norm)[found])
    with torch.no_grad():
        assert (tiny_cnn(x_adv[found].float()).argmax(1) != y[found]).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert torch.equal(x_adv[~found], x[~found])


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_deterministic(tiny_cnn, norm):
    x, y = _batch(tiny_cnn, seed=1)
    a, na = FMN(norm=norm, steps=20, seed=3).min_norms(tiny_cnn, x, y)
    b, nb = FMN(norm=norm, steps=20, seed=3).min_norms(tiny_cnn, x, y)
    assert torch.equal(a, b) and torch.equal(na, nb)


def test_call_keeps_only_breaks_within_eps(tiny_cnn):
    x, y = _batch(tiny_cnn, seed=2)
    _, norms = FMN(steps=30).min_norms(tiny_cnn, x, y)
    eps = float(norms[torch.isfinite(norms) & (norms > 0)].median())
    x_adv = FMN(steps=30, eps=eps)(tiny_cnn, x, y)
    inside = norms <= eps + EPS_TOLERANCE
    assert torch.equal(x_adv[~inside], x[~inside])
    assert (distance(x_adv, x, "Linf") <= eps + EPS_TOLERANCE).all()
    with torch.no_grad():
        assert (tiny_cnn(x_adv[inside]).argmax(1) != y[inside]).all()
    # without eps: every point found, at its smallest norm
    assert torch.equal(FMN(steps=30)(tiny_cnn, x, y), FMN(steps=30).min_norms(tiny_cnn, x, y)[0])


def test_nothing_found_is_inf(tiny_cnn):
    """A model that always answers class 3 (no gradient at all): every other label is misclassified
    (norm 0), class 3 is never broken (norm inf, x returned)."""
    const = nn.Sequential(nn.Flatten(), nn.Linear(784, 10))
    with torch.no_grad():
        const[1].weight.zero_()
        const[1].bias.copy_(torch.arange(10) == 3)
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([3, 1, 3, 0])
    x_adv, norms = FMN(steps=5).min_norms(const, x, y)
    assert norms.tolist() == [math.inf, 0.0, math.inf, 0.0]
    assert torch.equal(x_adv, x)


def test_leaves_the_model_as_it_was(tiny_cnn):
    tiny_cnn.train()
    x, y = _batch(tiny_cnn.eval(), n=4, wrong=(0,))
    tiny_cnn.train()
    FMN(steps=3).min_norms(tiny_cnn, x, y)
    assert tiny_cnn.training and all(p.requires_grad for p in tiny_cnn.parameters())
    assert all(p.grad is None for p in tiny_cnn.parameters())


def test_rejects_bad_input(tiny_cnn):
    x = torch.rand(2, 1, 28, 28) * 255
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        FMN(steps=2).min_norms(tiny_cnn, x, torch.tensor([0, 1]))
    with pytest.raises(UserError, match="labels"):
        FMN(steps=2).min_norms(tiny_cnn, x / 255, torch.tensor([0]))
    x_adv, norms = FMN(steps=2).min_norms(tiny_cnn, x[:0] / 255, torch.tensor([], dtype=torch.long))
    assert x_adv.shape == (0, 1, 28, 28) and norms.shape == (0,)


def test_candidates_are_checked_in_fp32(tiny_cnn):
    """Under bf16 autocast the attack's own passes are bf16; what it keeps must still break the fp32
    model, at the fp32 distance."""
    x, y = _batch(tiny_cnn, seed=4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv, norms = FMN(norm="L2", steps=20).min_norms(tiny_cnn, x, y)
    found = torch.isfinite(norms) & (norms > 0)
    assert found.any()
    assert torch.equal(norms[found], distance(x_adv, x, "L2")[found])
    with torch.no_grad():
        assert (tiny_cnn(x_adv[found]).argmax(1) != y[found]).all()
