"""The Ray executor on a local Ray instance with 2 CPUs: the same store as the local executor, and
a Ray worker killed mid-study is retried without recomputing or losing cells."""

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
import yaml

ray = pytest.importorskip("ray") if not os.environ.get("CI") else __import__("ray")

STUDY = {
    "name": "ray_tiny",
    "dataset": "mnist",
    "data": {"train_subset": 1500, "test_subset": 300},
    "model": {"name": "mnist_cnn", "args": {"conv1": 4, "conv2": 8, "fc": 32, "kernel_size": 5, "padding": 0}},
    "train": {"epochs": 1, "batch_size": 128, "lr": 0.05},
    "finetune": {"lr": 0.01},
    "pruning": {
        "magnitude": {"method": "global_magnitude", "sparsities": [0.3, 0.6], "finetune_epochs": [1]},
        "channels": {"method": "channel_l1", "sparsities": [0.5], "finetune_epochs": [1]},
    },
    "evaluation": {"attack_subset": 100, "attacks": {"fgsm": {"eps": [0.1]}}},
    "seeds": [0, 1],
}


def stored(out) -> dict:
    with sqlite3.connect(out / "results.sqlite") as db:
        return {
            (json.dumps(json.loads(a), sort_keys=True), m): v
            for a, m, v in db.execute("SELECT axes, metric, value FROM results")
            if m != "latency_ms"
        }


def finished_at(out) -> dict:
    with sqlite3.connect(out / "results.sqlite") as db:
        return dict(db.execute("SELECT hash, finished_at FROM cells"))


def cli(*args, **kw):
    return subprocess.run(
        [sys.executable, "-m", "robustprune", *map(str, args)], capture_output=True, text=True, timeout=900, **kw
    )


@pytest.fixture()
def study_path(tmp_path):
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(STUDY))
    return path


@pytest.mark.slow
def test_ray_store_equals_the_local_executors(study_path, tmp_path, data_dir):
    local, on_ray = tmp_path / "local", tmp_path / "ray"
    a = cli("run", study_path, "--data-dir", data_dir, "--out", local, "--workers", "2")
    assert a.returncode == 0, a.stderr
    b = cli("run", study_path, "--data-dir", data_dir, "--out", on_ray, "--executor", "ray")
    assert b.returncode == 0, b.stderr
    assert "computed 8 cells, 0 from the store, 0 failed" in b.stdout
    assert stored(on_ray) == stored(local) and len(stored(local)) > 8 * 10
    again = cli("run", study_path, "--data-dir", data_dir, "--out", on_ray, "--executor", "ray")
    assert "computed 0 cells, 8 from the store" in again.stdout


def ray_workers_running_a_job() -> list[int]:
    pids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if b"ray::ray_job" in f.read():
                        pids.append(int(pid))
            except OSError:
                pass
    return pids


@pytest.mark.slow
def test_a_killed_ray_worker_is_retried_and_nothing_is_recomputed(study_path, tmp_path, data_dir):
    out = tmp_path / "ray"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "robustprune",
            "run",
            str(study_path),
            "--data-dir",
            str(data_dir),
            "--out",
            str(out),
            "--executor",
            "ray",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    killed, deadline = 0, time.time() + 900  # (a hang guard: the kill waits for a stored cell and a busy worker)
    while proc.poll() is None and time.time() < deadline:
        done = len(finished_at(out)) if (out / "results.sqlite").exists() else 0
        workers = ray_workers_running_a_job()
        if done >= 1 and workers and not killed:  # kill a worker in the middle of a job
            os.kill(workers[0], signal.SIGKILL)
            killed = 1
            before = finished_at(out)
        time.sleep(0.2)
    stdout, stderr = proc.communicate(timeout=600)
    assert killed, "no Ray worker was seen running a job"
    assert proc.returncode == 0, stderr
    after = finished_at(out)
    assert len(after) == 8  # every cell, once (hash is the key)
    assert {h: after[h] for h in before} == before  # cells stored before the kill were kept
    rerun = cli("run", study_path, "--data-dir", data_dir, "--out", out, "--executor", "ray")
    assert "computed 0 cells, 8 from the store" in rerun.stdout and finished_at(out) == after


def test_address_without_ray_executor_is_refused(study_path):
    r = cli("run", study_path, "--address", "auto")
    assert r.returncode == 2 and "--address is the Ray cluster of --executor ray" in r.stderr
