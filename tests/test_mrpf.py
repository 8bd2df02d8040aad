"""MRPF (Bai et al.): the projection of the weight perturbation, Module Robust Sensitivity, and the
per-layer ratio formulas on hand-computed examples."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from robustprune.errors import UserError
from robustprune.pruning.mrpf import (
    adaptive_ratios,
    adversarial_loss,
    inverse_mrs_ratios,
    module_robust_sensitivity,
    perturbed_copy,
    project_relative_,
)


def test_projection_onto_the_relative_ball():
    w0 = torch.tensor([3.0, 4.0])  # norm 5, eps 0.1: radius 0.5
    w = torch.tensor([6.0, 4.0])
    assert torch.allclose(project_relative_(w, w0, 0.1), torch.tensor([3.5, 4.0]))
    inside = torch.tensor([3.2, 4.1])
    assert torch.equal(project_relative_(inside.clone(), w0, 0.1), inside)


def test_adaptive_ratios_hand_example():
    # mean 2, deviations -1, 0, 1 (already in [-1, 1]); p = 0.5 - dev * 0.6 = 1.1, 0.5, -0.1 -> clipped
    got = adaptive_ratios({"a": 1.0, "b": 2.0, "c": 3.0}, r_global=0.5, r_min=0.2, r_max=0.8)
    assert got == pytest.approx({"a": 0.8, "b": 0.5, "c": 0.2})


def test_adaptive_ratios_clip_replace_non_positive_and_rescale():
    # a's 0 becomes delta; deviations / 7 -> -3/7, -2/7, -2/7, 1; p = 0.3 - dev * 0.5 = 0.514, 0.443, 0.443, -0.2
    # clipped to 0.1; their mean 0.375 is rescaled to 0.3 (x 0.8)
    got = adaptive_ratios({"a": 0.0, "b": 1.0, "c": 1.0, "d": 10.0}, r_global=0.3, r_min=0.1, r_max=0.6)
    assert got == pytest.approx(
        {"a": 0.8 * (0.3 + 1.5 / 7), "b": 0.8 * (0.3 + 1 / 7), "c": 0.8 * (0.3 + 1 / 7), "d": 0.08}, abs=1e-6
    )
    assert sum(got.values()) / 4 == pytest.approx(0.3)
    assert adaptive_ratios({"a": -1.0, "b": -5.0}, 0.3, 0.1, 0.6) == pytest.approx({"a": 0.3, "b": 0.3})


def test_inverse_mrs_ratios_eq_8_to_10():
    # InvMRS 1, 1/3 -> w 0.75, 0.25; "mean" scales by the 2 layers so the ratios average r_g
    assert inverse_mrs_ratios({"a": 1.0, "b": 3.0}, 0.4, 0.9, delta=0.0) == pytest.approx({"a": 0.6, "b": 0.2})
    assert inverse_mrs_ratios({"a": 1.0, "b": 3.0}, 0.4, 0.5, delta=0.0) == pytest.approx({"a": 0.5, "b": 0.2})
    assert inverse_mrs_ratios({"a": 1.0, "b": 3.0}, 0.4, 0.9, delta=0.0, scale="literal") == pytest.approx(
        {"a": 0.3, "b": 0.1}
    )


@pytest.mark.parametrize("r", [(0.5, 0.6, 0.8), (0.5, 0.2, 0.4), (0.5, 0.2, 1.0)])
def test_bad_ratio_ranges(r):
    with pytest.raises(UserError, match="r_min <= r_global <= r_max < 1"):
        adaptive_ratios({"a": 1.0}, r_global=r[0], r_min=r[1], r_max=r[2])


class TwoPaths(nn.Module):
    """Two linear layers whose outputs add: `big` carries almost all of the logit, `small` little."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.big, self.small = nn.Linear(8, 3), nn.Linear(8, 3)
        with torch.no_grad():
            self.small.weight.mul_(0.01)
            self.small.bias.zero_()

    def forward(self, x):
        return self.big(x) + self.small(x)


def test_mrs_is_positive_bounded_and_ranks_the_layer_that_matters():
    model = TwoPaths()
    x, y = torch.randn(64, 8), torch.randint(0, 3, (64,))
    before = copy.deepcopy(model.state_dict())
    mrs = module_robust_sensitivity(model, ["big", "small"], x, y, lr=0.5, epochs=3, eps=0.1, batch_size=16)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the model is untouched
    assert mrs["big"] > mrs["small"] > 0  # ascent raises the loss, most through the layer that carries the logit
    ratios = adaptive_ratios(mrs, r_global=0.5, r_min=0.2, r_max=0.8)
    assert ratios["big"] < ratios["small"]  # the more sensitive layer is pruned less
    clone = perturbed_copy(model, "big", x, y, lr=0.5, epochs=3, eps=0.1, batch_size=16)
    moved = float((clone.big.weight - model.big.weight).detach().norm())
    assert 0 < moved <= 0.1 * float(model.big.weight.detach().norm()) + 1e-6  # projected onto the relative ball
    assert torch.equal(clone.small.weight, model.small.weight) and torch.equal(clone.big.bias, model.big.bias)
    assert adversarial_loss(clone, x, y) == pytest.approx(adversarial_loss(model, x, y) + mrs["big"])


def test_unknown_layer_is_one_sentence():
    with pytest.raises(UserError, match="has no layer 'nope' with a weight"):
        module_robust_sensitivity(TwoPaths(), ["nope"], torch.randn(4, 8), torch.zeros(4, dtype=torch.long))


# ---- the training choices MRPF studies: step / cosine schedules, adversarial fine-tuning ------------

from pydantic import ValidationError  # noqa: E402

from robustprune.train import AdversarialTraining, TrainConfig, make_optimizer, make_schedule, train  # noqa: E402


def lrs(cfg: TrainConfig, steps: int) -> list[float]:
    opt = make_optimizer(nn.Linear(2, 2), cfg)
    sched = make_schedule(opt, cfg, steps)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_step_schedule_divides_by_ten_at_fixed_intervals():
    got = lrs(TrainConfig(lr=0.1, schedule="step"), 12)  # every third of the 12 steps
    assert got == pytest.approx([0.1] * 4 + [0.01] * 4 + [0.001] * 4)


def test_cosine_decays_to_min_lr():
    got = lrs(TrainConfig(lr=0.02, schedule="cosine", min_lr=1e-4), 50)
    assert got[0] == pytest.approx(0.02) and got[-1] == pytest.approx(1e-4, abs=1e-4)
    assert all(a >= b for a, b in zip(got, got[1:]))


def mnist_like(n=64):
    from conftest import random_mnist

    return random_mnist(n, seed=1)


def test_adversarial_batches_at_eps_zero_are_duplicates_and_train_like_clean(tiny_cnn):
    x, y = mnist_like()
    clean, dup = copy.deepcopy(tiny_cnn), copy.deepcopy(tiny_cnn)
    train(clean, x, y, TrainConfig(epochs=1, batch_size=16), seed=0)
    train(dup, x, y, TrainConfig(epochs=1, batch_size=16, adversarial={"eps": 0.0, "ratio": 1.0}), seed=0)
    for a, b in zip(clean.parameters(), dup.parameters()):
        assert torch.allclose(a, b, atol=1e-5)  # the same mean loss and gradient on a doubled batch


def test_adversarial_finetuning_attacks_a_share_of_each_batch(tiny_cnn, monkeypatch):
    from robustprune.attacks.fgsm import FGSM

    sizes = []
    real = FGSM.__call__

    def spy(self, model, xb, yb):
        sizes.append(len(xb))
        return real(self, model, xb, yb)

    monkeypatch.setattr(FGSM, "__call__", spy)
    x, y = mnist_like(50)
    before = copy.deepcopy(tiny_cnn)
    h = train(tiny_cnn, x, y, TrainConfig(epochs=1, batch_size=20, adversarial={"ratio": 0.2}), seed=0)
    assert sizes == [4, 4, 2]  # round(0.2 x 20), round(0.2 x 20), round(0.2 x 10)
    assert any(not torch.equal(a, b) for a, b in zip(before.parameters(), tiny_cnn.parameters()))
    assert 0.0 <= h[0]["train_acc"] <= 1.0


@pytest.mark.parametrize(
    "adv, expected",
    [
        ({"attack": "fgsn"}, "unknown attack 'fgsn'"),
        ({"eps": 1.5}, "less than or equal to 1"),
        ({"ratio": 0}, "greater than 0"),
        ({"attack": "pgd", "params": {"steps": 0}}, "PGD steps must be an integer >= 1"),
    ],
)
def test_bad_adversarial_training_settings(adv, expected):
    with pytest.raises((ValidationError, UserError)) as e:
        AdversarialTraining(**adv)
    assert expected in str(e.value)


def test_filter_groups_of_a_resnet_couple_the_residual_stream():
    from robustprune.models import build_model
    from robustprune.pruning.structured import filter_groups

    model = build_model("resnet20", num_classes=10, image_shape=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3)
    groups = filter_groups(model, torch.zeros(1, 3, 32, 32))
    stage1 = next(g for g in groups if "stem.conv" in g)
    assert set(stage1) == {"stem.conv", "layer1.0.body.conv2", "layer1.1.body.conv2", "layer1.2.body.conv2"}
    assert ["layer1.0.body.conv1"] in groups  # a conv inside a block is its own group
    assert not any("classifier" in n for g in groups for n in g)  # the classifier is never pruned
    assert len(groups) == 3 + 9  # three residual streams, nine inner convs


def test_a_module_of_several_layers_is_perturbed_together_each_within_its_ball():
    model = TwoPaths()
    x, y = torch.randn(32, 8), torch.randint(0, 3, (32,))
    clone = perturbed_copy(model, ["big", "small"], x, y, lr=1.0, epochs=2, eps=0.05, batch_size=8)
    for name in ("big", "small"):
        w, w0 = getattr(clone, name).weight.detach(), getattr(model, name).weight.detach()
        assert 0 < float((w - w0).norm()) <= 0.05 * float(w0.norm()) + 1e-6
    mrs = module_robust_sensitivity(model, [["big", "small"], "small"], x, y, lr=1.0, epochs=2, eps=0.05, batch_size=8)
    assert set(mrs) == {"big", "small"} and mrs["big"] > mrs["small"]


# ---- the `mrpf` pruning method -------------------------------------------------------------------


def tiny_resnet():
    from robustprune.models import build_model

    torch.manual_seed(0)
    return build_model(
        "resnet20", num_classes=10, image_shape=(3, 16, 16), mean=(0.5,) * 3, std=(0.25,) * 3, width=8
    ).eval()


def test_mrpf_method_prunes_each_group_at_its_ratio_and_replays_from_the_plan():
    from robustprune.metrics.size import layer_widths
    from robustprune.pruning import PRUNING_METHODS
    from robustprune.pruning.criteria.replay import Recording, Replay
    from robustprune.pruning.structured import filter_groups

    method = PRUNING_METHODS.get("mrpf")()
    params = method.Params(criterion="l1", r_min=0.1, r_max=0.6, mrs_lr=0.1)
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 3, 16, 16, generator=g), torch.randint(0, 10, (64,), generator=g)
    example = x[:1]
    model, again = tiny_resnet(), tiny_resnet()
    groups = filter_groups(model, example)
    recording = Recording(method.criterion(params))
    method.prune(model, 0.3, example, params, (x, y), criterion=recording)
    plan = method.last_plan
    assert set(plan["mrs"]) == set(plan["ratios"]) == {grp[0] for grp in groups}
    assert sum(plan["ratios"].values()) / len(groups) == pytest.approx(0.3)
    order = sorted(plan["mrs"], key=plan["mrs"].get)  # least sensitive first: pruned hardest
    assert plan["ratios"][order[0]] >= plan["ratios"][order[-1]]
    widths = layer_widths(model)
    dense = layer_widths(tiny_resnet())
    for grp in groups:
        n = dense[f"width:{grp[0]}"]
        assert widths[f"width:{grp[0]}"] == n - round(plan["ratios"][grp[0]] * n)
    # the plan and the scores rebuild the same network without data or MRS
    method.prune(again, 0.3, example, params, None, criterion=Replay(recording), plan=plan)
    assert layer_widths(again) == widths


def test_mrs_is_computed_once_per_dense_model_and_mrs_setting(tmp_path, monkeypatch):
    import robustprune.pruning.mrpf as mrpf
    from robustprune.pruning import PRUNING_METHODS
    from robustprune.study.runner import MRSCache

    calls = []
    real = mrpf.module_robust_sensitivity
    monkeypatch.setattr(mrpf, "module_robust_sensitivity", lambda *a, **k: calls.append(1) or real(*a, **k))
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(32, 3, 16, 16, generator=g), torch.randint(0, 10, (32,), generator=g)
    cache = MRSCache(tmp_path, {"seed": 0})
    plans = []
    for criterion, sparsity, lr in (("l1", 0.3, 0.1), ("taylor", 0.5, 0.1), ("l1", 0.3, 0.2)):
        method = PRUNING_METHODS.get("mrpf")()
        method.mrs_cache = cache
        params = method.Params(criterion=criterion, r_min=0.1, r_max=0.6, mrs_lr=lr)
        method.prune(tiny_resnet(), sparsity, x[:1], params, (x, y))
        plans.append(method.last_plan)
    assert len(calls) == 2  # the second entry reused the first one's MRS
    assert plans[1]["mrs"] == plans[0]["mrs"] and plans[2]["mrs"] != plans[0]["mrs"]
    assert len(list(tmp_path.glob("mrs-*.pt"))) == 2
    fresh = PRUNING_METHODS.get("mrpf")()  # and the cached MRS equals a fresh computation
    fresh.prune(tiny_resnet(), 0.3, x[:1], fresh.Params(criterion="l1", r_min=0.1, r_max=0.6, mrs_lr=0.1), (x, y))
    assert fresh.last_plan == plans[0]


def flops_reduction(model, dense, example) -> float:
    from robustprune.metrics.size import count_macs

    return 1 - count_macs(model, example)[0] / count_macs(dense, example)[0]


def test_match_flops_removes_the_flops_of_uniform_pruning_and_replays_from_the_plan():
    from robustprune.metrics.size import layer_widths
    from robustprune.pruning import PRUNING_METHODS
    from robustprune.pruning.criteria.replay import Recording, Replay

    method = PRUNING_METHODS.get("mrpf")()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(64, 3, 16, 16, generator=g), torch.randint(0, 10, (64,), generator=g)
    example, dense = x[:1], tiny_resnet()
    uniform = PRUNING_METHODS.get("structured")()
    baseline = tiny_resnet()
    uniform.prune(baseline, 0.5, example, uniform.Params(criterion="taylor"), (x, y))
    target = flops_reduction(baseline, dense, example)
    nominal = tiny_resnet()  # MRPF at the nominal ratio removes fewer FLOPs here (residual streams pruned less)
    method.prune(nominal, 0.5, example, method.Params(criterion="taylor", r_min=0.1, r_max=0.8, mrs_lr=0.1), (x, y))
    assert abs(flops_reduction(nominal, dense, example) - target) > 0.02

    params = method.Params(criterion="taylor", r_min=0.1, r_max=0.8, mrs_lr=0.1, match_flops=True)
    model, recording = tiny_resnet(), Recording(method.criterion(params))
    method.prune(model, 0.5, example, params, (x, y), criterion=recording)
    plan = method.last_plan
    got = flops_reduction(model, dense, example)
    assert abs(got - target) <= 0.01
    assert plan["flops_reduction"] == pytest.approx(got) and plan["baseline_flops_reduction"] == pytest.approx(target)
    assert 0.5 < plan["global_ratio"] <= 0.8
    assert sum(plan["ratios"].values()) / len(plan["ratios"]) == pytest.approx(plan["global_ratio"])
    again = tiny_resnet()  # the stored plan and scores rebuild it without data, MRS or bisection
    method.prune(again, 0.5, example, params, None, criterion=Replay(recording), plan=plan)
    assert layer_widths(again) == layer_widths(model)


def test_match_flops_that_cannot_be_reached_names_the_numbers():
    from robustprune.pruning import PRUNING_METHODS

    method = PRUNING_METHODS.get("mrpf")()
    g = torch.Generator().manual_seed(0)
    x, y = torch.rand(32, 3, 16, 16, generator=g), torch.randint(0, 10, (32,), generator=g)
    # Eq. 10 caps every ratio at r_max, so its mean stays under the global ratio: 30 % uniform is out of reach
    params = method.Params(criterion="l1", rule="inverse", r_max=0.8, mrs_lr=0.1, match_flops=True)
    with pytest.raises(UserError) as e:
        method.prune(tiny_resnet(), 0.3, x[:1], params, (x, y))
    msg = str(e.value)
    assert "cannot match the" in msg and "FLOPs reduction of uniform pruning at sparsity 0.3 within 1 p.p." in msg
    assert "closest:" in msg and "widen r_min / r_max or set match_flops: false" in msg


@pytest.mark.parametrize(
    "params, sparsity, expected",
    [
        ({"target": "blocks"}, 0.3, "use target filters, rounds 1 and no layer_ratios"),
        ({"r_min": 0.4}, 0.3, "sparsity 0.3 is outside [r_min, r_max] = [0.4, 0.8]"),
        ({"attack": "fgsn"}, 0.3, "unknown attack 'fgsn'"),
        ({"rule": "median"}, 0.3, "'pruning.m.params.rule'"),
    ],
)
def test_bad_mrpf_entries(params, sparsity, expected):
    from robustprune.study.schema import resolve_study

    raw = {
        "name": "t",
        "dataset": "cifar10",
        "model": {"name": "resnet20"},
        "pruning": {"m": {"method": "mrpf", "sparsities": [sparsity], "params": params}},
    }
    with pytest.raises(UserError) as e:
        resolve_study(raw, "t")
    assert expected in str(e.value)


# ---- study files: per-entry fine-tuning, the mrpf method through the CLI -----------------------------

STUDY = {
    "name": "mrpf_tiny",
    "dataset": "cifar10",
    "data": {"train_subset": 512, "test_subset": 200},
    "model": {"name": "resnet20", "args": {"width": 8}},
    "train": {"epochs": 1, "batch_size": 128, "lr": 0.1, "augment": "crop_flip"},
    "finetune": {"lr": 0.01},
    "pruning": {
        "l2": {"method": "structured", "sparsities": [0.3], "finetune_epochs": [1], "params": {"criterion": "l2"}},
        "l2_mrpf": {
            "method": "mrpf",
            "sparsities": [0.3],
            "finetune_epochs": [1],
            "params": {"criterion": "l2", "r_min": 0.1, "r_max": 0.6, "mrs_lr": 0.1},
            "finetune": {"adversarial": {"attack": "fgsm", "eps": 0.0078431, "ratio": 0.2}},
        },
    },
    "evaluation": {"attack_subset": 100, "attacks": {"fgsm": {"eps": [0.0313725]}}},
}


def test_entry_finetune_changes_only_that_entrys_cells():
    from robustprune.study.cells import expand
    from robustprune.study.schema import resolve_study

    cells = {c.axes["pruning"]: c for c in expand(resolve_study(STUDY, "t"))}
    assert cells["l2_mrpf"].config["pruning"]["finetune"]["adversarial"]["ratio"] == 0.2
    assert cells["l2"].config["pruning"]["finetune"]["adversarial"] is None
    assert (
        cells["l2"].config["pruning"]["finetune"]["lr"] == cells["l2_mrpf"].config["pruning"]["finetune"]["lr"] == 0.01
    )


@pytest.mark.parametrize(
    "finetune, expected",
    [
        ({"epochs": 3}, "fine-tuning epochs come from finetune_epochs"),
        ({"advers": {}}, "pruning 'l2_mrpf'.finetune.advers: unknown key"),
        ({"adversarial": {"attack": "fgsn"}}, "unknown attack 'fgsn'"),
    ],
)
def test_bad_entry_finetune(finetune, expected):
    from robustprune.study.schema import resolve_study

    raw = copy.deepcopy(STUDY)
    raw["pruning"]["l2_mrpf"]["finetune"] = finetune
    with pytest.raises(UserError) as e:
        resolve_study(raw, "t")
    assert expected in str(e.value)


def test_match_flops_off_keeps_the_hash_of_old_cells():
    from robustprune.study.cells import expand
    from robustprune.study.schema import resolve_study

    raw = copy.deepcopy(STUDY)
    before = {c.axes["pruning"]: c.hash for c in expand(resolve_study(raw, "t"))}
    raw["pruning"]["l2_mrpf"]["params"]["match_flops"] = False
    assert {c.axes["pruning"]: c.hash for c in expand(resolve_study(raw, "t"))} == before
    raw["pruning"]["l2_mrpf"]["params"]["match_flops"] = True
    after = {c.axes["pruning"]: c.hash for c in expand(resolve_study(raw, "t"))}
    assert after["l2_mrpf"] != before["l2_mrpf"] and after["l2"] == before["l2"]


def test_a_flops_matched_mrpf_cell_is_rebuilt_from_its_checkpoint(tmp_path, data_dir, monkeypatch):
    from robustprune.metrics.size import layer_widths
    from robustprune.pruning.methods import MRPF
    from robustprune.study.cells import expand
    from robustprune.study.runner import Progress, Workspace
    from robustprune.study.schema import resolve_study

    if not (data_dir / "cifar10" / "cifar10.npz").exists():
        pytest.skip("real CIFAR-10 not found")
    raw = copy.deepcopy(STUDY)
    raw["data"] = {"train_subset": 256, "test_subset": 50}
    raw["pruning"] = {"m": raw["pruning"]["l2_mrpf"]}
    raw["pruning"]["m"]["params"] |= {"match_flops": True}
    raw["pruning"]["m"]["finetune"] = {}
    study = resolve_study(raw, "t")
    cell = next(c for c in expand(study) if c.axes["pruning"] == "m")
    ws = Workspace(study, tmp_path, data_dir, torch.device("cpu"), Progress())
    model, _ = ws.model_of(cell)
    metrics = ws.plan_metrics(cell)
    dense = ws.dense(cell.dense_key).model
    assert abs(flops_reduction(model, dense, ws.example_input()) - metrics["mrpf:flops_reduction"]) < 1e-9
    assert abs(metrics["mrpf:flops_reduction"] - metrics["mrpf:baseline_flops_reduction"]) <= 0.01
    assert metrics["mrpf:global_ratio"] != 0.3

    def no_search(*args, **kwargs):
        raise AssertionError("a cached cell searched for its global ratio again")

    monkeypatch.setattr(MRPF, "flops_matched", no_search)
    fresh = Workspace(study, tmp_path, data_dir, torch.device("cpu"), Progress())
    again, _ = fresh.model_of(cell)
    assert layer_widths(again) == layer_widths(model)
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
    assert fresh.plan_metrics(cell) == metrics


@pytest.mark.slow
def test_mrpf_study_through_the_cli_stores_mrs_and_ratios(tmp_path, data_dir):
    import yaml
    from conftest import run_cli, stored_results

    if not (data_dir / "cifar10" / "cifar10.npz").exists():
        pytest.skip("real CIFAR-10 not found")
    study_file = tmp_path / "mrpf.yaml"
    study_file.write_text(yaml.safe_dump(STUDY))
    out = tmp_path / "out"
    run = ("run", study_file, "--data-dir", data_dir, "--out", out)
    proc = run_cli(*run)
    assert proc.returncode == 0, proc.stderr
    first = stored_results(out)
    ratios = {m[len("ratio:") :]: v for (p, m), v in first.items() if p == "l2_mrpf" and m.startswith("ratio:")}
    mrs = {m[len("mrs:") :]: v for (p, m), v in first.items() if p == "l2_mrpf" and m.startswith("mrs:")}
    assert len(ratios) == len(mrs) == 12 and sum(ratios.values()) / 12 == pytest.approx(0.3)
    assert not any(m.startswith("ratio:") for (p, m) in first if p != "l2_mrpf")
    assert len(list(out.rglob("mrs-*.pt"))) == 1  # MRS kept next to the dense checkpoint
    for group, r in ratios.items():  # each group lost its share of filters
        dense = first[("dense", f"width:{group}")]
        assert first[("l2_mrpf", f"width:{group}")] == dense - round(r * dense)
    report = run_cli("report", out, "--format", "markdown").stdout
    assert "Module Robust Sensitivity and pruning ratios (regime 'clean')" in report
    figures = run_cli("report", out, "--figures", tmp_path / "figures")
    assert figures.returncode == 0 and (tmp_path / "figures" / "mrs_ratios.png").stat().st_size > 10_000
    assert "figure:" in figures.stdout
    # rebuilt from the checkpoints into a new store: the stored plan replaces MRS, same numbers
    for f in out.glob("results.sqlite*"):
        f.unlink()
    assert run_cli(*run).returncode == 0
    again = stored_results(out)
    assert {k: v for k, v in again.items() if k[1] != "latency_ms"} == {
        k: v for k, v in first.items() if k[1] != "latency_ms"
    }


def test_the_study_file_has_the_papers_resnet50_and_mobilevit_rows():
    """Tables 6 and 7: ResNet-50 and MobileViT-xs in the full budget; one MobileViT-xs row (Magnitude
    + MRPF, one seed, 2 dense epochs) in the cpu budget, beside the ResNet-20 cells."""
    from pathlib import Path

    from robustprune.study.cells import expand
    from robustprune.study.schema import load_study

    path = Path(__file__).resolve().parents[1] / "studies" / "cifar_mrpf.yaml"
    full = expand(load_study(path, "full"))
    by_model = lambda cells, m: {c.axes["pruning"] for c in cells if c.axes.get("model") == m}  # noqa: E731
    assert by_model(full, "resnet50") == {"dense", "taylor", "taylor_mrpf", "magnitude", "magnitude_mrpf"}
    assert by_model(full, "mobilevit") == {
        "dense",
        "taylor",
        "taylor_at",
        "taylor_mrpf",
        "magnitude",
        "magnitude_at",
        "magnitude_mrpf",
    }
    study = load_study(path, "full")
    assert study.tables["architectures"].models == ["resnet50", "mobilevit", "vgg16"]
    assert study.tables["mobilevit"].models == ["mobilevit"]
    cpu = expand(load_study(path, "cpu"))
    mvit = [c for c in cpu if c.axes.get("model") == "mobilevit"]
    assert sorted((c.axes["pruning"], c.axes["sparsity"], c.axes["seed"]) for c in mvit) == [
        ("dense", 0.0, 0),
        ("magnitude_mrpf", 0.3, 0),
        ("magnitude_mrpf", 0.5, 0),
    ]
    assert all(c.config["train"]["epochs"] == 2 and c.config["train"]["optimizer"] == "adam" for c in mvit)
    assert all(c.config["train"]["epochs"] == 15 for c in cpu if c.axes["model"] == "resnet20")
    assert len(cpu) == 63
