"""Claims as data: arms are picked from stored cells, paired per seed, Holm-corrected, and given a
verdict that never reads a floor as a finding (synthetic cells; the CLI test runs a real store)."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from robustprune.errors import UserError
from robustprune.report.claims import (
    CONTRADICTED,
    HOLDS,
    INCONCLUSIVE,
    NO_EFFECT,
    NOT_MEASURABLE,
    NOT_RUN,
    arm_cells,
    claims_csv,
    claims_table,
    decide,
    measure,
)
from robustprune.stats import Interval
from robustprune.study.schema import Claim, StudyConfig, resolve_study


def cell(pruning: str, seed: int, regime: str = "clean", rnd=None, **metrics) -> dict:
    axes = {"regime": regime, "pruning": pruning, "method": None, "sparsity": 0.0 if pruning == "dense" else 0.5,
            "finetune_epochs": 0 if pruning == "dense" else 1, "round": rnd, "seed": seed}  # fmt: skip
    if rnd is not None:
        axes["sparsity"], axes["finetune_epochs"] = 0.2 * rnd, 0
    return {"axes": axes, "status": "done", "metrics": metrics, "per_image": {}}


def study(claims: list[dict], regimes=("clean",)) -> StudyConfig:
    return StudyConfig(
        name="t",
        regimes={r: {} for r in regimes},
        pruning={
            "mag": {"method": "global_magnitude", "sparsities": [0.5], "finetune_epochs": [1]},
            "lottery": {"method": "lottery_ticket", "params": {"rounds": 3}},
        },  # fmt: skip
        claims=claims,
    )


MAG = {"pruning": "mag", "sparsity": 0.5, "finetune_epochs": 1}


def claim(paper: float, metric="acc_clean", **kw) -> dict:
    return {"name": "mag vs dense", "a": MAG, "b": "dense", "metric": metric, "paper": paper, **kw}


def cells_with(gains: list[float], base: float = 0.90, metric="acc_clean") -> list[dict]:
    out = []
    for seed, g in enumerate(gains):
        out += [cell("dense", seed, **{metric: base}), cell("mag", seed, **{metric: base + g})]
    return out


def one(s, cells):
    (m,) = measure(s, cells)
    return m


def test_difference_is_paired_per_seed_with_a_t_interval():
    # seed effects of +-5 p.p. shared by both arms cancel in the pairing: a tight interval around +1 p.p.
    cells = []
    for seed, shift in enumerate([0.05, -0.05, 0.0, 0.03, -0.02]):
        cells += [cell("dense", seed, acc_clean=0.9 + shift), cell("mag", seed, acc_clean=0.91 + shift + 0.001 * seed)]
    m = one(study([claim(1.0)]), cells)
    assert m.seeds == 5 and m.diff.unit == "seeds"
    assert m.diff.mean == pytest.approx(0.012)
    assert 0.0 < m.diff.low < 0.012 < m.diff.high < 0.02
    assert m.verdict == HOLDS


def test_verdicts():
    s = study([claim(2.0)])
    assert one(s, cells_with([0.02, 0.021, 0.019, 0.02])).verdict == HOLDS
    assert one(s, cells_with([-0.02, -0.021, -0.019, -0.02])).verdict == CONTRADICTED
    # includes 0, excludes the paper's +2 p.p.
    assert one(s, cells_with([0.001, -0.001, 0.002, -0.002])).verdict == NO_EFFECT
    # includes 0 and +2 p.p.: too noisy to say
    assert one(s, cells_with([0.05, -0.04, 0.03, -0.03])).verdict == INCONCLUSIVE
    # one seed: no interval, never a verdict beyond inconclusive
    m = one(s, cells_with([0.05]))
    assert m.diff is None and m.verdict == INCONCLUSIVE
    assert one(s, []).verdict == NOT_RUN


def test_a_claim_of_no_difference_holds_inside_its_margin():
    s = study([claim(0.0, margin=0.5)])
    assert one(s, cells_with([0.001, -0.001, 0.0005, 0.0])).verdict == HOLDS
    assert one(s, cells_with([0.02, 0.021, 0.019, 0.02])).verdict == CONTRADICTED
    assert one(s, cells_with([0.01, -0.01, 0.012, -0.008])).verdict == INCONCLUSIVE


def test_floor_and_far_clean_accuracy_are_not_measurable():
    # robust accuracy under 2 %: a consistent 0.5 p.p. "gain" at the floor is no finding
    s = study([claim(5.0, metric="acc_adv:pgd@0.03")])
    m = one(s, cells_with([0.005, 0.006, 0.004], base=0.001, metric="acc_adv:pgd@0.03"))
    assert m.verdict == NOT_MEASURABLE and "floor" in m.reason
    # the same gain off the floor is measured
    assert one(s, cells_with([0.05, 0.051, 0.049], base=0.2, metric="acc_adv:pgd@0.03")).verdict == HOLDS
    # an arm 15 points under the paper's clean accuracy is another experiment
    far = study([claim(1.0, a={**MAG, "paper_clean": 95.0})])
    m = one(far, cells_with([0.01, 0.011, 0.009], base=0.79))
    assert m.verdict == NOT_MEASURABLE and "paper's 95" in m.reason
    assert one(far, cells_with([0.01, 0.011, 0.009], base=0.86)).verdict == HOLDS


def test_holm_across_a_papers_claims():
    # two claims with the same evidence: Holm doubles the smaller p-value of the family of two
    gains = [0.01, 0.02, 0.005, 0.012]
    cells = [c | {"metrics": {**c["metrics"], "acc_x": c["metrics"]["acc_clean"]}} for c in cells_with(gains)]
    single = one(study([claim(1.0)]), cells)
    both = measure(study([claim(1.0), claim(1.0, metric="acc_x")]), cells)
    assert single.p_holm == pytest.approx(single.diff.p)
    assert both[0].p_holm == pytest.approx(min(1.0, 2 * single.diff.p))
    assert both[1].p_holm == pytest.approx(min(1.0, 2 * single.diff.p))


def test_best_lottery_round_is_chosen_on_validation_never_on_test():
    s = study([{"name": "lt", "a": {"pruning": "lottery", "round": "best"}, "b": "dense", "metric": "acc_clean",
                "paper": 1.0}])  # fmt: skip
    cells = [cell("dense", 0, acc_clean=0.9, val_acc=0.9)]
    # round 1: best on test, worse on validation; round 2: best on validation
    cells += [cell("lottery", 0, rnd=1, acc_clean=0.99, val_acc=0.80), cell("lottery", 0, rnd=2, acc_clean=0.91,
                                                                          val_acc=0.95)]  # fmt: skip
    picked = arm_cells(s, cells, s.claims[0].arms("a")[0])
    assert picked[0]["axes"]["round"] == 2
    # without a validation split nothing is chosen (the claim is not run), rather than peeking at the test set
    no_val = [c | {"metrics": {k: v for k, v in c["metrics"].items() if k != "val_acc"}} for c in cells]
    assert arm_cells(s, no_val, s.claims[0].arms("a")[0]) == {}


def test_an_arm_listing_entries_takes_per_seed_the_one_best_on_validation():
    s = StudyConfig(
        name="t",
        regimes={"clean": {}},
        pruning={
            "mag": {"method": "global_magnitude", "sparsities": [0.5], "finetune_epochs": [1]},
            "pen": {"method": "global_magnitude", "sparsities": [0.5], "finetune_epochs": [1]},
        },
        claims=[{"name": "best penalty vs mag", "a": {"pruning": ["mag", "pen"], "sparsity": 0.5}, "b": MAG,
                 "metric": "acc_clean", "paper": 1.0}],
    )  # fmt: skip
    cells = []
    for seed, (val_mag, val_pen) in enumerate([(0.9, 0.8), (0.7, 0.95), (0.6, 0.99)]):
        # the test accuracy favours the other entry each time: a choice made on it would differ
        cells += [cell("mag", seed, acc_clean=0.9 - 0.1 * (val_mag > val_pen), val_acc=val_mag),
                  cell("pen", seed, acc_clean=0.9 - 0.1 * (val_pen > val_mag), val_acc=val_pen)]  # fmt: skip
    arm = s.claims[0].arms("a")[0]
    assert arm.chooses() and not s.claims[0].arms("b")[0].chooses()
    picked = arm_cells(s, cells, arm)
    assert [picked[seed]["axes"]["pruning"] for seed in range(3)] == ["mag", "pen", "pen"]
    assert [picked[seed]["metrics"]["acc_clean"] for seed in range(3)] == pytest.approx([0.8, 0.8, 0.8])
    t = claims_table(s, cells)
    assert any("seed 0: mag (val 90.0 %), seed 1: pen (val 95.0 %)" in n for n in t.notes)
    # an entry listed twice, or an empty list, is refused with the rule
    for bad in (["mag", "mag"], []):
        with pytest.raises(ValidationError, match="needs at least one entry, each once"):
            Claim(name="x", a={"pruning": bad}, b="dense", metric="acc_clean", paper=1.0)
    # a listed entry the study lacks is refused at load like a single one
    raw = {"name": "t", "pruning": {"mag": {"method": "global_magnitude", "sparsities": [0.5]}},
           "claims": [{"name": "x", "a": {"pruning": ["mag", "pen"]}, "b": "dense", "metric": "clean",
                       "paper": 1}]}  # fmt: skip
    with pytest.raises(UserError, match="names pruning 'pen'"):
        resolve_study(raw, "study.yaml")


def test_composite_metric_is_averaged_per_seed():
    s = study([claim(1.0, metric=["acc_a", "acc_b"])])
    cells = []
    for seed in range(3):
        cells += [cell("dense", seed, acc_a=0.5, acc_b=0.7), cell("mag", seed, acc_a=0.52, acc_b=0.72 + 0.001 * seed)]
    assert one(s, cells).diff.mean == pytest.approx(0.0205)


def test_decide_uses_the_holm_adjusted_p_value():
    c = Claim(**claim(1.0))
    d = Interval(mean=0.01, low=0.001, high=0.019, p=0.03, n=3, unit="seeds")
    assert decide(c, d, 0.03)[0] == HOLDS
    assert decide(c, d, 0.09)[0] == INCONCLUSIVE  # significant alone, not after the correction


def test_table_and_csv_carry_paper_measured_and_verdict():
    s = study([claim(1.0, paper_b=90.0, reading="pixel"), claim(1.0, metric="acc_x", paper_b=50.0, reading="norm")])
    cells = [c | {"metrics": {**c["metrics"], "acc_x": c["metrics"]["acc_clean"] - 0.4}}
             for c in cells_with([0.01, 0.012, 0.011])]  # fmt: skip
    t = claims_table(s, cells)
    assert [r[-1].split(" (")[0] for r in t.rows] == [HOLDS, HOLDS]
    assert t.rows[0][2] == "+1.00" and t.rows[0][3].startswith("+1.10 [")
    assert t.rows[0][4] == "91.10 / 90.00" and t.rows[0][5] == "3"
    # arm b is 90 % at one reading and 50 % at the other: the note names the one nearer the paper
    assert any("pixel reading reproduces" in n for n in t.notes)
    rows = claims_csv(s, cells).strip().splitlines()
    assert rows[0].startswith("study,claim,reading") and len(rows) == 3
    assert ",holds," in rows[1]


def test_claims_that_name_no_setting_are_rejected_at_load():
    raw = {"name": "t", "pruning": {"mag": {"method": "global_magnitude", "sparsities": [0.5]}},
           "claims": [{"name": "x", "a": "magnitude", "b": "dense", "metric": "clean", "paper": 1.0}]}  # fmt: skip
    with pytest.raises(UserError, match="names pruning 'magnitude'"):
        resolve_study(raw, "study.yaml")


STUDIES = sorted((Path(__file__).resolve().parents[1] / "studies").glob("*.yaml"))


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.stem)
def test_every_claim_of_the_claims_budget_names_cells_and_metrics_it_runs(path):
    """A claims budget that misses an arm or a metric would spend its 90 minutes and say 'not run'."""
    from robustprune.evaluation.names import adv
    from robustprune.report.claims import metric_names
    from robustprune.study.cells import expand
    from robustprune.study.schema import load_study

    s = load_study(path, "claims")
    assert s.claims and len(s.seeds) >= 3
    axes = [c.axes for c in expand(s)]
    evaluated = {adv(label, e) for label, entry in s.evaluation.attacks.items() for e in entry.eps}
    evaluated |= {f"acc_occlusion@{size}" for size in s.evaluation.occlusion}
    if s.evaluation.corruptions is not None:
        evaluated |= {f"acc_corruption@{sev}" for sev in s.evaluation.corruptions.severities}
    for claim in s.claims:
        for side in ("a", "b"):
            for arm in claim.arms(side):
                regime = arm.regime or next(iter(s.regimes))
                mine = [a for a in axes if a["regime"] == regime]
                for entry in arm.prunings():
                    if arm.round == "best":
                        hits = [a for a in mine if a["pruning"] == entry and a["round"] is not None]
                    else:
                        hits = [a for a in mine if arm.model_copy(update={"pruning": entry}).matches(a)]
                    assert {a["seed"] for a in hits} == set(s.seeds), (claim.name, side, entry)
                if arm.chooses():  # a choice is made on the validation split, so the budget must hold one out
                    assert s.data.validation > 0, (claim.name, side)
        for m in metric_names(s, claim):
            assert m in evaluated or m == "acc_clean" or m.startswith("acc_fgsm_data"), (claim.name, m)


def test_an_arm_without_finetune_epochs_takes_the_budgets_and_refuses_ambiguity():
    s = study([claim(1.0, a={"pruning": "mag", "sparsity": 0.5})])
    assert one(s, cells_with([0.01, 0.012, 0.011])).verdict == HOLDS  # the budget's one fine-tuning length
    twice = cells_with([0.01, 0.012, 0.011]) + [
        c | {"axes": c["axes"] | {"finetune_epochs": 5}} for c in cells_with([0.01]) if c["axes"]["pruning"] == "mag"
    ]
    with pytest.raises(UserError, match="matches several models of seed 0; name its finetune_epochs"):
        measure(s, twice)
