"""Local parallel executor: cells go to worker processes as jobs, in dependency order.

A job is a list of cells one worker runs in order: the dense cell of a (seed, regime), a whole
lottery-ticket chain (round r needs round r-1), or one one-shot pruning cell. Every job of a
(seed, regime) waits for its dense job, which trains the shared dense model into the on-disk
cache. Workers write each finished cell to the store themselves (one transaction per cell), so a
killed study loses at most the cells being computed. Small CPU models use cores better as several
single-threaded processes than as one multi-threaded one (1.5-1.9x for the MNIST CNNs here)."""

from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_mod
import signal
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass, field
from multiprocessing.managers import SyncManager
from pathlib import Path

import torch

from robustprune.study.cells import Cell, training_epochs
from robustprune.study.schema import StudyConfig
from robustprune.study.store import Store
from robustprune.study.workspace import Progress, Workspace, compute_and_store


def worker_layout(workers: int | str, device: str) -> tuple[int, int]:
    """(processes, threads per process). 'auto': one process on a GPU; on a CPU one per core up
    to 8, sharing the cores."""
    cores = os.cpu_count() or 1
    if workers == "auto":
        workers = 1 if device.startswith("cuda") or (device == "auto" and torch.cuda.is_available()) else min(cores, 8)
    workers = max(1, int(workers))
    return workers, max(1, cores // workers)


@dataclass
class Job:
    id: int
    cells: list[Cell]
    after: list[int] = field(default_factory=list)  # jobs that must finish first (their dense models)
    cost: float = 0.0
    done: bool = False
    group: tuple = field(default_factory=tuple)


def _group(cell: Cell) -> tuple:
    a = cell.axes
    return a["seed"], a["regime"], a.get("model")


def plan_jobs(cells: list[Cell], transfer_models=None) -> list[Job]:
    """One job per dense model, per lottery-ticket chain and per one-shot setting; each waits for
    the jobs that train the dense models it starts from."""
    jobs: list[Job] = []
    chains: dict[tuple, Job] = {}
    for cell in cells:
        a = cell.axes
        group = _group(cell)
        pr = cell.config["pruning"]
        if pr is None:
            jobs.append(Job(len(jobs), [cell], [], 1e9, group=group))
        elif a["round"] is not None or a.get("iteration") is not None:
            # a chain: each lottery round / pruning iteration starts from the previous one's model
            key = (*group, a["pruning"], a["sparsity"], a["finetune_epochs"])
            if key not in chains:
                chains[key] = Job(len(jobs), [], [], 0.0, group=group)
                jobs.append(chains[key])
            chains[key].cells.append(cell)
            epochs = pr["params"].get("epochs") if a["round"] is not None else a["finetune_epochs"]
            chains[key].cost += (epochs or 3) + 0.3
        else:
            jobs.append(
                Job(len(jobs), [cell], [], training_epochs(cell) * (1.0 - 0.5 * pr["sparsity"]) + 0.3, group=group)
            )
    if transfer_models:
        jobs = _merge_transfer_jobs(jobs, transfer_models)
    dense_job = {_group(c): job.id for job in jobs for c in job.cells if c.config["pruning"] is None}
    for job in jobs:
        needs = {dense_job.get(_group(c)) for c in job.cells if c.config["pruning"] is not None}
        job.after = sorted(needs - {None, job.id})
        job.cells.sort(
            key=lambda c: (c.config["pruning"] is not None, c.axes["round"] or 0, c.axes.get("iteration") or 0)
        )
    return jobs


def _merge_transfer_jobs(jobs: list[Job], models) -> list[Job]:
    """The models of a transfer matrix attack each other, so one worker builds them all (one job per
    (seed, regime)) instead of two workers training the same source at once. Dense models join
    the job only when the matrix spans several architectures; with one, every pruned model waits
    for the dense job anyway."""
    from robustprune.study.workspace import selected

    def merge_key(job: Job) -> tuple | None:
        picked = [c for c in job.cells if selected(c, models)]
        if not picked:
            return None
        if job.cells[0].config["pruning"] is None and not several_models.get(job.group[:2]):
            return None
        return job.group[:2]

    several_models: dict[tuple, bool] = {}
    for job in jobs:
        for c in job.cells:
            if selected(c, models):
                labels = several_models.setdefault(job.group[:2], set())
                labels.add(c.axes.get("model"))
    several_models = {k: len(v) > 1 for k, v in several_models.items()}
    merged: dict[tuple, Job] = {}
    out: list[Job] = []
    for job in jobs:
        key = merge_key(job)
        if key is None:
            out.append(job)
        elif key not in merged:
            merged[key] = job
            out.append(job)
        else:
            merged[key].cells += job.cells
            merged[key].cost += job.cost
    for i, job in enumerate(out):
        job.id = i
    return out


# ---- worker side -----------------------------------------------------------------------------------

_STATE: dict = {}


class QueueProgress(Progress):
    """Sends a worker's progress to the main process."""

    def __init__(self, q):
        self.q, self.pid = q, os.getpid()
        self._last = 0.0

    def cell_started(self, cell, index, total):
        self.q.put(("start", self.pid, cell.label))

    def stage(self, text, total):
        self.q.put(("stage", self.pid, text, total))

    def advance(self, completed, info=""):
        now = time.monotonic()
        if now - self._last > 0.25:  # the queue is not free: at most 4 updates a second
            self._last = now
            self.q.put(("advance", self.pid, completed, info))


def _die_with_parent(parent: int) -> None:
    """Linux: a worker is killed when the study process dies (no orphan keeps computing). A
    parent that died while the worker was still starting is caught by the pid check."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:
        os._exit(1)


def _helper(parent: int) -> None:
    """A helper process (worker, queue server) dies with the study process and leaves signals to it.
    Ctrl-C, and a scheduler's SIGTERM, often reach the whole process group; the study process answers
    them and kills its helpers, so none prints a traceback or vanishes under it first."""
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _init_worker(threads: int, q, parent: int) -> None:
    _helper(parent)
    torch.set_num_threads(threads)
    _STATE["queue"] = q


def _run_job(
    study_dump: dict,
    cells: list[Cell],
    out_dir: str,
    data_dir,
    device: str,
    threads: int,
    checkpoints: str | None = None,
) -> list[tuple[str, str, float]]:
    from robustprune.device import pick_device

    torch.set_num_threads(threads)
    key = (str(study_dump), out_dir, str(data_dir), device, checkpoints)
    if _STATE.get("key") != key:  # one workspace per worker: the data set is loaded once
        progress = QueueProgress(_STATE["queue"])
        study = StudyConfig(**study_dump)
        _STATE.update(
            key=key,
            progress=progress,
            ws=Workspace(study, Path(out_dir), data_dir, pick_device(device), progress, checkpoints),
            store=Store(Path(out_dir) / "results.sqlite"),
        )
    ws, store, progress = _STATE["ws"], _STATE["store"], _STATE["progress"]
    out = []
    for cell in cells:
        if store.is_done(cell.hash):
            continue
        progress.cell_started(cell, 0, 0)
        status, wall = compute_and_store(cell, ws, store)
        out.append((cell.hash, status, wall))
        _STATE["queue"].put(("finished", os.getpid(), cell.hash, status, wall))
    return out


# ---- main side -------------------------------------------------------------------------------------


def pending_jobs(study: StudyConfig, cells: list[Cell], store: Store, progress: Progress):
    """Report the cells the store already has, and plan jobs for the others (local and Ray
    executors alike). Returns (jobs, {hash: (index, cell)}, counts)."""
    done = store.done_hashes()
    counts = {"computed": 0, "skipped": 0, "failed": 0}
    for i, c in enumerate(cells):
        if c.hash in done:
            counts["skipped"] += 1
            progress.cell_finished(c, i, len(cells), 0.0, "stored")
    jobs = plan_jobs(
        [c for c in cells if c.hash not in done],
        study.evaluation.transfer.models if study.evaluation.transfer else None,
    )
    return jobs, {c.hash: (i, c) for i, c in enumerate(cells)}, counts


def run_parallel(
    study: StudyConfig,
    cells: list[Cell],
    store: Store,
    out_dir: Path,
    data_dir,
    device: str,
    progress: Progress,
    workers: int,
    threads: int,
    checkpoints: Path | None = None,
) -> dict[str, int]:
    jobs, by_hash, counts = pending_jobs(study, cells, store, progress)
    finished_count = counts["skipped"]
    # Every other job waits for the dense models: when there are fewer of them than workers, their
    # jobs get the idle workers' threads. Decided from the whole study, not from what is left, so
    # a resumed study computes every cell with the same thread count (float results depend on it).
    n_dense = len({_group(c) for c in cells if c.config["pruning"] is None})
    dense_threads = max(threads, workers * threads // max(1, min(workers, n_dense)))
    ctx = mp.get_context("spawn")  # fork after torch has started threads can deadlock
    manager = SyncManager(ctx=ctx)
    manager.start(_helper, (os.getpid(),))  # the queue's server process, too, dies with the study
    with manager:
        q = manager.Queue()
        pool = ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_init_worker, initargs=(threads, q, os.getpid())
        )
        running: dict = {}
        study_dump = study.model_dump(mode="json")

        def drain():
            nonlocal finished_count
            while True:
                try:
                    event = q.get_nowait()
                except queue_mod.Empty:
                    return
                kind, pid = event[0], event[1]
                if kind == "start":
                    progress.worker_event(pid, "start", event[2])
                elif kind == "stage":
                    progress.worker_event(pid, "stage", event[2], event[3])
                elif kind == "advance":
                    progress.worker_event(pid, "advance", event[2], event[3])
                elif kind == "finished":
                    index, cell = by_hash[event[2]]
                    counts["failed" if event[3] == "failed" else "computed"] += 1
                    progress.cell_finished(cell, finished_count, len(cells), event[4], event[3])
                    finished_count += 1

        try:
            while True:
                ready = [
                    j
                    for j in jobs
                    if not j.done and j.id not in running.values() and all(jobs[d].done for d in j.after)
                ]
                ready.sort(key=lambda j: -j.cost)
                for job in ready[: max(0, workers - len(running))]:
                    dense_job = all(c.config["pruning"] is None for c in job.cells)
                    fut = pool.submit(
                        _run_job,
                        study_dump,
                        job.cells,
                        str(out_dir),
                        data_dir,
                        device,
                        dense_threads if dense_job else threads,
                        str(checkpoints) if checkpoints else None,
                    )
                    running[fut] = job.id
                if not running:
                    break
                finished, _ = wait(list(running), timeout=0.2, return_when=FIRST_COMPLETED)
                drain()
                for fut in finished:
                    jobs[running.pop(fut)].done = True
                    fut.result()  # a worker's error (e.g. a corrupt checkpoint) stops the study here
            drain()
        except BaseException:
            procs = list((getattr(pool, "_processes", None) or {}).values())
            pool.shutdown(wait=False, cancel_futures=True)
            for p in procs:  # a finished cell is already stored; the others are recomputed next time
                p.kill()
            raise
        pool.shutdown(wait=True)
    return counts
