"""ONNX export (rp.export_onnx) and measured latency (rp.latency): onnxruntime's outputs equal
PyTorch's, a wrong export is refused, a missing extra and a failed write are one sentence, and the
latency report's figures, speed-ups, notes and thread handling."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import read_only, without_root_override, writable
from torch import nn

from robustprune import export
from robustprune.errors import UserError
from robustprune.metrics import latency as latency_mod
from robustprune.models import build_model
from robustprune.pruning.criteria import build_criterion
from robustprune.pruning.structured import prune_filters_

try:
    import onnxruntime as ort
except ImportError:  # the test extra holds it, so CI always runs these
    if os.environ.get("CI"):
        raise
    pytest.skip('needs the onnx extra (pip install -e ".[onnx]")', allow_module_level=True)


def resnet20(width: int) -> nn.Module:
    torch.manual_seed(0)
    model = build_model(
        "resnet20", num_classes=10, image_shape=(3, 32, 32), mean=(0.5,) * 3, std=(0.25,) * 3, width=width
    )
    return model.to(memory_format=torch.channels_last).eval()


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return build_model(
        "mnist_cnn", num_classes=10, image_shape=(1, 28, 28), mean=(0.1,), std=(0.3,), conv1=4, conv2=6, fc=8
    )


def pruned_resnet20(width: int) -> nn.Module:
    model = resnet20(width)
    prune_filters_(model, build_criterion("l1"), 0.3, torch.rand(1, 3, 32, 32))
    return model.eval()


class ConcatDepthwise(nn.Module):
    """Two branches concatenated, then a depthwise conv (groups = channels) and a head."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(3, 4, 1)
        self.dw = nn.Conv2d(10, 10, 3, padding=1, groups=10)
        self.bn = nn.BatchNorm2d(10)
        self.fc = nn.Linear(10, 5)

    def forward(self, x):
        y = torch.cat([torch.relu(self.a(x)), self.b(x)], dim=1)
        return self.fc(torch.relu(self.bn(self.dw(y))).mean((2, 3)))


class TransformerBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(16, 2, 32, dropout=0.0, batch_first=True)
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(self.layer(x).mean(1))


class BatchScaled(nn.Module):
    """float(x.shape[0]) becomes a constant when traced: right at the traced batch size only."""

    def forward(self, x):
        return x.flatten(1) * float(x.shape[0])


def onnx_outputs(path, x: torch.Tensor) -> np.ndarray:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]


def assert_same(model: nn.Module, path, x: torch.Tensor) -> None:
    with torch.no_grad():
        expected = model(x).numpy()
    got = onnx_outputs(path, x)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, np.abs(expected).max())


CASES = {
    "small_cnn": (small_cnn, (1, 28, 28)),
    "residual": (lambda: resnet20(4), (3, 32, 32)),
    "concat_depthwise": (ConcatDepthwise, (3, 16, 16)),
    "pruned_resnet20": (lambda: pruned_resnet20(8), (3, 32, 32)),
    "transformer": (TransformerBlock, (5, 16)),
}


# ---- export round trip ------------------------------------------------------------------------


@pytest.mark.parametrize("name", CASES)
def test_onnx_outputs_equal_torch_at_two_batch_sizes(tmp_path, name):
    build, shape = CASES[name]
    torch.manual_seed(0)
    model = build().train()  # exported in eval mode, and left in train mode
    x = torch.rand(1, *shape)
    path = export.export_onnx(model, tmp_path / f"{name}.onnx", x)
    assert path == tmp_path / f"{name}.onnx" and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    assert model.training
    model.eval()
    for batch in (1, 5):  # the batch axis is dynamic
        assert_same(model, path, torch.rand(batch, *shape))


def test_pruned_resnet20_is_smaller_on_disk_and_fixed_batch_works(tmp_path):
    dense, pruned = resnet20(8), pruned_resnet20(8)
    x = torch.rand(2, 3, 32, 32)
    a = export.export_onnx(dense, tmp_path / "dense.onnx", x, dynamic_batch=False)
    b = export.export_onnx(pruned, tmp_path / "pruned.onnx", x, dynamic_batch=False, opset=17)
    assert b.stat().st_size < 0.7 * a.stat().st_size  # 30 % of the filters gone: about half the weights
    assert_same(pruned, b, x)
    session = ort.InferenceSession(str(b), providers=["CPUExecutionProvider"])
    assert session.get_inputs()[0].shape == [2, 3, 32, 32]


def test_auto_falls_back_to_the_torch_export_based_exporter(tmp_path, tiny_cnn, monkeypatch):
    """'auto' tries the TorchScript exporter, then the torch.export-based one (the only one once
    torch drops TorchScript); when both fail the sentence names each failure."""

    def gone(*a, **kw):
        raise RuntimeError("the TorchScript exporter is gone")

    monkeypatch.setitem(export._EXPORT, "torchscript", gone)
    path = export.export_onnx(tiny_cnn, tmp_path / "m.onnx", torch.rand(1, 1, 28, 28))
    for batch in (1, 3):
        assert_same(tiny_cnn, path, torch.rand(batch, 1, 28, 28))
    monkeypatch.setitem(export._EXPORT, "dynamo", lambda *a, **kw: b"not a model")
    with pytest.raises(UserError) as e:
        export.export_onnx(tiny_cnn, tmp_path / "n.onnx", torch.rand(1, 1, 28, 28))
    text = str(e.value)
    assert text.startswith("cannot export MnistCNN to ONNX (torchscript exporter: the TorchScript exporter is gone; ")
    assert "dynamo exporter: " in text and "\n" not in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


# ---- the check --------------------------------------------------------------------------------


def test_a_traced_constant_that_differs_at_another_batch_size_is_refused(tmp_path):
    with pytest.raises(UserError, match=r"cannot export BatchScaled to ONNX \(torchscript exporter: .*differ"):
        export.export_onnx(BatchScaled(), tmp_path / "m.onnx", torch.rand(1, 4), exporter="torchscript")
    assert list(tmp_path.iterdir()) == []


def test_perturbed_runtime_outputs_are_refused_with_the_difference(tmp_path, tiny_cnn, monkeypatch):
    real_run = ort.InferenceSession.run

    def off_by_half(self, *a, **kw):
        return [o + 0.5 for o in real_run(self, *a, **kw)]

    monkeypatch.setattr(ort.InferenceSession, "run", off_by_half)
    with pytest.raises(UserError) as e:
        export.export_onnx(tiny_cnn, tmp_path / "m.onnx", torch.rand(1, 1, 28, 28), exporter="torchscript")
    text = str(e.value)
    assert "differ from PyTorch's by up to 0.5 of their scale (allowed 0.0001)" in text and "\n" not in text
    assert list(tmp_path.iterdir()) == []
    # check=False writes it all the same
    assert export.export_onnx(tiny_cnn, tmp_path / "m.onnx", torch.rand(1, 1, 28, 28), check=False).exists()


def test_bad_arguments_are_one_sentence(tmp_path, tiny_cnn):
    x = torch.rand(1, 1, 28, 28)
    with pytest.raises(UserError, match="unknown ONNX exporter 'jit'"):
        export.export_onnx(tiny_cnn, tmp_path / "m.onnx", x, exporter="jit")
    with pytest.raises(UserError, match="example_inputs must be a tensor"):
        export.export_onnx(tiny_cnn, tmp_path / "m.onnx", [3.0])
    with pytest.raises(UserError, match="unknown latency runtime 'tensorrt'"):
        export.latency(tiny_cnn, example_inputs=x, runtime="tensorrt")
    with pytest.raises(UserError, match="batch_sizes must be whole numbers"):
        export.latency(tiny_cnn, example_inputs=x, batch_sizes=(1, 0))
    with pytest.raises(UserError, match="threads must be a whole number of at least 1"):
        export.latency(tiny_cnn, example_inputs=x, threads=0)


# ---- the optional extra -----------------------------------------------------------------------


def test_without_the_onnx_extra(tmp_path, tiny_cnn, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # `import onnxruntime` now raises ImportError
    x = torch.rand(1, 1, 28, 28)
    hint = 'ONNX export needs the onnx extra; install it with pip install -e ".[onnx]"'
    with pytest.raises(UserError) as e:
        export.export_onnx(tiny_cnn, tmp_path / "m.onnx", x)
    assert str(e.value) == hint
    with pytest.raises(UserError) as e:
        export.latency(tiny_cnn, example_inputs=x, runtime="both", threads=1)
    assert str(e.value) == hint
    assert list(tmp_path.iterdir()) == []
    report = export.latency(tiny_cnn, example_inputs=x, runtime="torch", batch_sizes=(2,), repeats=2, threads=1)
    assert [e.runtime for e in report.entries] == ["torch"]  # torch alone needs no extra


# ---- writes that fail -------------------------------------------------------------------------


def test_a_full_disk_leaves_the_previous_file(tmp_path, tiny_cnn, full_disk):
    path = tmp_path / "m.onnx"
    path.write_bytes(b"the previous export")
    with pytest.raises(UserError) as e:
        export.export_onnx(tiny_cnn, path, torch.rand(1, 1, 28, 28))
    text = str(e.value)
    assert text.startswith(f"cannot write {path} (No space left on device); free some space in {tmp_path}"), text
    assert path.read_bytes() == b"the previous export" and [p.name for p in tmp_path.iterdir()] == ["m.onnx"]


WRITE_READ_ONLY = """
import sys, torch
from robustprune.errors import UserError
from robustprune.export import export_onnx
model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.ReLU())
try:
    export_onnx(model, sys.argv[1], torch.rand(1, 1, 8, 8))
except UserError as e:
    print(e)
"""


def test_a_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    read_only(folder)
    try:
        done = subprocess.run(
            [sys.executable, "-c", WRITE_READ_ONLY, str(folder / "m.onnx")],
            capture_output=True,
            text=True,
            timeout=600,
            preexec_fn=without_root_override,  # root ignores the mode bits otherwise
        )
    finally:
        writable(folder)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(f"cannot write {folder / 'm.onnx'} (Permission denied); choose a writable")
    assert list(folder.iterdir()) == []


# ---- latency ----------------------------------------------------------------------------------


class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Costly(nn.Module):
    """Takes (fixed + per_item * batch) ms of the fake clock per forward pass."""

    def __init__(self, clock: FakeClock, fixed: float, per_item: float, width: int):
        super().__init__()
        self.clock, self.fixed, self.per_item = clock, fixed, per_item
        self.fc = nn.Linear(width, width)
        self.threads_seen: list[int] = []

    def forward(self, x):
        self.threads_seen.append(torch.get_num_threads())
        self.clock.now += (self.fixed + self.per_item * x.shape[0]) / 1000.0
        return x


def test_speedup_is_dense_over_pruned_per_batch_size(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(latency_mod, "clock", clock)
    dense, pruned = Costly(clock, 2.0, 1.0, 8).train(), Costly(clock, 1.0, 0.25, 4).eval()
    before = torch.get_num_threads()
    report = export.latency(
        dense, pruned, example_inputs=torch.rand(1, 8), batch_sizes=(1, 8), repeats=5, warmup=2, threads=before + 1
    )
    assert [(e.runtime, e.batch) for e in report.entries] == [("torch", 1), ("torch", 8)]
    one, eight = report.entry("torch", 1), report.entry("torch", 8)
    assert (one.dense_ms, one.pruned_ms) == pytest.approx((3.0, 1.25))
    assert (eight.dense_ms, eight.pruned_ms) == pytest.approx((10.0, 3.0))
    assert one.speedup == pytest.approx(2.4) and report.speedup("torch", 8) == pytest.approx(10 / 3)
    assert one.dense_spread == pytest.approx((3.0, 3.0))
    assert len(dense.threads_seen) == 2 * (2 + 5) and set(dense.threads_seen) == {before + 1}
    assert torch.get_num_threads() == before and dense.training and not pruned.training
    # batch 1 costs 3 ms of which 3 - 10 / 8 = 1.75 ms do not grow with the batch
    assert any("torch at batch 1: about 1.75 of 3.00 ms is fixed per-call overhead" in n for n in report.notes)
    d = report.to_dict()
    assert d["threads"] == before + 1 and d["repeats"] == 5
    assert d["entries"][1] == {
        "runtime": "torch",
        "batch": 8,
        "dense_ms": pytest.approx(10.0),
        "dense_p10_ms": pytest.approx(10.0),
        "dense_p90_ms": pytest.approx(10.0),
        "pruned_ms": pytest.approx(3.0),
        "pruned_p10_ms": pytest.approx(3.0),
        "pruned_p90_ms": pytest.approx(3.0),
        "speedup": pytest.approx(10 / 3),
    }
    lines = report.table().splitlines()
    assert f"{before + 1} thread(s), median of 5 runs" in lines[0]
    rows = [line.split() for line in lines if line.split()[:1] == ["torch"]]
    assert [(r[1], r[2], r[4], r[6]) for r in rows] == [
        ("1", "3.000", "1.250", "2.40x"),
        ("8", "10.000", "3.000", "3.33x"),
    ]


def test_a_masked_model_is_named_as_the_reason(monkeypatch):
    clock = FakeClock()
    monkeypatch.setattr(latency_mod, "clock", clock)
    dense, masked = Costly(clock, 1.0, 1.0, 8), Costly(clock, 1.0, 1.0, 8)
    report = export.latency(dense, masked, example_inputs=torch.rand(1, 8), batch_sizes=(4,), repeats=3, threads=1)
    assert report.speedup("torch", 4) == pytest.approx(1.0)
    assert any("masked (zeroed) weights run at the dense speed" in n for n in report.notes)


def test_torch_and_onnxruntime_on_a_pruned_resnet20(monkeypatch):
    dense, pruned = resnet20(16).train(), pruned_resnet20(16)
    before = torch.get_num_threads()
    sessions = []
    real_session = export._session

    def spy(*a, **kw):
        sessions.append(real_session(*a, **kw))
        return sessions[-1]

    monkeypatch.setattr(export, "_session", spy)
    report = export.latency(
        dense, pruned, example_inputs=torch.rand(1, 3, 32, 32), runtime="both", batch_sizes=(1, 4), repeats=3, threads=2
    )
    timed = sessions[-1], sessions[-3]  # each model's export check opens a session of its own first
    assert [s.get_session_options().intra_op_num_threads for s in timed] == [2, 2]
    assert timed[0].get_session_options().graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    assert [(e.runtime, e.batch) for e in report.entries] == [
        ("torch", 1),
        ("torch", 4),
        ("onnxruntime", 1),
        ("onnxruntime", 4),
    ]
    for e in report.entries:
        assert e.dense_ms > 0 and e.pruned_ms > 0 and e.speedup == e.dense_ms / e.pruned_ms
        assert e.dense_spread[0] <= e.dense_ms <= e.dense_spread[1]
    assert torch.get_num_threads() == before and dense.training
    # 11/22/45 filters per stage: not whole blocks of onnxruntime's 16 channels
    assert any("21 of the pruned model's 21 convolutions" in n for n in report.notes)
    assert str(report).count("onnxruntime") >= 2 and report.to_dict()["threads"] == 2


# ---- threads ----------------------------------------------------------------------------------


def test_measure_latency_defaults_to_the_idle_usable_cores_and_restores_the_count(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(latency_mod, "default_threads", lambda: before + 1)
    model = Costly(FakeClock(), 1.0, 0.0, 4)
    r = latency_mod.measure_latency(model, torch.rand(2, 4), warmup=1, repeats=3)
    assert set(model.threads_seen) == {before + 1} and torch.get_num_threads() == before
    assert set(r) == {"median_ms", "p10_ms", "p90_ms"}


@pytest.mark.parametrize(
    "cpus, quota, idle, expected",
    [
        ({0, 1}, None, 0.0, 1),  # both cores busy with other work: one thread, no waiting at barriers
        ({0, 1}, None, 1.9, 2),
        ({0, 1, 2, 3}, None, 2.8, 3),
        ({0, 1, 2, 3}, 1.5, 3.9, 2),  # a CPU quota of 1.5 cores caps the 4 allowed CPUs at 2
        ({0, 1, 2, 3}, None, None, 4),  # no /proc/stat: every usable core
    ],
)
def test_default_threads(monkeypatch, cpus, quota, idle, expected):
    monkeypatch.setattr(latency_mod, "_allowed_cpus", lambda: cpus)
    monkeypatch.setattr(latency_mod, "_cgroup_cpu_limit", lambda: quota)
    monkeypatch.setattr(latency_mod, "idle_cores", lambda: idle)
    assert latency_mod.default_threads() == expected


def test_idle_cores_is_measured_on_this_machine():
    idle = latency_mod.idle_cores(0.05)
    if idle is None:
        pytest.skip("no /proc/stat")
    assert 0.0 <= idle <= len(latency_mod._allowed_cpus()) + 1e-9
    assert 1 <= latency_mod.default_threads() <= latency_mod.usable_cores()
