"""Time-left estimates weigh cells by their work: a dense training is worth many fine-tuning epochs."""

import io

import pytest
from rich.console import Console

from robustprune.progress import RichProgress
from robustprune.study.cells import Cell, estimated_cost


def cell(h: str, pruning: dict | None, train_epochs: int = 10) -> Cell:
    return Cell(
        study="s",
        axes={"seed": 0, "regime": "clean", "pruning": "dense" if pruning is None else "p"},
        config={"train": {"epochs": train_epochs}, "pruning": pruning},
        hash=h,
        dense_key={},
    )


def test_costs_follow_training_epochs_and_sparsity():
    assert estimated_cost(cell("d", None)) == 10.5
    assert estimated_cost(cell("p", {"sparsity": 0.5, "finetune": {"epochs": 2}})) == 2 * 0.75 + 0.5
    assert estimated_cost(cell("s", {"sparsity": 0.5, "adjust": "scratch_e", "finetune": {}})) == 10.5


def test_time_left_scales_elapsed_time_by_the_work_left(monkeypatch):
    clock = iter([0.0, 100.0, 110.0])
    monkeypatch.setattr("robustprune.progress.time.perf_counter", lambda: next(clock))
    dense, pruned = cell("d", None), cell("p", {"sparsity": 0.5, "finetune": {"epochs": 2}})
    progress = RichProgress(Console(file=io.StringIO()), 3)
    progress.plan([cell("x", None), dense, pruned], stored={"x"})
    progress.computed = 1
    assert progress.time_left(dense, 1) == pytest.approx(100.0 * 2.0 / 10.5)  # 10.5 units done, 2 left
    progress.computed = 2
    assert progress.time_left(pruned, 0) == 0.0


def test_advance_before_any_stage_does_not_fail():
    progress = RichProgress(Console(file=io.StringIO()), 1)
    progress.advance(0, "fgsm eps=0.1 on 100 images")  # a cached dense model: evaluation starts first
    assert progress.stage_task is not None
