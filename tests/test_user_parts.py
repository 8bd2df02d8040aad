"""A user's own model and data: study files that import an architecture and read an .npz file, an
image folder or a data function, and the one-model commands `robustprune prune | evaluate`, all
through the public CLI in a folder of the user's own (real MNIST subsets)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import stored_results

NETS = '''
import torch
from torch import nn


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class ResCNN(nn.Module):
    """A residual CNN of the user's own: images in [0, 1], normalisation left out."""

    def __init__(self, width=16, num_classes=10, channels=1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1, bias=False), nn.BatchNorm2d(width),
                                  nn.ReLU(), nn.MaxPool2d(2))
        self.block = Block(width)
        self.head = nn.Linear(width * 14 * 14, num_classes)

    def forward(self, x):
        return self.head(self.block(self.stem(x)).flatten(1))


def make_net(width=16, num_classes=10, image_shape=(1, 28, 28)):
    return ResCNN(width, num_classes, image_shape[0])


def not_a_model(**kwargs):
    return "a string"
'''

DATA = """
import numpy as np


def load(n=1500):
    f = np.load("digits.npz")
    train = (f["x_train"][:n].astype("float32") / 255, f["y_train"][:n])
    return train, (f["x_test"], f["y_test"])
"""


@pytest.fixture(scope="module")
def user_folder(tmp_path_factory, data_dir) -> Path:
    """A folder as a user has it: their network module, their data loader and an .npz of MNIST."""
    from robustprune.data import load_dataset

    folder = tmp_path_factory.mktemp("user")
    (folder / "mynets.py").write_text(NETS)
    (folder / "mydata.py").write_text(DATA)
    ds = load_dataset("mnist", data_dir)
    np.savez(
        folder / "digits.npz",
        x_train=ds.x_train[:3000].numpy(),
        y_train=ds.y_train[:3000].numpy(),
        x_test=ds.x_test[:500].numpy(),
        y_test=ds.y_test[:500].numpy(),
    )
    return folder


def cli(folder: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "robustprune", *args], cwd=folder, capture_output=True, text=True, timeout=600
    )


def study(folder: Path, name: str, data: str, model: str, extra: str = "", epochs: int = 1) -> Path:
    path = folder / f"{name}.yaml"
    path.write_text(
        textwrap.dedent(f"""\
        name: {name}
        data: {data}
        model: {model}
        train: {{epochs: {epochs}, lr: 0.05}}
        evaluation: {{attack_subset: 100, attacks: {{fgsm: {{eps: [0.1]}}}}}}
        seeds: [0]
        """)
        + extra
    )
    return path


def test_a_study_on_the_users_model_and_npz_data(user_folder):
    extra = (
        "pruning:\n  channels: {method: structured, sparsities: [0.3], finetune_epochs: [1], params: {criterion: l1}}\n"
    )
    study(user_folder, "own", "{npz: digits.npz}", '{import: "mynets:make_net", kwargs: {width: 8}}', extra)
    r = cli(user_folder, "run", "own.yaml", "--out", "runs/own", "--workers", "2")
    assert r.returncode == 0, r.stderr
    rows = stored_results(user_folder / "runs" / "own")
    assert rows[("dense", "acc_clean")] > 0.8  # the user's net really trained on the user's images
    assert rows[("channels", "acc_clean")] > 0.5
    assert 0 <= rows[("channels", "acc_adv:fgsm@0.1")] <= rows[("channels", "acc_clean")] + 0.05
    report = cli(user_folder, "report", "runs/own")  # a fresh process finds the model and data again
    assert report.returncode == 0, report.stderr
    assert "channels s=0.3" in report.stdout


def test_an_image_folder_and_a_data_function(user_folder):
    from PIL import Image

    f = np.load(user_folder / "digits.npz")
    root = user_folder / "pngs"
    for split, n in (("train", 1000), ("test", 200)):
        for i in range(n):
            label = int(f[f"y_{split}"][i])
            path = root / split / f"digit{label}" / f"{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(f[f"x_{split}"][i, 0]).save(path)
    model = '{import: "mynets:make_net", kwargs: {width: 8}}'
    for name, data in (("folder", "{folder: pngs}"), ("function", '{import: "mydata:load", kwargs: {n: 1000}}')):
        study(user_folder, name, data, model, epochs=3)
        r = cli(user_folder, "run", f"{name}.yaml", "--out", f"runs/{name}", "--workers", "1")
        assert r.returncode == 0, r.stderr
        assert stored_results(user_folder / "runs" / name)[("dense", "acc_clean")] > 0.5, name


@pytest.mark.parametrize(
    "data, model, phrase",
    [
        ("{npz: digits.npz}", '{import: "nonesuch:make"}', "model.import 'nonesuch:make': no module named 'nonesuch'"),
        ("{npz: digits.npz}", '{import: "mynets:make_nett"}', "mynets has no 'make_nett'"),
        ("{npz: digits.npz}", '{import: "mynets"}', "is not an import path; write it as package.module:name"),
        ("{npz: digits.npz}", '{import: "mynets:not_a_model"}', "returned a str, not a torch nn.Module"),
        ("{npz: digits.npz}", '{name: resnet20, import: "mynets:make_net"}', "give either name"),
        ("{npz: missing.npz}", '{import: "mynets:make_net"}', "the data file missing.npz does not exist"),
        ("{npz: mynets.py}", '{import: "mynets:make_net"}', "cannot be read as .npz"),
        ("{npz: digits.npz, folder: pngs}", '{import: "mynets:make_net"}', "give one source of images"),
        ('{import: "mydata:nothing"}', '{import: "mynets:make_net"}', "mydata has no 'nothing'"),
    ],
)
def test_bad_user_parts_are_one_sentence(user_folder, data, model, phrase):
    name = "bad"
    study(user_folder, name, data, model)
    r = cli(user_folder, "run", f"{name}.yaml", "--out", "runs/bad")
    assert r.returncode == 2, r.stderr
    assert phrase in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert not (user_folder / "runs" / "bad" / "results.sqlite").exists()


def test_prune_and_evaluate_one_model_from_the_command_line(user_folder):
    common = ["--model", "mynets:make_net", "--arg", "width=8", "--data", "digits.npz", "--test-subset", "300"]
    r = cli(user_folder, "prune", *common, "--method", "structured", "--ratio", "0.3", "--param", "criterion=l1",
            "--finetune-epochs", "1", "--attack", "fgsm:eps=0.1", "--save", "pruned.safetensors",
            "--json", "pruned.json", "--latency", "both")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "acc_adv:fgsm@0.1" in r.stdout
    assert "onnxruntime" in r.stdout and "speed-up" in r.stdout  # dense vs pruned latency, measured
    result = json.loads((user_folder / "pruned.json").read_text())
    assert result["pruned"]["parameters"] < result["dense"]["parameters"]
    assert result["pruned"]["acc_clean"] > 0.5  # fine-tuned for one epoch
    # the saved file, evaluated by a new process on a fresh instance, gives the same numbers
    r = cli(user_folder, "evaluate", *common, "--weights", "pruned.safetensors", "--attack", "fgsm:eps=0.1",
            "--json", "again.json")  # fmt: skip
    assert r.returncode == 0, r.stderr
    again = json.loads((user_folder / "again.json").read_text())["metrics"]
    for metric in ("acc_clean", "acc_adv:fgsm@0.1", "parameters"):
        assert again[metric] == result["pruned"][metric], metric
    bad = cli(user_folder, "evaluate", *common, "--attack", "pgd")
    assert bad.returncode == 2 and "attack 'pgd' needs its eps" in bad.stderr
    bad = cli(user_folder, "evaluate", "--model", "mynets:make_net", "--data", "nothing-here")
    assert bad.returncode == 2 and "is neither a dataset" in bad.stderr


def test_the_example_study_of_a_users_own_model_runs_as_documented(tmp_path, data_dir):
    """examples/own_model: the README's and docs/api.md's complete example, run from its folder."""
    folder = Path(__file__).resolve().parents[1] / "examples" / "own_model"
    out = tmp_path / "own_model"
    r = cli(folder, "run", "study.yaml", "--budget", "smoke", "--out", str(out), "--data-dir", str(data_dir))
    assert r.returncode == 0, r.stderr
    rows = stored_results(out)
    assert rows[("dense", "acc_clean")] > 0.5
    assert {("channels", "acc_adv:autoattack@0.1"), ("magnitude", "acc_corruption")} <= set(rows)
    report = cli(folder, "report", str(out))
    assert report.returncode == 0 and "channels s=0.3" in report.stdout, report.stderr


def test_the_readme_shows_the_example_study_as_it_is():
    import re

    import yaml

    root = Path(__file__).resolve().parents[1]
    shown = re.search(r"```yaml\n(name: own_model.*?)```", (root / "README.md").read_text(), re.S).group(1)
    assert yaml.safe_load(shown) == yaml.safe_load((root / "examples" / "own_model" / "study.yaml").read_text())
