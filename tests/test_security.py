"""Security curves from FMN (robustprune.evaluation.security) and the RobustBench export
(robustprune.evaluation.robustbench). The curve tests run FMN and APGD-CE on the real MNIST CNNs of
the mnist_cnns fixture: at a fixed eps, FMN's curve must not claim more robustness than APGD-CE
finds (a minimum-norm attack that misses breaks overstates robustness)."""

from __future__ import annotations

import itertools
import json
import math
import time

import pytest
import torch

from robustprune.attacks import adversarial_accuracy
from robustprune.attacks.apgd import APGDCE
from robustprune.errors import UserError
from robustprune.evaluation import security
from robustprune.evaluation.robustbench import eps_string, percent, robustbench_entry, write_robustbench_json
from robustprune.evaluation.security import curve_from_norms, default_grid, median_norm, security_curve

N_LINF, N_L2 = 200, 100
# FMN (100 steps) may leave this many more points robust than APGD-CE (100 steps) at the same eps.
# Measured: robust model at Linf 0.3 +3.0 to +4.0 points (on 200 and on 500 images, for two trainings
# of the fixture; 300 steps do not close it, 1000 do), clean model at Linf 0.1 +0.5, L2 within +-2
SLACK = 0.05


# ---- curve_from_norms and friends (pure) -------------------------------------------------------


def test_curve_from_hand_made_norms():
    norms = [0.0, 0.1, 0.2, 0.3, math.inf]
    assert curve_from_norms(norms, [0, 0.05, 0.1, 0.25, 0.3, 1.0, 100]) == [0.8, 0.8, 0.6, 0.4, 0.2, 0.2, 0.2]
    assert curve_from_norms(torch.tensor([0.5, 0.5]), [0.5]) == [0.0]  # robust only if norm > eps
    assert median_norm(norms) == 0.2 and median_norm([0.0, 1.0, 2.0, 3.0]) == 1.0
    assert median_norm([0.1, math.inf, math.inf]) == math.inf
    grid = default_grid(norms, "Linf", points=4)
    assert grid == pytest.approx([0.0, 0.1, 0.2, 0.3])
    assert default_grid([0.0, math.inf], "L2", points=3) == [0.0, 5.0, 10.0]


@pytest.mark.parametrize(
    "norms, grid, match",
    [
        ([], [0.1], "at least one"),
        ([0.1, float("nan")], [0.1], "NaN"),
        ([-0.1], [0.1], "negative"),
        ([0.1], [], "eps_grid"),
        ([0.1], [-1.0], "eps_grid"),
        ([0.1], [math.inf], "eps_grid"),
        ([0.1], "abc", "eps_grid"),
    ],
)
def test_curve_from_norms_rejects(norms, grid, match):
    with pytest.raises(UserError, match=match):
        curve_from_norms(norms, grid)


def test_security_curve_on_a_tiny_model(tiny_cnn):
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(10, 1, 28, 28, generator=g) * 255).to(torch.uint8)  # uint8 images are accepted
    with torch.no_grad():
        y = tiny_cnn(x.float() / 255).argmax(1)
    y[0] = (y[0] + 1) % 10
    c = security_curve(tiny_cnn, x, y, norm="L2", steps=10, batch_size=4)
    assert c["n"] == 10 and len(c["norms"]) == 10 and c["norms"][0] == 0.0
    assert c["clean_accuracy"] == 0.9 == c["robust_accuracy"][0]
    assert len(c["eps"]) == 51 and c["eps"][0] == 0.0
    assert c["median_norm"] == median_norm(c["norms"])
    assert c == {**c, **security_curve(tiny_cnn, x, y, norm="L2", steps=10, batch_size=10), "seconds": c["seconds"]}
    with pytest.raises(UserError, match="batch_size"):
        security_curve(tiny_cnn, x, y, batch_size=0)
    with pytest.raises(UserError, match="norm"):
        security_curve(tiny_cnn, x, y, norm="L0")


# ---- real models: FMN's curve against APGD-CE ------------------------------------------------------


def _check_curve(c, model, x, y):
    acc = c["robust_accuracy"]
    assert all(a >= b for a, b in itertools.pairwise(acc)), acc  # non-increasing in eps
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).double().mean().item()
    assert acc[0] == c["clean_accuracy"] == pytest.approx(clean)  # eps 0: exactly the correct points


@pytest.mark.parametrize("which, eps", [("robust", 0.3), ("clean", 0.1)])
def test_linf_curve_agrees_with_apgd(mnist_cnns, which, eps):
    model, x, y = mnist_cnns[which], mnist_cnns["x"][:N_LINF], mnist_cnns["y"][:N_LINF]
    start = time.perf_counter()
    c = security_curve(model, x, y, "Linf", eps_grid=[0.0, 0.05, 0.1, 0.2, 0.3, 0.4])
    fmn = c["robust_accuracy"][c["eps"].index(eps)]
    apgd = adversarial_accuracy(model, APGDCE(eps, steps=100), x, y)
    print(
        f"\n{which} Linf eps {eps}: FMN curve {fmn:.3f} ({c['seconds']:.1f} s for {len(x)} images), "
        f"APGD-CE {apgd:.3f} ({time.perf_counter() - start - c['seconds']:.1f} s); "
        f"median norm {c['median_norm']:.4f}"
    )
    _check_curve(c, model, x, y)
    assert fmn <= apgd + SLACK


@pytest.mark.parametrize("which, eps", [("robust", 1.5), ("clean", 1.0)])
def test_l2_curve_agrees_with_apgd(mnist_cnns, which, eps):
    torchattacks = pytest.importorskip("torchattacks")
    model, x, y = mnist_cnns[which], mnist_cnns["x"][:N_L2], mnist_cnns["y"][:N_L2]
    c = security_curve(model, x, y, "L2", eps_grid=[0.0, 0.5, 1.0, 1.5, 2.0])
    fmn = c["robust_accuracy"][c["eps"].index(eps)]
    ta = torchattacks.APGD(model, norm="L2", eps=eps, steps=100, n_restarts=1, loss="ce", seed=0)
    apgd = adversarial_accuracy(model, lambda m, xb, yb: ta(xb, yb), x, y)
    print(
        f"\n{which} L2 eps {eps}: FMN curve {fmn:.3f} ({c['seconds']:.1f} s for {len(x)} images), "
        f"torchattacks APGD-CE L2 {apgd:.3f}; median norm {c['median_norm']:.4f}"
    )
    _check_curve(c, model, x, y)
    assert fmn <= apgd + SLACK


# ---- the figure ---------------------------------------------------------------------------------


def test_plot_security_curves(tmp_path):
    curves = {
        "dense": {"eps": [0, 0.1, 0.2, 0.3], "robust_accuracy": [0.98, 0.9, 0.75, 0.6]},
        "pruned 90 %": {"eps": [0, 0.1, 0.2, 0.3], "robust_accuracy": [0.97, 0.85, 0.6, 0.4]},
    }
    out = security.plot_security_curves(
        curves,
        tmp_path / "figs" / "security.png",
        "Linf",
        checked={"dense": (0.3, 0.58), "pruned 90 %": (0.3, 0.37)},
        title="MNIST",
    )
    assert out == tmp_path / "figs" / "security.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 1000
    assert [p.name for p in out.parent.iterdir()] == ["security.png"]  # no temporary file left
    with pytest.raises(UserError, match="at least one curve"):
        security.plot_security_curves({}, tmp_path / "empty.png", "Linf")
    with pytest.raises(UserError, match="no curve"):
        security.plot_security_curves(curves, tmp_path / "x.png", "Linf", checked={"other": (0.3, 0.5)})
    with pytest.raises(UserError, match="PNG"):
        security.plot_security_curves(curves, tmp_path / "x.pdf", "Linf")
    assert not (tmp_path / "empty.png").exists() and not (tmp_path / "x.png").exists()


# ---- RobustBench ------------------------------------------------------------------------------------


def test_robustbench_formats():
    # as robustbench/utils.py update_json writes them: str(round(100 * acc, 2))
    assert [percent(a) for a in (0.5953, 0.8969, 0.58, 0.0, 1.0, 0.29, 0.123456)] == [
        "59.53",
        "89.69",
        "58.0",
        "0.0",
        "100.0",
        "29.0",
        "12.35",
    ]
    # eps as in model_info/*/Linf/*.json ("8/255", "4/255") and L2 ("0.5")
    assert eps_string(8 / 255, "Linf") == "8/255" and eps_string(4 / 255, "Linf") == "4/255"
    assert eps_string(0.3, "Linf") == "0.3" and eps_string(0.5, "L2") == "0.5" and eps_string(1.5, "L2") == "1.5"


def test_robustbench_entry_round_trips(tmp_path):
    entry = robustbench_entry(
        0.8969,
        0.5953,
        8 / 255,
        "Linf",
        1000,
        "cifar10",
        "Dense_RN18",
        extra={"architecture": "ResNet-18", "footnote": "Evaluated on 1000 test points."},
    )
    assert entry == {
        "link": "",
        "name": "Dense_RN18",
        "authors": "",
        "additional_data": False,
        "number_forward_passes": 1,
        "dataset": "cifar10",
        "venue": "",
        "architecture": "ResNet-18",
        "eps": "8/255",
        "clean_acc": "89.69",
        "reported": "",
        "autoattack_acc": "59.53",
        "footnote": "Evaluated on 1000 test points.",
        "unreliable": False,
        "threat_model": "Linf",
        "n_examples": 1000,
    }
    path = tmp_path / "model_info" / "cifar10" / "Linf" / "Dense_RN18.json"
    write_robustbench_json(entry, path)
    assert json.loads(path.read_text()) == entry
    assert [p.name for p in path.parent.iterdir()] == ["Dense_RN18.json"]
    l2 = robustbench_entry(0.95, 0.7, 0.5, "L2", 500, "MNIST", "x")
    assert (l2["eps"], l2["threat_model"], l2["dataset"], l2["clean_acc"], l2["autoattack_acc"]) == (
        "0.5",
        "L2",
        "mnist",
        "95.0",
        "70.0",
    )


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"clean_acc": 95.0}, "clean_acc"),
        ({"autoattack_acc": -0.1}, "autoattack_acc"),
        ({"autoattack_acc": 0.99}, "cannot exceed"),
        ({"eps": -1.0}, "eps"),
        ({"norm": "L1"}, "norm"),
        ({"n_points": 0}, "n_points"),
        ({"dataset": ""}, "dataset"),
        ({"extra": {"clean_acc": "99.0"}}, "measured"),
    ],
)
def test_robustbench_entry_rejects(kwargs, match):
    args = {
        "clean_acc": 0.95,
        "autoattack_acc": 0.6,
        "eps": 0.3,
        "norm": "Linf",
        "n_points": 100,
        "dataset": "mnist",
        "model_name": "m",
        **kwargs,
    }
    with pytest.raises(UserError, match=match):
        robustbench_entry(**args)


def test_write_robustbench_json_refuses_non_json(tmp_path):
    with pytest.raises(UserError, match="JSON"):
        write_robustbench_json({"clean_acc": math.inf}, tmp_path / "a.json")
    assert list(tmp_path.iterdir()) == []
