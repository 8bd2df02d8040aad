"""What a study records besides accuracy: training dynamics per epoch (TrainConfig.dynamics),
per-layer widths, the criterion scores that rebuild a cached pruned model, and the report tables
built from them."""

from __future__ import annotations

import copy

import pytest
import torch

from robustprune import checkpoint
from robustprune.metrics.size import layer_widths
from robustprune.pruning.criteria import build_criterion
from robustprune.pruning.criteria.replay import Recording, Replay
from robustprune.pruning.structured import prune_structured_
from robustprune.report.training import dynamics_tables, shown_epochs, widths_tables
from robustprune.study.schema import resolve_study
from robustprune.train import TrainConfig, train


def tiny_data(n=96):
    from conftest import random_mnist

    return random_mnist(n)


def test_dynamics_are_recorded_per_epoch_without_changing_training(tiny_cnn):
    x, y = tiny_data()
    plain, probed = copy.deepcopy(tiny_cnn), copy.deepcopy(tiny_cnn)
    h0 = train(plain, x, y, TrainConfig(epochs=2, batch_size=32), seed=3)
    h1 = train(probed, x, y, TrainConfig(epochs=2, batch_size=32, dynamics=True), seed=3)
    assert [e["loss"] for e in h0] == [e["loss"] for e in h1]
    for p0, p1 in zip(plain.state_dict().values(), probed.state_dict().values()):
        assert torch.equal(p0, p1)  # the probe has no side effect on weights, BN statistics or RNG streams
    assert "grad_confusion" not in h0[0]
    for e in h1:
        assert 0.0 <= e["grad_confusion"] <= 2.0 and -1.0 <= e["grad_cos_min"] <= 1.0
        assert 0.0 < e["layer_rotation"] <= 2.0  # the weights moved away from where training started
    assert h1[1]["layer_rotation"] > h1[0]["layer_rotation"]  # and keep moving


def test_layer_widths_follow_structured_pruning(tiny_cnn):
    before = layer_widths(tiny_cnn)
    assert before == {"width:conv1": 4.0, "width:conv2": 6.0, "width:fc1": 8.0, "width:fc2": 10.0}
    prune_structured_(tiny_cnn, build_criterion("l1"), 0.5, torch.zeros(1, 1, 28, 28))
    after = layer_widths(tiny_cnn)
    assert after["width:conv1"] == 2.0 and after["width:conv2"] == 3.0
    assert after["width:fc2"] == 10.0  # the classifier is never pruned


def test_recorded_scores_survive_a_weights_only_checkpoint_and_replay_exactly(tmp_path, tiny_cnn):
    x, y = tiny_data(64)
    xf = x.float() / 255
    first, second = copy.deepcopy(tiny_cnn), copy.deepcopy(tiny_cnn)
    recording = Recording(build_criterion("pls"))
    prune_structured_(first, recording, 0.5, xf[:1], x=xf, y=y)
    checkpoint.save({"recordings": [recording.state()]}, tmp_path / "r.pt")
    state = checkpoint.load(tmp_path / "r.pt")["recordings"][0]  # torch.load(weights_only=True)
    prune_structured_(second, Replay(state), 0.5, xf[:1])  # no data: the criterion does not run again
    assert layer_widths(first) == layer_widths(second)
    for (k, a), b in zip(first.state_dict().items(), second.state_dict().values()):
        assert torch.equal(a, b), k  # the same filters went


@pytest.mark.parametrize(
    "n, expected",
    [(1, [1]), (8, list(range(1, 9))), (15, [1, 3, 5, 7, 9, 11, 13, 15]), (200, [1, 29, 58, 86, 115, 143, 172, 200])],
)
def test_shown_epochs(n, expected):
    assert shown_epochs(n) == expected


STUDY = {
    "name": "t",
    "dataset": "cifar10",
    "model": {"name": "resnet20"},
    "pruning": {
        "l1": {"method": "structured", "sparsities": [0.5], "finetune_epochs": [2]},
        "mag": {"method": "global_magnitude", "sparsities": [0.5], "finetune_epochs": [2]},
    },
}


def cell(pruning: str, seed: int, history: list[dict], widths: dict[str, float]) -> dict:
    axes = {
        "regime": "clean",
        "pruning": pruning,
        "method": None,
        "sparsity": 0.0 if pruning == "dense" else 0.5,
        "finetune_epochs": 0 if pruning == "dense" else 2,
        "round": None,
        "seed": seed,
    }
    return {
        "axes": axes,
        "metrics": {"acc_clean": 0.9, **{f"width:{k}": v for k, v in widths.items()}},
        "status": "done",
        "error": None,
        "hash": f"{pruning}{seed}",
        "history": history,
    }


def hist(*losses, dyn=True):
    return [
        {"epoch": i + 1, "loss": v, **({"grad_confusion": v / 10, "layer_rotation": 0.1 * (i + 1)} if dyn else {})}
        for i, v in enumerate(losses)
    ]


DENSE_W = {"stem.conv": 16, "layer1.0.body.conv1": 16, "fc": 10}


def test_dynamics_tables_rows_columns_and_seed_statistics():
    study = resolve_study(STUDY, "t")
    cells = [
        cell("dense", 0, hist(2.0, 1.0, 0.5), DENSE_W),
        cell("dense", 1, hist(2.2, 1.2, 0.7), DENSE_W),
        cell("l1", 0, hist(0.6, 0.4), {"stem.conv": 8, "fc": 10}),
        cell("mag", 0, hist(0.5, 0.3), DENSE_W),
    ]
    loss, confusion, rotation = dynamics_tables(study, cells, "clean")
    assert loss.title == "Training dynamics: Training loss (regime 'clean')"
    assert loss.headers == ["Setting", "Ep 1", "Ep 2", "Ep 3"]
    assert loss.rows[0] == ["Dense", "2.1000 ± 0.1414", "1.1000 ± 0.1414", "0.6000 ± 0.1414"]
    assert loss.rows[1] == ["l1 s=0.5, FT 2 ep", "0.6000", "0.4000", "—"]  # fine-tuning ran 2 epochs
    assert confusion.rows[0][1] == "0.2100 ± 0.0141" and rotation.rows[2][2] == "0.2000"
    assert "Fig. 2" in loss.caption and "2 seeds" in loss.caption


def test_no_dynamics_table_when_the_study_did_not_ask_for_them():
    study = resolve_study(STUDY, "t")
    assert dynamics_tables(study, [cell("dense", 0, hist(2.0, 1.0, dyn=False), DENSE_W)], "clean") == []


def test_widths_table_shows_layers_and_only_settings_that_changed_them():
    study = resolve_study(STUDY, "t")
    cells = [cell("dense", 0, [], DENSE_W), cell("l1", 0, [], {"stem.conv": 8, "fc": 10}), cell("mag", 0, [], DENSE_W)]
    (t,) = widths_tables(study, cells, "clean")
    assert t.headers == ["Layer", "Dense", "l1 s=0.5"]  # magnitude pruning leaves every width
    assert t.rows == [["stem.conv", "16", "8"], ["layer1.0.body.conv1", "16", "—"], ["fc", "10", "10"]]
    assert widths_tables(study, [cells[0], cells[2]], "clean") == []  # nothing structural to show


def test_widths_tables_split_many_settings_and_keep_iterations_apart():
    raw = dict(
        STUDY,
        pruning={f"e{i}": {"method": "structured", "sparsities": [0.5], "finetune_epochs": [2]} for i in range(7)}
        | {"it": {"method": "structured", "sparsities": [0.5], "finetune_epochs": [2], "params": {"rounds": 2}}},
    )
    study = resolve_study(raw, "t")
    cells = [cell("dense", 0, [], DENSE_W)]
    for i in range(7):
        cells.append(cell(f"e{i}", 0, [], {"stem.conv": 8 + i, "fc": 10}))
    for it, w in ((1, 12), (2, 9)):
        c = cell("it", 0, [], {"stem.conv": w, "fc": 10})
        c["axes"]["iteration"] = it
        cells.append(c)
    first, second = widths_tables(study, cells, "clean")
    assert first.title.endswith("part 1 of 2)") and second.title.endswith("part 2 of 2)")
    assert first.headers == ["Layer", "Dense", "e0 s=0.5", "e1 s=0.5", "e2 s=0.5", "e3 s=0.5", "e4 s=0.5", "e5 s=0.5"]
    assert second.headers == ["Layer", "Dense", "e6 s=0.5", "it s=0.5 it1", "it s=0.5 it2"]
    assert second.rows[0] == ["stem.conv", "16", "14", "12", "9"]


def test_plan_table_lists_mrs_and_ratios_per_group():
    from robustprune.report.training import plan_tables

    raw = dict(STUDY, pruning={"m": {"method": "mrpf", "sparsities": [0.5], "finetune_epochs": [2]}})
    study = resolve_study(raw, "t")
    cells = []
    for seed, scale in ((0, 1.0), (1, 3.0)):
        c = cell("m", seed, [], {"stem.conv": 8})
        c["metrics"] |= {
            "mrs:stem.conv": 0.1 * scale,
            "ratio:stem.conv": 0.4,
            "mrs:layer1.0.body.conv1": 0.02,
            "ratio:layer1.0.body.conv1": 0.6,
        }
        cells.append(c)
    (t,) = plan_tables(study, [cell("dense", 0, [], DENSE_W), *cells], "clean")
    assert t.headers == ["Group (first layer)", "MRS", "ratio m s=0.5"]  # one MRS column: no setting named
    assert t.rows == [["stem.conv", "0.2000 ± 0.1414", "0.400"], ["layer1.0.body.conv1", "0.0200", "0.600"]]


def test_plan_table_merges_equal_columns_and_keeps_different_ones():
    from robustprune.report.training import plan_tables

    raw = dict(
        STUDY, pruning={p: {"method": "mrpf", "sparsities": [0.3, 0.5], "finetune_epochs": [2]} for p in ("a", "b")}
    )
    study = resolve_study(raw, "t")
    cells = []
    for p in ("a", "b"):
        for s in (0.3, 0.5):
            c = cell(p, 0, [], {"stem.conv": 8})
            c["axes"]["sparsity"] = s
            c["metrics"] |= {"mrs:stem.conv": 0.1 if p == "a" else 0.3, "ratio:stem.conv": s}
            cells.append(c)
    (t,) = plan_tables(study, [cell("dense", 0, [], DENSE_W), *cells], "clean")
    assert t.headers == [
        "Group (first layer)",
        "MRS a s=0.3 and 1 more alike",
        "ratio a s=0.3 and 1 more alike",
        "ratio a s=0.5 and 1 more alike",
        "MRS b s=0.3 and 1 more alike",
    ]
    assert t.rows == [["stem.conv", "0.1000", "0.300", "0.500", "0.3000"]]
