"""Report tables from synthetic cells: layouts, values, mean ± std over seeds, masking marks."""

from __future__ import annotations

import io

import numpy as np
import pytest
from rich.console import Console

from robustprune.evaluation import names
from robustprune.report import robustness as rb
from robustprune.report.render import to_rich
from robustprune.report.tables import MARK_NOTE, Table, all_tables, marked, sweep_table, table1, to_markdown
from robustprune.study.schema import resolve_study

MAG = {"pruning": "magnitude", "sparsity": 0.5, "finetune_epochs": 1}
RAW = {
    "name": "report_test",
    "regimes": {"clean": {}, "fgsm_data": {"eps": 0.2}},
    "pruning": {"magnitude": {"method": "global_magnitude", "sparsities": [0.5], "finetune_epochs": [1]}},
    "evaluation": {
        "attacks": {
            "fgsm": {"eps": [0.1, 0.2]},
            "pgd20": {"attack": "pgd", "eps": [0.1, 0.2], "params": {"steps": 20, "step_size": 0.01}},
            "pgd10": {"attack": "pgd", "eps": [0.1], "params": {"steps": 10, "step_size": 0.01}},
        },
        "occlusion": [4, 8],
        "corruptions": {"types": ["gaussian_noise", "fog"], "severities": [1, 2]},
        "transfer": {"attack": "pgd20", "eps": 0.1, "models": ["dense", MAG]},
        "report_eps": 0.2,
    },
    "table1": {
        "columns": {"Clean": ["clean", "acc_clean"], "FGSM": ["fgsm_data", "acc_fgsm_data"]},
        "rows": [{"label": "Magnitude (50%)", "pruning": "magnitude", "sparsity": 0.5}],
    },
    "seeds": [0, 1],
}
PGD_VS_FGSM = names.check("iterative_vs_fgsm", names.adv("pgd20", 0.1), names.adv("fgsm", 0.1))
FGSM_DATA_CHECK = names.check("transfer", names.adv("fgsm", 0.2), "acc_fgsm_data")


@pytest.fixture(scope="module")
def study():
    return resolve_study(RAW, "test")


def metrics(base: float, regime: str, setting: str) -> dict[str, float]:
    """Every metric of one model; `base` shifts all accuracies so settings and seeds differ."""
    m = {
        "acc_clean": 0.90 + base,
        "sparsity": 0.0 if setting == "dense" else 0.5,
        "params_nonzero": 1000.0,
        "flops_nonzero": 5000.0,
        "params": 1000.0,
        "flops": 5000.0,
        "images:attacks": 100.0,
        "images:shifts": 200.0,
        "masking_violations": 0.0,
        names.adv("fgsm", 0.1): 0.50 + base,
        names.adv("fgsm", 0.2): 0.30 + base,
        names.adv("pgd20", 0.1): 0.40 + base,
        names.adv("pgd20", 0.2): 0.10 + base,
        names.adv("pgd10", 0.1): 0.45 + base,
        names.occlusion(4): 0.80 + base,
        names.occlusion(8): 0.60 + base,
        PGD_VS_FGSM: -0.10,
    }
    for kind, acc in (("gaussian_noise", 0.85), ("fog", 0.75)):
        for sev in (1, 2):
            m[names.corruption(kind, sev)] = acc + base + (0.02 if sev == 1 else -0.02)
        m[names.corruption(kind)] = acc + base
    m[names.corruption(None, 1)], m[names.corruption(None, 2)] = 0.82 + base, 0.78 + base
    m[names.corruption()] = 0.80 + base
    other = "magnitude s=0.5 ft=1" if setting == "dense" else "dense"
    m[names.transfer("pgd20", 0.1, other)] = 0.70 + base
    if regime == "fgsm_data":
        m["acc_fgsm_data"] = 0.60 + base
        m[FGSM_DATA_CHECK] = -0.05
    return m


def cell(regime: str, setting: str, seed: int, **overrides: float) -> dict:
    pruning, sparsity, ft = ("dense", 0.0, 0) if setting == "dense" else ("magnitude", 0.5, 1)
    base = (0.0 if setting == "dense" else -0.04) + (0.0 if seed == 0 else 0.02)
    axes = {
        "regime": regime,
        "pruning": pruning,
        "method": None if pruning == "dense" else "global_magnitude",
        "sparsity": sparsity,
        "finetune_epochs": ft,
        "round": None,
        "seed": seed,
    }
    return {
        "axes": axes,
        "metrics": metrics(base, regime, setting) | overrides,
        "status": "done",
        "error": None,
        "hash": f"{regime}-{setting}-{seed}",
    }


def study_cells(**overrides_of) -> list[dict]:
    """Both regimes x (dense, magnitude) x seeds 0, 1; overrides_of['regime/setting/seed'] = metrics."""
    return [
        cell(r, s, seed, **overrides_of.get(f"{r}/{s}/{seed}", {}))
        for r in ("clean", "fgsm_data")
        for s in ("dense", "magnitude")
        for seed in (0, 1)
    ]


def column(table, header: str) -> list[str]:
    return [row[table.headers.index(header)] for row in table.rows]


def by_title(tables, title: str):
    return next(t for t in tables if t.title == title)


# ---- layouts and values -----------------------------------------------------------------------------


def test_sweep_shows_only_core_metrics(study):
    t = sweep_table(study, study_cells(), "fgsm_data")
    assert t.headers == ["Setting", "Clean acc.", "FGSM-data acc.", "Sparsity", "Non-zero params", "Non-zero FLOPs"]
    assert [r[0] for r in t.rows] == ["Dense", "magnitude s=0.5, FT 1 ep"]


def test_mean_and_std_over_two_seeds(study):
    t = sweep_table(study, study_cells(), "clean")
    assert column(t, "Clean acc.") == ["91.00 ± 1.41", "87.00 ± 1.41"]
    assert column(t, "Non-zero params") == ["1,000", "1,000"]  # counts that do not vary carry no ± 0


def test_summary_columns_follow_report_eps(study):
    t = rb.summary_table(study, study_cells(), "clean")
    # report_eps 0.2 where the attack ran at it, else its first eps (pgd10 runs 0.1 only)
    assert t.headers == [
        "Setting",
        "Clean",
        "FGSM ε=0.2",
        "PGD20 ε=0.2",
        "PGD10 ε=0.1",
        "Occlusion",
        "Corruption",
        "Masking",
    ]
    assert t.rows[0] == [
        "Dense",
        "91.00 ± 1.41",
        "31.00 ± 1.41",
        "11.00 ± 1.41",
        "46.00 ± 1.41",
        "71.00 ± 1.41",
        "81.00 ± 1.41",
        "✓",
    ]
    assert "2 seeds" in t.caption and "first 100 test images" in t.caption and "first 200 test images" in t.caption
    # the pruned model loses the same 4 p.p. in both seeds: no spread, every accuracy is marked
    assert t.rows[1][1:7] == [f"{v:.2f} ± 1.41 *" for v in (87, 27, 7, 42, 67, 77)]
    assert t.notes == [
        "* = the difference from the dense model of the same architecture and seeds is significant: paired t-test "
        "over 2 seeds, Holm-corrected across this table's 6 comparisons, adjusted p < 0.05."
    ]


def test_attack_occlusion_and_corruption_sweeps(study):
    tables = rb.detail_tables(study, study_cells(), "clean")
    assert [t.title for t in tables] == [
        "Attack strength: FGSM (regime 'clean')",
        "Attack strength: PGD20 (regime 'clean')",
        "Occlusion (regime 'clean')",
        "Corruptions by type (regime 'clean')",
        "Corruptions by severity (regime 'clean')",
        "Transfer attacks (regime 'clean')",
    ]
    fgsm, _, occ, by_type, by_sev, _ = tables
    assert fgsm.headers == ["Setting", "ε=0.1", "ε=0.2"] and fgsm.rows[1][1:] == ["47.00 ± 1.41 *", "27.00 ± 1.41 *"]
    assert occ.headers == ["Setting", "δ=4", "δ=8"] and occ.rows[0][1:] == ["81.00 ± 1.41", "61.00 ± 1.41"]
    assert by_type.headers == ["Setting", "gauss", "fog", "Mean"]
    assert by_type.rows[0][1:] == ["86.00 ± 1.41", "76.00 ± 1.41", "81.00 ± 1.41"]
    assert "gauss = gaussian_noise" in by_type.caption
    assert by_sev.headers == ["Setting", "Sev. 1", "Sev. 2", "Mean"]


def test_transfer_matrix_diagonal_is_white_box(study):
    t = rb.transfer_table(rb.regime_view(study, study_cells(), "clean", None))
    assert t.headers == ["Source ↓ / target →", "dense", "magnitude s=0.5 ft=1"]
    assert [r[0] for r in t.rows] == ["dense", "magnitude s=0.5 ft=1"]
    # diagonal: the target's own acc_adv:pgd20@0.1; off-diagonal: acc_transfer:...|source stored in the target
    assert t.rows[0][1] == "41.00 ± 1.41" and t.rows[1][2] == "37.00 ± 1.41"
    assert t.rows[0][2] == "67.00 ± 1.41" and t.rows[1][1] == "71.00 ± 1.41"
    assert "diagonal is the target's white-box accuracy" in t.caption


def test_tables_are_skipped_without_their_metrics(study):
    bare = [c | {"metrics": {"acc_clean": 0.9, "sparsity": 0.0}} for c in study_cells()]
    assert rb.summary_table(study, bare, "clean") is None
    assert rb.detail_tables(study, bare, "clean") == []
    assert rb.masking_table(study, bare) is None


# ---- gradient-masking checks ----------------------------------------------------------------------


def test_all_checks_passed_row_counts_checks(study):
    t = rb.masking_table(study, study_cells())
    n = 8 + 4  # one check in every cell, one more in each fgsm_data cell
    assert t.headers == ["Result"] and t.rows == [[f"All {n} checks passed in every regime, setting and seed."]]


def test_violated_check_marks_the_stronger_attack(study):
    cells = study_cells(**{"clean/magnitude/1": {PGD_VS_FGSM: 0.03}})
    tables = all_tables(study, cells)
    summary = by_title(tables, "Robustness summary (regime 'clean')")
    # report_eps 0.2 is not the violated eps: the summary's attack columns stay unmarked
    assert "⚠" not in " ".join(summary.rows[1][2:5])
    assert column(summary, "Masking") == ["✓", "⚠ 1"]
    pgd = by_title(tables, "Attack strength: PGD20 (regime 'clean')")
    assert column(pgd, "ε=0.1") == ["41.00 ± 1.41", "37.00 ± 1.41 ⚠ *"]  # the stronger side, in any seed
    assert pgd.notes[0] == MARK_NOTE and pgd.notes[1].startswith("* = ")
    fgsm = by_title(tables, "Attack strength: FGSM (regime 'clean')")
    assert "⚠" not in " ".join(column(fgsm, "ε=0.1")) and MARK_NOTE not in fgsm.notes
    transfer = by_title(tables, "Transfer attacks (regime 'clean')")
    assert transfer.rows[1][2] == "37.00 ± 1.41 ⚠" and "⚠" not in transfer.rows[0][2]
    checks = by_title(tables, "Gradient-masking checks")
    # seed 1 of magnitude: acc pgd20@0.1 = 0.40 - 0.04 + 0.02 = 0.38, weaker = 0.38 - 0.03
    assert checks.rows == [
        [
            "clean",
            "magnitude s=0.5, FT 1 ep",
            "1",
            "iterative attack weaker than FGSM",
            "PGD20 ε=0.1",
            "38.00",
            "FGSM ε=0.1",
            "35.00",
            "3.00",
        ]
    ]
    assert checks.caption.startswith("1 of 12 checks failed")


def test_fgsm_data_transfer_check_marks_table1_and_white_box(study):
    cells = study_cells(**{"fgsm_data/dense/0": {FGSM_DATA_CHECK: 0.02}})
    t1 = table1(study, cells)
    assert column(t1, "FGSM") == ["61.00 ± 1.41 ⚠", "57.00 ± 1.41 *"] and t1.notes[0] == MARK_NOTE
    assert "⚠" not in " ".join(column(t1, "Clean"))
    sweep = sweep_table(study, cells, "fgsm_data")
    assert column(sweep, "FGSM-data acc.")[0].endswith(" ⚠")
    summary = rb.summary_table(study, cells, "fgsm_data")
    assert column(summary, "FGSM ε=0.2") == ["31.00 ± 1.41 ⚠", "27.00 ± 1.41 *"]
    assert column(summary, "Masking") == ["⚠ 1", "✓"]


def test_violation_count_is_summed_over_seeds(study):
    cells = study_cells(**{f"clean/dense/{s}": {PGD_VS_FGSM: 0.01} for s in (0, 1)})
    assert column(rb.summary_table(study, cells, "clean"), "Masking") == ["⚠ 2", "✓"]
    assert len(rb.masking_table(study, cells).rows) == 2


def test_gap_at_the_tolerance_passes(study):
    cells = study_cells(**{"clean/dense/0": {PGD_VS_FGSM: study.evaluation.masking_tolerance}})
    assert rb.violations(study, cells) == []


# ---- order and rendering --------------------------------------------------------------------------


def test_all_tables_order(study):
    cells = study_cells() + [cell("clean", "dense", 2) | {"status": "failed", "error": "boom", "metrics": {}}]
    titles = [t.title for t in all_tables(study, cells)]
    per_regime = lambda r: [  # noqa: E731
        f"Robustness summary (regime '{r}')",
        f"Gain over the unpruned network (regime '{r}')",
        f"Sweep: regime '{r}'",
        f"Attack strength: FGSM (regime '{r}')",
        f"Attack strength: PGD20 (regime '{r}')",
        f"Occlusion (regime '{r}')",
        f"Corruptions by type (regime '{r}')",
        f"Corruptions by severity (regime '{r}')",
        f"Transfer attacks (regime '{r}')",
    ]
    assert titles == [
        "Table 1: robustness under different pruning methods",
        *per_regime("clean"),
        *per_regime("fgsm_data"),
        "Gradient-masking checks",
        "Failed cells",
    ]


def test_markdown_escapes_pipes_and_prints_notes(study):
    cells = study_cells(
        **{
            "clean/dense/0": {
                names.check(
                    "transfer", names.adv("pgd20", 0.1), names.transfer("pgd20", 0.1, "magnitude s=0.5 ft=1")
                ): 0.02
            }
        }
    )
    assert "| x\\|y |" in to_markdown(Table("t", ["a"], [["x|y"]]))
    tables = all_tables(study, cells)
    checks = to_markdown(by_title(tables, "Gradient-masking checks"))
    assert "PGD20 ε=0.1 from magnitude s=0.5 ft=1" in checks
    for t in tables:
        md = to_markdown(t)
        rows = [line.replace("\\|", "") for line in md.splitlines() if line.startswith("|")]
        assert {r.count("|") for r in rows} == {len(t.headers) + 1}, t.title  # escaped '|' splits no cell
        assert (MARK_NOTE in md) == marked(t.rows) and all(n in md for n in t.notes)


def test_rich_rendering_fits_160_columns(study):
    console = Console(file=io.StringIO(), width=160, highlight=False)
    for t in all_tables(study, study_cells()):
        console.print(to_rich(t, console.width))
    out = console.file.getvalue()
    assert "Corruptions by type" in out and max(map(len, out.splitlines())) <= 160


def test_gains_table_in_jordao_layout(study):
    # seed 1 of the pruned model gains 3 p.p. of clean accuracy over its dense model, seed 0 loses 4
    cells = study_cells(**{"clean/magnitude/1": {"acc_clean": 0.95}})
    t = rb.gains_table(study, cells, "clean")
    assert t.headers == [
        "Setting",
        "Semantic (severity 2)",  # the paper's setting: the highest severity and the largest occlusion
        "Occlusion (8 px)",
        "FGSM ε=0.2",
        "PGD20 ε=0.2",
        "PGD10 ε=0.1",
        "Clean",
        "Average",
        "Semantic, all severities",  # beside the Average, not in it
        "Occlusion, all sizes",
    ]
    assert [r[0] for r in t.rows] == ["magnitude s=0.5, FT 1 ep"]  # the dense network is the reference
    row = dict(zip(t.headers, t.rows[0]))
    # paired by seed; the same loss in both seeds is significant
    assert row["Semantic (severity 2)"] == "(-) 4.00 ± 0.00 *" and row["Occlusion (8 px)"] == "(-) 4.00 ± 0.00 *"
    assert row["Semantic, all severities"] == "(-) 4.00 ± 0.00 *" and row["Occlusion, all sizes"] == "(-) 4.00 ± 0.00 *"
    # clean: seed 0 -> 86 - 90 = -4; seed 1 -> 95 - 92 = +3; mean -0.5, std 4.95: not significant
    assert row["Clean"] == "(-) 0.50 ± 4.95"
    # average over the six columns, per seed: (5 * -4 + -4) / 6 = -4 and (5 * -4 + 3) / 6 = -2.83;
    # t = 3.42 / (0.82 / sqrt 2) = 5.9 with 1 degree of freedom: p = 0.11
    assert row["Average"] == "(-) 3.42 ± 0.82"
    assert "Holm-corrected across this table's 9 comparisons" in t.notes[0]
    assert rb.signed([0.001]) == "0.00" and rb.signed([1.5]) == "(+) 1.50" and rb.signed([]) == "—"


def test_correlation_table_over_setting_means(study):
    from scipy import stats

    cells = study_cells()
    assert rb.correlation_table(study, cells, "clean") is None  # two settings say nothing
    extra = []
    for c in cells:
        if c["axes"]["regime"] == "clean" and c["axes"]["pruning"] == "magnitude":
            m = dict(c["metrics"], acc_clean=c["metrics"]["acc_clean"] - 0.10)
            m[names.adv("fgsm", 0.2)] = c["metrics"][names.adv("fgsm", 0.2)] + 0.05
            extra.append(c | {"axes": c["axes"] | {"sparsity": 0.7}, "metrics": m, "hash": c["hash"] + "b"})
    t = rb.correlation_table(study, cells + extra, "clean")
    assert t.headers == ["Robustness measure", "Pearson r", "p", "n"]
    row = next(r for r in t.rows if r[0] == "FGSM ε=0.2")
    # setting means (dense, s=0.5, s=0.7): clean 91, 87, 77; FGSM 31, 27, 32
    r, p = stats.pearsonr([91, 87, 77], [31, 27, 32])
    assert row[1] == f"{r:+.2f}" and row[2] == f"{p:.3g}" and row[3] == "3"
    # 6 cells (3 settings x 2 seeds), 3 independent points: the caption says what p counts
    assert "3 settings" in t.caption and "never settings × seeds" in t.caption


# ---- significance: seeds as the unit, Holm across a table, intervals over images with one seed -----


def with_per_image(cells: list[dict], seed: int = 0) -> list[dict]:
    """Per-image results for every accuracy of the cells: the pruned model's hits are its dense
    model's with some images flipped; each metric is then the mean of its hits."""
    rng = np.random.default_rng(seed)
    images = {"adv": 100, "occlusion": 200, "corruption": 200}
    dense: dict[tuple, dict] = {}
    out = []
    for c in sorted(cells, key=lambda c: c["axes"]["pruning"] != "dense"):
        key = (c["axes"]["regime"], c["axes"]["seed"])
        hits = {}
        for m in c["metrics"]:
            p = names.parse(m)
            if (
                not m.startswith("acc_")
                or p.family == "transfer"
                or (p.family == "corruption" and None in (p.name, p.strength))
            ):
                continue
            n = images.get(p.family, 1000)
            base = dense.get(key, {}).get(m)
            hits[m] = rng.random(n) < 0.6 if base is None else np.where(rng.random(n) < 0.1, ~base, base)
        if c["axes"]["pruning"] == "dense":
            dense[key] = hits
        metrics = c["metrics"] | {m: float(h.mean()) for m, h in hits.items()}
        parts = [m for m in hits if names.parse(m).family == "corruption"]
        metrics[names.corruption()] = float(np.mean([hits[m].mean() for m in parts]))
        out.append(c | {"metrics": metrics, "per_image": hits})
    return out


def test_one_seed_shows_intervals_over_images_and_no_marks(study):
    from robustprune.stats import paired_images

    cells = with_per_image([c for c in study_cells() if c["axes"]["seed"] == 0])
    t = rb.summary_table(study, cells, "clean")
    assert not any(v.endswith(" *") for r in t.rows for v in r)
    pruned, dense = (
        next(c for c in cells if c["axes"]["regime"] == "clean" and c["axes"]["pruning"] == p)
        for p in ("magnitude", "dense")
    )

    def shown(metrics: list[str], value: float) -> str:
        a = np.mean([pruned["per_image"][m] for m in metrics], axis=0)  # a composite averages per image
        b = np.mean([dense["per_image"][m] for m in metrics], axis=0)
        d = paired_images(a, b)
        return f"{100 * value:.2f} [{100 * d.low:+.1f}, {100 * d.high:+.1f}]"

    row = dict(zip(t.headers, t.rows[1]))
    assert row["Clean"] == shown(["acc_clean"], pruned["metrics"]["acc_clean"])
    fgsm = names.adv("fgsm", 0.2)
    assert row["FGSM ε=0.2"] == shown([fgsm], pruned["metrics"][fgsm])
    parts = [names.corruption(k, s) for k in ("gaussian_noise", "fog") for s in (1, 2)]
    assert row["Corruption"] == shown(parts, pruned["metrics"][names.corruption()])
    occlusion = [names.occlusion(4), names.occlusion(8)]
    assert row["Occlusion"] == shown(occlusion, np.mean([pruned["metrics"][m] for m in occlusion]))
    assert t.rows[0][1] == f"{100 * dense['metrics']['acc_clean']:.2f}"  # the dense row is the reference
    assert t.notes == [
        "[low, high] = with one seed, the 95 % interval (p.p.) of the difference from the dense model of the same "
        "seed over the test images only: training noise is not included, and no significance is claimed."
    ]
    t1 = table1(study, cells)
    assert not any(v.endswith(" *") for r in t1.rows for v in r) and "[" in t1.rows[1][2]
    gains = rb.gains_table(study, cells, "clean")
    assert dict(zip(gains.headers, gains.rows[0]))["Clean"].endswith("]")


def test_three_seeds_mark_a_large_consistent_difference_only(study):
    # clean: the pruned model loses 10, 9 and 11 p.p. (t = 17, p = 0.003): marked.
    # FGSM-data: +1, -2, +0.5 p.p.: noise, not marked.
    dense = {0: 0.90, 1: 0.92, 2: 0.92}  # acc_clean of cell(): 0.90 + 0.02 for seeds 1 and 2
    over = {f"clean/magnitude/{s}": {"acc_clean": dense[s] - d} for s, d in ((0, 0.10), (1, 0.09), (2, 0.11))}
    over |= {
        f"fgsm_data/magnitude/{s}": {"acc_fgsm_data": dense[s] - 0.30 + d}
        for s, d in ((0, 0.01), (1, -0.02), (2, 0.005))
    }
    cells = [
        cell(r, st, seed, **over.get(f"{r}/{st}/{seed}", {}))
        for r in ("clean", "fgsm_data")
        for st in ("dense", "magnitude")
        for seed in (0, 1, 2)
    ]
    t = table1(study, cells)
    assert t.rows[1][2].endswith(" *") and t.rows[1][2].startswith("81.33 ± 1.53")
    assert not t.rows[1][3].endswith(" *") and not t.rows[0][2].endswith(" *")
    assert t.notes == [
        "* = the difference from the dense model of the same architecture and seeds is significant: paired t-test "
        "over 3 seeds, Holm-corrected across this table's 2 comparisons, adjusted p < 0.05."
    ]
    assert "[" not in " ".join(v for r in t.rows for v in r)  # no interval over images with 3 seeds


def test_holm_leaves_fewer_marks_than_uncorrected_tests():
    from robustprune.stats import paired_seeds

    eps = [round(0.01 * i, 2) for i in range(1, 12)]
    raw = {
        "name": "holm",
        "pruning": {"m": {"method": "global_magnitude", "sparsities": [0.5], "finetune_epochs": [1]}},
        "evaluation": {"attacks": {"fgsm": {"eps": eps}}},
        "seeds": [0, 1, 2],
    }
    study = resolve_study(raw, "test")
    # per seed, pruned - dense: +2.0, +2.5, +3.0 p.p. at ten eps (p = 0.013 each) and +10.0, +10.1,
    # +10.2 p.p. at the last (p < 0.001)
    gains = {e: [0.020, 0.025, 0.030] for e in eps[:-1]} | {eps[-1]: [0.100, 0.101, 0.102]}
    cells = []
    for seed in (0, 1, 2):
        for pruning in ("dense", "m"):
            axes = {
                "regime": "clean",
                "pruning": pruning,
                "method": None,
                "sparsity": 0.0 if pruning == "dense" else 0.5,
            }
            axes |= {"finetune_epochs": 0 if pruning == "dense" else 1, "round": None, "seed": seed}
            base = 0.5 + 0.03 * seed
            m = {"acc_clean": 0.9, "images:attacks": 100.0}
            m |= {names.adv("fgsm", e): base + (gains[e][seed] if pruning == "m" else 0.0) for e in eps}
            cells.append({"axes": axes, "metrics": m, "status": "done", "error": None, "hash": f"{pruning}{seed}"})
    raw_p = [paired_seeds(*zip(*[(base + g, base) for base, g in zip((0.5, 0.53, 0.56), gains[e])])).p for e in eps]
    assert sum(p < 0.05 for p in raw_p) == 11  # every uncorrected test "finds" something
    (t,) = rb.attack_sweep_tables(rb.regime_view(study, cells, "clean", set()))
    marks = [v.endswith(" *") for v in t.rows[1][1:]]
    assert marks == [False] * 10 + [True]  # after Holm only the large gain stands
    assert "Holm-corrected across this table's 11 comparisons" in t.notes[0]


LOTTERY = {"method": "lottery_ticket", "params": {"rounds": 3, "rate": 0.2, "epochs": 1}}


def lottery_cells(val: dict[int, float] | None) -> list[dict]:
    """clean regime, 2 seeds: dense and lottery rounds 1-3; test accuracy is best in round 1 and
    val_acc (when given) is highest in the round val says."""
    test_acc = {1: 0.95, 2: 0.85, 3: 0.80}
    out = [cell("clean", "dense", s) for s in (0, 1)]
    for r in (1, 2, 3):
        for s in (0, 1):
            c = cell("clean", "dense", s)
            c["axes"] |= {"pruning": "lottery", "round": r, "sparsity": 1 - 0.8**r, "method": "lottery_ticket"}
            c["metrics"] = c["metrics"] | {"acc_clean": test_acc[r] + 0.01 * s} | ({"val_acc": val[r]} if val else {})
            c["hash"] = f"lottery-{r}-{s}"
            out.append(c)
    return out


@pytest.fixture(scope="module")
def lottery_study():
    raw = dict(RAW, pruning=RAW["pruning"] | {"lottery": LOTTERY})
    raw["table1"] = dict(
        RAW["table1"], rows=[*RAW["table1"]["rows"], {"label": "Lottery ticket", "pruning": "lottery"}]
    )
    return resolve_study(raw, "test")


def test_table1_lottery_round_is_chosen_on_validation_accuracy(lottery_study):
    t = table1(lottery_study, lottery_cells({1: 0.96, 2: 0.98, 3: 0.97}))
    lottery = next(r for r in t.rows if r[0] == "Lottery ticket")
    # round 2: the best val_acc, not round 1's best test accuracy; -5 and -6 p.p. over 2 seeds: p = 0.058
    assert lottery[2] == "85.50 ± 0.71 (r2)"
    assert "highest validation accuracy" in t.caption and "never chosen on test accuracy" in t.caption
    assert "last round" not in t.caption


def test_table1_lottery_without_validation_accuracy_shows_the_last_round(lottery_study):
    t = table1(lottery_study, lottery_cells(None))
    lottery = next(r for r in t.rows if r[0] == "Lottery ticket")
    assert lottery[2] == "80.50 ± 0.71 * (r3)"  # -10 and -11 p.p.: p = 0.03, the mark goes before the round
    assert "is the last round, as no validation accuracy is stored" in t.caption


def test_validation_accuracy_is_never_a_test_column(lottery_study):
    cells = lottery_cells({1: 0.96, 2: 0.98, 3: 0.97})
    for c in cells:
        c["metrics"]["val_acc"] = c["metrics"].get("val_acc", 0.9)
    for t in all_tables(lottery_study, cells):
        assert not any("val" in h.lower() for h in t.headers), t.title
