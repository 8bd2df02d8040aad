"""The library face (`import robustprune as rp`) on real MNIST subsets: every pruning method by name,
fine-tuning that keeps masks, evaluation that matches the study's numbers, data in every accepted
form, and one-sentence errors for bad input."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import robustprune as rp
from robustprune.errors import UserError
from robustprune.models import build_model


@pytest.fixture(scope="module")
def mnist(data_dir):
    from robustprune.data import load_dataset

    ds = load_dataset("mnist", data_dir)
    return ds.x_train[:3000], ds.y_train[:3000], ds.x_test[:400], ds.y_test[:400]


@pytest.fixture(scope="module")
def trained(mnist):
    x, y, _, _ = mnist
    torch.manual_seed(0)
    model = build_model("mnist_cnn", num_classes=10, image_shape=(1, 28, 28), mean=(0.1307,), std=(0.3081,))
    return rp.finetune(model, (x, y), epochs=1, lr=0.05, schedule="onecycle")


def zeros(model: nn.Module) -> float:
    ws = [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def test_public_names_are_importable_from_the_package():
    for name in ("prune", "finetune", "evaluate", "save", "load", "export_onnx", "latency"):
        assert callable(getattr(rp, name)), name
    assert set(rp.__all__) >= {"prune", "finetune", "evaluate", "save", "load", "export_onnx", "latency"}


def test_every_registered_method_prunes_a_copy(trained, mnist):
    x, y, xt, yt = mnist
    before = copy.deepcopy(trained.state_dict())
    mag = rp.prune(trained, "global_magnitude", ratio=0.5)
    assert zeros(mag) == pytest.approx(0.5, abs=0.01) and rp.masks_of(mag) is not None
    rev = rp.prune(trained, "reverse_magnitude", ratio=0.1)
    largest = max(float(m.weight.detach().abs().max()) for m in trained.modules() if isinstance(m, nn.Conv2d))
    assert max(float(m.weight.detach().abs().max()) for m in rev.modules() if isinstance(m, nn.Conv2d)) < largest
    l1 = rp.prune(trained, "channel_l1", ratio=0.3, example_inputs=xt[:1])
    taylor = rp.prune(trained, "structured", ratio=0.3, criterion="taylor", data=(x, y))  # example from the data
    mrpf = rp.prune(trained, "mrpf", ratio=0.3, data=(x, y))
    for pruned in (l1, taylor, mrpf):
        assert params(pruned) < params(trained)
        assert pruned(xt[:2].float() / 255).shape == (2, 10)
    widths = [m.out_channels for m in l1.modules() if isinstance(m, nn.Conv2d)]
    dense = [m.out_channels for m in trained.modules() if isinstance(m, nn.Conv2d)]
    assert widths == [d - round(0.3 * d) for d in dense]  # the ratio of every coupled group, once
    blocks = rp.prune(trained, "structured", ratio=0.3, criterion="l1", example_inputs=xt[:1], scope="global")
    assert params(blocks) < params(trained)
    # the model given is never changed
    assert all(torch.equal(v, before[k]) for k, v in trained.state_dict().items())
    assert rp.masks_of(trained) is None


def test_lottery_ticket_is_one_round_rewound_to_the_weights_given(trained):
    with pytest.raises(UserError, match="pass rewind_to="):
        rp.prune(trained, "lottery_ticket", ratio=0.2)
    torch.manual_seed(1)
    init = build_model("mnist_cnn", num_classes=10, image_shape=(1, 28, 28), mean=(0.1307,), std=(0.3081,))
    ticket = rp.prune(trained, "lottery_ticket", ratio=0.2, rewind_to=init.state_dict())
    masks = rp.masks_of(ticket)
    for name, p in ticket.named_parameters():
        if name in masks:  # survivors carry their initial values, the rest are zero
            assert torch.equal(p[masks[name]], init.state_dict()[name][masks[name]])
            assert not p[~masks[name]].any()


def test_bad_method_settings_are_one_sentence(trained, mnist):
    xt = mnist[2]
    with pytest.raises(UserError, match="unknown pruning method 'magnitude'"):
        rp.prune(trained, "magnitude", ratio=0.5)
    with pytest.raises(UserError, match="pruning method 'structured' cannot take"):
        rp.prune(trained, "structured", ratio=0.3, example_inputs=xt[:1], target="neurons")
    with pytest.raises(UserError, match="rounds=3 alternates pruning and fine-tuning"):
        rp.prune(trained, "structured", ratio=0.3, example_inputs=xt[:1], rounds=3)
    with pytest.raises(UserError, match=r"ratio must be a number in \[0, 1\)"):
        rp.prune(trained, "global_magnitude", ratio=1.5)
    with pytest.raises(UserError, match="pass example_inputs"):
        rp.prune(trained, "channel_l1", ratio=0.3)
    with pytest.raises(UserError, match="pass data=\\(x, y\\)"):
        rp.prune(trained, "structured", ratio=0.3, criterion="taylor", example_inputs=xt[:1])


def test_finetune_keeps_the_masks_and_recovers_accuracy(trained, mnist):
    x, y, xt, yt = mnist
    pruned = rp.prune(trained, "global_magnitude", ratio=0.9)
    before = rp.evaluate(pruned, (xt, yt))["acc_clean"]
    rp.finetune(pruned, (x, y), epochs=1, lr=0.02)
    assert zeros(pruned) >= 0.9 - 0.01  # pruned weights stayed zero through the updates
    assert rp.evaluate(pruned, (xt, yt))["acc_clean"] > before
    with pytest.raises(UserError, match="fine-tuning settings are not valid: optimizer"):
        rp.finetune(pruned, (x, y), optimizer="lion")


def test_evaluate_names_metrics_as_the_store_and_data_forms_agree(trained, mnist):
    _, _, xt, yt = mnist
    attacks = {"pgd": {"eps": [0.05, 0.1], "steps": 10}, "fgsm": {"eps": 0.1}}
    result = rp.evaluate(trained, (xt, yt), attacks=attacks, shifts={"occlusion": [8]}, attack_subset=200)
    assert {"acc_clean", "acc_adv:pgd@0.05", "acc_adv:pgd@0.1", "acc_adv:fgsm@0.1", "acc_occlusion@8"} <= set(result)
    assert result["images:attacks"] == 200
    # a stronger ball breaks at least as much; PGD at least as strong as FGSM at the same eps
    assert result["acc_adv:pgd@0.1"] <= result["acc_adv:pgd@0.05"] <= result["acc_clean"] + 0.05
    assert result["acc_adv:pgd@0.1"] <= result["acc_adv:fgsm@0.1"]
    assert result["acc_clean"] > 0.6  # one epoch on 3000 images
    # the same images as float tensors, a Dataset and a DataLoader give the same numbers
    xf = xt.float() / 255
    clean = {"acc_clean": result["acc_clean"]}
    for data in ((xf, yt), TensorDataset(xf, yt), DataLoader(TensorDataset(xf, yt), batch_size=64)):
        assert rp.evaluate(trained, data) == pytest.approx(clean)


def test_evaluate_with_corruptions(trained, mnist):
    _, _, xt, yt = mnist
    result = rp.evaluate(trained, (xt, yt), shifts={"corruptions": {"types": ["gaussian_noise"], "severities": [1, 5]}})
    assert result["acc_corruption:gaussian_noise@5"] <= result["acc_corruption:gaussian_noise@1"] + 0.02
    assert 0 < result["acc_corruption"] <= 1


def test_bad_data_is_one_sentence(trained, mnist):
    _, _, xt, yt = mnist
    cases = [
        ((xt.float(), yt), r"range over \[0, 255\], not \[0, 1\]; give unnormalised images"),
        ((xt.float() / 255, yt[:10]), "has 400 images but labels of shape"),
        ((xt[0, 0].float(), yt), "have shape"),
        (([1, 2, 3],), "give \\(images, labels\\) tensors"),
        ((xt.float() / 255, yt - 1), "the labels of the evaluation data include -1"),
    ]
    for args, phrase in cases:
        data = args[0] if len(args) == 1 else args
        with pytest.raises(UserError, match=phrase):
            rp.evaluate(trained, data)
    with pytest.raises(UserError, match="unknown shift 'fog'"):
        rp.evaluate(trained, (xt, yt), shifts=["fog"])
    with pytest.raises(UserError, match="attack 'pgd' needs its eps"):
        rp.evaluate(trained, (xt, yt), attacks={"pgd": {"steps": 10}})


def test_the_python_example_of_docs_api_runs(tmp_path, data_dir, monkeypatch):
    """The guide's first example, run as written (the data folder is the test machine's)."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "api.md").read_text()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code.replace('"../shared/data"', repr(str(data_dir))), "docs/api.md", "exec"), {})
    assert (tmp_path / "pruned.safetensors").is_file()
