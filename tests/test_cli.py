"""Integration tests through the public CLI on real MNIST (the study's `smoke` budget)."""

from __future__ import annotations

import csv
import io
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import group_members, stored_cells, wait_for

from robustprune.cli import main

pytestmark = pytest.mark.slow


def cli(*args: str, check: bool = True, timeout: float = 1800) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "robustprune", *args], capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_args(study_file, data_dir, out) -> list[str]:
    return ["run", str(study_file), "--budget", "smoke", "--data-dir", str(data_dir), "--out", str(out)]


def stored(out: Path) -> list[tuple]:
    with sqlite3.connect(out / "results.sqlite") as db:
        return db.execute("SELECT hash, metric, value FROM results ORDER BY hash, metric").fetchall()


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, study_file, data_dir):
    out = tmp_path_factory.mktemp("smoke")
    t0 = time.perf_counter()
    proc = cli(*run_args(study_file, data_dir, out))
    return out, proc, time.perf_counter() - t0


def test_smoke_study_runs_and_prints_table1(smoke_run):
    out, proc, _ = smoke_run
    text = proc.stdout
    for label in (
        "Table 1",
        "Baseline (no pruning)",
        "Magnitude (50%)",
        "No FT",
        "With FT (1 ep)",
        "Structured channel (30%)",
        "Lottery ticket (best round)",
        "Spurious corr.",
        "Noisy label",
        "Sweep: regime 'fgsm_data'",
        "lottery round 2",
    ):
        assert label in text, label
    with sqlite3.connect(out / "results.sqlite") as db:
        statuses = db.execute("SELECT status, count(*) FROM cells GROUP BY status").fetchall()
        # 4 regimes x (dense + magnitude 1x2 + structured 1x2 + 2 lottery rounds)
        assert statuses == [("done", 28)]
        row = db.execute("SELECT config, versions, wall_time_s, seed FROM results LIMIT 1").fetchone()
        assert '"regime"' in row[0] and '"torch"' in row[1] and row[2] > 0 and row[3] == 0


def test_smoke_values_are_sane(smoke_run):
    out, _, _ = smoke_run
    rows = list(csv.DictReader(io.StringIO(cli("report", str(out), "--format", "csv").stdout)))
    by = {
        (r["regime"], r["pruning"], r["sparsity"], r["finetune_epochs"], r["round"], r["metric"]): float(r["value"])
        for r in rows
    }
    dense_clean = by[("clean", "dense", "0.0", "0", "", "acc_clean")]
    assert 0.8 < dense_clean <= 1.0  # 2 epochs on 4000 images
    # Structured pruning really shrinks the model; magnitude pruning hits its sparsity exactly.
    assert by[("clean", "structured", "0.3", "0", "", "params")] < by[("clean", "dense", "0.0", "0", "", "params")]
    assert by[("clean", "magnitude", "0.5", "0", "", "sparsity")] == pytest.approx(0.5, abs=1e-4)
    assert by[("clean", "lottery", "0.36", "0", "2", "sparsity")] == pytest.approx(0.36, abs=1e-3)
    # White-box attacks can only lower accuracy; stronger ones lower it more.
    dense = {m: v for (r, p, s, f, rd, m), v in by.items() if (r, p) == ("clean", "dense")}
    assert dense["acc_adv:fgsm@0.1"] <= dense_clean
    assert dense["acc_adv:pgd20@0.1"] <= dense["acc_adv:fgsm@0.1"]
    assert dense["acc_adv:apgd_ce@0.1"] <= dense["acc_adv:fgsm@0.1"]
    assert dense["acc_adv:fgsm@0.3"] <= dense["acc_adv:fgsm@0.05"]
    assert dense["acc_occlusion@16"] < dense["acc_occlusion@4"]
    assert 0.3 < dense["acc_corruption"] <= 1.0 and len([m for m in dense if m.startswith("acc_corruption:")]) == 15 * 6
    assert dense["masking_violations"] == 0 and len([m for m in dense if m.startswith("check:")]) >= 8
    # the transfer matrix: each listed model attacked with examples crafted on the two others
    assert {m for m in dense if m.startswith("acc_transfer:")} == {
        "acc_transfer:pgd20@0.1|magnitude s=0.5 ft=1",
        "acc_transfer:pgd20@0.1|structured s=0.3 ft=1",
    }
    assert ("clean", "magnitude", "0.5", "1", "", "acc_transfer:pgd20@0.1|dense") in by
    assert ("clean", "magnitude", "0.5", "0", "", "acc_transfer:pgd20@0.1|dense") not in by  # not listed
    assert ("spurious", "dense", "0.0", "0", "", "acc_patched") in by
    assert ("fgsm_data", "dense", "0.0", "0", "", "acc_fgsm_data") in by


def test_rerun_computes_nothing_and_prints_same_tables(smoke_run, study_file, data_dir):
    out, first, _ = smoke_run
    before = stored(out)
    again = cli(*run_args(study_file, data_dir, out))
    assert "computed 0 cells, 28 from the store" in again.stdout
    assert stored(out) == before
    tables = lambda s: s[s.index("Table 1") :]  # noqa: E731
    assert tables(again.stdout) == tables(first.stdout)


def test_report_formats(smoke_run):
    out, _, _ = smoke_run
    md = cli("report", str(out), "--format", "markdown").stdout
    assert (
        "| Pruning method | Fine-tune | Clean | Spurious corr. | Noisy label | FGSM | AutoAttack ε=0.2 (subset) |" in md
    )
    text = cli("report", str(out), "--format", "csv").stdout
    header = text.splitlines()[0]
    assert header == "regime,pruning,method,sparsity,finetune_epochs,round,seed,metric,value,config_hash,status"
    assert len(text.splitlines()) - 1 == len(stored(out))


def test_report_claims_lists_every_claim_without_a_verdict_from_one_seed(smoke_run):
    out, _, _ = smoke_run
    assert "Claims of mnist_pruning_robustness" in cli("report", str(out), "--claims").stdout
    md = cli("report", str(out), "--claims", "--format", "markdown").stdout
    rows = [line for line in md.splitlines() if line.startswith("| ") and "| Table 1 |" in line]
    assert len(rows) == 12  # the study file's Table 1 claims
    # one seed is no replication: no claim may hold or be contradicted
    assert all(("inconclusive" in r) or ("not measurable" in r) for r in rows), rows
    table = list(csv.DictReader(io.StringIO(cli("report", str(out), "--claims", "--format", "csv").stdout)))
    assert len(table) == 12 and {r["seeds"] for r in table} == {"1"}
    lottery = [r for r in table if r["claim"].startswith("Lottery")]
    assert len(lottery) == 4 and all(r["a_pct"] != "—" for r in lottery)  # a round chosen on validation


def test_killed_run_resumes_to_identical_results(smoke_run, study_file, data_dir, tmp_path):
    """SIGKILL mid-study, run again: same rows as the uninterrupted run (same seeds, same numbers)."""
    reference, _, _ = smoke_run
    out = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "robustprune", *run_args(study_file, data_dir, out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: stored_cells(out) >= 6 or proc.poll() is not None, "6 stored cells")
    assert proc.poll() is None, "the study finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = len({h for h, _, _ in stored(out)})
    assert 0 < partial < 28
    resumed = cli(*run_args(study_file, data_dir, out))
    assert f"{partial} from the store" in resumed.stdout
    assert stored(out) == stored(reference)


@pytest.mark.parametrize("target", ["study process", "process group"])
def test_sigterm_stops_the_run_like_ctrl_c_and_it_resumes(target, smoke_run, study_file, data_dir, tmp_path):
    """SIGTERM, what schedulers send to the study process (or to its whole group, like SLURM and
    systemd): the one 'interrupted' line and exit code 130 as for Ctrl-C, no traceback, no worker
    left. The same command then finishes to the uninterrupted run's rows."""
    reference, _, _ = smoke_run
    out = tmp_path / "stopped"
    log = {name: open(tmp_path / name, "w+") for name in ("stdout", "stderr")}  # (a pipe could fill and block it)
    proc = subprocess.Popen(
        [sys.executable, "-m", "robustprune", *run_args(study_file, data_dir, out)],
        stdout=log["stdout"],
        stderr=log["stderr"],
        start_new_session=True,
    )
    try:
        wait_for(lambda: stored_cells(out) >= 1 or proc.poll() is not None, "a stored cell")
        assert proc.poll() is None, "the study finished before it could be stopped"
        workers = len(group_members(proc.pid)) - 1
        (os.kill if target == "study process" else os.killpg)(proc.pid, signal.SIGTERM)
        code = proc.wait(timeout=300)
        wait_for(lambda: not group_members(proc.pid), "the workers to exit", timeout=120)
    finally:
        if group_members(proc.pid):
            os.killpg(proc.pid, signal.SIGKILL)
    for f in log.values():
        f.close()
    stdout, stderr = ((tmp_path / name).read_text() for name in log)
    if (os.cpu_count() or 1) > 1:
        assert workers >= 3  # the queue's server and two workers were running
    assert code == 130, stderr
    last = stdout.strip().splitlines()[-1]
    assert (
        last == f"interrupted: finished cells are stored in {out}/results.sqlite; run the same command again to resume"
    )
    assert stderr.strip() == "", stderr  # no traceback, from the study process or a worker
    partial = len({h for h, _, _ in stored(out)})
    assert 0 < partial < 28
    if target == "study process":  # (the resume is the same for both)
        resumed = cli(*run_args(study_file, data_dir, out))
        assert f"{partial} from the store" in resumed.stdout
        assert stored(out) == stored(reference)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["run", "no/such/study.yaml"], "does not exist"),
        (["run", "{study}", "--budget", "huge"], "no budget 'huge'; known budgets: claims, full, smoke"),
        (["run", "{study}", "--set", "train.epochs=-1"], "'train.epochs'"),
        (["run", "{study}", "--set", "regimes.nosy={}"], "unknown training regime 'nosy'"),
        (["run", "{study}", "--set", "pruning.magnitude.sparsities=[1.5]"], "outside [0, 1)"),
        (["run", "{study}", "--set", "pruning.magnitude.method=magic"], "unknown pruning method 'magic'"),
        (["run", "{study}", "--set", "dataset=mnits"], "unknown dataset 'mnits'; did you mean 'mnist'"),
        (["run", "{study}", "--set", "trian.epochs=2"], "unknown key 'trian'"),
        (["run", "{study}", "--set", "nonsense"], "is not KEY=VALUE"),
        (["run", "{study}", "--seeds", "0"], "--seeds must be at least 1"),
        (["run", "{study}", "--seeds", "x"], "invalid int value"),
        (["report", "{tmp}"], "no result store"),
        (["run", "{study}", "--set", "evaluation.attacks.cw={eps: [0.1]}"], "unknown attack 'cw'"),
        (["run", "{study}", "--set", "evaluation.attacks.fgsm.eps=[-0.1]"], "eps -0.1 is outside [0, 1]"),
        (["run", "{study}", "--set", "evaluation.attacks.pgd20.params.steps=0"], "PGD steps must be an integer >= 1"),
        (["run", "{study}", "--set", "evaluation.corruptions.source=cifar10c"], "needs cifar10c_dir"),
    ],
)
def test_bad_input_one_sentence_exit_2(args, expected, study_file, tmp_path, capsys):
    args = [a.replace("{study}", str(study_file)).replace("{tmp}", str(tmp_path)) for a in args] + [
        "--out",
        str(tmp_path / "o"),
    ] * (args[0] == "run")
    code = main(args)
    err = capsys.readouterr().err
    assert code == 2
    assert expected in err
    assert "Traceback" not in err and len(err.strip().splitlines()) <= 3  # argparse adds a usage line
    assert not (tmp_path / "o" / "results.sqlite").exists()  # nothing written before the input is valid


def test_bad_data_folder_leaves_store_unchanged(smoke_run, study_file, tmp_path, capsys):
    out, _, _ = smoke_run
    before = stored(out)
    bad = tmp_path / "data" / "mnist"
    bad.mkdir(parents=True)
    for name in (
        "train-images-idx3-ubyte.gz",
        "train-labels-idx1-ubyte.gz",
        "t10k-images-idx3-ubyte.gz",
        "t10k-labels-idx1-ubyte.gz",
    ):
        (bad / name).write_bytes(b"not a gzip file")
    # A different setting so that cells are not all stored already and data must be read.
    code = main(run_args(study_file, tmp_path / "data", out) + ["--set", "train.lr=0.07"])
    err = capsys.readouterr().err
    assert code == 2 and "corrupt or not the official file" in err and "Traceback" not in err
    assert stored(out) == before


@pytest.mark.parametrize(
    "settings, expected",
    [
        (
            ["evaluation.corruptions.source=cifar10c", "evaluation.corruptions.cifar10c_dir=no/such/folder"],
            "CIFAR-10-C folder no/such/folder not found; download CIFAR-10-C",
        ),
        (["evaluation.occlusion=[40]"], "occlusion size 40 is larger than the 28x28 images"),
    ],
)
def test_bad_evaluation_input_leaves_store_unchanged(settings, expected, smoke_run, study_file, data_dir, capsys):
    out, _, _ = smoke_run
    before = stored(out)
    code = main(run_args(study_file, data_dir, out) + [a for s in settings for a in ("--set", s)])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and "Traceback" not in err
    assert stored(out) == before


def test_invalid_yaml_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain: [unclosed\n")
    assert main(["run", str(bad), "--out", str(tmp_path / "o")]) == 2
    assert "is not valid YAML at line" in capsys.readouterr().err


def test_list_shows_registries(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for name in (
        "mnist",
        "mnist_cnn",
        "clean",
        "spurious",
        "noisy_labels",
        "fgsm_data",
        "global_magnitude",
        "channel_l1",
        "lottery_ticket",
        "fgsm",
    ):
        assert name in out


def test_new_evaluation_reuses_every_trained_model(smoke_run, study_file, data_dir):
    """Changing only what is evaluated re-evaluates cells but trains nothing again."""
    out, _, _ = smoke_run
    ckpts = {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").glob("*.pt")}
    assert any(n.startswith("pruned-") for n in ckpts) and any(n.startswith("lottery-") for n in ckpts)
    proc = cli(*run_args(study_file, data_dir, out), "--set", "evaluation.attacks.fgsm.eps=[0.15]")
    assert "computed 28 cells" in proc.stdout
    csv_out = cli("report", str(out), "--format", "csv").stdout
    assert "acc_adv:fgsm@0.15" in csv_out and "acc_adv:fgsm@0.1," not in csv_out
    after = {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").glob("*.pt")}
    assert after == ckpts


def test_autoattack_and_security_curve_are_stored_and_consistent(smoke_run):
    """The smoke budget runs a one-stage AutoAttack (APGD-CE only) at eps 0.1 and 0.2 and a security
    curve on the same first 25 test images: clean accuracy on them agrees, the sweep never rises."""
    import json

    out, _, _ = smoke_run
    with sqlite3.connect(out / "results.sqlite") as db:
        cells = [(json.loads(a), h) for h, a in db.execute("SELECT hash, axes FROM cells WHERE status = 'done'")]
        metrics = {
            h: dict(db.execute("SELECT metric, value FROM results WHERE hash = ?", (h,)).fetchall()) for _, h in cells
        }
    assert cells
    for _axes, h in cells:
        m = metrics[h]
        assert m["images:autoattack"] == 25 and m["images:curve"] == 25
        clean, a1, a2 = m["acc_adv:autoattack@0"], m["acc_adv:autoattack@0.1"], m["acc_adv:autoattack@0.2"]
        assert a2 <= a1 <= clean
        assert m["acc_curve:Linf@0"] == pytest.approx(clean)  # both are clean accuracy on the same images
        curve = [m[f"acc_curve:Linf@{e}"] for e in ("0", "0.1", "0.2", "0.3")]
        assert curve == sorted(curve, reverse=True)
        assert "check:eps_flat:acc_adv:autoattack@0.2|acc_adv:autoattack@0.1" in m
        assert "check:min_norm:acc_adv:autoattack@0.1|acc_curve:Linf@0.1" in m
        # (a cell of another test's evaluation has FGSM at 0.15 instead of 0.1)
        runs = [m[k] for k in ("acc_adv:fgsm@0.1", "acc_adv:pgd20@0.1", "acc_adv:apgd_ce@0.1") if k in m]
        assert len(runs) >= 2 and m["acc_adv:worst@0.1"] <= min(runs)


def test_robustbench_export_and_security_figures(smoke_run, tmp_path):
    import json

    out, _, _ = smoke_run
    proc = cli("report", str(out), "--robustbench", str(tmp_path / "rb"))
    files = sorted((tmp_path / "rb").glob("*.json"))
    assert f"RobustBench entries: {len(files)} files" in proc.stdout
    assert len(files) == 2 * 28  # every cell at eps 0.1 and 0.2
    entry = json.loads(next(f for f in files if f.name.startswith("clean_Dense_seed_0_autoattack_eps=0.1")).read_text())
    assert entry["dataset"] == "mnist" and entry["eps"] == "0.1" and entry["threat_model"] == "Linf"
    assert entry["n_examples"] == 25 and float(entry["autoattack_acc"]) <= float(entry["clean_acc"])
    cli("report", str(out), "--figures", str(tmp_path / "fig"))
    assert (tmp_path / "fig" / "security_curves.png").stat().st_size > 10000
    bad = cli("report", str(out), "--robustbench", str(out / "results.sqlite"), check=False)
    assert bad.returncode == 2 and "is a file, not a folder" in bad.stderr
