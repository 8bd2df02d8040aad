"""The evaluation suite: metric names, which masking checks exist, their values, and a model whose
gradients are masked getting caught."""

import pytest
import torch
from torch import nn

from robustprune.attacks import ATTACKS
from robustprune.evaluation import names
from robustprune.evaluation.checks import masking_checks, pairs
from robustprune.evaluation.suite import evaluate_robustness
from robustprune.study.runner import Progress, craft
from robustprune.study.schema import EvaluationConfig


def ev(**kw) -> EvaluationConfig:
    return EvaluationConfig(**kw)


ATTACK_SET = {
    "fgsm": {"eps": [0.1, 0.2]},
    "pgd10": {"attack": "pgd", "eps": [0.1], "params": {"steps": 10, "step_size": 0.01}},
    "pgd20": {"attack": "pgd", "eps": [0.1, 0.2], "params": {"steps": 20, "step_size": 0.01}},
    "apgd": {"attack": "apgd_ce", "eps": [0.2], "params": {"steps": 10}},
}


def test_names_round_trip():
    assert names.adv("pgd20", 8 / 255) == "acc_adv:pgd20@0.0313725"
    p = names.parse(names.transfer("pgd20", 0.1, "magnitude s=0.5 ft=1"))
    assert (p.family, p.name, p.strength, p.source) == ("transfer", "pgd20", "0.1", "magnitude s=0.5 ft=1")
    assert names.parse(names.corruption("fog", 3)) == names.Parsed("corruption", "fog", "3")
    assert names.parse(names.corruption(None, 3)) == names.Parsed("corruption", None, "3")
    assert names.parse(names.corruption()) == names.Parsed("corruption", None, None)
    assert names.parse("acc_patched") == names.Parsed("test", "patched")
    c = names.parse(names.check("eps", "acc_adv:fgsm@0.2", "acc_adv:fgsm@0.1"))
    assert (c.family, c.name, c.stronger, c.weaker) == ("check", "eps", "acc_adv:fgsm@0.2", "acc_adv:fgsm@0.1")
    assert names.setting_key({"pruning": "lottery", "round": 3}) == "lottery r3"


def test_check_pairs_cover_each_rule():
    e = ev(attacks=ATTACK_SET)
    got = set(pairs(e.attacks, ["acc_transfer:pgd20@0.1|dense"], {"acc_fgsm_data": ("fgsm", 0.2)}))
    assert got == {
        # every iterative attack vs FGSM at each shared eps
        ("iterative_vs_fgsm", "acc_adv:pgd10@0.1", "acc_adv:fgsm@0.1"),
        ("iterative_vs_fgsm", "acc_adv:pgd20@0.1", "acc_adv:fgsm@0.1"),
        ("iterative_vs_fgsm", "acc_adv:pgd20@0.2", "acc_adv:fgsm@0.2"),
        ("iterative_vs_fgsm", "acc_adv:apgd@0.2", "acc_adv:fgsm@0.2"),
        # PGD-20 vs PGD-10: same attack and step size, more steps
        ("steps", "acc_adv:pgd20@0.1", "acc_adv:pgd10@0.1"),
        # larger eps vs smaller for FGSM; an attack swept over eps on its survivors must fall at all
        ("eps", "acc_adv:fgsm@0.2", "acc_adv:fgsm@0.1"),
        ("eps_flat", "acc_adv:pgd20@0.2", "acc_adv:pgd20@0.1"),
        # white-box vs transfer: the study's matrix and the regime's FGSM test set
        ("transfer", "acc_adv:pgd20@0.1", "acc_transfer:pgd20@0.1|dense"),
        ("transfer", "acc_adv:fgsm@0.2", "acc_fgsm_data"),
    }


def test_steps_check_needs_otherwise_equal_params():
    attacks = {
        "a": {"attack": "pgd", "eps": [0.1], "params": {"steps": 10, "step_size": 0.01}},
        "b": {"attack": "pgd", "eps": [0.1], "params": {"steps": 20, "step_size": 0.02}},
    }
    assert not [p for p in pairs(ev(attacks=attacks).attacks, [], {}) if p[0] == "steps"]


def test_masking_checks_values_and_tolerance():
    metrics = {
        "acc_adv:fgsm@0.1": 0.50,
        "acc_adv:pgd20@0.1": 0.503,
        "acc_adv:fgsm@0.2": 0.30,
        "acc_adv:pgd20@0.2": 0.40,
    }
    cp = [
        ("iterative_vs_fgsm", "acc_adv:pgd20@0.1", "acc_adv:fgsm@0.1"),
        ("iterative_vs_fgsm", "acc_adv:pgd20@0.2", "acc_adv:fgsm@0.2"),
        ("eps", "acc_adv:fgsm@0.2", "acc_adv:fgsm@0.1"),
        ("steps", "acc_adv:missing@0.1", "acc_adv:fgsm@0.1"),
    ]  # not evaluated: no check
    out = masking_checks(metrics, cp, tolerance=0.005)
    assert out[names.check(*cp[0])] == pytest.approx(0.003)
    assert out[names.check(*cp[1])] == pytest.approx(0.10)
    assert out[names.check(*cp[2])] == pytest.approx(-0.20)
    assert names.check(*cp[3]) not in out
    assert out["masking_violations"] == 1.0  # 0.3 p.p. is within the tolerance, 10 p.p. is not
    assert masking_checks(metrics, cp, tolerance=0.0)["masking_violations"] == 2.0
    # A gap of exactly the tolerance (one image in 200) is not a violation despite float error.
    one_image = {"acc_adv:fgsm@0.1": 0.66, "acc_adv:pgd20@0.1": 0.665}
    assert 0.665 - 0.66 > 0.005
    assert masking_checks(one_image, cp[:1], tolerance=0.005)["masking_violations"] == 0.0


class Quantised(nn.Module):
    """The same classifier behind 8-bit input rounding: torch.round has a zero gradient, so
    white-box attacks see no gradient at all (obfuscated gradients, Athalye et al. 2018)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(torch.round(x * 255) / 255)


def _trained_pair():
    torch.manual_seed(0)
    n = 400
    y = torch.randint(0, 2, (n,))
    x = torch.rand(n, 1, 6, 6) * 0.5 + y.view(-1, 1, 1, 1) * 0.4  # class 1 is brighter
    inner = nn.Sequential(nn.Flatten(), nn.Linear(36, 2))
    opt = torch.optim.SGD(inner.parameters(), lr=0.5)
    for _ in range(200):
        opt.zero_grad()
        nn.functional.cross_entropy(inner(x), y).backward()
        opt.step()
    return inner.eval(), Quantised(inner).eval(), x, y


def test_masked_gradients_are_flagged_by_the_transfer_check():
    inner, masked, x, y = _trained_pair()
    e = ev(
        attacks={"fgsm": {"eps": [0.2]}, "pgd": {"eps": [0.2], "params": {"steps": 5}}},
        transfer={"attack": "pgd", "models": ["dense", {"pruning": "p", "sparsity": 0.5, "finetune_epochs": 0}]},
        attack_subset=None,
    )
    transfer = {"twin": craft(inner, ATTACKS.get("pgd")(eps=0.2, steps=5), x, y, 100)}
    out = evaluate_robustness(masked, x, y, e, Progress(), transfer_sets=transfer)
    clean = float((masked(x).argmax(1) == y).float().mean())
    assert out["acc_adv:fgsm@0.2"] == pytest.approx(clean)  # no gradient: the attack changes nothing
    assert out["acc_transfer:pgd@0.2|twin"] < out["acc_adv:pgd@0.2"] - 0.2
    assert out[names.check("transfer", "acc_adv:pgd@0.2", "acc_transfer:pgd@0.2|twin")] > 0.2
    assert out["masking_violations"] >= 1
    # the unmasked twin passes every check
    honest = evaluate_robustness(inner, x, y, e, Progress(), transfer_sets=transfer)
    assert honest["masking_violations"] == 0


def test_suite_metrics_and_aggregates():
    inner, _, x, y = _trained_pair()
    x8 = (x * 255).round().to(torch.uint8)
    e = ev(
        attacks={"fgsm": {"eps": [0.05, 0.1]}},
        occlusion=[2, 6],
        attack_subset=100,
        shift_subset=50,
        corruptions={"types": ["fog", "contrast"], "severities": [1, 5]},
    )

    def corrupted(kind):
        from robustprune.attacks.corruptions import corrupt

        xs = torch.stack([(corrupt(x8[:50], kind, s) * 255).round().to(torch.uint8) for s in (1, 5)])
        return xs, y[:50].expand(2, -1)

    out = evaluate_robustness(inner, x8, y, e, Progress(), corrupted=corrupted)
    assert out["images:attacks"] == 100 and out["images:shifts"] == 50
    assert out["acc_adv:fgsm@0.1"] <= out["acc_adv:fgsm@0.05"]
    assert out["acc_occlusion@6"] == pytest.approx(0.5, abs=0.2)  # the whole 6x6 image is zeroed: one class
    for kind in ("fog", "contrast"):
        assert out[f"acc_corruption:{kind}"] == pytest.approx(
            (out[f"acc_corruption:{kind}@1"] + out[f"acc_corruption:{kind}@5"]) / 2
        )
    assert out["acc_corruption@5"] == pytest.approx(
        (out["acc_corruption:fog@5"] + out["acc_corruption:contrast@5"]) / 2
    )
    assert out["acc_corruption"] == pytest.approx((out["acc_corruption:fog"] + out["acc_corruption:contrast"]) / 2)
    assert {k for k in out if k.startswith("check:")} == {names.check("eps", "acc_adv:fgsm@0.1", "acc_adv:fgsm@0.05")}
