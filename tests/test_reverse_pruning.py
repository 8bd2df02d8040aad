"""Reverse pruning, the high-magnitude penalty and the weight statistics (reverse-pruning paper),
on hand-made tensors and models whose answers are known."""

import math

import pytest
import torch
from torch import nn

from robustprune.errors import UserError
from robustprune.metrics.weights import layer_bound, quantiles, weight_statistics
from robustprune.pruning import PRUNING_METHODS
from robustprune.pruning.unstructured import magnitude_masks, reverse_threshold
from robustprune.train import MagnitudePenalty, TrainConfig, magnitude_penalty, train


class TwoLayers(nn.Module):
    def __init__(self, w1: list[float], w2: list[float]):
        super().__init__()
        self.a = nn.Linear(len(w1), 1, bias=False)
        self.b = nn.Linear(len(w2), 1, bias=False)
        with torch.no_grad():
            self.a.weight.copy_(torch.tensor([w1]))
            self.b.weight.copy_(torch.tensor([w2]))


def test_reverse_pruning_removes_exactly_the_largest_weights_globally():
    model = TwoLayers([0.1, -0.9, 0.3, 0.05], [-0.5, 0.2, 0.7, -0.01])
    method = PRUNING_METHODS.get("reverse_magnitude")()
    masks = method.prune(model, 0.25, None, method.Params())  # 2 of 8 weights: |-0.9| and |0.7|
    assert model.a.weight.tolist() == [[pytest.approx(0.1), 0.0, pytest.approx(0.3), pytest.approx(0.05)]]
    assert model.b.weight.tolist() == [[-0.5, pytest.approx(0.2), 0.0, pytest.approx(-0.01)]]
    assert int(sum((~m).sum() for m in masks.values())) == 2


def test_reverse_pruning_per_layer_removes_each_layers_share():
    model = TwoLayers([0.1, -0.9, 0.3, 0.05], [-0.5, 0.2, 0.7, -0.01])
    method = PRUNING_METHODS.get("reverse_magnitude")()
    method.prune(model, 0.5, None, method.Params(scope="layer"))  # 2 per layer
    assert (model.a.weight == 0).tolist() == [[False, True, True, False]]
    assert (model.b.weight == 0).tolist() == [[True, False, True, False]]


def test_conventional_and_reverse_masks_are_complements_at_half():
    torch.manual_seed(0)
    model = TwoLayers(torch.randn(50).tolist(), torch.randn(30).tolist())
    small = magnitude_masks(model, 0.5, "global", largest=False)
    large = magnitude_masks(model, 0.5, "global", largest=True)
    for name in small:  # distinct magnitudes: each weight is removed by exactly one of the two
        assert torch.equal(small[name], ~large[name])


def test_reverse_threshold_is_the_largest_kept_magnitude():
    model = TwoLayers([0.1, -0.9, 0.3, 0.05], [-0.5, 0.2, 0.7, -0.01])
    assert reverse_threshold(model, 0.25) == pytest.approx(0.5)  # 0.9 and 0.7 go, 0.5 is the largest left
    assert reverse_threshold(model, 0.0) == pytest.approx(0.9)


def test_penalty_is_zero_below_tau_and_has_the_right_gradient_above():
    w = torch.tensor([0.1, -0.2, 0.5, -0.8, 0.3], requires_grad=True)
    value = magnitude_penalty([w], 0.3)
    assert value.item() == pytest.approx(0.2**2 + 0.5**2)
    value.backward()
    # d/dw max(|w| - tau, 0)^2 = 2 (|w| - tau) sign(w) above tau, 0 inside [-tau, tau]
    assert w.grad.tolist() == pytest.approx([0.0, 0.0, 0.4, -1.0, 0.0])
    inside = torch.tensor([0.1, -0.29, 0.3], requires_grad=True)
    magnitude_penalty([inside], 0.3).backward()
    assert magnitude_penalty([inside], 0.3).item() == 0.0 and inside.grad.abs().sum() == 0


def test_training_with_the_penalty_shrinks_the_large_weights_only():
    torch.manual_seed(0)
    x, y = torch.rand(64, 4), torch.randint(0, 2, (64,))

    def fit(penalty):
        model = nn.Sequential(nn.Linear(4, 2))
        with torch.no_grad():
            model[0].weight.copy_(torch.tensor([[2.0, 0.05, -3.0, 0.1], [0.02, -0.04, 0.03, 1.5]]))
        cfg = TrainConfig(
            epochs=3,
            batch_size=16,
            lr=0.05,
            momentum=0.0,
            weight_decay=0.0,
            schedule="constant",
            magnitude_penalty=penalty,
        )
        train(model, x, y, cfg, seed=0)
        return model[0].weight.detach()

    plain, penalised = fit(None), fit(MagnitudePenalty(weight=1.0, threshold=0.5))
    assert penalised.abs().max() < plain.abs().max() - 0.5
    small = torch.tensor([[False, True, False, True], [True, True, True, False]])
    assert torch.allclose(penalised[small], plain[small], atol=0.02)  # below tau the penalty does nothing


@pytest.mark.parametrize(
    "kwargs",
    [
        {"weight": 1.0},
        {"weight": 1.0, "threshold": 0.1, "threshold_from_reverse": 0.1},
        {"weight": 0.0, "threshold": 0.1},
        {"weight": 1.0, "threshold_from_reverse": 1.5},
    ],
)
def test_bad_penalties_are_refused(kwargs):
    with pytest.raises(ValueError):
        MagnitudePenalty(**kwargs)


def test_threshold_from_reverse_needs_a_dense_model():
    from robustprune.study.schema import resolve_study

    raw = {"name": "t", "train": {"magnitude_penalty": {"weight": 1.0, "threshold_from_reverse": 0.1}}}
    with pytest.raises(UserError, match="works only when fine-tuning"):
        resolve_study(raw, "t")
    cfg = TrainConfig(epochs=1, magnitude_penalty={"weight": 1.0, "threshold_from_reverse": 0.1})
    with pytest.raises(UserError, match="needs the dense model"):
        train(nn.Linear(2, 2), torch.rand(4, 2), torch.tensor([0, 1, 0, 1]), cfg, seed=0)


# ---- weight statistics -------------------------------------------------------------------------


def test_quantiles_match_numpy():
    import numpy as np

    v = torch.randn(1001)
    assert quantiles(v) == pytest.approx(np.quantile(v.double().numpy(), [0, 0.25, 0.5, 0.75, 1.0]).tolist())


def test_weight_statistics_of_a_hand_made_model():
    model = TwoLayers([3.0, -4.0], [0.0, 2.0])
    stats = weight_statistics(model)
    assert stats["weights:q0"] == -4.0 and stats["weights:q100"] == 3.0
    assert stats["weights:q50"] == pytest.approx(1.0)  # sorted -4, 0, 2, 3: halfway between 0 and 2
    assert stats["weights:l1"] == 9.0 and stats["weights:linf"] == 4.0
    assert stats["weights:l2"] == pytest.approx(math.sqrt(29))
    # spectral norms of the 1x2 rows: 5 and 2, product 10
    assert stats["weights:log10_bound"] == pytest.approx(1.0)


def test_conv_bound_is_the_norm_of_the_kernel_l1_matrix_and_bounds_the_layer():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    a = conv.weight.detach().abs().sum(dim=(2, 3)).double()
    assert layer_bound(conv) == pytest.approx(float(torch.linalg.matrix_norm(a, ord=2)))
    for _ in range(20):  # ||conv(x)|| <= bound * ||x|| on random inputs (Young's inequality)
        x = torch.randn(1, 3, 8, 8)
        assert conv(x).norm() <= layer_bound(conv) * x.norm() + 1e-5


def test_batchnorm_after_a_layer_is_folded_into_its_bound():
    conv = nn.Conv2d(1, 2, 1, bias=False)
    bn = nn.BatchNorm2d(2).eval()
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([1.0, 1.0]).view(2, 1, 1, 1))
        bn.weight.copy_(torch.tensor([3.0, -0.5]))
        bn.running_var.copy_(torch.tensor([1.0 - 1e-5, 4.0 - 1e-5]))
    model = nn.Sequential(conv, bn)
    # A = [[1], [1]] scaled by [3, 0.25]: norm sqrt(9 + 1/16)
    assert weight_statistics(model)["weights:log10_bound"] == pytest.approx(math.log10(math.sqrt(9 + 1 / 16)))


def test_a_layer_of_zeros_leaves_no_finite_bound():
    assert "weights:log10_bound" not in weight_statistics(TwoLayers([0.0, 0.0], [1.0, 2.0]))


# ---- the study through the CLI, on real CIFAR-10 -------------------------------------------------

STUDY = {
    "name": "rp_tiny",
    "dataset": "cifar10",
    "data": {"train_subset": 512, "test_subset": 200},
    "model": {"name": "resnet20", "args": {"width": 4}},
    "train": {"epochs": 1, "batch_size": 128, "lr": 0.1},
    "finetune": {"lr": 0.01, "schedule": "constant", "weight_decay": 0.0},
    "pruning": {
        "cp": {"method": "global_magnitude", "sparsities": [0.5], "finetune_epochs": [1]},
        "rp": {"method": "reverse_magnitude", "sparsities": [0.1], "finetune_epochs": [0, 1]},
        "ours": {
            "method": "global_magnitude",
            "sparsities": [0.5],
            "finetune_epochs": [1],
            "finetune": {"magnitude_penalty": {"weight": 10.0, "threshold_from_reverse": 0.1}},
        },
    },
    "evaluation": {
        "attack_subset": 100,
        "attacks": {"pgd4": {"attack": "pgd", "eps": [0.0039216, 0.0313725], "params": {"steps": 4}}},
    },
    "tables": {
        "t2": {
            "title": "Table 2",
            "rows": {"Baseline": "dense", "CP": "cp@0.5", "RP": "rp@0.1"},
            "columns": {"Benign": "clean", "PGD-4 1/255": "pgd4@0.0039216"},
            "dense": False,
            "show_flops": False,
            "transpose": True,
            "row_header": "Attack",
        }
    },
}


@pytest.mark.slow
def test_reverse_pruning_study_through_the_cli(tmp_path, data_dir):
    import yaml
    from conftest import run_cli, stored_results

    if not (data_dir / "cifar10" / "cifar10.npz").exists():
        pytest.skip("real CIFAR-10 not found")
    study_file = tmp_path / "rp.yaml"
    study_file.write_text(yaml.safe_dump(STUDY))
    out = tmp_path / "out"
    proc = run_cli("run", study_file, "--data-dir", data_dir, "--out", out)
    assert proc.returncode == 0, proc.stderr
    r = stored_results(out, key=lambda a: (a["pruning"], a["finetune_epochs"]))
    dense_linf = r[(("dense", 0), "weights:linf")]
    # reverse pruning without fine-tuning: nothing above the threshold is left, the rest is untouched
    assert r[(("rp", 0), "weights:linf")] < dense_linf
    assert r[(("rp", 0), "sparsity")] == pytest.approx(0.1, abs=1e-3)
    assert r[(("cp", 1), "sparsity")] == pytest.approx(0.5, abs=1e-3)
    # the penalty pulled the large weights towards tau; plain fine-tuning of the same mask did not
    assert r[(("ours", 1), "weights:linf")] < 0.8 * r[(("cp", 1), "weights:linf")]
    assert r[(("ours", 1), "weights:q0")] > r[(("cp", 1), "weights:q0")]
    report = run_cli("report", out, "--format", "markdown").stdout
    assert "| Attack | Baseline | CP | RP (FT 0 ep) | RP (FT 1 ep) |" in report and "| PGD-4 1/255 |" in report
    # the written report: every table as markdown, CSV and LaTeX, the figures, every number
    rep = run_cli("report", out, "--out", tmp_path / "report")
    assert rep.returncode == 0, rep.stderr
    text = (tmp_path / "report" / "report.md").read_text()
    assert (
        "| Attack | Baseline | CP | RP (FT 0 ep) | RP (FT 1 ep) |" in text and "![weights](figures/weights.png)" in text
    )
    assert (
        len(list((tmp_path / "report" / "tables").glob("*.tex")))
        == len(list((tmp_path / "report" / "tables").glob("*.csv")))
        > 5
    )
    assert (tmp_path / "report" / "figures" / "robustness_vs_sparsity.png").exists()
    assert "weights:l1" in (tmp_path / "report" / "results.csv").read_text()
    (tmp_path / "a_file").write_text("x")
    bad = run_cli("report", out, "--out", tmp_path / "a_file")
    assert bad.returncode == 2 and "is a file, not a folder" in bad.stderr and "Traceback" not in bad.stderr
