"""Saving and loading pruned models (robustprune.saving): safetensors weights, the pruned structure
as metadata, replayed on a fresh instance in another process; damaged files and failed writes are
one sentence; nothing is unpickled."""

from __future__ import annotations

import importlib
import json
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch

from robustprune import files, saving
from robustprune.errors import UserError
from robustprune.models import build_model
from robustprune.pruning.criteria import build_criterion
from robustprune.pruning.structured import prune_filters_, prune_structured_, record_step_
from robustprune.pruning.unstructured import apply_masks_, global_magnitude_masks

# The architectures, as a user's own module: the new process imports them from this file.
MODELS_SRC = '''
import torch
from torch import nn

from robustprune.models import build_model
from robustprune.models.blocks import HiddenLinear, MultiHeadSelfAttention


class ResTiny(nn.Module):
    """A residual addition: the stem's channels are coupled to the block's last conv."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        x = torch.relu(self.bn(self.stem(x)))
        x = x + self.b(torch.relu(self.a(x)))
        return self.head(x.mean((2, 3)))


class CatNet(nn.Module):
    """A concatenation, then a depthwise and a grouped conv, then flatten into a linear layer."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 6, 3, padding=1)
        self.c2 = nn.Conv2d(3, 6, 3, padding=1)
        self.dw = nn.Conv2d(12, 12, 3, padding=1, groups=12)
        self.gc = nn.Conv2d(12, 8, 1, groups=2)
        self.fc = nn.Linear(8 * 8 * 8, 5)

    def forward(self, x):
        x = torch.cat([self.c1(x), self.c2(x)], 1)
        return self.fc(torch.relu(self.gc(self.dw(x))).flatten(1))


class TinyViT(nn.Module):
    """Patch tokens, attention heads and a hidden MLP width, with residual additions."""

    def __init__(self):
        super().__init__()
        self.patch = nn.Conv2d(3, 16, 2, stride=2)
        self.norm = nn.LayerNorm(16)
        self.attn = MultiHeadSelfAttention(16, 4)
        self.fc1 = HiddenLinear(16, 32)
        self.fc2 = nn.Linear(32, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = t + self.attn(self.norm(t))
        t = t + self.fc2(torch.relu(self.fc1(t)))
        return self.head(t.mean(1))


def fresh(case):
    if case == "resnet20":
        kw = dict(num_classes=4, image_shape=(3, 8, 8), mean=(0.5,) * 3, std=(0.25,) * 3)
        return build_model("resnet20", width=4, **kw).eval()
    return {"res": ResTiny, "cat": CatNet, "vit": TinyViT, "unstructured": ResTiny}[case]().eval()
'''

# In the new process: a fresh instance of each case (other random weights), the file loaded into it.
CHILD = """
import json, sys
import safetensors.torch, torch
torch.set_num_threads(1)
folder = sys.argv[1]
sys.path.insert(0, folder)
import tiny_models
from robustprune import saving
x = safetensors.torch.load_file(folder + "/input.safetensors")["x"]
outs, counts = {}, {}
for case in sys.argv[2:]:
    torch.manual_seed(123)
    model = saving.load(folder + "/" + case + ".safetensors", tiny_models.fresh(case))
    with torch.no_grad():
        outs[case] = model(x)
    counts[case] = [sum(p.numel() for p in model.parameters()), sum(int((p == 0).sum()) for p in model.parameters())]
safetensors.torch.save_file(outs, folder + "/outputs.safetensors")
print(json.dumps(counts))
"""

CASES = ["res", "cat", "vit", "resnet20", "unstructured"]
X = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(7))


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models")
    (folder / "tiny_models.py").write_text(MODELS_SRC)
    sys.path.insert(0, str(folder))
    try:
        yield folder, importlib.import_module("tiny_models")
    finally:
        sys.path.remove(str(folder))
        sys.modules.pop("tiny_models", None)


def pruned(module, case: str):
    """The case's model, pruned as a user would prune it (seeded: the same weights every time)."""
    torch.manual_seed(0)
    model = module.fresh(case)
    l1 = build_criterion("l1")
    if case == "resnet20":
        prune_structured_(model, l1, 0.3, X[:1], target="both")  # blocks, then filters
    elif case == "unstructured":
        apply_masks_(model, global_magnitude_masks(model, 0.5))
    else:
        prune_filters_(model, l1, 0.3, X[:1])
        prune_filters_(model, l1, 0.3, X[:1])  # iterative: the second step replays on the first's result
    return model


@pytest.fixture(scope="module")
def round_trip(tiny_models):
    """Every case pruned and saved here, loaded in one new process: (pruned models, outputs, counts)."""
    folder, module = tiny_models
    models = {}
    for case in CASES:
        models[case] = pruned(module, case)
        saving.save(models[case], folder / f"{case}.safetensors", metadata={"case": case})
    safetensors.torch.save_file({"x": X}, folder / "input.safetensors")
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), *CASES], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    outs = safetensors.torch.load_file(folder / "outputs.safetensors")
    return models, outs, json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("case", CASES)
def test_a_fresh_instance_in_a_new_process_gives_identical_outputs(round_trip, tiny_models, case):
    models, outs, counts = round_trip
    model = models[case]
    with torch.no_grad():
        assert torch.equal(outs[case], model(X))
    zeros = sum(int((p == 0).sum()) for p in model.parameters())
    assert counts[case] == [n_params(model), zeros]
    unpruned = n_params(tiny_models[1].fresh(case))
    if case == "unstructured":
        assert n_params(model) == unpruned and zeros >= 0.4 * unpruned  # zeros only, same shapes
    else:
        assert n_params(model) < unpruned


def test_the_structure_is_plain_data_in_order(tiny_models):
    _, module = tiny_models
    model = pruned(module, "resnet20")
    steps = saving.structure_of(model)
    assert [s["kind"] for s in steps] == ["identity", "identity", "channels"]
    assert steps[2]["input_shape"] == [1, 3, 8, 8] and steps[2]["input_dtype"] == "float32"
    assert json.loads(json.dumps(steps)) == steps  # lists, ints, strings and bools only
    assert all(type(i) is int for _, _, idxs in steps[2]["history"] for i in idxs)
    vit = saving.structure_of(pruned(module, "vit"))
    assert [s["kind"] for s in vit] == ["channels", "heads", "channels", "heads"]
    assert saving.structure_of(pruned(module, "unstructured")) == []
    assert not any("structure" in k for k in model.state_dict())  # not a buffer: no tensor in the file


def test_apply_structure_rebuilds_the_shapes(tiny_models):
    _, module = tiny_models
    model = pruned(module, "cat")
    fresh = saving.apply_structure_(module.fresh("cat"), saving.structure_of(model))
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert saving.structure_of(fresh) == saving.structure_of(model)


def test_load_into_the_pruned_model_itself_and_save_again(tiny_models, tmp_path):
    """A model whose record matches the file's is not pruned again; a loaded model saves as it came."""
    _, module = tiny_models
    model = pruned(module, "res")
    saving.save(model, tmp_path / "a.safetensors", metadata={"epochs": 3, "note": ["x", None]})
    saving.load(tmp_path / "a.safetensors", model)
    again = saving.load(tmp_path / "a.safetensors", module.fresh("res"))
    saving.save(again, tmp_path / "b.safetensors")
    third = saving.load(tmp_path / "b.safetensors", module.fresh("res"))
    with torch.no_grad():
        assert torch.equal(third(X), model(X))
    assert saving.read_metadata(tmp_path / "a.safetensors") == {"epochs": 3, "note": ["x", None]}


def test_tied_weights_are_stored_once(tmp_path):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    model[1].weight = model[0].weight
    saving.save(model, tmp_path / "t.safetensors")
    with safetensors.safe_open(str(tmp_path / "t.safetensors"), "pt") as f:
        assert sorted(f.keys()) == ["0.bias", "0.weight", "1.bias"]
    torch.manual_seed(1)
    other = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    saving.load(tmp_path / "t.safetensors", other)
    x = torch.rand(2, 4)
    assert torch.equal(other(x), model(x))


def test_loading_unpickles_nothing(tiny_models, tmp_path, monkeypatch):
    _, module = tiny_models
    model = pruned(module, "vit")
    saving.save(model, tmp_path / "v.safetensors")

    def refuse(*args, **kwargs):
        raise AssertionError("pickle used while loading")

    for target, name in [(pickle, "loads"), (pickle, "load"), (pickle, "Unpickler"), (torch, "load")]:
        monkeypatch.setattr(target, name, refuse)
    with torch.no_grad():  # (Torch-Pruning traces with autograd: load turns it on for the replay)
        loaded = saving.load(tmp_path / "v.safetensors", module.fresh("vit"))
        assert torch.equal(loaded(X), model(X))


# ---- damaged files ----------------------------------------------------------------------------------


@pytest.fixture
def saved(tiny_models, tmp_path):
    """A pruned ResTiny saved to a file: (path, module of the architectures)."""
    _, module = tiny_models
    path = tmp_path / "res.safetensors"
    saving.save(pruned(module, "res"), path)
    return path, module


def rewrite(path: Path, **changes) -> None:
    """Rewrite the file with some metadata values changed (its tensors as they are)."""
    with safetensors.safe_open(str(path), "pt") as f:
        meta = {**f.metadata(), **changes}
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    safetensors.torch.save_file(tensors, str(path), metadata=meta)


def refused(path: Path, model, pattern: str) -> str:
    with pytest.raises(UserError, match=pattern) as e:
        saving.load(path, model)
    text = str(e.value)
    assert str(path) in text and "\n" not in text and "Traceback" not in text
    return text


NOT_SAFETENSORS = "is not a safetensors file, or is truncated or damaged"


def test_header_bytes_flipped(saved):
    path, module = saved
    data = bytearray(path.read_bytes())
    data[8:12] = b"\xff\xfe\x00\x01"  # the JSON header's first bytes
    path.write_bytes(bytes(data))
    refused(path, module.fresh("res"), NOT_SAFETENSORS)


def test_header_length_flipped(saved):
    path, module = saved
    data = bytearray(path.read_bytes())
    data[7] = 0x7F  # an absurd header length
    path.write_bytes(bytes(data))
    refused(path, module.fresh("res"), NOT_SAFETENSORS)


def test_truncated_file(saved):
    path, module = saved
    path.write_bytes(path.read_bytes()[:-100])
    refused(path, module.fresh("res"), NOT_SAFETENSORS)


def test_weight_bytes_changed(saved):
    path, module = saved
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF  # inside the last tensor: still a valid file, other weights
    path.write_bytes(bytes(data))
    refused(path, module.fresh("res"), "holds tensors that differ from those it was saved with; the file is damaged")


def test_a_torch_pickle_renamed(saved):
    path, module = saved
    torch.save(module.fresh("res").state_dict(), path)
    refused(path, module.fresh("res"), NOT_SAFETENSORS)


def test_metadata_names_a_missing_layer(saved):
    path, module = saved
    with safetensors.safe_open(str(path), "pt") as f:
        steps = json.loads(f.metadata()["structure"])
    steps[0]["history"][0][0] = "nolayer"
    rewrite(path, structure=json.dumps(steps))
    refused(
        path,
        module.fresh("res"),
        "names layer 'nolayer' which ResTiny does not have; pass a fresh instance of the architecture",
    )


def test_metadata_removes_channels_the_layer_lacks(saved):
    path, module = saved
    with safetensors.safe_open(str(path), "pt") as f:
        steps = json.loads(f.metadata()["structure"])
    steps[0]["history"][0][2] = [0, 99]
    rewrite(path, structure=json.dumps(steps))
    refused(path, module.fresh("res"), r"pruning step 1 \(channels\) of .* does not fit ResTiny \(it removes channels")


def test_a_structure_traced_from_other_inputs_needs_them(saved):
    """No input shape recorded (pruned with inputs other than one tensor): load asks for example_inputs."""
    path, module = saved
    with safetensors.safe_open(str(path), "pt") as f:
        steps = json.loads(f.metadata()["structure"])
    for step in steps:
        step["input_shape"] = step["input_dtype"] = None
    rewrite(path, structure=json.dumps(steps))
    with pytest.raises(UserError, match=r"pass example_inputs=\.\.\. as given to the pruning"):
        saving.load(path, module.fresh("res"))
    loaded = saving.load(path, module.fresh("res"), example_inputs=X[:1])
    reference = pruned(module, "res")
    with torch.no_grad():
        assert torch.equal(loaded(X), reference(X))


def test_another_architecture(saved):
    path, module = saved
    text = refused(path, module.fresh("cat"), "does not have; pass a fresh instance")
    assert "(the file was saved from ResTiny)" in text


def test_shapes_that_do_not_fit_after_replay(tiny_models, tmp_path):
    """A wider net of the same class: the replay succeeds, the weights do not fit."""
    _, module = tiny_models
    path = tmp_path / "r.safetensors"
    saving.save(pruned(module, "resnet20"), path)
    kw = dict(num_classes=4, image_shape=(3, 8, 8), mean=(0.5,) * 3, std=(0.25,) * 3)
    wide = build_model("resnet20", width=6, **kw)
    refused(path, wide, r"holds tensor '[\w.]+' of shape \(\d+(, \d+)*\) but CifarResNet has \(\d+(, \d+)*\)")


@pytest.mark.parametrize(
    "changes, pattern",
    [
        ({"structure": "[{'kind'"}, "has no valid 'structure' metadata"),
        ({"structure": '[{"kind": "prune_everything"}]'}, "unknown kind 'prune_everything'"),
        ({"structure": '[{"kind": "identity"}]'}, "pruning step 1 of .* is malformed"),
        ({"format_version": "2"}, "written by a newer robustprune .*; upgrade robustprune"),
        ({"format_version": "one"}, "has no valid format version"),
        ({"format": "other"}, "without robustprune's metadata"),
    ],
)
def test_edited_metadata(saved, changes, pattern):
    path, module = saved
    rewrite(path, **changes)
    refused(path, module.fresh("res"), pattern)


def test_a_plain_safetensors_file(tmp_path):
    path = tmp_path / "plain.safetensors"
    safetensors.torch.save_file({"weight": torch.zeros(2)}, str(path))
    refused(path, torch.nn.Linear(1, 2, bias=False), "without robustprune's metadata")


def test_a_missing_file(tmp_path):
    refused(tmp_path / "none.safetensors", torch.nn.Linear(1, 1), "does not exist; check the path")


def test_a_folder(tmp_path):
    (tmp_path / "d.safetensors").mkdir()
    refused(tmp_path / "d.safetensors", torch.nn.Linear(1, 1), "is a folder, not a regular file")


def test_a_model_pruned_otherwise(saved):
    path, module = saved
    other = module.fresh("res")
    prune_filters_(other, build_criterion("random"), 0.5, X[:1])
    refused(path, other, "was already pruned differently; pass a fresh instance")


# ---- writing --------------------------------------------------------------------------------------------


def test_a_structure_that_was_not_recorded_is_refused(tmp_path):
    model = torch.nn.Linear(1, 1)
    record_step_(model, {"kind": "unrecorded", "unit": "_SomeUnit"})
    with pytest.raises(UserError, match="was pruned by a structure robustprune cannot record"):
        saving.save(model, tmp_path / "m.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_metadata_must_be_json(tmp_path):
    with pytest.raises(UserError, match="must be a dict of JSON values"):
        saving.save(torch.nn.Linear(1, 1), tmp_path / "m.safetensors", metadata={"f": object()})
    assert list(tmp_path.iterdir()) == []


def test_a_read_only_folder(tmp_path, monkeypatch):
    def refuse(src, dst):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(files.os, "replace", refuse)
    path = tmp_path / "m.safetensors"
    with pytest.raises(UserError, match=r"\(Read-only file system\); choose a writable folder") as e:
        saving.save(torch.nn.Linear(1, 1), path)
    assert str(path) in str(e.value) and list(tmp_path.iterdir()) == []


def test_a_full_disk_keeps_the_previous_file(tmp_path, full_disk):
    path = tmp_path / "m.safetensors"
    safetensors.torch.save_file({"v": torch.ones(1)}, str(path))  # (not through robustprune: no link)
    before = path.read_bytes()
    with pytest.raises(UserError, match=r"\(No space left on device\); free some space in") as e:
        saving.save(torch.nn.Linear(64, 64), path)
    assert str(path) in str(e.value)
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["m.safetensors"]
