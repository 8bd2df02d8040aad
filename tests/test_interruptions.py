"""Reliability of long runs (issue 8): a study killed (SIGKILL) at random points, over and over,
ends with the store of an uninterrupted run; two processes (and Ray workers) writing one store
never duplicate or lose a row; the same cell and seed give bit-identical numbers; a diverging run
is stored as failed with its reason and the study goes on."""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import group_members, stored_cells, wait_for

from robustprune import checkpoint

pytestmark = pytest.mark.slow

# 3 seeds x (dense + 4 pruned): 15 cells, about 10 s of work with 2 workers
STUDY = {
    "name": "kill_me",
    "dataset": "mnist",
    "data": {"train_subset": 1000, "test_subset": 200},
    "model": {"name": "mnist_cnn", "args": {"conv1": 4, "conv2": 8, "fc": 32, "kernel_size": 5, "padding": 0}},
    "train": {"epochs": 1, "batch_size": 128, "lr": 0.05},
    "finetune": {"lr": 0.01},
    "pruning": {
        "magnitude": {"method": "global_magnitude", "sparsities": [0.5], "finetune_epochs": [0, 1]},
        "channels": {"method": "channel_l1", "sparsities": [0.3, 0.6], "finetune_epochs": [1]},
    },
    # Madry's PGD (every step on every image): an early-stopping attack finishes the study before 10 kills
    "evaluation": {
        "attack_subset": 100,
        "attacks": {"fgsm": {"eps": [0.1]}, "pgd": {"eps": [0.1], "params": {"early_stop": False}}},
    },
    "seeds": [0, 1, 2],
}
N_CELLS = 15
WORKERS = ["--workers", "2"]  # one thread per cell; every run below uses the same layout


def command(study: Path, out: Path, data_dir: Path, *extra) -> list[str]:
    return [
        sys.executable,
        "-m",
        "robustprune",
        "run",
        str(study),
        "--data-dir",
        str(data_dir),
        "--out",
        str(out),
        *WORKERS,
        *extra,
    ]


def contents(out: Path) -> dict:
    """The data of a store: each cell's status and error, each metric's value, each per-image vector."""
    with sqlite3.connect(out / "results.sqlite") as db:
        cells = db.execute("SELECT hash, status, error FROM cells ORDER BY hash").fetchall()
        results = db.execute("SELECT hash, metric, value FROM results ORDER BY hash, metric").fetchall()
        per_image = db.execute("SELECT hash, metric, n, correct FROM per_image ORDER BY hash, metric").fetchall()
    return {"cells": cells, "results": results, "per_image": per_image}


def row_counts(out: Path) -> dict:
    with sqlite3.connect(out / "results.sqlite") as db:
        return {
            t: db.execute(f"SELECT count(*), count(DISTINCT {k}) FROM {t}").fetchone()
            for t, k in (("cells", "hash"), ("results", "hash || metric"), ("per_image", "hash || metric"))
        }


def every_checkpoint_loads(out: Path) -> int:
    files = list((out / "checkpoints").glob("*.pt"))
    for f in files:
        checkpoint.load(f)
    return len(files)


@pytest.fixture(scope="module")
def study(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("study") / "kill_me.yaml"
    path.write_text(yaml.safe_dump(STUDY))
    return path


@pytest.fixture(scope="module")
def reference(study, data_dir, tmp_path_factory):
    """The uninterrupted run, and how long it took."""
    out = tmp_path_factory.mktemp("reference")
    t0 = time.perf_counter()
    proc = subprocess.run(command(study, out, data_dir), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert f"computed {N_CELLS} cells" in proc.stdout
    return out, time.perf_counter() - t0


def run_until_killed(cmd: list[str], out: Path, rng: random.Random, any_moment: bool) -> subprocess.Popen | None:
    """Start the study and SIGKILL its whole process group a random fraction of a second after it
    stored its first new cell, so that kills land between cells and in the next ones' training,
    evaluation and writes, and every run adds a cell or so. With any_moment, it may instead be
    killed earlier, a random time after the start (start-up, data loading, the first training).
    Runs that wait for a cell make progress however slow the machine is, so what is asserted
    never depends on its load. Returns the process if it finished by itself."""
    before = stored_cells(out)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    t0 = time.monotonic()
    kill_at, seen = (t0 + rng.uniform(0.5, 8.0)) if any_moment else math.inf, False
    while proc.poll() is None:
        now = time.monotonic()
        if not seen and stored_cells(out) > before:
            seen, kill_at = True, min(kill_at, now + rng.uniform(0.0, 0.3))
        if now >= kill_at or now - t0 > 900:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            assert now - t0 <= 900, "no cell stored in 900 s"
            return None
        time.sleep(0.02)
    return proc


def test_killed_at_random_points_many_times_ends_with_the_uninterrupted_store(study, reference, data_dir, tmp_path):
    ref_out, _ = reference
    out = tmp_path / "killed"
    cmd = command(study, out, data_dir)
    rng = random.Random(8)
    kills, stored_after_kill = 0, []
    any_moment = rng.sample([True] * 6 + [False] * 6, 12)
    while kills < 12:
        finished = run_until_killed(cmd, out, rng, any_moment[kills])
        if finished is not None:  # it completed before its kill time
            assert finished.returncode == 0, finished.stderr.read().decode()
            break
        kills += 1
        stored_after_kill.append(stored_cells(out))
        # a killed writer never leaves a torn row or a cell without its metrics
        assert all(n == distinct for n, distinct in row_counts(out).values())
    final = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert final.returncode == 0, final.stderr  # e.g. a half-written checkpoint would be reported here
    assert kills >= 10, f"only {kills} kills: the study finished too soon to be interrupted"
    assert any(0 < n < N_CELLS for n in stored_after_kill), stored_after_kill  # kills fell between cells too
    assert contents(out) == contents(ref_out)
    assert row_counts(out) == row_counts(ref_out)
    assert every_checkpoint_loads(out) == every_checkpoint_loads(ref_out)
    assert not list(out.rglob("*.tmp"))  # temporaries of killed writers are cleaned up by the next run


PHASES = {
    # the queue's server and a worker process exist (workers still importing torch, loading data)
    "workers starting": lambda pid, out: len(group_members(pid)) >= 3,
    # a worker trains or writes a model
    "computing": lambda pid, out: any((out / "checkpoints").glob("*.pt*")),
    # a worker has stored a cell and goes on with the next
    "storing": lambda pid, out: stored_cells(out) >= 1,
}


@pytest.mark.parametrize("phase", list(PHASES))
def test_killing_only_the_main_process_stops_its_workers(phase, study, data_dir, tmp_path):
    """Workers and the queue's server die with the study process, however far they got (no
    orphan keeps computing or writing). Each phase is reached by waiting for what shows it."""
    out = tmp_path / "out"
    proc = subprocess.Popen(
        command(study, out, data_dir),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        wait_for(lambda: proc.poll() is not None or PHASES[phase](proc.pid, out), phase, every=0.02)
        assert proc.poll() is None, f"the study ended before '{phase}'"
        started = len(group_members(proc.pid))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        wait_for(lambda: not group_members(proc.pid), "the workers to die", timeout=120, every=0.2)
    finally:
        left = group_members(proc.pid)
        if left:
            os.killpg(proc.pid, signal.SIGKILL)
    assert started >= 2 and not left, f"processes outlived the study: {left} (of {started})"


@pytest.mark.parametrize("executors", [("local", "local"), ("ray", "local")])
def test_two_processes_on_one_store_never_duplicate_or_lose_rows(executors, study, reference, data_dir, tmp_path):
    if "ray" in executors:
        pytest.importorskip("ray") if not os.environ.get("CI") else None
    ref_out, _ = reference
    out = tmp_path / "shared"
    procs = [
        subprocess.Popen(
            command(study, out, data_dir, "--executor", ex), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for ex in executors
    ]
    outputs = [p.communicate(timeout=900) for p in procs]
    for p, (_stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stderr
    assert contents(out) == contents(ref_out)
    assert row_counts(out) == row_counts(ref_out)
    computed = [int(stdout.split("computed ")[1].split()[0]) for stdout, _ in outputs]
    assert sum(computed) >= N_CELLS  # both worked; a cell both computed is stored once


def test_same_cell_and_seed_give_bit_identical_metrics(study, reference, data_dir, tmp_path):
    """A fresh run (new process, new checkpoints) reproduces every stored number bit for bit."""
    ref_out, _ = reference
    out = tmp_path / "again"
    proc = subprocess.run(command(study, out, data_dir), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    mine, theirs = contents(out), contents(ref_out)
    assert [(h, m, v.hex()) for h, m, v in mine["results"]] == [(h, m, v.hex()) for h, m, v in theirs["results"]]
    assert mine == theirs
    with sqlite3.connect(out / "results.sqlite") as db:
        configs = {h: json.loads(c) for h, c in db.execute("SELECT hash, config FROM cells")}
    assert len(configs) == N_CELLS


DIVERGING = {
    "blowup": {"method": "global_magnitude", "sparsities": [0.5], "finetune_epochs": [1], "finetune": {"lr": 1.0e12}}
}


def run_variant(study: Path, data_dir: Path, tmp_path: Path, **changes):
    """The study on seed 0 with some top-level sections replaced, run to the end (exit 0)."""
    path = tmp_path / "variant.yaml"
    path.write_text(yaml.safe_dump(yaml.safe_load(study.read_text()) | {"seeds": [0]} | changes))
    out = tmp_path / "out"
    proc = subprocess.run(command(path, out, data_dir), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    return path, out, proc


def test_a_diverging_fine_tuning_is_stored_as_failed_and_the_study_goes_on(study, data_dir, tmp_path):
    path, out, proc = run_variant(
        study, data_dir, tmp_path, pruning={"magnitude": STUDY["pruning"]["magnitude"], **DIVERGING}
    )
    assert "computed 3 cells, 0 from the store, 1 failed" in proc.stdout
    with sqlite3.connect(out / "results.sqlite") as db:
        cells = {json.loads(a)["pruning"]: (s, e) for a, s, e in db.execute("SELECT axes, status, error FROM cells")}
        failed_rows = db.execute(
            "SELECT count(*) FROM results r JOIN cells c USING (hash) WHERE c.status = 'failed'"
        ).fetchone()[0]
    assert cells["dense"] == ("done", None) and cells["magnitude"][0] == "done"
    status, error = cells["blowup"]
    assert status == "failed" and "loss became" in error and ("nan" in error or "inf" in error)
    assert failed_rows == 0  # no half-computed metrics of a failed cell
    report = subprocess.run(
        [sys.executable, "-m", "robustprune", "report", str(out)], capture_output=True, text=True, timeout=300
    )
    assert report.returncode == 0
    failed_table = report.stdout[report.stdout.index("Failed cells") :]
    assert "blowup s=0.5, FT 1 ep" in failed_table and "loss became" in failed_table
    again = subprocess.run(command(path, out, data_dir), capture_output=True, text=True, timeout=600)
    assert "computed 0 cells, 4 from the store" in again.stdout  # a failed cell is not retried


def test_a_diverging_dense_model_fails_its_pruned_cells_without_retraining(study, data_dir, tmp_path):
    _, out, proc = run_variant(study, data_dir, tmp_path, train=STUDY["train"] | {"lr": 1.0e12})
    assert "computed 0 cells, 0 from the store, 5 failed" in proc.stdout
    with sqlite3.connect(out / "results.sqlite") as db:
        rows = [
            (json.loads(a)["pruning"], e, w) for a, e, w in db.execute("SELECT axes, error, wall_time_s FROM cells")
        ]
    dense = [r for r in rows if r[0] == "dense"]
    assert len(dense) == 1 and "loss became" in dense[0][1]
    pruned = [r for r in rows if r[0] != "dense"]
    # the diverging training is remembered, not repeated: this sentence comes only from the dense
    # checkpoint that records the divergence (no wall-clock bound: that would depend on the load)
    assert len(pruned) == 4 and all(e.startswith("the dense model diverged: loss became") for _, e, _ in pruned)
    [dense_file] = (out / "checkpoints").glob("dense-*.pt")
    assert set(checkpoint.load(dense_file)) == {"diverged", "key"}
