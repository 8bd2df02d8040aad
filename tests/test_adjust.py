"""Parameter adjustment after pruning (Jordão & Pedrini Table 3): Scratch-E, Scratch-B and the
winning ticket put the pruned structure on fresh or rewound weights, exactly; bad input."""

from __future__ import annotations

import pytest
import torch

from robustprune.errors import UserError
from robustprune.pruning import PRUNING_METHODS
from robustprune.pruning.unstructured import prunable_weights
from robustprune.study.cells import expand
from robustprune.study.runner import Progress, Workspace
from robustprune.study.schema import resolve_study


def raw(epochs=2, rewind=2, **entry):
    return {
        "name": "adjust",
        "dataset": "mnist",
        "data": {"train_subset": 600, "test_subset": 100},
        "train": {"epochs": epochs},
        "pruning": {
            "mag": {
                "method": "global_magnitude",
                "sparsities": [0.5],
                "finetune_epochs": [1],
                "adjust": ["finetune", "scratch_e", "scratch_b", "winning_ticket"],
                "rewind_epoch": rewind,
            },
            "st": {
                "method": "structured",
                "sparsities": [0.5],
                "params": {"criterion": "l1"},
                "adjust": ["scratch_e", "winning_ticket"],
                "rewind_epoch": rewind,
            }
            | entry,
        },
        "evaluation": {"attack_subset": 50, "attacks": {"fgsm": {"eps": [0.1]}}},
    }


def test_cells_of_the_schemes():
    cells = expand(resolve_study(raw(), "test"))
    labels = {c.label for c in cells}
    assert "clean / mag s=0.5 ft=1 / seed 0" in labels and "clean / mag s=0.5 scratch_b / seed 0" in labels
    assert "clean / st s=0.5 winning_ticket / seed 0" in labels
    assert "clean / st s=0.5 ft=0 / seed 0" not in labels  # no 'finetune' listed: no fine-tuned cell
    assert len(cells) == 1 + 4 + 2
    ticket = next(c for c in cells if c.axes.get("adjust") == "winning_ticket" and c.axes["pruning"] == "st")
    assert ticket.config["pruning"]["rewind_epoch"] == 2


@pytest.mark.parametrize(
    "change, expected",
    [
        (raw(rewind=3), "rewind_epoch 3 is after the last of the 2 training epochs"),
        (raw(adjust=[]), "needs at least one scheme"),
        (raw(adjust=["scratch"]), "'pruning.st.adjust.0'"),
        (
            raw() | {"pruning": {"c": {"method": "channel_l1", "sparsities": [0.3], "adjust": ["scratch_e"]}}},
            "channel_l1 supports only adjust: [finetune]",
        ),
        (raw() | {"pruning": {"l": {"method": "lottery_ticket", "adjust": ["scratch_e"]}}}, "retrains itself"),
    ],
)
def test_bad_adjust_input(change, expected):
    with pytest.raises(UserError) as e:
        resolve_study(change, "test")
    assert expected in str(e.value)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, data_dir):
    # rewind to the last epoch: the ticket then trains 0 epochs, so its weights can be checked exactly
    study = resolve_study(raw(epochs=2, rewind=2), "test")
    ws = Workspace(study, tmp_path_factory.mktemp("adjust"), data_dir, torch.device("cpu"), Progress())
    return ws, expand(study)


def cell_of(cells, pruning, adjust):
    return next(c for c in cells if c.axes["pruning"] == pruning and c.axes.get("adjust") == adjust)


def test_rewind_weights_are_saved_while_training(workspace):
    ws, cells = workspace
    dense = ws.dense(cells[0].dense_key)
    assert set(dense.rewind) == {2}
    final = dense.model.state_dict()
    assert all(torch.equal(dense.rewind[2][k], final[k].cpu()) for k in final)  # epoch 2 is the last


def test_unstructured_winning_ticket_is_the_masked_rewind_weights(workspace):
    ws, cells = workspace
    dense = ws.dense(cells[0].dense_key)
    model, history = ws.model_of(cell_of(cells, "mag", "winning_ticket"))
    assert history == []  # 2 epochs - rewind epoch 2
    weights = prunable_weights(model)
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    assert zeros == pytest.approx(0.5 * sum(w.numel() for w in weights.values()), abs=2)  # global 50 %
    for name, w in weights.items():
        kept = w.detach() != 0
        assert torch.equal(w.detach()[kept], dense.rewind[2][name][kept]), name


def test_structured_winning_ticket_keeps_the_filters_found_on_the_trained_model(workspace):
    ws, cells = workspace
    dense = ws.dense(cells[0].dense_key)
    model, _ = ws.model_of(cell_of(cells, "st", "winning_ticket"))
    w0 = dense.rewind[2]["conv1.weight"]
    n = w0.shape[0]
    assert model.conv1.out_channels == n - round(0.5 * n)
    # the kept filters are the rewound weights of the filters with the largest L1 norm on the trained model
    trained = dense.model.conv1.weight.detach().abs().flatten(1).sum(1)
    keep = sorted(torch.argsort(trained, descending=True, stable=True)[: model.conv1.out_channels].tolist())
    assert torch.equal(model.conv1.weight.detach(), w0[keep])


def test_scratch_is_freshly_initialised_and_trained(workspace):
    ws, cells = workspace
    dense = ws.dense(cells[0].dense_key)
    e_model, e_hist = ws.model_of(cell_of(cells, "mag", "scratch_e"))
    b_model, b_hist = ws.model_of(cell_of(cells, "mag", "scratch_b"))
    assert len(e_hist) == 2  # as long as the dense model
    assert len(b_hist) == 4  # Scratch-B: twice the dense epochs (Jordão & Pedrini)
    w = e_model.conv1.weight.detach()
    assert (w == 0).any()  # the mask stays applied while training
    assert not torch.equal(w, dense.model.conv1.weight.detach() * (w != 0))
    # the same cell again: the same weights (seeded re-initialisation, cached)
    again, _ = ws.model_of(cell_of(cells, "mag", "scratch_e"))
    assert torch.equal(again.conv1.weight, e_model.conv1.weight)
    assert PRUNING_METHODS.get("global_magnitude").adjustable


# ---- Scratch-B's budget and the rewind point as a share of training ----------------------------------


def two_models(**entry):
    """Two architectures trained 4 and 8 epochs, and one structured entry with a winning ticket."""
    return {
        "name": "rewind",
        "dataset": "mnist",
        "models": {
            "short": {"name": "mnist_cnn", "args": {"conv1": 4}, "train": {"epochs": 4}},
            "long": {"name": "mnist_cnn", "args": {"conv1": 6}, "train": {"epochs": 8}},
        },
        "pruning": {
            "st": {"method": "structured", "sparsities": [0.5], "adjust": ["finetune", "winning_ticket"]} | entry
        },
    }


def test_rewind_fraction_resolves_per_architecture_to_the_cell_of_that_epoch():
    def tickets(raw):
        cells = expand(resolve_study(raw, "test"))
        return {c.axes["model"]: c for c in cells if c.axes.get("adjust") == "winning_ticket"}, cells

    by_fraction, cells = tickets(two_models(rewind_fraction=0.25))
    assert {m: c.config["pruning"]["rewind_epoch"] for m, c in by_fraction.items()} == {"short": 1, "long": 2}
    by_epoch, cells_by_epoch = tickets(two_models(rewind_epoch=1))
    assert by_fraction["short"].hash == by_epoch["short"].hash  # rewinding to the same epoch is the same cell
    assert by_fraction["long"].hash != by_epoch["long"].hash
    others = lambda cs: {c.hash for c in cs if c.axes.get("adjust") != "winning_ticket"}  # noqa: E731
    assert others(cells) == others(cells_by_epoch)


def test_scratch_b_budget_is_in_the_config_of_scratch_b_cells_only():
    raw = two_models(adjust=["finetune", "scratch_e", "scratch_b"], scratch_b="flops")
    cells = expand(resolve_study(raw, "test"))
    budgets = {c.axes.get("adjust"): c.config["pruning"].get("scratch_b") for c in cells if c.config["pruning"]}
    assert budgets == {None: None, "scratch_e": None, "scratch_b": "flops"}
    default = expand(resolve_study(two_models(adjust=["finetune", "scratch_e", "scratch_b"]), "test"))
    assert [c.config["pruning"] and c.config["pruning"].get("scratch_b") for c in default].count("epochs") == 2
    same = lambda cs: {c.hash for c in cs if c.axes.get("adjust") != "scratch_b"}  # noqa: E731
    assert same(cells) == same(default)  # the option names only Scratch-B cells


@pytest.mark.parametrize(
    "entry, expected",
    [
        ({"rewind_epoch": 1, "rewind_fraction": 0.25}, "rewind_epoch 1 and rewind_fraction 0.25 are both given"),
        ({"rewind_fraction": 1.0}, "rewind_fraction 1.0 is outside [0, 1)"),
        ({"rewind_fraction": -0.1}, "rewind_fraction -0.1 is outside [0, 1)"),
        ({"rewind_epoch": 6}, "rewind_epoch 6 is after the last of the 4 training epochs of model 'short'"),
        ({"scratch_b": "steps"}, "'pruning.st.scratch_b'"),
    ],
)
def test_bad_rewind_and_scratch_b_input(entry, expected):
    with pytest.raises(UserError) as e:
        resolve_study(two_models(**entry), "test")
    assert expected in str(e.value)


def test_rewind_fraction_saves_its_epoch_and_scratch_b_flops_keeps_liu_et_al_budget(tmp_path, data_dir):
    from robustprune.metrics.size import size_metrics

    study = resolve_study(
        raw()
        | {
            "pruning": {
                "st": {
                    "method": "structured",
                    "sparsities": [0.5],
                    "params": {"criterion": "l1"},
                    "adjust": ["scratch_b", "winning_ticket"],
                    "rewind_fraction": 0.5,
                    "scratch_b": "flops",
                }
            }
        },
        "test",
    )
    ws = Workspace(study, tmp_path, data_dir, torch.device("cpu"), Progress())
    cells = expand(study)
    key = cells[0].dense_key
    assert ws.rewind_epochs(key) == {1}  # half of the 2 dense epochs
    dense = ws.dense(key)
    assert set(dense.rewind) == {1}
    _, ticket_history = ws.model_of(cell_of(cells, "st", "winning_ticket"))
    assert len(ticket_history) == 1  # from epoch 1 to the end
    model, history = ws.model_of(cell_of(cells, "st", "scratch_b"))
    ex = ws.example_input()
    ratio = size_metrics(dense.model, ex, 1)["flops_nonzero"] / size_metrics(model, ex, 1)["flops_nonzero"]
    assert len(history) == max(1, round(2 * ratio)) and len(history) != 4  # the dense training's FLOPs
