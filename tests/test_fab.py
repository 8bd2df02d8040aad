"""FAB and FAB-T (Croce & Hein 2020), L-inf and L2: the projection onto a hyperplane inside the [0, 1] box on
hand-made cases, unit tests on tiny tensors, and cross-checks against torchattacks' FAB on real MNIST CNNs."""

from __future__ import annotations

import math
import time

import pytest
import torch
from torch import nn

from robustprune.attacks.base import ATTACKS, build_attack
from robustprune.attacks.fab import (
    FAB,
    FABT,
    _level_crossing,
    _level_crossing_sorted,
    _target_difference,
    class_differences,
    project_to_hyperplane,
)
from robustprune.errors import UserError

# ---- the projection ---------------------------------------------------------------------------------------


def proj(t, w, b, norm):
    return project_to_hyperplane(torch.tensor([t]), torch.tensor([w]), torch.tensor([b]), norm)[0]


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_projection_hand_made(norm):
    def approx(v):
        return pytest.approx(v, abs=1e-6)

    # inside the box: L-inf moves every coordinate by the same amount, L2 along w
    assert proj([0.5, 0.5], [1.0, 1.0], 0.6, norm).tolist() == approx([-0.2, -0.2])
    assert proj([0.5, 0.5], [1.0, 1.0], 1.4, norm).tolist() == approx([0.2, 0.2])  # the other side
    assert proj([0.5, 0.5], [1.0, 2.0], 1.0, "L2").tolist() == approx([-0.1, -0.2])
    # L-inf min max|d| with d1 + 2 d2 = -0.5: |d| = 0.5 / 3 on both
    assert proj([0.5, 0.5], [1.0, 2.0], 1.0, "Linf").tolist() == approx([-1 / 6, -1 / 6])
    # the box binds: x1 + x2 = 0.2 from (0.1, 0.9); the first coordinate stops at 0, the second goes to 0.2
    # (L-inf: the minimal max-move 0.7 needs x2 = 0.2, so x1 = 0; L2: the KKT point is the same)
    assert proj([0.1, 0.9], [1.0, 1.0], 0.2, norm).tolist() == approx([-0.1, -0.7])
    # a coordinate with zero weight never moves
    assert proj([0.5, 0.3], [2.0, 0.0], 0.6, norm).tolist() == approx([-0.2, 0.0])
    # the box cannot reach the hyperplane (x1 + x2 >= 0 > -1): the nearest corner
    assert proj([0.5, 0.3], [1.0, 1.0], -1.0, norm).tolist() == approx([-0.5, -0.3])
    # already on the hyperplane
    assert proj([0.5, 0.3], [1.0, -1.0], 0.2, norm).tolist() == approx([0.0, 0.0])
    # all-zero w: no move
    assert proj([0.5, 0.3], [0.0, 0.0], 1.0, norm).tolist() == [0.0, 0.0]


def random_hyperplanes(n=300, dim=784, seed=0):
    g = torch.Generator().manual_seed(seed)
    t = torch.rand(n, dim, generator=g)
    t[:, : dim // 4] = (t[:, : dim // 4] > 0.5).float()  # saturated pixels, as in MNIST
    w = torch.randn(n, dim, generator=g) * (torch.rand(n, dim, generator=g) > 0.2)  # some zero weights
    b = (w * torch.rand(n, dim, generator=g)).sum(1) * (1 + 0.5 * torch.randn(n, generator=g))
    b[::5] = w[::5].clamp(min=0).sum(1) + 1.0  # beyond the box: <w, z> <= sum of the positive w_i
    return t, w, b


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_projection_matches_torchattacks_and_is_optimal(norm):
    from torchattacks.attacks.fab import projection_l2, projection_linf

    t, w, b = random_hyperplanes()
    d = project_to_hyperplane(t, w, b, norm)
    ref = (projection_linf if norm == "Linf" else projection_l2)(t, w.clone(), b.clone())
    assert torch.allclose(d, ref, atol=1e-5)
    z = t + d
    assert z.min() >= 0 and z.max() <= 1
    reachable = (torch.minimum(w * 0, w).sum(1) <= b) & (b <= torch.maximum(w * 0, w).sum(1))
    assert 50 < int(reachable.sum()) < len(t)  # both cases occur
    assert torch.allclose((w * z).sum(1)[reachable], b[reachable], atol=1e-3, rtol=1e-4)
    # optimality: no other point of the hyperplane in the box is nearer to t, e.g. the projections of random
    # box points onto it
    norm_of = (lambda v: v.abs().amax(1)) if norm == "Linf" else (lambda v: v.norm(dim=1))
    for seed in range(3):
        u = torch.rand(t.shape, generator=torch.Generator().manual_seed(seed))
        feasible = u + project_to_hyperplane(u, w, b, norm)
        assert bool((norm_of(d) <= norm_of(feasible - t) + 1e-5)[reachable].all())


def test_newton_and_sorting_agree():
    g = torch.Generator().manual_seed(2)
    weight, knot = torch.rand(200, 50, generator=g), torch.rand(200, 50, generator=g)
    knot[:, :10] = 0.0
    level = (weight * knot).sum(1) * torch.rand(200, generator=g) * 1.2  # some rows out of reach
    newton, exact = _level_crossing(weight, knot, level), _level_crossing_sorted(weight, knot, level)
    fallback = _level_crossing(weight, knot, level, newton_steps=0)  # all rows by sorting
    reach = level <= (weight * knot).sum(1)
    assert torch.allclose(newton[reach], exact[reach], rtol=1e-4) and torch.equal(fallback, exact)
    value = (weight * torch.minimum(knot, exact[:, None])).sum(1)
    assert torch.allclose(value[reach], level[reach], rtol=1e-4)
    # out of reach: at least every knot (the full move)
    assert bool((newton[~reach] >= knot[~reach].amax(1) - 1e-6).all())
    assert bool((exact[~reach] >= knot[~reach].amax(1) - 1e-6).all())


# ---- the gradients ----------------------------------------------------------------------------------------


def test_gradients_of_the_logit_differences(tiny_cnn):
    x = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 3, 9, 1, 1, 5])

    def forward(z):
        return tiny_cnn(z.view(-1, 1, 28, 28))

    z = x.flatten(1)
    diff, grads = class_differences(forward, z, y)
    assert diff.shape == (6, 10) and grads.shape == (10, 6, 784)
    jacobian = torch.func.vmap(torch.func.jacrev(lambda u: tiny_cnn(u.view(1, 1, 28, 28))[0]))(z)  # (n, K, D)
    assert torch.allclose(grads, (jacobian - jacobian[torch.arange(6), y][:, None]).transpose(0, 1), atol=1e-6)
    assert torch.all(diff.gather(1, y[:, None]) == 0) and torch.all(grads[y, torch.arange(6)] == 0)
    # the targeted difference (one backward of the summed differences) is the target's row
    target = torch.tensor([2, 0, 4, 7, 9, 3])
    f, g = _target_difference(forward, z, y, target)
    assert torch.allclose(f, diff.gather(1, target[:, None]).squeeze(1))
    assert torch.allclose(g, grads[target, torch.arange(6)], atol=1e-6)
    # against central differences along a random direction (in float64: the CNN is piecewise linear)
    model64 = tiny_cnn.double()
    z64, v = z.double(), torch.randn(z.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    _, g64 = _target_difference(lambda u: model64(u.view(-1, 1, 28, 28)), z64, y, target)
    h = 1e-6
    with torch.no_grad():
        fd = (model64((z64 + h * v).view(-1, 1, 28, 28)) - model64((z64 - h * v).view(-1, 1, 28, 28))) / (2 * h)
    fd = fd.gather(1, target[:, None]).squeeze(1) - fd.gather(1, y[:, None]).squeeze(1)
    assert torch.allclose((g64.double() * v).sum(1), fd, rtol=1e-4, atol=1e-6)


# ---- the attacks on tiny models ---------------------------------------------------------------------------


def linear_model() -> nn.Module:
    """Two classes, four pixels: logit_0 - logit_1 = <(-1, 1, -1, 4), x> (bias 0)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, -2.0, 0.5, 3.0], [2.0, -3.0, 1.5, -1.0]]))
    return model.eval()


def dist(a, b, norm):
    d = (a - b).flatten(1)
    return d.abs().amax(1) if norm == "Linf" else d.norm(dim=1)


@pytest.mark.parametrize("norm,minimal", [("Linf", 1.5 / 7), ("L2", 1.5 / math.sqrt(19))])
@pytest.mark.parametrize("make", [FABT, FAB])
def test_linear_model_finds_the_minimal_perturbation(norm, minimal, make):
    # at x = 0.5 everywhere the margin of class 0 is 1.5 = 0.5 * (1 - 1 + 1 + ... ); the nearest point of class 1
    # is 1.5 / ||w_0 - w_1||_dual away (L1 norm 7 for L-inf, L2 norm sqrt(19) for L2), well inside the box
    model, x, y = linear_model(), torch.full((1, 1, 2, 2), 0.5), torch.tensor([0])
    with torch.no_grad():
        assert float(model(x)[0, 0] - model(x)[0, 1]) == pytest.approx(1.5)
    x_adv = make(1.0, norm=norm)(model, x, y)
    found = float(dist(x_adv, x, norm)[0])
    with torch.no_grad():
        assert int(model(x_adv).argmax(1)) == 1
    assert minimal * (1 - 1e-5) <= found <= minimal * 1.01
    # with eps just below the minimum nothing is found: the input comes back
    assert torch.equal(make(minimal * 0.99, norm=norm)(model, x, y), x)


def tiny_batch(model, n=8, seed=0):
    x = torch.rand(n, 1, 28, 28, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        y = model(x).argmax(1)
    return x, y


CASES = {
    "fab_t_linf": (lambda: FABT(0.3, norm="Linf", steps=20, n_target_classes=3), "Linf", 0.3),
    "fab_t_l2": (lambda: FABT(2.0, norm="L2", steps=20, n_target_classes=3), "L2", 2.0),
    "fab_linf": (lambda: FAB(0.3, norm="Linf", steps=20, restarts=2, seed=1), "Linf", 0.3),
    "fab_l2": (lambda: FAB(2.0, norm="L2", steps=20, restarts=2, seed=1), "L2", 2.0),
}


@pytest.mark.parametrize("case", CASES)
def test_bounds_determinism_and_misclassification(tiny_cnn, case):
    make, norm, eps = CASES[case]
    x, y = tiny_batch(tiny_cnn)
    y[:2] = (y[:2] + 1) % 10  # two points misclassified from the start
    rng = torch.get_rng_state()
    x_adv = make()(tiny_cnn, x, y)
    assert torch.equal(torch.get_rng_state(), rng)  # the global RNG is never used
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype and not x_adv.requires_grad
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert float(dist(x_adv, x, norm).max()) <= eps + 1e-5
    assert torch.equal(x_adv[:2], x[:2])  # misclassified: returned as they are
    moved = dist(x_adv, x, norm) > 0
    with torch.no_grad():
        wrong = tiny_cnn(x_adv).argmax(1) != y
    assert int(moved.sum()) >= 3  # the attack breaks points of the random-weight CNN
    assert bool(wrong[moved].all())  # every returned change is an adversarial example
    assert torch.equal(make()(tiny_cnn, x, y), x_adv)  # deterministic
    with torch.no_grad():  # also when called under no_grad
        assert torch.equal(make()(tiny_cnn, x, y), x_adv)


def linear3() -> nn.Module:
    """Three classes, four pixels. At x = 0.5 class 0 wins, class 1 is the runner-up by logit (-0.05 vs -0.5)
    but far in input space (only pixels 0 and 1 move it, slowly), class 2 is nearer (pixels 2 and 3, fast)."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[0.0, 0.0, 0.0, 0.0], [0.1, 0.1, 0.0, 0.0], [0.0, 0.0, 2.0, 2.0]]))
        model[1].bias.copy_(torch.tensor([0.0, -0.15, -2.5]))
    return model.eval()


@pytest.mark.parametrize(
    "norm,eps,far,near,b_near",
    [
        ("Linf", 0.2, 0.05 / 0.2, 0.5 / 4, 0.01 / 0.2),
        ("L2", 0.3, 0.05 / math.sqrt(0.02), 0.5 / math.sqrt(8), 0.01 / math.sqrt(0.02)),
    ],
)
def test_targets_in_turn_and_a_broken_point_is_not_attacked_again(norm, eps, far, near, b_near):
    # A = 0.5 everywhere: class 1 (first target) is `far` > eps away, class 2 (second target) `near` < eps.
    # B: pixels 0 and 1 at 0.7, so class 1 is only `b_near` away, class 2 still `near`.
    model = linear3()
    x = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.7, 0.7, 0.5, 0.5]]).view(2, 1, 2, 2)
    y = torch.tensor([0, 0])
    one = FABT(eps, norm=norm, n_target_classes=1)(model, x, y)
    two = FABT(eps, norm=norm, n_target_classes=2)(model, x, y)
    with torch.no_grad():
        assert model(one).argmax(1).tolist() == [0, 1] and model(two).argmax(1).tolist() == [2, 1]
    assert torch.equal(one[0], x[0])  # class 1 is out of reach for A
    assert near <= float(dist(two[:1], x[:1], norm)) <= near * 1.01  # class 2 is not
    assert b_near <= float(dist(one[1:], x[1:], norm)) <= b_near * 1.01
    assert torch.equal(two[1], one[1])  # B, broken by the first target, is left alone by the second
    # with a radius beyond `far`, the first target alone reaches class 1 at its own minimal distance
    a = FABT(far * 1.05, norm=norm, n_target_classes=1)(model, x[:1], y[:1])
    assert far <= float(dist(a, x[:1], norm)) <= far * 1.01
    # untargeted FAB goes for the nearest boundary, class 2
    a = FAB(eps, norm=norm, restarts=1)(model, x[:1], y[:1])
    with torch.no_grad():
        assert int(model(a).argmax(1)) == 2
    assert near <= float(dist(a, x[:1], norm)) <= near * 1.01


@pytest.mark.parametrize("norm", ["Linf", "L2"])
def test_restarts_leave_broken_points_alone(tiny_cnn, norm):
    x, y = tiny_batch(tiny_cnn, n=10, seed=3)
    eps = 0.005 if norm == "Linf" else 0.1  # some points broken, some not
    one = FAB(eps, norm=norm, steps=15, restarts=1)(tiny_cnn, x, y)
    three = FAB(eps, norm=norm, steps=15, restarts=3)(tiny_cnn, x, y)
    broken1, broken3 = (one != x).flatten(1).any(1), (three != x).flatten(1).any(1)
    assert 0 < int(broken1.sum()) < len(x)
    assert bool(broken3[broken1].all()) and torch.equal(three[broken1], one[broken1])


def test_random_starts_are_seeded_and_inside_half_the_ball():
    x0 = torch.rand(5, 784, generator=torch.Generator().manual_seed(0)) * 0.5 + 0.25
    for norm, eps in (("Linf", 0.3), ("L2", 2.0)):
        attack = FAB(eps, norm=norm)
        a = attack._random_start(x0, torch.Generator().manual_seed(4))
        b = attack._random_start(x0, torch.Generator().manual_seed(4))
        c = attack._random_start(x0, torch.Generator().manual_seed(5))
        assert torch.equal(a, b) and not torch.equal(a, c)
        assert torch.allclose(dist(a, x0, norm), torch.full((5,), eps / 2), rtol=1e-5)  # box not reached


def test_targets_are_the_runner_up_classes():
    logits = torch.tensor([[0.0, 5.0, 3.0, 9.0], [4.0, 1.0, 2.0, 3.0]])
    y = torch.tensor([3, 0])
    targets = FABT(0.1)._targets(logits, y)  # 9 asked, 3 = K - 1 exist
    assert torch.stack(targets, 1).tolist() == [[1, 2, 0], [3, 2, 1]]
    assert torch.stack(FABT(0.1, n_target_classes=2)._targets(logits, y), 1).tolist() == [[1, 2], [3, 2]]


def test_eps_zero_and_empty_batch(tiny_cnn):
    x, y = tiny_batch(tiny_cnn, n=3)
    assert torch.equal(FABT(0.0)(tiny_cnn, x, y), x) and torch.equal(FAB(0.0, norm="L2")(tiny_cnn, x, y), x)
    assert FABT(0.1)(tiny_cnn, x[:0], y[:0]).shape == (0, 1, 28, 28)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"eps": -0.1}, "eps must be a finite number >= 0"),
        ({"eps": 1.5}, r"eps must be in \[0, 1\]"),
        ({"eps": float("nan"), "norm": "L2"}, "eps must be a finite number"),
        ({"eps": True}, "eps must be"),
        ({"eps": 0.3, "norm": "L1"}, "norm must be 'Linf' or 'L2'"),
        ({"eps": 0.3, "steps": 0}, "steps must be an integer >= 1"),
        ({"eps": 0.3, "steps": 2.5}, "steps must be an integer"),
        ({"eps": 0.3, "restarts": 0}, "restarts must be an integer >= 1"),
        ({"eps": 0.3, "n_target_classes": 0}, "n_target_classes must be an integer >= 1"),
        ({"eps": 0.3, "alpha_max": 1.5}, r"alpha_max .* must be a number in \[0, 1\]"),
        ({"eps": 0.3, "alpha_max": "0.1"}, "alpha_max"),
        ({"eps": 0.3, "eta": 0.9}, "eta .* must be a finite number >= 1"),
        ({"eps": 0.3, "eta": float("inf")}, "eta"),
        ({"eps": 0.3, "beta": 0.0}, r"beta .* must be a number in \(0, 1\]"),
        ({"eps": 0.3, "beta": 1.1}, "beta"),
        ({"eps": 0.3, "seed": 1.0}, "seed must be an integer"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(UserError, match=match):
        FABT(**kwargs)
    if "n_target_classes" not in kwargs:
        with pytest.raises(UserError, match=match):
            FAB(**kwargs)


def test_bad_inputs(tiny_cnn):
    x, y = tiny_batch(tiny_cnn, n=3)
    with pytest.raises(UserError, match=r"images must be in \[0, 1\]"):
        FABT(0.1)(tiny_cnn, x * 255, y)
    with pytest.raises(UserError, match="one integer label per image"):
        FABT(0.1)(tiny_cnn, x, y[:2])
    with pytest.raises(UserError, match="one integer label per image"):
        FAB(0.1)(tiny_cnn, x, y.float())
    with pytest.raises(UserError, match=r"labels must be in \[0, 9\]"):
        FAB(0.1)(tiny_cnn, x, torch.tensor([0, 10, 1]))


def test_registered():
    assert ATTACKS.get("fab_t") is FABT and ATTACKS.get("fab") is FAB
    attack = build_attack("fab_t", 0.5, {"norm": "L2", "steps": 10})
    assert (attack.norm, attack.eps, attack.steps, attack.n_target_classes, attack.restarts) == ("L2", 0.5, 10, 9, 1)
    assert FAB(0.3).restarts == 5  # AutoAttack's "plus" version
    with pytest.raises(ValueError, match="attack 'fab': FAB steps must be"):
        build_attack("fab", 0.3, {"steps": 0})


# ---- cross-checks against torchattacks on real MNIST CNNs -------------------------------------------------

# model, norm, eps, images. Both libraries take ~0.1 s per image on one core (9 targets x 100 steps for each point
# that survives): 100 images for the main case, 60 for the others keep the file near a minute.
CROSS_CHECKS = {
    "robust_linf": ("robust", "Linf", 0.3, 100),
    "robust_l2": ("robust", "L2", 2.0, 60),
    "clean_linf": ("clean", "Linf", 0.1, 40),
}


@pytest.mark.parametrize("case", CROSS_CHECKS)
def test_fab_t_is_no_weaker_than_torchattacks(mnist_cnns, case):
    import torchattacks

    which, norm, eps, n = CROSS_CHECKS[case]
    model, x, y = mnist_cnns[which], mnist_cnns["x"][:n], mnist_cnns["y"][:n]

    def accuracy(x_adv):
        with torch.no_grad():
            return int((model(x_adv).argmax(1) == y).sum()) / n

    start = time.perf_counter()
    ours = FABT(eps, norm=norm)(model, x, y)
    ours_s = time.perf_counter() - start
    reference = torchattacks.FAB(
        model,
        norm=norm,
        eps=eps,
        steps=100,
        n_restarts=1,
        alpha_max=0.1,
        eta=1.05,
        beta=0.9,
        multi_targeted=True,
        n_classes=10,
        seed=0,
    )
    start = time.perf_counter()
    theirs = reference(x, y)
    theirs_s = time.perf_counter() - start
    clean, acc_ours, acc_theirs = accuracy(x), accuracy(ours), accuracy(theirs)
    print(
        f"\nFAB-T {norm} eps={eps} on the {which} CNN, {n} images: clean {clean:.3f}, robust accuracy "
        f"robustprune {acc_ours:.3f} ({ours_s:.1f} s), torchattacks {acc_theirs:.3f} ({theirs_s:.1f} s)"
    )
    assert acc_ours <= acc_theirs + 0.01 + 1e-9
    assert acc_ours < clean - 0.2  # the attack bites at these radii
    assert float(dist(ours, x, norm).max()) <= eps + 1e-5
    moved = dist(ours, x, norm) > 0
    with torch.no_grad():
        assert bool((model(ours[moved]).argmax(1) != y[moved]).all())
