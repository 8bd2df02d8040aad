"""Runs a study's cells: in order in this process, or in parallel through an executor (executor.py,
ray_executor.py); each cell is computed by workspace.py, which every executor shares."""

from __future__ import annotations

from pathlib import Path

from robustprune import checkpoint
from robustprune.device import pick_device
from robustprune.study.cells import Cell
from robustprune.study.schema import StudyConfig
from robustprune.study.store import Store
from robustprune.study.workspace import (  # noqa: F401  (craft, MRSCache, selected: still importable from here)
    MRSCache,
    Progress,
    Workspace,
    compute_and_store,
    craft,
    selected,
)


def prepare(
    study: StudyConfig, out_dir: Path, data_dir=None, device: str = "auto", checkpoints: Path | None = None
) -> Workspace:
    """The workspace of a run, once every input it reads is checked (before the store is opened,
    so bad input leaves it untouched). Temporary files of killed runs are removed."""
    ws = Workspace(study, out_dir, data_dir, pick_device(device), Progress(), checkpoints)
    ws.check_inputs()
    checkpoint.remove_stale_temporaries(ws.ckpt_dir)
    return ws


def run_study(
    study: StudyConfig,
    cells: list[Cell],
    store: Store,
    out_dir: Path,
    data_dir=None,
    device: str = "auto",
    progress: Progress | None = None,
    workers: int | str = 1,
    checkpoints: Path | None = None,
    executor: str = "local",
    address: str | None = None,
    ws: Workspace | None = None,
) -> dict[str, int]:
    """Compute every cell the store does not have yet. Returns counts of computed/skipped/failed.
    workers > 1 (or 'auto') runs cells in parallel processes (see executor.py). checkpoints: the
    folder of trained models and derived data sets (default out_dir/checkpoints). ws: from
    prepare(), when the caller checked the inputs already."""
    from robustprune.study.executor import run_parallel, worker_layout

    progress = progress or Progress()
    progress.plan(cells, store.done_hashes())
    n_workers, threads = worker_layout(workers, device)
    ws = ws or prepare(study, out_dir, data_dir, device, checkpoints)
    ws.progress = progress
    if executor == "ray":
        from robustprune.study.ray_executor import run_ray

        return run_ray(study, cells, store, Path(out_dir), data_dir, device, progress, address, checkpoints)
    if n_workers > 1:
        return run_parallel(
            study, cells, store, Path(out_dir), data_dir, device, progress, n_workers, threads, checkpoints
        )
    done = store.done_hashes()
    counts = {"computed": 0, "skipped": 0, "failed": 0}
    for i, cell in enumerate(cells):
        if cell.hash in done:
            counts["skipped"] += 1
            progress.cell_finished(cell, i, len(cells), 0.0, "stored")
            continue
        progress.cell_started(cell, i, len(cells))
        status, wall = compute_and_store(cell, ws, store)
        done.add(cell.hash)
        counts["failed" if status == "failed" else "computed"] += 1
        progress.cell_finished(cell, i, len(cells), wall, status)
    return counts
