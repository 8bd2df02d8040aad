"""The sweep table shows the measured speed-up of each setting over its seed's dense model."""

from __future__ import annotations

from robustprune.report.tables import speedup_text, sweep_table
from robustprune.study.schema import StudyConfig


def cell(pruning: str, seed: int, latency: float) -> dict:
    axes = {"regime": "clean", "pruning": pruning, "sparsity": 0.0 if pruning == "dense" else 0.3,
            "finetune_epochs": 0, "round": None, "seed": seed}  # fmt: skip
    return {"axes": axes, "status": "done", "metrics": {"acc_clean": 0.9, "latency_ms": latency}, "per_image": {}}


def test_speedup_is_per_seed_against_that_seeds_dense_model():
    study = StudyConfig(name="t", pruning={"ch": {"method": "channel_l1", "sparsities": [0.3]}})
    # seed 0: 10 ms -> 5 ms (2x); seed 1: 12 ms -> 4 ms (3x): the mean of the ratios, 2.5x
    cells = [cell("dense", 0, 10.0), cell("ch", 0, 5.0), cell("dense", 1, 12.0), cell("ch", 1, 4.0)]
    table = sweep_table(study, cells, "clean")
    assert table.headers[-1] == "Speed-up"
    assert [row[-1] for row in table.rows] == ["1.00×", "2.50×"]
    assert "same seed" in table.caption
    # a setting whose seed has no dense latency shows a dash, not a number from another seed
    from robustprune.report.tables import group

    groups = group([cell("ch", 2, 5.0), cell("dense", 0, 10.0)])
    ch = next(k for k in groups if k.pruning == "ch")
    assert speedup_text(groups, list(groups), ch) == "—"


def test_no_speedup_column_without_latency():
    study = StudyConfig(name="t", pruning={"ch": {"method": "channel_l1", "sparsities": [0.3]}})
    cells = [cell("dense", 0, 10.0), cell("ch", 0, 5.0)]
    for c in cells:
        del c["metrics"]["latency_ms"]
    assert "Speed-up" not in sweep_table(study, cells, "clean").headers
