"""Studies of several architectures (`models:`): validation, cells, job planning, and a small
two-architecture study through the CLI with a cross-architecture transfer matrix."""

from __future__ import annotations

import sqlite3
import subprocess
import sys

import pytest
import yaml

from robustprune.errors import UserError
from robustprune.study.cells import expand
from robustprune.study.executor import plan_jobs
from robustprune.study.schema import resolve_study

TWO_MODELS = {
    "name": "two_models",
    "dataset": "mnist",
    "data": {"train_subset": 1000, "test_subset": 300},
    "models": {
        "narrow": {"name": "mnist_cnn", "args": {"conv1": 4, "conv2": 8, "fc": 32}},
        "wide": {"name": "mnist_cnn"},
    },
    "train": {"epochs": 1},
    "finetune": {"lr": 0.01},
    "pruning": {"magnitude": {"method": "global_magnitude", "sparsities": [0.5], "finetune_epochs": [0, 1]}},
    "evaluation": {
        "attack_subset": 100,
        "attacks": {"fgsm": {"eps": [0.1]}},
        "transfer": {
            "attack": "fgsm",
            "models": ["dense", {"pruning": "magnitude", "sparsity": 0.5, "finetune_epochs": 1, "model": "wide"}],
        },
    },
}


def test_an_architecture_may_change_training_and_run_fewer_seeds():
    import copy

    raw = copy.deepcopy(TWO_MODELS) | {"seeds": [0, 1, 2]}
    before = {
        (c.axes["model"], c.axes["pruning"], c.axes["finetune_epochs"], c.axes["seed"]): c.hash
        for c in expand(resolve_study(raw, "test"))
    }
    raw["models"]["wide"] = {"name": "mnist_cnn", "train": {"epochs": 3, "lr": 0.02}, "seeds": [1]}
    cells = expand(resolve_study(raw, "test"))
    after = {(c.axes["model"], c.axes["pruning"], c.axes["finetune_epochs"], c.axes["seed"]): c for c in cells}
    # the narrow model's cells are the same cells; the wide one trains longer, on seed 1 only
    assert {k: c.hash for k, c in after.items() if k[0] == "narrow"} == {
        k: h for k, h in before.items() if k[0] == "narrow"
    }
    wide = [c for c in cells if c.axes["model"] == "wide"]
    assert {c.axes["seed"] for c in wide} == {1} and len(wide) == 3
    assert all(c.config["train"]["epochs"] == 3 and c.config["train"]["lr"] == 0.02 for c in wide)
    assert all(c.hash != before[k] for k, c in after.items() if k[0] == "wide")
    assert all("train" not in c.config["model"] and "seeds" not in c.config["model"] for c in cells)


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"train": {"epochz": 3}}, "model 'wide'.train.epochz: unknown key"),
        ({"train": {"lr": -1}}, "model 'wide'.train.lr: Input should be greater than 0"),
        ({"seeds": [7]}, "model 'wide' runs seeds [7], none of the study's seeds [0]"),
    ],
)
def test_bad_architecture_settings(change, expected):
    import copy

    raw = copy.deepcopy(TWO_MODELS)
    raw["models"]["wide"] |= change
    with pytest.raises(UserError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        resolve_study(raw, "test")


def test_models_axis_cells():
    study = resolve_study(TWO_MODELS, "test")
    cells = expand(study)
    assert len(cells) == 2 * 3  # per architecture: dense + magnitude x (no FT, FT)
    assert {c.axes["model"] for c in cells} == {"narrow", "wide"}
    assert len({c.hash for c in cells}) == len(cells)
    narrow = [c for c in cells if c.axes["model"] == "narrow"]
    assert all(c.dense_key["model"]["args"]["conv1"] == 4 for c in narrow)
    assert "narrow / clean / dense / seed 0" in {c.label for c in cells}


def test_one_model_studies_keep_their_axes_and_hashes(study_file):
    raw = yaml.safe_load(study_file.read_text())
    cells = expand(resolve_study(raw, "test", "full"))
    assert all("model" not in c.axes for c in cells)
    with_models = dict(raw, models={"cnn": raw.get("model", {"name": "mnist_cnn"})})
    with_models.pop("model", None)
    relabelled = expand(resolve_study(with_models, "test", "full"))
    # the same architecture under a label computes the same models: identical hashes
    assert [c.hash for c in relabelled] == [c.hash for c in cells]


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"model": {"name": "mnist_cnn", "args": {"fc": 64}}}, "either 'model' (one architecture) or 'models'"),
        ({"models": {"a": {"name": "mnist_cnn"}, "b": {"name": "mnist_cnn"}}}, "same architecture"),
        ({"models": {"a b": {"name": "mnist_cnn"}}}, "model label 'a b'"),
        ({"models": {"a": {"name": "resnet"}}}, "unknown model 'resnet'"),
        (
            {
                "evaluation": {
                    "attacks": {"fgsm": {"eps": [0.1]}},
                    "transfer": {"attack": "fgsm", "models": ["dense", {"pruning": "dense", "model": "huge"}]},
                }
            },
            "names model 'huge'",
        ),
    ],
)
def test_models_axis_bad_input(change, expected):
    with pytest.raises(UserError) as e:
        resolve_study(TWO_MODELS | change, "test")
    assert expected in str(e.value)


def test_jobs_wait_for_their_dense_models_and_transfer_spans_architectures():
    study = resolve_study(TWO_MODELS, "test")
    cells = expand(study)
    jobs = plan_jobs(cells, study.evaluation.transfer.models)
    by_cell = {c.hash: j for j in jobs for c in j.cells}
    # every selected model (both dense models and the wide FT model) is built by one worker
    selected = [c for c in cells if any(m.matches(c.axes) for m in study.evaluation.transfer.models)]
    assert len(selected) == 3 and len({by_cell[c.hash].id for c in selected}) == 1
    merged = by_cell[selected[0].hash]
    assert merged.cells[0].config["pruning"] is None and merged.after == []
    for job in jobs:
        for c in job.cells:
            if c.config["pruning"] is not None:
                dense = next(d for d in cells if d.config["pruning"] is None and d.axes["model"] == c.axes["model"])
                assert by_cell[dense.hash].id == job.id or by_cell[dense.hash].id in job.after
    # without transfer: one dense job per architecture, each pruned job after its own
    plain = plan_jobs(cells)
    assert sum(1 for j in plain if j.cells[0].config["pruning"] is None) == 2
    assert all(len(j.after) == 1 for j in plain if j.cells[0].config["pruning"] is not None)


@pytest.mark.slow
def test_two_architecture_study_through_the_cli(tmp_path, data_dir):
    study_file = tmp_path / "two.yaml"
    study_file.write_text(yaml.safe_dump(TWO_MODELS))
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "robustprune",
            "run",
            str(study_file),
            "--data-dir",
            str(data_dir),
            "--out",
            str(out),
            "--workers",
            "2",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    text = proc.stdout
    assert "narrow: Dense" in text and "wide: magnitude s=0.5, FT 1 ep" in text
    assert "Source ↓ / target →" in text
    with sqlite3.connect(out / "results.sqlite") as db:
        assert db.execute("SELECT count(*) FROM cells WHERE status = 'done'").fetchone()[0] == 6
        # the narrow dense model is attacked with examples crafted on the wide dense and pruned models
        metrics = {m for (m,) in db.execute("SELECT DISTINCT metric FROM results WHERE axes LIKE '%narrow%'")}
    assert "acc_transfer:fgsm@0.1|wide dense" in metrics
    assert "acc_transfer:fgsm@0.1|wide magnitude s=0.5 ft=1" in metrics
    csv_text = subprocess.run(
        [sys.executable, "-m", "robustprune", "report", str(out), "--format", "csv"],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert csv_text.splitlines()[0].startswith("model,regime,pruning")


def test_a_pruning_entry_can_name_the_architectures_it_prunes():
    raw = TWO_MODELS | {
        "pruning": {
            "magnitude": {
                "method": "global_magnitude",
                "sparsities": [0.5],
                "finetune_epochs": [1],
                "models": ["wide"],
            },
            "l1": {"method": "structured", "sparsities": [0.5]},
        }
    }
    cells = expand(resolve_study(raw, "test"))
    assert sorted((c.axes["model"], c.axes["pruning"]) for c in cells) == [
        ("narrow", "dense"),
        ("narrow", "l1"),
        ("wide", "dense"),
        ("wide", "l1"),
        ("wide", "magnitude"),
    ]
    # naming an entry's architectures does not change what its cells compute
    plain = expand(
        resolve_study(raw | {"pruning": {"magnitude": raw["pruning"]["magnitude"] | {"models": None}}}, "test")
    )
    wide = {c.hash for c in plain if c.axes["model"] == "wide" and c.axes["pruning"] == "magnitude"}
    assert wide == {c.hash for c in cells if c.axes["pruning"] == "magnitude"}


@pytest.mark.parametrize(
    "models, expected",
    [
        (["huge"], "names model 'huge', which is not a label of 'models' (narrow, wide)"),
        (["narrow"], "names model 'wide', which pruning 'm' does not prune (its models: narrow)"),
        ([], "models lists no architecture"),
    ],
)
def test_bad_entry_models(models, expected):
    raw = TWO_MODELS | {
        "pruning": {"m": {"method": "global_magnitude", "sparsities": [0.5], "finetune_epochs": [1], "models": models}}
    }
    raw["evaluation"] = raw["evaluation"] | {
        "transfer": {
            "attack": "fgsm",
            "models": ["dense", {"pruning": "m", "sparsity": 0.5, "finetune_epochs": 1, "model": "wide"}],
        }
    }
    with pytest.raises(UserError) as e:
        resolve_study(raw, "test")
    assert expected in str(e.value)


def test_entry_models_need_a_models_axis(study_file):
    raw = yaml.safe_load(study_file.read_text())
    raw["pruning"]["magnitude"]["models"] = ["cnn"]
    with pytest.raises(UserError) as e:
        resolve_study(raw, "test")
    assert "lists models, but the study has one model; remove 'models'" in str(e.value)


def test_layer_pruning_is_refused_only_for_the_architectures_it_names():
    raw = {
        "name": "t",
        "dataset": "cifar10",
        "models": {"r": {"name": "resnet20"}, "v": {"name": "vgg16_bn"}},
        "pruning": {"layers": {"method": "structured", "sparsities": [0.1], "params": {"target": "blocks"}}},
    }
    with pytest.raises(UserError) as e:
        resolve_study(raw, "test")
    assert "model 'vgg16_bn' has no residual block" in str(e.value) and "entry's 'models'" in str(e.value)
    raw["pruning"]["layers"]["models"] = ["r"]
    assert {c.axes["model"] for c in expand(resolve_study(raw, "test")) if c.axes["pruning"] == "layers"} == {"r"}
