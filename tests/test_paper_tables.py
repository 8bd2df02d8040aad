"""The paper-layout tables of a study's `tables:` section (Bai et al. Tables 1-5) and the '*' in
budget keys, on hand-made cells whose numbers are known."""

import pytest

from robustprune.errors import UserError
from robustprune.report.paper_tables import paper_table, paper_tables
from robustprune.report.tables import all_tables
from robustprune.study.schema import StudyConfig, resolve_study

PGD = "acc_adv:pgd20@0.0313725"
FGSM = "acc_adv:fgsm@0.0313725"


def base_study(**tables) -> dict:
    return {
        "name": "t",
        "dataset": "cifar10",
        "models": {
            "r20": {"name": "resnet20", "args": {"width": 4}},
            "r32": {"name": "resnet32", "args": {"width": 4}},
        },
        "pruning": {
            "taylor": {
                "method": "structured",
                "sparsities": [0.3, 0.5],
                "finetune_epochs": [1],
                "params": {"criterion": "taylor"},
            },
            "taylor_at": {
                "method": "structured",
                "sparsities": [0.3, 0.5],
                "finetune_epochs": [1],
                "params": {"criterion": "taylor"},
                "finetune": {"adversarial": {"attack": "fgsm"}},
            },
            "random": {
                "method": "structured",
                "sparsities": [0.5],
                "finetune_epochs": [1],
                "models": ["r20"],
                "params": {"criterion": "random"},
            },
        },
        "evaluation": {
            "attacks": {
                "pgd20": {"attack": "pgd", "eps": [0.0313725], "params": {"steps": 20}},
                "fgsm": {"eps": [0.0313725]},
            }
        },
        "tables": tables,
    }


MAIN = {
    "title": "Main",
    "rows": {"Taylor": "taylor", "Taylor + AT": "taylor_at"},
    "columns": {"Std": "clean", "Adv PGD-20": "pgd20", "Adv FGSM": "fgsm"},
}


def cell(model, pruning, sparsity, seed, flops, clean, pgd=0.1, fgsm=0.2):
    axes = {
        "regime": "clean",
        "pruning": pruning,
        "method": None if pruning == "dense" else "structured",
        "sparsity": sparsity,
        "finetune_epochs": 0 if pruning == "dense" else 1,
        "round": None,
        "seed": seed,
        "model": model,
    }
    return {
        "axes": axes,
        "status": "done",
        "error": None,
        "hash": f"{model}-{pruning}-{sparsity}-{seed}",
        "metrics": {"acc_clean": clean, PGD: pgd, FGSM: fgsm, "flops_nonzero": flops},
    }


def cells() -> list[dict]:
    out = []
    for model, dense_flops in (("r20", 1000.0), ("r32", 2000.0)):
        for seed in (0, 1):
            out.append(cell(model, "dense", 0.0, seed, dense_flops, 0.90 + 0.02 * seed))
            for s, kept in ((0.3, 0.5), (0.5, 0.25)):
                out.append(cell(model, "taylor", s, seed, dense_flops * kept, 0.80 + 0.02 * seed))
                # + AT keeps a little more at s = 0.5 in seed 1 only: FLOPs reduction 75 % and 70 %
                at_kept = 0.30 if (s, seed) == (0.5, 1) else kept
                out.append(cell(model, "taylor_at", s, seed, dense_flops * at_kept, 0.70, pgd=0.3, fgsm=0.4))
        if model == "r20":
            out += [cell("r20", "random", 0.5, seed, 250.0, 0.5) for seed in (0, 1)]
    return out


def test_methods_layout_rows_flops_and_statistics():
    study = StudyConfig(**base_study(main=MAIN))
    t = paper_table(study, cells(), "main", flags=set())
    assert t.headers == ["Architecture", "Method", "FLOPs↓ (%)", "Std", "Adv PGD-20", "Adv FGSM"]
    r20 = t.rows[:5]
    assert [r[0] for r in r20] == ["r20", "", "", "", ""]
    assert [r[1] for r in r20] == ["Dense", "Taylor", "Taylor", "Taylor + AT", "Taylor + AT"]
    assert r20[0][2:] == ["0.00", "91.00 ± 1.41", "10.00", "20.00"]  # 0.90, 0.92 over two seeds
    assert r20[1][2] == "50.00" and r20[2][2] == "75.00"  # the same in both seeds: no ± 0
    assert r20[4][2] == "72.50 ± 3.54"  # 75 % and 70 %
    assert r20[4][4:] == ["30.00 *", "40.00 *"]  # + 20 p.p. on PGD and FGSM in both seeds
    assert t.rows[5][:2] == ["r32", "Dense"] and len(t.rows) == 10
    assert "2 seeds" in t.caption and "pgd-20 at ε = 8/255" in t.caption


def test_table_options_models_sparsities_dense_and_row_header():
    spec = dict(MAIN, models=["r32"], sparsities=[0.5], dense=False, row_header="Variant")
    t = paper_table(StudyConfig(**base_study(main=spec)), cells(), "main", flags=set())
    assert t.headers[1] == "Variant"
    assert [(r[0], r[1], r[2]) for r in t.rows] == [("r32", "Taylor", "75.00"), ("", "Taylor + AT", "72.50 ± 3.54")]


def test_flops_layout_one_row_per_sparsity_and_shared_flops_column():
    spec = {
        "title": "T1",
        "layout": "flops",
        "rows": {"Taylor": "taylor", "Random": "random"},
        "columns": {"Acc": "clean"},
        "models": ["r20"],
    }
    t = paper_table(StudyConfig(**base_study(t1=spec)), cells(), "t1", flags=set())
    assert t.headers == ["Architecture", "Pruning ratio", "FLOPs↓ (%)", "Taylor Acc", "Random Acc"]
    assert t.rows[0] == ["r20", "0 (dense)", "0.00", "91.00 ± 1.41", "91.00 ± 1.41"]
    assert t.rows[1] == ["", "0.3", "50.00", "81.00 ± 1.41 *", "—"]  # random runs only at 0.5
    # random: -40 and -42 p.p., t = 41 with 1 degree of freedom, p = 0.016; Holm's largest factor is 1
    assert t.rows[2] == ["", "0.5", "75.00", "81.00 ± 1.41 *", "50.00 *"]


def test_flops_layout_splits_the_flops_column_when_entries_differ():
    spec = {
        "title": "T1",
        "layout": "flops",
        "rows": {"Taylor": "taylor", "AT": "taylor_at"},
        "columns": {"Acc": "clean"},
        "models": ["r20"],
        "dense": False,
    }
    t = paper_table(StudyConfig(**base_study(t1=spec)), cells(), "t1", flags=set())
    assert t.headers == ["Architecture", "Pruning ratio", "Taylor FLOPs↓ (%)", "Taylor Acc", "AT FLOPs↓ (%)", "AT Acc"]
    assert t.rows[1][4] == "72.50 ± 3.54"


def test_tables_come_first_in_the_report_and_skip_missing_results():
    study = StudyConfig(
        **base_study(
            main=MAIN,
            only_random={
                "title": "R",
                "rows": {"Random": "random"},
                "columns": {"Std": "clean"},
                "models": ["r32"],
                "dense": False,
            },
        )
    )
    tables = all_tables(study, cells())
    assert tables[0].title == "Main"
    assert [t.title for t in paper_tables(study, cells(), set())] == ["Main"]  # r32 has no random cells


@pytest.mark.parametrize(
    "spec, message",
    [
        (dict(MAIN, rows={"X": "nope"}), "row 'X' names pruning 'nope'"),
        (dict(MAIN, columns={"A": "apgd"}), "column 'A' names 'apgd'"),
        (dict(MAIN, models=["r56"]), "names model 'r56'"),
        (dict(MAIN, regime="noisy"), "names regime 'noisy'"),
        (dict(MAIN, rows={}), "needs at least one row"),
        (dict(MAIN, layout="wide"), "layout"),
    ],
)
def test_bad_tables_are_refused_with_the_reason(spec, message):
    with pytest.raises(UserError, match=message):
        resolve_study(base_study(main=spec), "study.yaml", budget=None)


def test_star_in_a_budget_key_sets_every_entry():
    raw = base_study(main=MAIN)
    raw["budgets"] = {"small": {"pruning.*.finetune_epochs": [3], "tables.*.models": ["r20"]}}
    study = resolve_study(raw, "study.yaml", budget="small")
    assert {label: p.finetune_epochs for label, p in study.pruning.items()} == {
        "taylor": [3],
        "taylor_at": [3],
        "random": [3],
    }
    assert study.tables["main"].models == ["r20"]


@pytest.mark.parametrize(
    "key, message",
    [
        ("pruning.*", "ends in '\\*'"),
        ("tables.*.models", "'\\*' over an empty section"),
        ("pruning.*.params.criterion.x", "is not a section"),
    ],
)
def test_bad_star_keys_are_refused(key, message):
    raw = base_study()
    raw["budgets"] = {"small": {key: 1}}
    with pytest.raises(UserError, match=message):
        resolve_study(raw, "study.yaml", budget="small")


# ---- the MRS / ratio figure -------------------------------------------------------------------


def mrpf_cells() -> list[dict]:
    """Two MRPF entries on one dense model (same MRS), two seeds; groups stored out of network order."""
    out = []
    for entry in ("taylor_mrpf", "magnitude_mrpf"):
        for seed in (0, 1):
            c = cell("r20", entry, 0.5, seed, 250.0, 0.8)
            c["metrics"] |= {
                "mrs:layer3.0.body.conv1": 0.2 + seed * 0.02,
                "mrs:stem.conv": 0.05,
                "ratio:layer3.0.body.conv1": 0.3,
                "ratio:stem.conv": 0.6,
            }
            out.append(c)
    return out


def test_mrs_figure_is_written_in_network_order(tmp_path):
    from matplotlib.image import imread

    from robustprune.report.figures import mrs_figures, network_order

    study = StudyConfig(**base_study())
    assert network_order(study, "r20", ["layer3.0.body.conv1", "stem.conv"]) == ["stem.conv", "layer3.0.body.conv1"]
    paths = mrs_figures(study, mrpf_cells() + cells(), tmp_path)
    assert paths == [tmp_path / "mrs_ratios_r20.png"]
    image = imread(paths[0])
    assert image.shape[0] > 500 and image.shape[1] > 500
    assert mrs_figures(study, cells(), tmp_path / "none") == []  # no MRPF cells: nothing written
    assert not (tmp_path / "none").exists()


def test_equal_curves_are_drawn_once():
    from robustprune.report.figures import _distinct

    out = _distinct({"a": [(1.0, 0.0), (2.0, 0.1)], "b": [(1.0, 0.0), (2.0, 0.1)], "c": [(3.0, 0.0), (2.0, 0.0)]})
    assert list(out) == ["a and 1 more alike", "c"]


# ---- the other figures and the written report ----------------------------------------------------


def sweep_cells() -> list[dict]:
    """One architecture, dense and taylor at two sparsities, two seeds, an attack at two eps, weights."""
    out = []
    for seed in (0, 1):
        for pruning, s, clean in (("dense", 0.0, 0.9), ("taylor", 0.3, 0.85), ("taylor", 0.5, 0.8)):
            c = cell(None, pruning, s, seed, 1000.0 * (1 - s), clean + 0.01 * seed)
            c["axes"].pop("model")
            c["metrics"] |= {
                "sparsity": s,
                "acc_adv:pgd20@0.0078431": clean / 2,
                "weights:q0": -0.5,
                "weights:q25": -0.1,
                "weights:q50": 0.0,
                "weights:q75": 0.1,
                "weights:q100": 0.5 - s / 2,
            }
            c["history"] = [
                {"epoch": e, "loss": 1.0 / e, "grad_confusion": 0.1 * e, "layer_rotation": 0.01 * e} for e in (1, 2)
            ]
            out.append(c)
    return out


def sweep_study() -> StudyConfig:
    raw = base_study()
    raw.pop("models")
    raw["pruning"]["taylor"].pop("models", None)
    raw["pruning"]["random"].pop("models")
    raw["evaluation"]["attacks"]["pgd20"]["eps"] = [0.0078431, 0.0313725]
    return StudyConfig(**raw)


def test_every_figure_that_applies_is_written(tmp_path):
    from matplotlib.image import imread

    from robustprune.report.figures import all_figures

    paths = all_figures(sweep_study(), sweep_cells(), tmp_path)
    assert sorted(p.name for p in paths) == [
        "generalization_vs_robustness.png",
        "robustness_vs_sparsity.png",
        "robustness_vs_strength.png",
        "training_dynamics.png",
        "weights.png",
    ]
    for p in paths:
        assert imread(p).shape[0] > 300


def test_figures_skip_what_the_study_lacks(tmp_path):
    from robustprune.report.figures import all_figures

    dense_only = [c for c in sweep_cells() if c["axes"]["pruning"] == "dense"]
    for c in dense_only:
        c["history"] = None
        c["metrics"] = {"acc_clean": 0.9}
    assert all_figures(sweep_study(), dense_only, tmp_path) == []


def test_latex_export_escapes_and_keeps_the_table():
    from robustprune.report.document import to_latex
    from robustprune.report.tables import Table

    tex = to_latex(Table("Gains (ε = 8/255)", ["Setting", "PGD_20"], [["50 % & more", "1.00 ± 0.20 ⚠"]], "A caption"))
    assert r"Setting & PGD\_20 \\" in tex and r"50 \% \& more & 1.00 $\pm$ 0.20 $^\dagger$ \\" in tex
    assert r"\caption{Gains ($\varepsilon$ = 8/255). A caption}" in tex and tex.count(r"\midrule") == 1


def test_paper_table_with_one_seed_shows_image_intervals_and_no_marks():
    import numpy as np

    from robustprune.stats import paired_images

    rng = np.random.default_rng(0)
    out = [c for c in cells() if c["axes"]["seed"] == 0]
    dense = {}
    for c in sorted(out, key=lambda c: c["axes"]["pruning"] != "dense"):  # dense models first
        a = c["axes"]
        hits = {m: rng.random(1000) < 0.5 for m in ("acc_clean", PGD, FGSM)}
        if a["pruning"] == "dense":
            dense[a["model"]] = hits
        elif a["pruning"] == "taylor_at":  # the dense model's PGD hits plus 30 % more
            hits[PGD] = dense[a["model"]][PGD] | (rng.random(1000) < 0.3)
        c["per_image"] = hits
        c["metrics"] = c["metrics"] | {m: float(h.mean()) for m, h in hits.items()}
    t = paper_table(StudyConfig(**base_study(main=MAIN)), out, "main", flags=set())
    assert not any(v.endswith(" *") for r in t.rows for v in r)  # one seed: never a mark
    at = next(c for c in out if c["axes"]["model"] == "r20" and c["axes"]["pruning"] == "taylor_at")
    diff = paired_images(at["per_image"][PGD], dense["r20"][PGD])
    assert diff.low > 0.05  # a gain far beyond test-set noise (s = 0.3: row 3), shown but not claimed
    pgd = {(r[1], i): r[4] for i, r in enumerate(t.rows[:5])}
    assert pgd[("Taylor + AT", 3)] == f"{100 * at['metrics'][PGD]:.2f} [{100 * diff.low:+.1f}, {100 * diff.high:+.1f}]"
    assert t.rows[0][4] == f"{100 * dense['r20'][PGD].mean():.2f}"  # the dense row is the reference
    assert len(t.notes) == 1 and "test images only" in t.notes[0] and "no significance is claimed" in t.notes[0]


def test_studies_side_by_side_share_columns_and_mark_what_one_lacks():
    from robustprune.report.render import side_by_side

    study_a = StudyConfig(**base_study())
    raw_b = base_study()
    raw_b["evaluation"]["attacks"] = {"fgsm": {"eps": [0.0313725]}}
    study_b = StudyConfig(**raw_b)
    b_cells = [c for c in cells() if c["axes"]["pruning"] in ("dense", "taylor")]
    t = side_by_side([("runs/a", study_a, cells()), ("runs/b", study_b, b_cells)])
    assert t.headers[:4] == ["Study", "Regime", "Setting", "Clean"]
    a_rows = [r for r in t.rows if r[0] == "a"]
    b_rows = [r for r in t.rows if r[0] == "b"]
    assert len(a_rows) == 11 and len(b_rows) == 6 and b_rows[0][1] == "clean"
    pgd = t.headers.index("PGD20 ε=8/255")
    assert all(r[pgd] == "—" for r in b_rows) and a_rows[0][pgd] == "10.00"
    assert side_by_side([("runs/a", study_a, cells())]) is None


def test_a_budget_removes_an_entry_with_null():
    raw = base_study(main=MAIN)
    raw["budgets"] = {"small": {"pruning.random": None, "tables.main": None}}
    study = resolve_study(raw, "study.yaml", budget="small")
    assert list(study.pruning) == ["taylor", "taylor_at"] and study.tables == {}
    raw["budgets"] = {"bad": {"pruning.taylor": None}}  # a table still names it: refused, with the reason
    with pytest.raises(UserError, match="row 'Taylor' names pruning 'taylor'"):
        resolve_study(raw, "study.yaml", budget="bad")
