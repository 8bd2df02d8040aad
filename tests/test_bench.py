"""`robustprune bench`: the evaluation section at a tiny scale, its JSON figures and its errors."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
import yaml

from robustprune.bench import STUDY_CNN_ARGS
from robustprune.cli import main

# a few seconds instead of minutes: 2000 training, 500 attacked and 200 corrupted images
TINY = ["--train-images", "2000", "--eval-images", "500", "--corruption-images", "200"]


def bench(tmp_path, data_dir, *extra: str) -> tuple[int, dict | None]:
    out = tmp_path / "figures.json"
    code = main(["bench", "--section", "evaluation", "--data-dir", str(data_dir), "--json", str(out), *TINY, *extra])
    return code, json.loads(out.read_text()) if out.exists() else None


def test_bench_model_is_the_studys_cnn(study_file):
    assert yaml.safe_load(study_file.read_text())["model"] == {"name": "mnist_cnn", "args": STUDY_CNN_ARGS}


def test_evaluation_section_figures(tmp_path, data_dir, capsys):
    code, figures = bench(tmp_path, data_dir)
    out = capsys.readouterr().out
    assert code == 0
    assert "torchattacks" in out and "ratio" in out and "slowest" in out
    assert "fp32 matmul peak" not in out  # the training section did not run
    pgd = figures["evaluation"]["pgd"]
    assert pgd["images"] == 500 and pgd["steps"] == 20 and pgd["eps"] == 0.1
    assert pgd["robustprune_images_per_s"] > 0 and pgd["torchattacks_images_per_s"] > 0
    assert pgd["ratio"] == pytest.approx(pgd["robustprune_images_per_s"] / pgd["torchattacks_images_per_s"])
    # the same trajectory (no random start), but ours keeps the first iterate that breaks a point
    assert pgd["torchattacks_accuracy"] - 0.02 <= pgd["robustprune_accuracy"] <= pgd["torchattacks_accuracy"] + 1e-9
    # trained, so the attack has something to lower
    assert pgd["robustprune_accuracy"] < figures["evaluation"]["model"]["clean_accuracy"]
    corr = figures["evaluation"]["corruptions"]
    assert corr["n"] == 200 and len(corr["per_corruption_seconds"]) == 15 and corr["total_seconds"] > 0
    assert figures["threads"] >= 1


def test_without_torchattacks_the_rest_still_runs(tmp_path, data_dir, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "torchattacks", None)  # makes `import torchattacks` fail
    code, figures = bench(tmp_path, data_dir)
    assert code == 0
    assert "pip install --no-deps torchattacks" in figures["evaluation"]["pgd"]["skipped"]
    assert figures["evaluation"]["corruptions"]["total_seconds"] > 0
    assert "pip install --no-deps torchattacks" in capsys.readouterr().out


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--data-dir", "{tmp}/nothing"], "needs MNIST, which is not in"),
        (["--eval-images", "0"], "--eval-images must be at least 1"),
        (["--json", "{tmp}/no/such/folder/f.json"], "does not exist"),
    ],
)
def test_bad_input_one_sentence_exit_2(args, expected, tmp_path, data_dir, capsys):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code = main(["bench", "--section", "evaluation", "--data-dir", str(data_dir), *args])
    captured = capsys.readouterr()
    assert code == 2
    assert expected in captured.err
    assert "Traceback" not in captured.err and len(captured.err.strip().splitlines()) == 1
    assert "images/s" not in captured.out  # nothing was measured before the error


def test_training_section_reports_throughput_against_peak(capsys):
    assert main(["bench", "--section", "training", "--seconds", "0.3"]) == 0
    out = capsys.readouterr().out
    assert "fp32 matmul peak" in out and "images/s" in out and "achieved / peak" in out
    peak = float(out.split("fp32 matmul peak (2048x2048)")[1].split("GFLOP/s")[0].strip(" │|").replace(",", ""))
    assert peak > 0


def test_resnet20_section_trains_the_fast_recipe_on_real_cifar10(tmp_path, data_dir, capsys):
    from robustprune.bench_cifar import FAST_RESNET20

    if not (data_dir / "cifar10" / "cifar10.npz").exists():
        pytest.skip("real CIFAR-10 not found")
    out = tmp_path / "r.json"
    code = main(
        [
            "bench",
            "--section",
            "resnet20",
            "--data-dir",
            str(data_dir),
            "--epochs",
            "1",
            "--train-images",
            "512",
            "--json",
            str(out),
        ]
    )
    text = capsys.readouterr().out
    assert code == 0
    r = json.loads(out.read_text())["resnet20"]
    assert r["epochs"] == 1 and r["train_images"] == 512 and r["images_per_s"] > 0
    assert 0.0 <= r["test_accuracy"] <= 1.0 and r["train_seconds"] > 0
    assert r["recipe"] == FAST_RESNET20.model_copy(update={"epochs": 1}).model_dump()
    assert "epoch 1/1" in text and "test accuracy" in text
    assert "fp32 matmul peak" not in text  # only the section asked for


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--epochs", "0"], "--epochs must be at least 1"),
        (["--data-dir", "{tmp}"], "the resnet20 section needs CIFAR-10, which is not in"),
    ],
)
def test_resnet20_section_bad_input(args, expected, tmp_path, data_dir, capsys):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    code = main(["bench", "--section", "resnet20", "--data-dir", str(data_dir), *args])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1


def test_pruning_speed_and_step_throughput_measure_real_work():
    from robustprune.bench_cifar import pruning_speed, step_throughput

    speed = pruning_speed(repeats=1)
    # measured, and finite (no bound on the time itself: that would depend on the machine's load)
    assert set(speed) == {"filters", "blocks", "both"} and all(0 < v < math.inf for v in speed.values())
    assert step_throughput("resnet20", "fp32", torch.device("cpu"), batch_size=8, steps=1) > 0


def test_attacks_section_compares_with_the_reference(tmp_path, data_dir, capsys):
    out = tmp_path / "attacks.json"
    code = main(
        [
            "bench",
            "--section",
            "attacks",
            "--data-dir",
            str(data_dir),
            "--json",
            str(out),
            "--train-images",
            "2000",
            "--eval-images",
            "40",
            "--autoattack-images",
            "8",
        ]
    )
    text = capsys.readouterr().out
    assert code == 0 and "AutoAttack standard eps 0.3" in text and "speed-up (target >= 3)" in text
    figures = json.loads(out.read_text())["attacks"]
    assert set(figures) == {"clean eps=0.3", "clean eps=0.1", "adversarially trained eps=0.3", "robust_training"}
    for case in ("clean eps=0.3", "clean eps=0.1", "adversarially trained eps=0.3"):
        aa, pgd = figures[case]["autoattack"], figures[case]["pgd"]
        assert aa["images"] == 8 and pgd["images"] == 40
        assert aa["speedup"] == pytest.approx(aa["reference_seconds"] / aa["robustprune_seconds"])
        assert set(aa["robustprune_stage_seconds"]) == {"apgd_ce", "apgd_t", "fab_t", "square"}
        # the same images: no more points left standing than by the reference (one image of slack)
        assert aa["robustprune_accuracy"] <= aa["reference_accuracy"] + 1 / 8 + 1e-9
        assert pgd["robustprune_accuracy"] <= pgd["torchattacks_accuracy"] + 1e-9


def test_attacks_section_refuses_a_bad_size(tmp_path, data_dir, capsys):
    assert main(["bench", "--section", "attacks", "--data-dir", str(data_dir), "--autoattack-images", "0"]) == 2
    assert "--autoattack-images must be at least 1" in capsys.readouterr().err
