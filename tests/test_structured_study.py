"""The `structured` pruning method in study files: criteria, targets, bad input, and a small
ResNet-20 study on real CIFAR-10 through the CLI."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest
import yaml

from robustprune.errors import UserError
from robustprune.study.cells import expand
from robustprune.study.schema import resolve_study

CIFAR_STUDY = {
    "name": "cifar_structured_tiny",
    "dataset": "cifar10",
    "data": {"train_subset": 512, "test_subset": 200},
    "model": {"name": "resnet20"},
    "train": {"epochs": 1, "batch_size": 128, "lr": 0.1, "augment": "crop_flip"},
    "finetune": {"lr": 0.01},
    "pruning": {
        "pls_filters": {
            "method": "structured",
            "sparsities": [0.3],
            "finetune_epochs": [0, 1],
            "params": {"criterion": "pls", "target": "filters"},
        },
        "l1_both": {
            "method": "structured",
            "sparsities": [0.3],
            "finetune_epochs": [0],
            "params": {"criterion": "l1", "target": "both"},
        },
    },
    "evaluation": {
        "attack_subset": 100,
        "shift_subset": 100,
        "attacks": {"fgsm": {"eps": [0.0313725]}},
        "occlusion": [8],
    },
}


def test_structured_entries_expand_with_their_criterion():
    cells = expand(resolve_study(CIFAR_STUDY, "test"))
    assert len(cells) == 1 + 2 + 1
    pls = [c for c in cells if c.axes["pruning"] == "pls_filters"]
    assert all(c.config["pruning"]["params"]["criterion"] == "pls" for c in pls)
    assert len({c.hash for c in cells}) == 4


@pytest.mark.parametrize(
    "params, expected",
    [
        ({"criterion": "plz"}, "unknown criterion 'plz'; did you mean 'pls'?"),
        ({"criterion": "pls", "target": "layers"}, "'pruning.x.params.target'"),
        ({"criterion": "random", "criterion_params": {"sed": 1}}, "does not accept"),
    ],
)
def test_bad_structured_params(params, expected):
    raw = dict(CIFAR_STUDY, pruning={"x": {"method": "structured", "sparsities": [0.3], "params": params}})
    with pytest.raises(UserError) as e:
        resolve_study(raw, "test")
    assert expected in str(e.value)


def test_iterative_entries_take_only_finetuning():
    raw = dict(
        CIFAR_STUDY,
        pruning={
            "x": {
                "method": "structured",
                "sparsities": [0.3],
                "adjust": ["finetune", "scratch_e"],
                "params": {"criterion": "l1", "rounds": 3},
            }
        },
    )
    with pytest.raises(UserError) as e:
        resolve_study(raw, "test")
    assert "iterative pruning (rounds > 1) fine-tunes after every round, so it takes only adjust: [finetune]" in str(
        e.value
    )
    raw["pruning"]["x"]["adjust"] = ["finetune"]
    cells = expand(resolve_study(raw, "test"))
    assert [
        (c.axes["iteration"], c.config["pruning"]["params"]["rounds"]) for c in cells if c.axes["pruning"] == "x"
    ] == [(1, 3), (2, 3), (3, 3)]


def test_block_pruning_of_a_model_without_blocks_is_refused_before_running():
    raw = dict(
        CIFAR_STUDY,
        model={"name": "vgg16_bn"},
        pruning={"x": {"method": "structured", "sparsities": [0.3], "params": {"target": "blocks"}}},
    )
    with pytest.raises(UserError) as e:
        resolve_study(raw, "test")
    assert "has no residual block with an identity shortcut; use target: filters" in str(e.value)


@pytest.mark.slow
def test_resnet20_structured_study_on_real_cifar10(tmp_path, data_dir):
    if not (data_dir / "cifar10" / "cifar10.npz").exists():
        pytest.skip("real CIFAR-10 not found")
    study_file = tmp_path / "cifar.yaml"
    study_file.write_text(yaml.safe_dump(CIFAR_STUDY))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "robustprune", "run", str(study_file), "--data-dir", str(data_dir), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    with sqlite3.connect(out / "results.sqlite") as db:
        rows = db.execute(
            "SELECT axes, metric, value FROM results WHERE metric IN ('params', 'acc_clean', "
            "'acc_adv:fgsm@0.0313725', 'acc_occlusion@8')"
        ).fetchall()
    import json

    got = {(json.loads(a)["pruning"], json.loads(a)["finetune_epochs"], m): v for a, m, v in rows}
    dense = got[("dense", 0, "params")]
    assert 260_000 < dense < 290_000  # ResNet-20
    # 30 % of every group of coupled filters: about half the weights go (both in and out channels shrink)
    assert 0.35 * dense < got[("pls_filters", 0, "params")] < 0.65 * dense
    # blocks first, then filters: smaller still
    assert got[("l1_both", 0, "params")] < got[("pls_filters", 0, "params")]
    for key, v in got.items():
        if key[2].startswith("acc_"):
            assert 0.0 <= v <= 1.0
    assert "pls_filters s=0.3, FT 1 ep" in proc.stdout


@pytest.mark.slow
def test_cifar_study_smoke_budget_through_the_cli(tmp_path, data_dir):
    if not (data_dir / "cifar10" / "cifar10.npz").exists():
        pytest.skip("real CIFAR-10 not found")
    from conftest import REPO_ROOT

    study_file = REPO_ROOT / "studies" / "cifar_structured_pruning_robustness.yaml"
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "robustprune",
            "run",
            str(study_file),
            "--budget",
            "smoke",
            "--data-dir",
            str(data_dir),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    # the Jordão & Pedrini layout, CIFAR eps written as k/255, the transfer matrix
    for label in (
        "Gain over the unpruned network (regime 'clean')",
        "Semantic",
        "Occlusion",
        "FGSM ε=8/255",
        "resnet20: pls_layers s=0.1, FT 1 ep",
        "resnet20: kl_filters s=0.1, FT 1 ep",
        "resnet20: pls_filters s=0.1, Scratch-B",
        "resnet20: pls_filters s=0.1, W-ticket",
        "Source ↓ / target →",
        "Attack strength: FGSM",
        "resnet20: pls_filters_iterative s=0.1, FT 1 ep, iteration 2",
        "Training dynamics: Gradient confusion",
        "Per-layer widths (resnet20, regime 'clean', part 1 of 2)",
    ):
        assert label in text, label
    with sqlite3.connect(out / "results.sqlite") as db:
        # dense + pls_filters x (no FT, FT, Scratch-E, Scratch-B, W-ticket) + 6 other entries with FT
        # + 2 iterations of pls_filters_iterative
        assert db.execute("SELECT count(*) FROM cells WHERE status = 'done'").fetchone()[0] == 15
        params = dict(
            db.execute(
                "SELECT json_extract(axes, '$.pruning') || ':' || json_extract(axes, "
                "'$.finetune_epochs'), value FROM results WHERE metric = 'params'"
            ).fetchall()
        )
    assert params["pls_layers:1"] < params["dense:0"] and params["pls_both:1"] < params["pls_filters:1"]
    with sqlite3.connect(out / "results.sqlite") as db:
        latency = [v for (v,) in db.execute("SELECT value FROM results WHERE metric = 'latency_ms'")]
    assert len(latency) == 15 and all(v > 0 for v in latency)
    assert "Latency (ms)" in text
    # Algorithm 2 on the dense model: 8 sampled filters, fractions per attack and tolerance
    assert "Single-element removal (regime 'clean')" in text
    with sqlite3.connect(out / "results.sqlite") as db:
        single = dict(db.execute("SELECT metric, value FROM results WHERE metric LIKE 'single:%'").fetchall())
    assert single["single:filters:elements"] == 8
    fractions = [v for m, v in single.items() if "|t=" in m]
    assert len(fractions) == 2 * 6 and all(0.0 <= v <= 1.0 for v in fractions)
    fgsm = [single[f"single:filters:acc_adv:fgsm@0.0313725|t={t}"] for t in range(6)]
    assert fgsm == sorted(fgsm)  # a larger tolerance admits at least as many elements


@pytest.mark.parametrize(
    "single, expected",
    [
        ({"max_elements": 0}, "'evaluation.single_element.max_elements'"),
        ({"kind": "layers"}, "'evaluation.single_element.kind'"),
        ({"images": 0}, "'evaluation.single_element.images'"),
    ],
)
def test_bad_single_element_settings(single, expected):
    raw = dict(CIFAR_STUDY, evaluation=CIFAR_STUDY["evaluation"] | {"single_element": single})
    with pytest.raises(UserError) as e:
        resolve_study(raw, "test")
    assert expected in str(e.value)


@pytest.mark.parametrize("budget, cells", [("full", 39), ("smoke", 15), ("cpu", 15)])  # full: 8 cells of ResNet-50
def test_every_budget_of_the_cifar_study_is_valid(budget, cells):
    from conftest import REPO_ROOT

    from robustprune.study.schema import load_study

    study = load_study(REPO_ROOT / "studies" / "cifar_structured_pruning_robustness.yaml", budget)
    assert len(expand(study)) == cells
    assert study.train.dynamics and study.finetune.dynamics


def test_iterations_are_cells_chained_in_one_job():
    from robustprune.study.executor import plan_jobs

    raw = dict(
        CIFAR_STUDY,
        pruning={
            "it": {
                "method": "structured",
                "sparsities": [0.2],
                "finetune_epochs": [0, 1],
                "params": {"criterion": "l1", "rounds": 3},
            }
        },
    )
    cells = expand(resolve_study(raw, "test"))
    its = [c for c in cells if c.axes["pruning"] == "it"]
    assert sorted((c.axes["finetune_epochs"], c.axes["iteration"]) for c in its) == [
        (0, 1),
        (0, 2),
        (0, 3),
        (1, 1),
        (1, 2),
        (1, 3),
    ]
    assert "clean / it s=0.2 ft=1 it=2 / seed 0" in {c.label for c in its}
    jobs = [j for j in plan_jobs(cells) if j.cells[0].axes["pruning"] == "it"]
    assert len(jobs) == 2  # one chain per fine-tuning setting, iterations in order
    for j in jobs:
        assert [c.axes["iteration"] for c in j.cells] == [1, 2, 3] and len(j.after) == 1


ITERATIVE_STUDY = dict(
    CIFAR_STUDY,
    name="cifar_iterative_tiny",
    train=CIFAR_STUDY["train"] | {"dynamics": True},
    finetune={"lr": 0.01, "dynamics": True},
    pruning={
        "it": {
            "method": "structured",
            "sparsities": [0.2],
            "finetune_epochs": [1],
            "params": {"criterion": "pls", "target": "filters", "rounds": 2},
        }
    },
    evaluation={"attack_subset": 100, "shift_subset": 100, "attacks": {"fgsm": {"eps": [0.0313725]}}},
)


@pytest.mark.slow
def test_iterative_pruning_dynamics_and_widths_through_the_cli(tmp_path, data_dir):
    import json

    from conftest import run_cli, stored_results

    if not (data_dir / "cifar10" / "cifar10.npz").exists():
        pytest.skip("real CIFAR-10 not found")
    study_file = tmp_path / "it.yaml"
    study_file.write_text(yaml.safe_dump(ITERATIVE_STUDY))
    out = tmp_path / "out"
    run = ("run", study_file, "--data-dir", data_dir, "--out", out)
    proc = run_cli(*run)
    assert proc.returncode == 0, proc.stderr
    report = run_cli("report", out, "--format", "markdown").stdout
    for label in (
        "it s=0.2, FT 1 ep, iteration 2",
        "Training dynamics: Gradient confusion (regime 'clean')",
        "Training dynamics: Layer rotation (regime 'clean')",
        "Per-layer widths (regime 'clean')",
        "| Layer | Dense | it s=0.2 it1 | it s=0.2 it2 |",
        "| stem.conv | 16 | 13 | 10 |",
    ):
        assert label in report, label
    first = stored_results(out, key=lambda axes: axes.get("iteration"))
    with sqlite3.connect(out / "results.sqlite") as db:
        hist = {json.loads(a).get("iteration"): json.loads(h) for a, h in db.execute("SELECT axes, history FROM cells")}
    dense = first[(None, "width:stem.conv")]
    assert (
        dense == 16 and first[(1, "width:stem.conv")] == 13 and first[(2, "width:stem.conv")] == 10
    )  # 20 % of what remains
    assert first[(2, "params")] < first[(1, "params")] < first[(None, "params")]
    assert [(e["iteration"], e["epoch"]) for e in hist[2]] == [(1, 1), (2, 1)]  # iteration 1's fine-tuning, then 2's
    assert all("grad_confusion" in e and "layer_rotation" in e for h in hist.values() for e in h)
    # a new store over the same checkpoints: every model comes from the cache, the pruned ones
    # rebuilt by replaying the stored scores, with identical numbers
    for f in out.glob("results.sqlite*"):
        f.unlink()
    ckpts = {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").iterdir()}
    assert run_cli(*run).returncode == 0
    assert {p.name: p.stat().st_mtime_ns for p in (out / "checkpoints").iterdir()} == ckpts  # nothing retrained
    again = stored_results(out, key=lambda axes: axes.get("iteration"))
    assert {k: v for k, v in again.items() if k[1] != "latency_ms"} == {
        k: v for k, v in first.items() if k[1] != "latency_ms"
    }


def test_retraining_cells_are_planned_as_long_jobs():
    from robustprune.study.executor import plan_jobs

    raw = dict(
        CIFAR_STUDY,
        train=CIFAR_STUDY["train"] | {"epochs": 10},
        pruning={
            "p": {
                "method": "structured",
                "sparsities": [0.5],
                "finetune_epochs": [2],
                "adjust": ["finetune", "scratch_e", "scratch_b", "winning_ticket"],
                "rewind_epoch": 4,
                "params": {"criterion": "l1"},
            }
        },
    )
    jobs = plan_jobs(expand(resolve_study(raw, "test")))
    cost = {
        (j.cells[0].axes.get("adjust") or f"ft{j.cells[0].axes['finetune_epochs']}"): j.cost
        for j in jobs
        if j.cells[0].config["pruning"] is not None
    }
    # longest first: Scratch-B (10 epochs x 2 for half the FLOPs) > Scratch-E (10) > W-ticket (6) > FT (2)
    assert cost["scratch_b"] > cost["scratch_e"] > cost["winning_ticket"] > cost["ft2"]
    assert cost["scratch_e"] == pytest.approx(10 * 0.75 + 0.3) and cost["ft2"] == pytest.approx(2 * 0.75 + 0.3)
