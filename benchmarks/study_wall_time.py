"""Wall time of a study budget with one seed, from an empty output folder (dense models, pruning,
fine-tuning, lottery tickets and every evaluation included). Default: the MNIST study's `full`.

    python benchmarks/study_wall_time.py [--data-dir ../shared/data] [--workers auto] [--budget full]
    python benchmarks/study_wall_time.py --study studies/cifar_structured_pruning_robustness.yaml --budget cpu
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STUDY = Path(__file__).resolve().parents[1] / "studies" / "mnist_pruning_robustness.yaml"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--data-dir", default="../shared/data")
    p.add_argument("--workers", default="auto")
    p.add_argument("--budget", default="full")
    p.add_argument("--study", default=str(STUDY), help="study file (default: the MNIST study)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as out:
        t0 = time.perf_counter()
        subprocess.run(
            [
                sys.executable,
                "-m",
                "robustprune",
                "run",
                args.study,
                "--budget",
                args.budget,
                "--data-dir",
                args.data_dir,
                "--out",
                out,
                "--workers",
                args.workers,
            ],
            check=True,
            stdout=subprocess.DEVNULL,
        )
        wall = time.perf_counter() - t0
        with sqlite3.connect(Path(out) / "results.sqlite") as db:
            cells = db.execute("SELECT count(*) FROM cells").fetchone()[0]
    print(
        f"{Path(args.study).stem}, {args.budget} budget, 1 seed, workers={args.workers}: {cells} cells in {wall:.0f} s "
        f"on {os.cpu_count()} cores"
    )


if __name__ == "__main__":
    main()
