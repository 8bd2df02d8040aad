"""Statistics behind the tables: the confidence interval over seeds, the paired bootstrap over seeds
and images, per-image results in the store, and the significance marks of the gains table."""

import numpy as np
import pytest

from robustprune.report.stats import ci95, paired_bootstrap, pooled


def test_ci95_is_the_student_t_interval():
    low, high = ci95([1.0, 2.0, 3.0])
    assert (low, high) == pytest.approx((2 - 4.302653 / 3**0.5, 2 + 4.302653 / 3**0.5))
    assert ci95([1.0]) is None


def test_identical_models_differ_by_nothing():
    a = np.random.default_rng(0).random(500) < 0.7
    d = paired_bootstrap([(a, a.copy())])
    assert (d.mean, d.low, d.high, d.p) == (0.0, 0.0, 0.0, 1.0) and not d.significant


def test_a_clear_difference_is_significant_and_its_interval_holds_it():
    rng = np.random.default_rng(1)
    b = rng.random(1000) < 0.6
    a = b | (rng.random(1000) < 0.3)  # a keeps every b hit and adds about 12 p.p.
    d = paired_bootstrap([(a, b)])
    assert d.significant and d.p < 0.001 and d.low < d.mean < d.high
    assert d.mean == pytest.approx((a.sum() - b.sum()) / 1000)
    flipped = paired_bootstrap([(b, a)])
    assert flipped.mean == pytest.approx(-d.mean) and flipped.high < 0


def test_two_images_in_a_thousand_are_not_significant():
    b = np.zeros(1000, bool)
    b[:600] = True
    a = b.copy()
    a[600:602] = True
    assert not paired_bootstrap([(a, b)]).significant


def test_the_multinomial_shortcut_matches_resampling_images():
    rng = np.random.default_rng(2)
    b = rng.random(300) < 0.5
    a = np.where(rng.random(300) < 0.2, ~b, b)
    fast = paired_bootstrap([(a, b)], resamples=4000, seed=3)
    diff = a.astype(int) - b.astype(int)
    slow = np.array([diff[rng.integers(300, size=300)].mean() for _ in range(4000)])
    assert fast.low == pytest.approx(np.quantile(slow, 0.025), abs=0.01)
    assert fast.high == pytest.approx(np.quantile(slow, 0.975), abs=0.01)


def test_seeds_are_resampled_too():
    rng = np.random.default_rng(4)
    pairs = []
    for shift in (0.0, 0.05, 0.10):  # seeds that disagree widen the interval
        b = rng.random(2000) < 0.5
        a = b | (rng.random(2000) < shift)
        pairs.append((a, b))
    d = paired_bootstrap(pairs)
    one = paired_bootstrap(pairs[1:2])
    assert d.seeds == 3 and (d.high - d.low) > (one.high - one.low)


def test_pooled_concatenates_metrics_or_gives_none():
    cell = {"per_image": {"a": np.array([True, False]), "b": np.array([True])}}
    assert pooled(cell, ["a", "b"]).tolist() == [True, False, True]
    assert pooled(cell, ["a", "c"]) is None and pooled({}, ["a"]) is None


def test_per_image_results_round_trip_through_the_store(tmp_path):
    from robustprune.study.cells import Cell
    from robustprune.study.store import Store

    hits = np.random.default_rng(5).random(1001) < 0.5
    cell = Cell(hash="h1", study="s", axes={"seed": 0, "regime": "clean", "pruning": "dense"}, config={}, dense_key={})
    store = Store(tmp_path / "r.sqlite")
    store.put(cell, {"acc_clean": float(hits.mean())}, 1.0, per_image={"acc_clean": hits})
    (c,) = store.cells()
    assert c["per_image"]["acc_clean"].tolist() == hits.tolist()
    assert store.per_image(["h1"], "acc_clean")["h1"].tolist() == hits.tolist()
    assert (tmp_path / "r.sqlite").stat().st_size < 60_000


def test_gains_table_marks_significant_differences():
    from robustprune.report.robustness import gains_table, summary_table
    from robustprune.study.schema import StudyConfig

    study = StudyConfig(
        name="t",
        pruning={"m": {"method": "global_magnitude", "sparsities": [0.5], "finetune_epochs": [1]}},
        evaluation={"attacks": {"fgsm": {"eps": [0.1]}}},
    )
    rng = np.random.default_rng(6)
    cells = []
    for seed in (0, 1):
        dense_clean = rng.random(1000) < 0.9
        dense_adv = rng.random(1000) < 0.3
        pruned_clean = dense_clean.copy()
        pruned_clean[:3] = ~pruned_clean[:3]  # a few flips: noise
        pruned_adv = dense_adv | (rng.random(1000) < 0.2)  # a real gain
        for pruning, clean, adv in (("dense", dense_clean, dense_adv), ("m", pruned_clean, pruned_adv)):
            axes = {
                "regime": "clean",
                "pruning": pruning,
                "method": None,
                "sparsity": 0.0 if pruning == "dense" else 0.5,
                "finetune_epochs": 0 if pruning == "dense" else 1,
                "round": None,
                "seed": seed,
            }
            cells.append(
                {
                    "hash": f"{pruning}{seed}",
                    "axes": axes,
                    "status": "done",
                    "error": None,
                    "metrics": {"acc_clean": clean.mean(), "acc_adv:fgsm@0.1": adv.mean()},
                    "per_image": {"acc_clean": clean, "acc_adv:fgsm@0.1": adv},
                }
            )
    t = gains_table(study, cells, "clean", flags=set())
    summary = summary_table(study, cells, "clean", flags=set())
    pruned_row = summary.rows[1]
    assert pruned_row[2].endswith(" *") and not pruned_row[1].endswith(" *")  # FGSM gain is real, clean is not
    assert not summary.rows[0][2].endswith(" *") and any("differs significantly" in n for n in summary.notes)
    fgsm, clean = t.rows[0][1], t.rows[0][2]
    assert fgsm.startswith("(+) ") and fgsm.endswith(" *")
    assert not clean.endswith(" *") and "[" in clean
    assert any("paired bootstrap" in n for n in t.notes)
