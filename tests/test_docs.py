"""Docs that stay true: every Python example in the README and docs/ runs (on small real subsets,
with the placeholders it names: `model`, `x`, `y`, `MyNet`, `x_train`, ...), every command line
shown parses with the real CLI, every study file and budget it names exists, the quick ones
(`list`, `--help`) run, and the synopsis in docs/usage.md lists exactly the options each command has."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def blocks(path: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(), re.S)


def commands(path: Path) -> list[str]:
    """The robustprune command lines of a document's bash blocks (continuations joined)."""
    out = []
    for block in blocks(path, "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            line = line.split(" #")[0].strip()
            for part in line.split("&&"):
                part = part.strip()
                if part.startswith("cd "):
                    continue
                if part.startswith("robustprune "):
                    out.append(part)
    return out


PYTHON = [(p, i) for p in DOCS for i, _ in enumerate(blocks(p, "python"))]
COMMANDS = [(p, c) for p in DOCS for c in commands(p)]


def _mnist_namespace(data_dir):
    from robustprune.data import load_dataset
    from robustprune.models import build_model
    from robustprune.train import TrainConfig, train

    ds = load_dataset("mnist", data_dir)

    def MyNet():  # noqa: N802  (the docs' placeholder for the user's architecture class)
        return build_model("mnist_cnn", num_classes=10, image_shape=(1, 28, 28), mean=ds.mean, std=ds.std)

    torch.manual_seed(0)
    model = MyNet()
    train(model, ds.x_train[:2000], ds.y_train[:2000], TrainConfig(epochs=1), seed=0)
    x, y = ds.x_test[:32].float() / 255, ds.y_test[:32]
    return {
        "model": model.eval(),
        "MyNet": MyNet,
        "x": x,
        "y": y,
        "x_train": ds.x_train[:1000],
        "y_train": ds.y_train[:1000],
        "x_test": ds.x_test[:16],  # (the README's AutoAttack at 8/255 leaves most MNIST points standing: few)
        "y_test": ds.y_test[:16],
    }


def _cifar_namespace(data_dir):
    from robustprune.data import load_dataset
    from robustprune.models import build_model

    ds = load_dataset("cifar10", data_dir)
    torch.manual_seed(0)
    model = build_model("resnet20", num_classes=10, image_shape=(3, 32, 32), mean=ds.mean, std=ds.std, width=8)
    return {"model": model.eval(), "x": ds.x_train[:32].float() / 255, "y": ds.y_train[:32]}


@pytest.mark.parametrize("path, index", PYTHON, ids=[f"{p.name}-{i}" for p, i in PYTHON])
def test_every_python_example_runs(path, index, tmp_path, monkeypatch, data_dir):
    code = blocks(path, "python")[index].replace('"../shared/data"', repr(str(data_dir)))
    monkeypatch.chdir(tmp_path)
    namespace = _cifar_namespace(data_dir) if path.name == "cifar-structured.md" else _mnist_namespace(data_dir)
    exec(compile(code, f"{path.name} example {index + 1}", "exec"), namespace)


@pytest.mark.parametrize("path, line", COMMANDS, ids=[f"{p.name}:{c[:60]}" for p, c in COMMANDS])
def test_every_command_shown_parses_and_names_what_exists(path, line, monkeypatch, capsys):
    from robustprune.cli import build_parser, main
    from robustprune.study.schema import load_study

    argv = shlex.split(line)[1:]
    argv = [a.replace("$s", "cifar_mrpf") for a in argv]  # a loop variable in the claims guide
    if "--help" in argv or argv[:1] == ["list"]:
        with pytest.raises(SystemExit) if "--help" in argv else _nothing():
            assert main(argv) == 0
        assert capsys.readouterr().out.strip()
        return
    args = build_parser().parse_args(argv)  # every option shown exists and takes what is shown
    if args.command == "run":
        study = args.study
        if "own_model" in line or not (ROOT / study).exists():
            study = ROOT / "examples" / "own_model" / "study.yaml" if "study.yaml" == study else ROOT / study
        assert Path(study).exists(), f"{path.name}: {line}: {study} does not exist"
        monkeypatch.chdir(Path(study).parent if "own_model" in str(study) else ROOT)
        load_study(study, args.budget)  # the study file and its budget exist and are valid


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _options(parser) -> set[str]:
    return {o for a in parser._actions for o in a.option_strings if o.startswith("--") and o != "--help"}


def test_the_synopsis_lists_exactly_each_commands_options():
    from robustprune.cli import build_parser

    text = (ROOT / "docs" / "usage.md").read_text()
    synopsis = blocks(ROOT / "docs" / "usage.md", "text")[0]
    entries = re.split(r"(?m)^(?=robustprune )", synopsis)
    sub = next(a for a in build_parser()._actions if a.__class__.__name__ == "_SubParsersAction")
    shown = {e.split()[1]: set(re.findall(r"--[a-z][a-z-]*", e)) for e in entries if e.strip()}
    for name, parser in sub.choices.items():
        assert name in shown, f"docs/usage.md's synopsis lacks 'robustprune {name}'"
        assert shown[name] == _options(parser), (name, shown[name] ^ _options(parser))
    assert "## Commands" in text
