"""APGD-CE/-DLR/-T in both norms, PGD on an active set, the norm-ball geometry, and the AutoAttack
cascade: unit tests on tiny tensors, then cross-checks against torchattacks on a clean and an
adversarially trained MNIST CNN (the `mnist_cnns` fixture)."""

from __future__ import annotations

import time

import pytest
import torch
from torch import nn

from robustprune.attacks import ATTACKS, adversarial_accuracy
from robustprune.attacks.apgd import APGDCE, APGDDLR, APGDT
from robustprune.attacks.autoattack import VERSIONS, AutoAttack
from robustprune.attacks.norms import EPS_TOLERANCE, distance, dlr_loss, dlr_targeted_loss, project, verified
from robustprune.attacks.pgd import PGD
from robustprune.errors import UserError


def rand_images(n=6, seed=0):
    return torch.rand((n, 1, 28, 28), generator=torch.Generator().manual_seed(seed))


def labels_of(model, x):
    with torch.no_grad():
        return model(x).argmax(1)


def fp32_check(model, x, x_adv, y, eps, norm):
    """Every returned point that differs from its input is misclassified inside the eps-ball."""
    changed = ~(x_adv == x).flatten(1).all(1)
    assert bool((distance(x_adv, x, norm)[changed] <= eps + EPS_TOLERANCE).all())
    assert float(x_adv.min()) >= 0 and float(x_adv.max()) <= 1
    with torch.no_grad():
        assert bool((model(x_adv).argmax(1)[changed] != y[changed]).all())
    return changed


# ---- geometry and losses on hand-made tensors ----------------------------------------------------------


def test_project_linf_and_l2():
    x = torch.full((2, 1, 2, 2), 0.5)
    far = x + torch.tensor([0.3, -0.3, 0.05, 0.9]).view(1, 1, 2, 2)
    p = project(far, x, 0.1, "Linf")
    assert torch.allclose(p[0].flatten(), torch.tensor([0.6, 0.4, 0.55, 0.6]))
    p2 = project(far, x, 0.2, "L2")
    assert float(distance(p2, x, "L2").max()) <= 0.2 + 1e-6
    # radial projection keeps the direction when the box does not cut
    d = (far - x).flatten(1)
    assert torch.allclose((p2 - x).flatten(1)[0], 0.2 * d[0] / d[0].norm(), atol=1e-6)
    # the box clamp after the L2 projection never leaves the ball
    near_edge = torch.zeros(1, 1, 2, 2)
    q = project(near_edge - 1.0, near_edge, 0.5, "L2")
    assert torch.equal(q, near_edge)


def test_dlr_losses_by_hand():
    logits = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.0, 2.0, 1.0, -2.0]])
    y = torch.tensor([0, 0])
    # correct: -(z_y - z_2nd) / (z_1 - z_3) = -(3 - 1) / (3 - 0); wrong: -(0 - 2) / (2 - 0)
    assert torch.allclose(dlr_loss(logits, y), torch.tensor([-2 / 3, 1.0]))
    # targeted at class 3: -(z_y - z_t) / (z_1 - (z_3 + z_4) / 2)
    t = torch.tensor([3, 3])
    assert torch.allclose(dlr_targeted_loss(logits, y, t), torch.tensor([-4 / 3.5, -2 / 3]))
    # scaling the logits does not change DLR (its point)
    assert torch.allclose(dlr_loss(10 * logits, y), dlr_loss(logits, y))


def test_verified_rejects_what_is_not_adversarial(tiny_cnn):
    x = rand_images()
    y = labels_of(tiny_cnn, x)
    # a far-away point outside the ball, and an unchanged (still correct) point, both come back as x
    outside = (x + 0.5).clamp(0, 1)
    assert torch.equal(verified(tiny_cnn, x, outside, y, 0.1, "Linf"), x)
    assert torch.equal(verified(tiny_cnn, x, x.clone(), y, 0.1, "Linf"), x)


# ---- the attacks' contracts on a tiny CNN ----------------------------------------------------------------

MAKERS = {
    "apgd_ce": lambda eps, norm, seed=0: APGDCE(eps, norm=norm, steps=10, seed=seed),
    "apgd_dlr": lambda eps, norm, seed=0: APGDDLR(eps, norm=norm, steps=10, seed=seed),
    "apgd_t": lambda eps, norm, seed=0: APGDT(eps, norm=norm, steps=5, n_target_classes=3, seed=seed),
    "pgd": lambda eps, norm, seed=0: PGD(eps, norm=norm, steps=5, seed=seed),
    "autoattack": lambda eps, norm, seed=0: AutoAttack(eps, norm=norm, seed=seed, attacks=["apgd_ce", "apgd_t"]),
}


@pytest.mark.parametrize("name", list(MAKERS))
@pytest.mark.parametrize("norm, eps", [("Linf", 0.1), ("L2", 1.0)])
def test_contract(tiny_cnn, name, norm, eps):
    x = rand_images(8)
    y = (labels_of(tiny_cnn, x) + torch.tensor([0, 0, 0, 0, 0, 0, 1, 1])) % 10  # the last two misclassified
    attack = MAKERS[name](eps, norm)
    x_adv = attack(tiny_cnn, x, y)
    assert x_adv.shape == x.shape and x_adv.dtype == x.dtype
    fp32_check(tiny_cnn, x, x_adv, y, eps, norm)
    assert torch.equal(x_adv[6:], x[6:])  # misclassified inputs are their own adversarial examples
    assert torch.equal(attack(tiny_cnn, x, y), x_adv)  # deterministic for a seed
    assert dict(ATTACKS.describe())[name]


def test_seeds_change_random_starts(tiny_cnn):
    # at a radius where some points survive, another seed's start finds another set or other points
    x = rand_images(32, seed=1)
    y = labels_of(tiny_cnn, x)
    a, b = (APGDCE(0.02, steps=3, seed=s)(tiny_cnn, x, y) for s in (0, 1))
    assert not torch.equal(a, b)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: APGDCE(0.1, norm="L1"), "norm must be 'Linf' or 'L2'"),
        (lambda: APGDCE(2.0), "eps must be in \\[0, 1\\] for the Linf norm"),
        (lambda: APGDCE(-1.0, norm="L2"), "eps must be a finite number >= 0"),
        (lambda: APGDT(0.1, n_target_classes=0), "APGD-T n_target_classes"),
        (lambda: APGDCE(0.1, eot_iter=0), "APGD-CE eot_iter"),
        (lambda: AutoAttack(0.1, version="fast"), "version must be one of standard, plus, rand"),
        (lambda: AutoAttack(0.1, attacks=["cw"]), "AutoAttack attacks must be a non-empty list"),
        (lambda: PGD(0.1, early_stop="no"), "PGD early_stop"),
    ],
)
def test_invalid_parameters(make, match):
    with pytest.raises(UserError, match=match):
        make()


def test_targeted_needs_four_classes():
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3)).eval()
    x = torch.rand(2, 1, 2, 2)
    with pytest.raises(UserError, match="at least 4 classes"):
        APGDT(0.1)(model, x, torch.tensor([0, 1]))


def test_autoattack_versions_are_the_originals():
    std = VERSIONS["standard"]
    assert [n for n, _ in std] == ["apgd_ce", "apgd_t", "fab_t", "square"]
    assert all(p.get("steps", 100) == 100 for _, p in std) and dict(std)["square"]["n_queries"] == 5000
    assert dict(std)["apgd_t"]["n_target_classes"] == 9 and dict(std)["fab_t"]["n_target_classes"] == 9
    assert [n for n, _ in VERSIONS["plus"]] == ["apgd_ce", "apgd_dlr", "fab", "square", "apgd_t", "fab_t"]
    assert dict(VERSIONS["plus"])["apgd_ce"]["restarts"] == 5 and dict(VERSIONS["plus"])["fab"]["restarts"] == 5
    assert all(p["eot_iter"] == 20 for _, p in VERSIONS["rand"])


def test_pgd_keeps_the_first_misclassifying_iterate():
    # a linear model whose gradient never changes: PGD walks to the corner of the ball; with a step of
    # half the radius the first step already misclassifies, and that iterate (not the corner) is kept
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 2)).eval()
    with torch.no_grad():
        model[1].weight.copy_(torch.tensor([[1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, -1.0, -1.0]]))
        model[1].bias.copy_(torch.tensor([-2.0, 2.0]))
    x = torch.full((1, 1, 2, 2), 0.51)  # logit 0 = 0.04, logit 1 = -0.04: class 0
    y = torch.tensor([0])
    out = PGD(0.1, steps=4, step_size=0.05, random_start=False)(model, x, y)
    # after one step: 0.46 everywhere, logits -0.16 vs +0.16: misclassified; the walk stops there
    assert torch.allclose(out, torch.full_like(x, 0.46))
    madry = PGD(0.1, steps=4, step_size=0.05, random_start=False, early_stop=False)(model, x, y)
    assert torch.allclose(madry, torch.full_like(x, 0.41))


# ---- on real MNIST CNNs: torchattacks as the reference --------------------------------------------------


def acc(model, attack, x, y):
    return adversarial_accuracy(model, attack, x, y)


def ta(attack):
    return lambda model, x, y: attack(x, y)


@pytest.mark.parametrize("norm, eps", [("Linf", 0.3), ("L2", 2.0)])
def test_apgd_matches_torchattacks_on_the_robust_model(mnist_cnns, norm, eps):
    import torchattacks

    model, x, y = mnist_cnns["robust"], mnist_cnns["x"][:200], mnist_cnns["y"][:200]
    t0 = time.perf_counter()
    ours = acc(model, APGDCE(eps, norm=norm, steps=100), x, y)
    t1 = time.perf_counter()
    theirs = acc(model, ta(torchattacks.APGD(model, norm=norm, eps=eps, steps=100, n_restarts=1, seed=0)), x, y)
    t2 = time.perf_counter()
    print(
        f"\nAPGD-CE {norm} eps={eps}: robustprune {ours:.3f} ({t1 - t0:.1f} s), "
        f"torchattacks {theirs:.3f} ({t2 - t1:.1f} s)"
    )
    assert ours <= theirs + 0.01 + 1e-9
    assert 0.2 < ours < 0.9  # a model with robustness to measure, and an attack that bites
    x, y = x[:100], y[:100]  # APGD-T runs 9 x 100 steps on every robust point: fewer images
    ours = acc(model, APGDCE(eps, norm=norm, steps=100), x, y)
    ours_t = acc(model, APGDT(eps, norm=norm, steps=100, n_target_classes=9), x, y)
    theirs_t = acc(
        model, ta(torchattacks.APGDT(model, norm=norm, eps=eps, steps=100, n_restarts=1, n_classes=10, seed=0)), x, y
    )
    print(f"APGD-T {norm} eps={eps}: robustprune {ours_t:.3f}, torchattacks {theirs_t:.3f}")
    assert ours_t <= theirs_t + 0.01 + 1e-9
    assert ours_t <= ours + 0.01 + 1e-9  # targeted DLR is no weaker than CE here (one image of slack)


def test_apgd_and_pgd_points_are_verified(mnist_cnns):
    model, x, y = mnist_cnns["clean"], mnist_cnns["x"][:200], mnist_cnns["y"][:200]
    for attack, norm, eps in (
        (APGDCE(0.1, steps=20), "Linf", 0.1),
        (APGDDLR(1.0, norm="L2", steps=20), "L2", 1.0),
        (PGD(0.1, steps=10, norm="Linf"), "Linf", 0.1),
        (PGD(1.0, steps=10, norm="L2"), "L2", 1.0),
    ):
        x_adv = attack(model, x, y)
        changed = fp32_check(model, x, x_adv, y, eps, norm)
        assert int(changed.sum()) > 20


def test_autoattack_is_no_weaker_than_the_reference_and_verified(mnist_cnns):
    """The standard cascade against torchattacks' four attacks with the original's settings run as a
    cascade (MultiAttack), on the adversarially trained CNN where every stage has points to work on."""
    from robustprune.attacks.benchmark import reference_autoattack

    model, x, y = mnist_cnns["robust"], mnist_cnns["x"][:60], mnist_cnns["y"][:60]
    t0 = time.perf_counter()
    result = AutoAttack(0.3, norm="Linf", version="standard", seed=0).run(model, x, y)
    t1 = time.perf_counter()
    theirs = acc(model, ta(reference_autoattack(model, 0.3, "Linf", 10)), x, y)
    t2 = time.perf_counter()
    ours = result.robust_accuracy()
    print(
        f"\nAutoAttack Linf 0.3, {len(x)} images: robustprune {ours:.3f} ({t1 - t0:.1f} s, stages "
        f"{ {k: round(v, 1) for k, v in result.seconds.items()} }), reference {theirs:.3f} ({t2 - t1:.1f} s)"
    )
    assert ours <= theirs + 0.005 + 1e-9  # no point more than the reference left standing
    assert 0.3 < ours < 0.9
    # what the cascade says it broke is broken, in fp32, inside the ball; the robust ones come back as x
    changed = fp32_check(model, x, result.x_adv, y, 0.3, "Linf")
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    broken_by = result.broken_by
    assert [b == "" for b in broken_by] == result.robust.tolist()
    assert all((b == "clean") == (not bool(c)) for b, c in zip(broken_by, correct))
    assert all(bool(changed[i]) == (broken_by[i] not in ("", "clean")) for i in range(len(x)))
    # the stages' robust accuracies fall monotonically and end at the result
    after = list(result.robust_after.values())
    assert after == sorted(after, reverse=True) and after[-1] == pytest.approx(ours)
    assert adversarial_accuracy(model, AutoAttack(0.3, seed=0), x, y) == pytest.approx(ours)


class Quantised(nn.Module):
    """A linear classifier on inputs rounded to 1/4: its gradient is zero everywhere, so white-box
    attacks are blind while a score-based one (Square) still finds the boundary."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc((torch.round(x * 4) / 4).flatten(1))  # torch.round passes back a zero gradient


def test_masking_by_a_zero_gradient_is_flagged():
    from robustprune.evaluation.suite import evaluate_robustness
    from robustprune.study.schema import EvaluationConfig

    torch.manual_seed(0)
    model = Quantised().eval()
    x = torch.rand(200, 1, 4, 4, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(1)
    ev = EvaluationConfig(
        attack_subset=None,
        attacks={
            "aa": {
                "attack": "autoattack",
                "eps": [0.2],
                "params": {"attacks": ["apgd_ce", "square"], "version": "standard"},
            }
        },
    )

    class Quiet:
        def advance(self, *a):
            pass

    out = evaluate_robustness(model, x, y, ev, Quiet())
    white, final = out["acc_adv:aa/white_box@0.2"], out["acc_adv:aa@0.2"]
    assert white > final + 0.05  # Square broke what the blind white-box stage could not
    assert out["check:black_box:acc_adv:aa/white_box@0.2|acc_adv:aa@0.2"] == pytest.approx(white - final)
    assert out["masking_violations"] >= 1


def test_eps_sweep_attacks_only_the_survivors(mnist_cnns, monkeypatch):
    from robustprune.evaluation.suite import attack_metrics
    from robustprune.study.schema import EvaluationConfig

    model, x, y = mnist_cnns["clean"], mnist_cnns["x"][:100], mnist_cnns["y"][:100]
    seen = []
    original = PGD.__call__

    def counting(self, model, xb, yb):
        seen.append((self.eps, len(xb)))
        return original(self, model, xb, yb)

    monkeypatch.setattr(PGD, "__call__", counting)
    ev = EvaluationConfig(attack_subset=None, attacks={"pgd": {"eps": [0.2, 0.05, 0.1], "params": {"steps": 10}}})

    class Quiet:
        def advance(self, *a):
            pass

    record: dict = {}
    out = attack_metrics(model, x, y, ev, Quiet(), record)
    accs = [out[f"acc_adv:pgd@{e:g}"] for e in (0.05, 0.1, 0.2)]
    assert accs == sorted(accs, reverse=True) and accs[-1] < accs[0]
    # ascending eps; each run sees only the images that survived the smaller ball
    assert [e for e, _ in seen] == [0.05, 0.1, 0.2]
    assert seen[0][1] == 100 and seen[1][1] == round(accs[0] * 100) and seen[2][1] == round(accs[1] * 100)
    assert bool((record["acc_adv:pgd@0.2"] <= record["acc_adv:pgd@0.1"]).all())
