"""What a new user does with their own network, end to end through `import robustprune as rp`, on
real data: a residual CNN of their own (MNIST) and a Hugging Face ViT built from a config
(CIFAR-10). Prune structurally and by magnitude, fine-tune, evaluate under AutoAttack and
corruptions, save, load in a new process, export to ONNX and measure the speed-up."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

import robustprune as rp

RESCNN = '''
import torch
from torch import nn


class ResCNN(nn.Module):
    """A residual CNN of the user's own (images in [0, 1])."""

    def __init__(self, width=16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.MaxPool2d(2))
        self.conv1, self.bn1 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width)
        self.head = nn.Linear(width * 14 * 14, 10)

    def forward(self, x):
        x = self.stem(x)
        x = torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))
        return self.head(x.flatten(1))
'''


def _load_in_new_process(tmp_path, module_code: str, build: str, path, x: torch.Tensor) -> torch.Tensor:
    """rp.load in a fresh interpreter on a fresh instance; its outputs on x."""
    (tmp_path / "usernet.py").write_text(module_code)
    torch.save(x, tmp_path / "x.pt")
    script = textwrap.dedent(f"""
        import torch, robustprune as rp, usernet
        model = rp.load({str(path)!r}, model={build})
        torch.save(model.eval()(torch.load("x.pt")), "out.pt")
    """)
    r = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    return torch.load(tmp_path / "out.pt")


def _same_outputs(model: nn.Module, loaded: torch.Tensor, x: torch.Tensor) -> None:
    with torch.no_grad():
        ref = model.to(memory_format=torch.contiguous_format).eval()(x)
    assert torch.allclose(loaded, ref, atol=1e-5, rtol=1e-5) and torch.equal(loaded.argmax(1), ref.argmax(1))


def _export_and_time(tmp_path, dense: nn.Module, pruned: nn.Module, x1: torch.Tensor) -> None:
    path = rp.export_onnx(pruned, tmp_path / "pruned.onnx", example_inputs=x1)  # checked against torch
    assert path.is_file() and path.stat().st_size > 1000
    report = rp.latency(dense, pruned, example_inputs=x1, runtime="both", batch_sizes=(1, 16), repeats=3)
    for runtime in ("torch", "onnxruntime"):
        for batch in (1, 16):
            e = report.entry(runtime, batch)
            assert e.dense_ms > 0 and e.pruned_ms > 0
            assert e.speedup == pytest.approx(e.dense_ms / e.pruned_ms)
    assert "speed-up" in report.table()


@pytest.fixture(scope="module")
def mnist(data_dir):
    from robustprune.data import load_dataset

    ds = load_dataset("mnist", data_dir)
    return (ds.x_train[:3000], ds.y_train[:3000]), (ds.x_test[:300], ds.y_test[:300])


def test_a_users_residual_cnn_from_pruning_to_onnx(tmp_path, mnist):
    train, test = mnist
    namespace: dict = {}
    exec(RESCNN, namespace)
    torch.manual_seed(0)
    dense = rp.finetune(namespace["ResCNN"](), train, epochs=1, lr=0.05, schedule="onecycle")
    structured = rp.prune(dense, "structured", ratio=0.3, criterion="l1", example_inputs=test[0][:1])
    assert structured.conv1.out_channels == structured.conv2.out_channels == 11  # 16 - round(0.3 * 16), once
    magnitude = rp.prune(dense, "global_magnitude", ratio=0.5)
    for model in (structured, magnitude):
        rp.finetune(model, train, epochs=1)
    result = rp.evaluate(
        structured,
        test,
        attacks={"autoattack": {"eps": 0.1, "subset": 32}},
        shifts={"corruptions": {"types": ["gaussian_noise", "fog"], "severities": [3]}},
    )
    assert result["acc_clean"] > 0.8
    assert result["acc_adv:autoattack@0.1"] <= result["acc_adv:autoattack@0"] <= 1
    assert 0 < result["acc_corruption@3"] <= 1 and result["masking_violations"] == 0
    x = test[0][:8].float() / 255
    for name, model in (("structured", structured), ("magnitude", magnitude)):
        path = rp.save(model, tmp_path / f"{name}.safetensors")
        _same_outputs(model, _load_in_new_process(tmp_path, RESCNN, "usernet.ResCNN()", path, x), x)
    _export_and_time(tmp_path, dense, structured, x[:1])


@pytest.fixture(scope="module")
def cifar(data_dir):
    from robustprune.data import load_dataset

    ds = load_dataset("cifar10", data_dir)
    return (ds.x_train[:512], ds.y_train[:512]), (ds.x_test[:64], ds.y_test[:64])


VIT = """
from transformers import ViTConfig, ViTForImageClassification

from robustprune.pruning.hf import HFClassifier


def vit():
    config = ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=128, num_labels=10)
    return HFClassifier(ViTForImageClassification(config))
"""


def test_a_hugging_face_vit_from_pruning_to_onnx(tmp_path, cifar):
    pytest.importorskip("transformers")
    train, test = cifar
    namespace: dict = {}
    exec(VIT, namespace)
    torch.manual_seed(0)
    dense = rp.finetune(namespace["vit"](), train, epochs=1, lr=0.01)
    structured = rp.prune(dense, "structured", ratio=0.3, example_inputs=test[0][:1])
    layer = structured.model.vit.layers[0]  # (transformers 5's layout)
    assert layer.attention.num_attention_heads == 3  # 4 heads, 30 % removed, at least one kept
    assert layer.mlp.fc1.out_features == 90  # 128 - round(0.3 * 128)
    magnitude = rp.prune(dense, "global_magnitude", ratio=0.5)
    for model in (structured, magnitude):
        rp.finetune(model, train, epochs=1, lr=0.01)
    result = rp.evaluate(
        structured,
        test,
        attacks={"autoattack": {"eps": 8 / 255, "subset": 16, "attacks": ["apgd_ce", "apgd_t"]}},
        shifts={"corruptions": {"types": ["gaussian_noise"], "severities": [5]}},
    )
    assert result["acc_adv:autoattack@0.0313725"] <= result["acc_adv:autoattack@0"]
    assert 0 <= result["acc_corruption:gaussian_noise@5"] <= 1
    x = test[0][:4].float() / 255
    path = rp.save(structured, tmp_path / "vit.safetensors")
    _same_outputs(structured, _load_in_new_process(tmp_path, VIT, "usernet.vit()", path, x), x)
    _export_and_time(tmp_path, dense, structured, x[:1])
