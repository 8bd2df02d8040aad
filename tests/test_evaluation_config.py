"""Study-file settings of the evaluation that AutoAttack brought: attack subsets, L2 radii, the
security curve, the reserved 'worst' label, which masking checks pair which metrics, and the
per-image worst case."""

import pytest
import torch
from pydantic import ValidationError

from robustprune.evaluation import names
from robustprune.evaluation.checks import masking_checks, pairs
from robustprune.study.schema import AttackEntry, EvaluationConfig, SecurityConfig


def test_attack_entry_radii_follow_the_norm():
    assert AttackEntry(eps=[0.5, 2.0], params={"norm": "L2"}).eps == [0.5, 2.0]
    with pytest.raises(ValidationError, match="an L2 radius needs"):
        AttackEntry(eps=[2.0])
    with pytest.raises(ValidationError, match="finite L2 radius"):
        AttackEntry(eps=[-1.0], params={"norm": "L2"})
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        AttackEntry(eps=[0.1], subset=0)


def test_security_config():
    s = SecurityConfig(eps=[0.3, 0.0, 0.1])
    assert s.eps == [0.0, 0.1, 0.3] and s.norm == "Linf" and s.steps == 100
    with pytest.raises(ValidationError, match="at most 1 for Linf"):
        SecurityConfig(eps=[1.5])
    assert SecurityConfig(norm="L2", eps=[0.5, 2.0]).eps == [0.5, 2.0]
    with pytest.raises(ValidationError):
        SecurityConfig(norm="L1", eps=[0.1])


def test_worst_is_a_reserved_label():
    with pytest.raises(ValidationError, match="reserved"):
        EvaluationConfig(attacks={"worst": {"attack": "fgsm", "eps": [0.1]}})


def test_autoattack_entry_is_checked_when_read():
    with pytest.raises(ValidationError, match="version must be one of"):
        EvaluationConfig(attacks={"aa": {"attack": "autoattack", "eps": [0.1], "params": {"version": "quick"}}})


def test_check_pairs_of_the_new_kinds():
    ev = EvaluationConfig(
        attacks={
            "fgsm": {"eps": [0.1]},
            "aa": {"attack": "autoattack", "eps": [0.1, 0.2], "subset": 50},
            "aa_small": {
                "attack": "autoattack",
                "eps": [0.1],
                "subset": 50,
                "params": {"attacks": ["apgd_ce", "apgd_t"]},
            },
            "apgd_l2": {"attack": "apgd_ce", "eps": [0.1], "params": {"norm": "L2"}},
        },
        security={"eps": [0.0, 0.1, 0.2], "subset": 50},
    )
    got = set(pairs(ev.attacks, [], {}, ev.security))
    assert ("black_box", "acc_adv:aa/white_box@0.1", "acc_adv:aa@0.1") in got
    assert ("black_box", "acc_adv:aa/white_box@0.2", "acc_adv:aa@0.2") in got
    assert ("eps_flat", "acc_adv:aa@0.2", "acc_adv:aa@0.1") in got
    assert ("min_norm", "acc_adv:aa@0.1", "acc_curve:Linf@0.1") in got
    assert ("min_norm", "acc_adv:aa@0.2", "acc_curve:Linf@0.2") in got
    # without Square there is no black-box stage to check against
    assert not [p for p in got if p[0] == "black_box" and "aa_small" in p[1]]
    # other images (a subset vs all) or another norm are never compared
    assert not [p for p in got if p[0] == "iterative_vs_fgsm"]


def test_eps_flat_fails_only_when_nothing_falls():
    cp = [
        ("eps_flat", "acc_adv:a@0.2", "acc_adv:a@0.1"),
        ("eps_flat", "acc_adv:b@0.2", "acc_adv:b@0.1"),
        ("eps_flat", "acc_adv:c@0.2", "acc_adv:c@0.1"),
    ]
    metrics = {
        "acc_adv:a@0.2": 0.3,
        "acc_adv:a@0.1": 0.5,  # falls: fine
        "acc_adv:b@0.2": 0.4,
        "acc_adv:b@0.1": 0.4,  # flat at 40 %: flagged
        "acc_adv:c@0.2": 0.0,
        "acc_adv:c@0.1": 0.0,
    }  # flat at the floor: nothing to see
    assert masking_checks(metrics, cp, tolerance=0.005)["masking_violations"] == 1


def test_worst_case_is_per_image(tiny_cnn):
    from robustprune.evaluation.suite import attack_metrics

    class Quiet:
        def advance(self, *a):
            pass

    x = torch.rand(40, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = tiny_cnn(x).argmax(1)
    ev = EvaluationConfig(
        attack_subset=None, attacks={"fgsm": {"eps": [0.05]}, "pgd": {"eps": [0.05], "params": {"steps": 3}}}
    )
    record: dict = {}
    out = attack_metrics(tiny_cnn, x, y, ev, Quiet(), record)
    worst = record[names.adv("fgsm", 0.05)] & record[names.adv("pgd", 0.05)]
    assert torch.equal(record[names.adv(names.WORST, 0.05)], worst)
    assert out[names.adv(names.WORST, 0.05)] == int(worst.sum()) / 40
    assert out[names.adv(names.WORST, 0.05)] <= min(out["acc_adv:fgsm@0.05"], out["acc_adv:pgd@0.05"])
