"""Progress for long runs, drawn with rich: the study (cells done, time left) and the current stage
(e.g. the epochs of a training). Without a terminal (CI, logs) it prints one line per cell."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from robustprune.study.workspace import Progress as ProgressBase


class RichProgress(ProgressBase):
    def __init__(self, console: Console, total_cells: int, on_computed=None):
        self.console, self.on_computed = console, on_computed  # called after each computed (stored) cell
        console._log_render.show_path = False  # the source line of the log call means nothing to users
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"),
            TimeElapsedColumn(),
            TextColumn("left"),
            TimeRemainingColumn(),
            console=console,
            transient=False,
        )
        self.study_task = self.bar.add_task("study", total=total_cells, info="")
        self.stage_task = None
        self.worker_tasks: dict[int, int] = {}
        self.worker_cells: dict[int, str] = {}
        self.worker_stages: dict[int, str] = {}
        self.t0 = time.perf_counter()
        self.computed = 0
        self.cost: dict[str, float] = {}  # per cell still to compute: its estimated work (estimated_cost)
        self.cost_done = 0.0

    def __enter__(self):
        self.bar.__enter__()
        return self

    def __exit__(self, *exc):
        return self.bar.__exit__(*exc)

    def plan(self, cells, stored):
        from robustprune.study.cells import estimated_cost

        self.cost = {c.hash: estimated_cost(c) for c in cells if c.hash not in stored}

    def time_left(self, cell, cells_left: int) -> float:
        """Seconds left: elapsed time scaled by the estimated work left over the work done (cells
        differ by 100x: a dense training vs one fine-tuning epoch); by cell counts without a plan."""
        elapsed = time.perf_counter() - self.t0
        if cell.hash not in self.cost:
            return cells_left * elapsed / self.computed
        self.cost_done += self.cost.pop(cell.hash)
        return elapsed * sum(self.cost.values()) / max(self.cost_done, 1e-9)

    def cell_started(self, cell, index, total):
        self.bar.update(self.study_task, info=cell.label)

    def cell_finished(self, cell, index, total, seconds, status):
        self.bar.update(self.study_task, completed=index + 1)
        if status == "stored":
            return
        self.computed += 1
        if self.on_computed is not None:
            self.on_computed()
        left = self.time_left(cell, total - index - 1)  # wall time, so parallel workers are accounted for
        self.console.log(
            f"[{index + 1}/{total}] {cell.label}: {status} in {seconds:.1f}s (about {left / 60:.1f} min left)",
            highlight=False,
        )

    def stage(self, text, total):
        if self.stage_task is None:
            self.stage_task = self.bar.add_task("", total=1, info="")
        self.bar.reset(self.stage_task, total=total, description=text, info="")

    def advance(self, completed, info=""):
        if self.stage_task is None:  # e.g. an evaluation whose dense model came from the cache: no stage yet
            self.stage("evaluate", 1)
        kwargs = {"info": info}
        if completed:
            kwargs["completed"] = completed
        self.bar.update(self.stage_task, **kwargs)

    def worker_event(self, worker, kind, *args):
        """One bar per parallel worker: its cell, then its current stage (epochs, attack)."""
        if worker not in self.worker_tasks:
            self.worker_tasks[worker] = self.bar.add_task("", total=1, info="")
        task = self.worker_tasks[worker]
        n = list(self.worker_tasks).index(worker) + 1
        if kind == "start":
            self.worker_cells[worker] = args[0]
            self.bar.reset(task, total=1, description=f"worker {n}: {args[0]}", info="")
        elif kind == "stage":
            self.worker_stages[worker] = args[0]
            self.bar.reset(
                task, total=args[1], description=f"worker {n}: {self.worker_cells.get(worker, '')}", info=args[0]
            )
        elif kind == "advance":
            info = f"{self.worker_stages.get(worker, '')}: {args[1]}"
            self.bar.update(task, info=info, **({"completed": args[0]} if args[0] else {}))
