"""robustprune.stats (seeds as the unit, Holm) on simulated studies and hand-worked cases; the
report's per-image scores; per-image results in the store; correlation over independent settings."""

import math

import numpy as np
import pytest
from scipy import stats

from robustprune.stats import Interval, ci95, holm, paired_images, paired_seeds

STUDIES = 3000  # simulated studies per check


def slack(rate: float, n: int = STUDIES) -> float:
    """Three standard errors of a rate estimated from n simulated studies."""
    return 3 * math.sqrt(rate * (1 - rate) / n)


def rejection_rate(seeds: int, effect: float, rng) -> float:
    """Share of simulated studies where paired_seeds finds p < 0.05: per seed, a level both models
    share (the seed's data order, its dense weights), unit-variance training noise of each model,
    and `effect` for the pruned one; the per-seed differences have sd sqrt(2)."""
    shared = rng.normal(0, 3, size=(STUDIES, seeds))
    dense = shared + rng.normal(size=(STUDIES, seeds))
    pruned = shared + effect + rng.normal(size=(STUDIES, seeds))
    return float(np.mean([paired_seeds(a, b).p < 0.05 for a, b in zip(pruned, dense)]))


@pytest.mark.parametrize("seeds", [3, 5])
def test_false_positive_rate_under_the_null_is_at_most_five_percent(seeds):
    rate = rejection_rate(seeds, 0.0, np.random.default_rng(seeds))
    assert rate <= 0.05 + slack(0.05)


def test_power_on_a_known_effect_matches_the_t_test():
    # per-seed differences have sd sqrt(2); an effect of 2 sd of the differences, 5 seeds
    seeds, sd = 5, math.sqrt(2)
    rate = rejection_rate(seeds, 2 * sd, np.random.default_rng(7))
    crit = stats.t.ppf(0.975, seeds - 1)
    nc = 2 * math.sqrt(seeds)  # effect / (sd / sqrt(n))
    power = stats.nct.sf(crit, seeds - 1, nc) + stats.nct.cdf(-crit, seeds - 1, nc)
    assert power > 0.9 and abs(rate - power) <= slack(power)


def test_holm_keeps_the_family_wise_error_rate():
    rng = np.random.default_rng(11)
    diffs = rng.normal(size=(STUDIES, 10, 3))  # 10 null comparisons over 3 seeds per simulated table
    p = stats.ttest_1samp(diffs, 0.0, axis=2).pvalue  # paired_seeds' p (checked against it below)
    raw = float(np.mean((p < 0.05).any(axis=1)))
    corrected = float(np.mean([min(holm(row)) < 0.05 for row in p]))
    assert raw > 0.3  # uncorrected, some comparison of 10 is "significant" in most tables
    assert corrected <= 0.05 + slack(0.05)


def test_holm_on_hand_worked_examples():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> 0.06 (monotone)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = holm([0.02, math.nan, 0.5])  # NaN is kept and not counted: m = 2
    assert adjusted[0] == pytest.approx(0.04) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.5)
    assert holm([0.6, 0.7]) == [1.0, 1.0]  # capped at 1
    assert holm([0.01, 0.01]) == pytest.approx([0.02, 0.02]) and holm([]) == []
    assert holm([0.03]) == pytest.approx([0.03])


def test_paired_seeds_is_the_t_test_and_its_interval():
    a, b = [0.91, 0.93, 0.92, 0.95], [0.90, 0.90, 0.91, 0.92]
    d = np.subtract(a, b)
    out = paired_seeds(a, b)
    ref = stats.ttest_1samp(d, 0.0)
    low, high = stats.t.interval(0.95, 3, loc=d.mean(), scale=stats.sem(d))
    assert (out.mean, out.low, out.high, out.p) == pytest.approx((d.mean(), low, high, ref.pvalue))
    assert (out.n, out.unit) == (4, "seeds") and out.excludes_zero
    flipped = paired_seeds(b, a)
    assert (flipped.mean, flipped.low, flipped.p) == pytest.approx((-d.mean(), -high, ref.pvalue))
    low90, _ = stats.t.interval(0.9, 3, loc=d.mean(), scale=stats.sem(d))
    assert paired_seeds(a, b, level=0.9).low == pytest.approx(low90)


def test_paired_seeds_edge_cases():
    assert paired_seeds([0.9], [0.8]) is None and paired_seeds([], []) is None
    assert paired_seeds([0.9, math.nan, None], [0.8, 0.7, 0.7]) is None  # one usable pair
    same = paired_seeds([0.5, 0.6], [0.5, 0.6])
    assert (same.mean, same.low, same.high, same.p) == (0.0, 0.0, 0.0, 1.0) and not same.excludes_zero
    # no spread: a constant 4 p.p. loss (the float noise of 0.86 - 0.90 vs 0.88 - 0.92 is no spread)
    const = paired_seeds([0.86, 0.88, 0.84], [0.90, 0.92, 0.88])
    assert const.mean == pytest.approx(-0.04) and const.low == const.high == const.mean and const.p == 0.0
    with pytest.raises(ValueError):
        paired_seeds([0.1, 0.2], [0.1])


def test_paired_images_by_hand():
    a = np.array([1, 1, 0, 1, 0, 1, 1, 0], bool)
    b = np.array([0, 1, 0, 0, 0, 1, 0, 1], bool)
    diffs = [1, 0, 0, 1, 0, 0, 1, -1]
    mean = sum(diffs) / 8  # 0.25
    sd = math.sqrt(sum((x - mean) ** 2 for x in diffs) / 7)
    se = sd / math.sqrt(8)
    z = 1.959963984540054
    out = paired_images(a, b)
    assert out == Interval(pytest.approx(mean), pytest.approx(mean - z * se), pytest.approx(mean + z * se),
                           pytest.approx(math.erfc(mean / se / math.sqrt(2))), 8, "images")  # fmt: skip
    # per-image shares (a composite column's images) work the same way
    shares = paired_images(np.array([0.5, 1.0, 0.25]), np.array([0.5, 0.5, 0.0]))
    assert shares.mean == pytest.approx(0.25) and shares.unit == "images"
    assert paired_images(a[:1], b[:1]) is None
    assert paired_images(a, a).p == 1.0


def test_ci95_is_the_student_t_interval():
    low, high = ci95([1.0, 2.0, 3.0])
    assert (low, high) == pytest.approx((2 - 4.302653 / 3**0.5, 2 + 4.302653 / 3**0.5))
    assert (low, high) == pytest.approx(stats.t.interval(0.95, 2, loc=2.0, scale=stats.sem([1.0, 2.0, 3.0])))
    assert ci95([1.0]) is None and ci95([1.0, None, math.nan]) is None


# ---- the report's per-image scores and the store -----------------------------------------------


def test_per_image_averages_a_composite_column_per_image():
    from robustprune.report.stats import per_image

    cell = {"per_image": {"a": np.array([True, False]), "b": np.array([True, True]), "c": np.array([True])}}
    assert per_image(cell, ["a", "b"]).tolist() == [1.0, 0.5]
    assert per_image(cell, ["a"]).tolist() == [1.0, 0.0]
    assert per_image(cell, ["a", "c"]) is None  # different images
    assert per_image(cell, ["a", "x"]) is None and per_image({}, ["a"]) is None


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


# ---- correlation over independent settings ------------------------------------------------------


def test_correlation_counts_settings_not_seeds():
    from robustprune.metrics.correlation import generalization_vs_robustness

    rng = np.random.default_rng(3)
    clean, fgsm = [0.95, 0.93, 0.90, 0.86], [0.20, 0.26, 0.25, 0.33]
    cells = [
        {
            "axes": {"regime": "clean", "pruning": "m", "sparsity": s, "seed": seed},
            "metrics": {"acc_clean": x + rng.normal(0, 0.01), "acc_adv:fgsm@0.1": y + rng.normal(0, 0.01)},
        }
        for s, x, y in zip([0.0, 0.3, 0.5, 0.7], clean, fgsm)
        for seed in range(3)
    ]
    res = generalization_vs_robustness(cells, "acc_clean", "acc_adv:fgsm@0.1")
    means = [
        [np.mean([c["metrics"][m] for c in cells[i : i + 3]]) for i in range(0, 12, 3)]
        for m in ("acc_clean", "acc_adv:fgsm@0.1")
    ]
    ref = stats.pearsonr(*means)
    assert res.n == 4 and res.r == pytest.approx(ref.statistic) and res.p == pytest.approx(ref.pvalue)
    # the 12 (setting, seed) points as if independent would claim a far smaller p
    pooled = stats.pearsonr(
        [c["metrics"]["acc_clean"] for c in cells], [c["metrics"]["acc_adv:fgsm@0.1"] for c in cells]
    )
    assert pooled.pvalue < res.p / 10
    # plain rows, grouped by a caller's setting key
    rows = [c["metrics"] | {"s": c["axes"]["sparsity"]} for c in cells]
    by_key = generalization_vs_robustness(rows, "acc_clean", "acc_adv:fgsm@0.1", setting=lambda r: r["s"])
    assert by_key == pytest.approx(res)
