"""Run a study's cells as Ray tasks (`robustprune run STUDY --executor ray [--address ADDR]`).

The jobs are the local executor's (plan_jobs: one per dense model, per lottery chain, per one-shot
setting; a job starts when the jobs training its dense models are done). Each job is one task that
needs `threads` CPUs (and a GPU when the study runs on CUDA). A task writes its cells to the same
SQLite store in one transaction per cell, exactly as a local worker does, so the resume semantics
are the same: no cell is computed twice, and a task whose worker dies is retried by Ray and skips
the cells that were stored before it died. On a cluster, the output folder, the checkpoints and
the data folder must be on a file system every node sees.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from robustprune.errors import UserError
from robustprune.study.cells import Cell
from robustprune.study.executor import pending_jobs
from robustprune.study.schema import StudyConfig
from robustprune.study.store import Store
from robustprune.study.workspace import Progress, Workspace, compute_and_store

TASK_RETRIES = 3  # a task whose worker process dies is run again (its stored cells are skipped)
_STATE: dict = {}  # per Ray worker process: the workspace of the study it last ran


def _ray():
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'robustprune[ray]' (or pip install ray)") from None
    return ray


def ray_job(
    study_dump: dict, cells: list[Cell], out_dir: str, data_dir, device: str, threads: int, checkpoints: str | None
) -> list[tuple[str, str, float]]:
    """One job's cells, in order, on a Ray worker: [(hash, status, wall seconds)] of those it computed."""
    from robustprune.device import pick_device

    torch.set_num_threads(threads)
    key = (str(study_dump), out_dir, str(data_dir), device, checkpoints)
    if _STATE.get("key") != key:  # a worker that runs several jobs of a study loads the data once
        study = StudyConfig(**study_dump)
        _STATE.update(
            key=key,
            ws=Workspace(study, Path(out_dir), data_dir, pick_device(device), Progress(), checkpoints),
            store=Store(Path(out_dir) / "results.sqlite"),
        )
    ws, store = _STATE["ws"], _STATE["store"]
    out = []
    for cell in cells:
        if store.is_done(cell.hash):
            continue
        status, wall = compute_and_store(cell, ws, store)
        out.append((cell.hash, status, wall))
    return out


def run_ray(
    study: StudyConfig,
    cells: list[Cell],
    store: Store,
    out_dir: Path,
    data_dir,
    device: str,
    progress: Progress,
    address: str | None = None,
    checkpoints: Path | None = None,
    threads: int = 1,
    num_cpus: int | None = None,
) -> dict[str, int]:
    """Compute every cell the store lacks on a Ray cluster (`address`), or on a local Ray instance
    with `num_cpus` CPUs (default: all cores). Returns counts of computed/skipped/failed."""
    ray = _ray()
    started_here = not ray.is_initialized()
    if started_here:
        try:
            ray.init(
                address=address,
                num_cpus=None if address else (num_cpus or os.cpu_count()),
                include_dashboard=False,
                log_to_driver=False,
                configure_logging=False,
            )
        except (ConnectionError, ValueError, RuntimeError) as e:
            raise UserError(
                f"cannot reach the Ray cluster at {address} ({e}); start it with 'ray start "
                f"--head' or leave out --address for a local instance"
            ) from None
    try:
        return _schedule(ray, study, cells, store, out_dir, data_dir, device, progress, checkpoints, threads)
    finally:
        if started_here:
            ray.shutdown()


def _schedule(ray, study, cells, store, out_dir, data_dir, device, progress, checkpoints, threads) -> dict[str, int]:
    jobs, by_hash, counts = pending_jobs(study, cells, store, progress)
    finished = counts["skipped"]
    gpus = 1 if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()) else 0
    task = ray.remote(ray_job).options(num_cpus=threads, num_gpus=gpus, max_retries=TASK_RETRIES)
    study_dump = study.model_dump(mode="json")
    running: dict = {}  # object ref -> job id
    while True:
        ready = sorted(
            (j for j in jobs if not j.done and j.id not in running.values() and all(jobs[d].done for d in j.after)),
            key=lambda j: -j.cost,
        )
        for job in ready:  # Ray queues what the cluster cannot run yet
            for c in job.cells:
                progress.cell_started(c, by_hash[c.hash][0], len(cells))
            ref = task.remote(
                study_dump,
                job.cells,
                str(out_dir),
                data_dir,
                device,
                threads,
                str(checkpoints) if checkpoints else None,
            )
            running[ref] = job.id
        if not running:
            return counts
        (ref,), _ = ray.wait(list(running), num_returns=1)
        jobs[running.pop(ref)].done = True
        try:
            results = ray.get(ref)
        except ray.exceptions.RayTaskError as e:  # the job raised (e.g. a corrupt checkpoint): stop here
            if isinstance(e.cause, UserError):  # its one sentence, without Ray's traceback text
                raise UserError(str(e.cause)) from None
            raise e.as_instanceof_cause() from None
        for h, status, wall in results:
            counts["failed" if status == "failed" else "computed"] += 1
            progress.cell_finished(by_hash[h][1], finished, len(cells), wall, status)
            finished += 1
