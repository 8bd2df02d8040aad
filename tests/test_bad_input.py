"""The catalogue of bad input (issue 8): options, study files, data files, checkpoints and output
folders. Every case gives exit code 2 and one sentence naming the problem and the fix, with no
traceback, and leaves a finished study's store (and every other file in its folder) unchanged."""

from __future__ import annotations

import errno
import io
import os
import pickle
import shutil
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import yaml
from conftest import damage_store, read_only, without_root_override, writable

from robustprune.cli import main

pytestmark = pytest.mark.slow

TINY = {
    "name": "tiny",
    "dataset": "mnist",
    "data": {"train_subset": 600, "test_subset": 100},
    "model": {"name": "mnist_cnn", "args": {"conv1": 4, "conv2": 8, "fc": 32, "kernel_size": 5, "padding": 0}},
    "train": {"epochs": 1, "batch_size": 128, "lr": 0.05},
    "finetune": {"lr": 0.01},
    "pruning": {"magnitude": {"method": "global_magnitude", "sparsities": [0.5], "finetune_epochs": [1]}},
    "evaluation": {"attack_subset": 50, "attacks": {"fgsm": {"eps": [0.1]}}},
    "seeds": [0],
}
MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
# A setting the reference run did not use: its cells are new, so the run must read and write.
NEW_EVAL = ["--set", "evaluation.attacks.fgsm.eps=[0.2]"]  # reuses the trained models (reads checkpoints)
NEW_TRAINING = ["--set", "train.lr=0.04"]  # trains a new dense model (writes a checkpoint)


def snapshot(out: Path) -> dict:
    """Every row of every table of the store, and every file of the folder with its size."""
    files = sorted(
        (str(p.relative_to(out)), p.stat().st_size)
        for p in out.rglob("*")
        if p.is_file() and not p.name.endswith(("-wal", "-shm"))
    )
    with sqlite3.connect(out / "results.sqlite") as db:
        tables = {
            t: sorted(map(repr, db.execute(f"SELECT * FROM {t}")))
            for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type='table'")
        }
    return {"files": files, "tables": tables}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """A finished study folder (1 dense + 1 pruned cell) and the study file that made it."""
    root = tmp_path_factory.mktemp("reference")
    study = root / "tiny.yaml"
    study.write_text(yaml.safe_dump(TINY))
    out = root / "out"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "robustprune",
            "run",
            str(study),
            "--data-dir",
            str(data_dir),
            "--out",
            str(out),
            "--workers",
            "1",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return study, out, snapshot(out)


@dataclass
class Env:
    study: Path  # a valid study file
    out: Path  # a copy of the finished study folder
    data: Path  # the real data folder
    tmp: Path

    def study_with(self, text: str | bytes) -> Path:
        path = self.tmp / "bad.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        return path

    def study_changed(self, change: Callable[[dict], None]) -> Path:
        raw = yaml.safe_load(self.study.read_text())
        change(raw)
        return self.study_with(yaml.safe_dump(raw))

    def mnist_copy(self, broken: Callable[[bytes], bytes] | None = None, name: str = MNIST_FILES[1]) -> Path:
        """A data folder with the real MNIST files, one of them passed through `broken`."""
        folder = self.tmp / "data" / "mnist"
        folder.mkdir(parents=True)
        src = self.data / "mnist" if (self.data / "mnist").is_dir() else self.data
        for f in MNIST_FILES:
            raw = (src / f).read_bytes()
            (folder / f).write_bytes(broken(raw) if broken and f == name else raw)
        return folder.parent

    def cifar_folder(self, name: str, content: bytes) -> Path:
        folder = self.tmp / "cdata" / "cifar10"
        folder.mkdir(parents=True)
        (folder / name).write_bytes(content)
        return folder.parent

    def weights(self, obj, name: str = "weights.pt") -> Path:
        path = self.tmp / name
        torch.save(obj, path)
        return path

    def tiny_state(self, **args) -> dict:
        from robustprune.models import build_model

        kw = TINY["model"]["args"] | args
        return build_model(
            "mnist_cnn", num_classes=10, image_shape=(1, 28, 28), mean=(0.1307,), std=(0.3081,), **kw
        ).state_dict()

    def checkpoint(self, prefix: str) -> Path:
        return next((self.out / "checkpoints").glob(f"{prefix}-*.pt"))

    def special(self, path: Path, kind: str) -> Path:
        """`path` made a FIFO, a folder, or a link to /dev/zero (the name stays the expected one)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() or path.is_symlink():
            path.unlink()
        {"fifo": os.mkfifo, "folder": Path.mkdir, "dev-zero": lambda p: p.symlink_to("/dev/zero")}[kind](path)
        return path

    def mnist_special(self, kind: str) -> Path:
        """A data folder whose last MNIST file is special (the others link to the real files)."""
        folder = self.tmp / "sdata" / "mnist"
        folder.mkdir(parents=True)
        src = self.data / "mnist" if (self.data / "mnist").is_dir() else self.data
        for f in MNIST_FILES[:-1]:
            (folder / f).symlink_to(src / f)
        self.special(folder / MNIST_FILES[-1], kind)
        return folder.parent

    def damaged_store(self, how: str) -> Path:
        """A copy of the finished folder's store, damaged; returns its folder."""
        folder = self.tmp / f"damaged-{how}"
        folder.mkdir()
        path = folder / "results.sqlite"
        if how == "fifo":
            os.mkfifo(path)
            return folder
        shutil.copy(self.out / "results.sqlite", path)
        damage_store(path, how)
        return folder


def npz_bytes(**arrays) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def cifar_arrays(n_train=50000, shape=(32, 32, 3)) -> dict:
    return {
        "x_train": np.zeros((n_train, *shape), np.uint8),
        "y_train": np.zeros(n_train, np.int64),
        "x_test": np.zeros((10000, 32, 32, 3), np.uint8),
        "y_test": np.zeros(10000, np.int64),
    }


class Payload:
    """A pickle that runs a shell command when loaded by plain pickle."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def half(raw: bytes) -> bytes:
    return raw[: len(raw) // 2]


def flip_byte(raw: bytes) -> bytes:
    return raw[:100] + bytes([raw[100] ^ 0xFF]) + raw[101:]


def run_args(e: Env, *extra, study: Path | None = None, data: Path | None = None) -> list:
    return [
        "run",
        study or e.study,
        "--data-dir",
        data or e.data,
        "--out",
        e.out,
        "--workers",
        "1",
        "--offline",
        *extra,
    ]


def cifar_study(e: Env) -> Path:
    return e.study_changed(lambda r: r.update(dataset="cifar10"))


def alias_bomb(levels: int = 9) -> str:
    """YAML whose last anchor expands to 10**levels values ("billion laughs")."""
    lines = ["l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def raw_pickle(path: Path) -> Path:
    """A plain pickle (not torch.save's zip format) of plain values."""
    path.write_bytes(pickle.dumps({"conv1.weight": [1.0, 2.0]}))
    return path


def with_text(e, extra: str) -> Path:
    """The valid study file with `extra` YAML appended."""
    return e.study_with(e.study.read_text() + extra)


@dataclass
class Case:
    id: str
    args: Callable[[Env], list]
    expect: str


CASES = [
    # ---- the command line -------------------------------------------------------------------------
    Case("unknown-command", lambda e: ["frobnicate"], "invalid choice: 'frobnicate'"),
    Case("unknown-option", lambda e: run_args(e, "--epochs", "3"), "unrecognized arguments: --epochs 3"),
    Case("workers-zero", lambda e: run_args(e, "--workers", "0"), "'0' is not a number of workers >= 1"),
    Case("seeds-zero", lambda e: run_args(e, "--seeds", "0"), "--seeds must be at least 1"),
    Case("seeds-not-int", lambda e: run_args(e, "--seeds", "two"), "invalid int value: 'two'"),
    Case("unknown-budget", lambda e: run_args(e, "--budget", "huge"), "no budget 'huge'; known budgets: full"),
    Case("set-not-key-value", lambda e: run_args(e, "--set", "nonsense"), "is not KEY=VALUE"),
    Case("set-unknown-key", lambda e: run_args(e, "--set", "trian.epochs=2"), "unknown key 'trian'"),
    Case("address-without-ray", lambda e: run_args(e, "--address", "auto"), "add --executor ray or remove --address"),
    Case("device-unknown", lambda e: run_args(e, "--device", "tpu"), "--device 'tpu' is not a device"),
    Case("device-cuda-missing", lambda e: run_args(e, "--device", "cuda:7"), "cuda"),
    Case("executor-unknown", lambda e: run_args(e, "--executor", "slurm"), "invalid choice: 'slurm'"),
    Case("report-format", lambda e: ["report", e.out, "--format", "pdf"], "invalid choice: 'pdf'"),
    Case("report-no-store", lambda e: ["report", e.tmp], "no result store"),
    Case("bench-section", lambda e: ["bench", "--section", "gpu"], "invalid choice: 'gpu'"),
    # ---- study files ------------------------------------------------------------------------------
    Case("study-missing", lambda e: run_args(e, study=e.tmp / "nope.yaml"), "does not exist; check the path"),
    Case(
        "yaml-malformed",
        lambda e: run_args(e, study=e.study_with("name: x\ntrain: [unclosed\n")),
        "is not valid YAML at line",
    ),
    Case("yaml-empty", lambda e: run_args(e, study=e.study_with("")), "must be a YAML mapping"),
    Case("yaml-list", lambda e: run_args(e, study=e.study_with("- a\n- b\n")), "must be a YAML mapping"),
    Case("yaml-not-utf8", lambda e: run_args(e, study=e.study_with(b"name: \xff\xfe\x00")), "cannot read study file"),
    Case("name-missing", lambda e: run_args(e, study=e.study_changed(lambda r: r.pop("name"))), "name"),
    Case(
        "unknown-top-key",
        lambda e: run_args(e, study=e.study_changed(lambda r: r.update(trainer={}))),
        "unknown key 'trainer'",
    ),
    Case("unknown-model", lambda e: run_args(e, "--set", "model.name=resnet9000"), "unknown model 'resnet9000'"),
    Case("model-arg-type", lambda e: run_args(e, "--set", "model.args.conv1=wide"), "does not accept args"),
    Case("unknown-dataset", lambda e: run_args(e, "--set", "dataset=mnits"), "did you mean 'mnist'"),
    Case(
        "unknown-method",
        lambda e: run_args(e, "--set", "pruning.magnitude.method=magic"),
        "unknown pruning method 'magic'",
    ),
    Case(
        "unknown-criterion",
        lambda e: run_args(
            e, "--set", "pruning.s={method: structured, sparsities: [0.3], params: {criterion: psychic}}"
        ),
        "psychic",
    ),
    Case("unknown-attack", lambda e: run_args(e, "--set", "evaluation.attacks.cw={eps: [0.1]}"), "unknown attack 'cw'"),
    Case("unknown-regime", lambda e: run_args(e, "--set", "regimes.nosy={}"), "unknown training regime 'nosy'"),
    Case("epochs-wrong-type", lambda e: run_args(e, "--set", "train.epochs=ten"), "'train.epochs'"),
    Case("epochs-negative", lambda e: run_args(e, "--set", "train.epochs=-1"), "'train.epochs'"),
    Case("lr-zero", lambda e: run_args(e, "--set", "train.lr=0"), "'train.lr'"),
    Case(
        "sparsity-above-one",
        lambda e: run_args(e, "--set", "pruning.magnitude.sparsities=[1.5]"),
        "sparsity 1.5 is outside [0, 1)",
    ),
    Case(
        "sparsity-negative",
        lambda e: run_args(e, "--set", "pruning.magnitude.sparsities=[-0.1]"),
        "sparsity -0.1 is outside [0, 1)",
    ),
    Case(
        "sparsity-empty-grid", lambda e: run_args(e, "--set", "pruning.magnitude.sparsities=[]"), "lists no sparsities"
    ),
    Case(
        "finetune-epochs-empty",
        lambda e: run_args(e, "--set", "pruning.magnitude.finetune_epochs=[]"),
        "needs at least one value",
    ),
    Case(
        "finetune-epochs-negative",
        lambda e: run_args(e, "--set", "pruning.magnitude.finetune_epochs=[-2]"),
        "fine-tuning epochs -2 is negative",
    ),
    Case(
        "eps-negative",
        lambda e: run_args(e, "--set", "evaluation.attacks.fgsm.eps=[-0.1]"),
        "eps -0.1 is outside [0, 1]",
    ),
    Case("eps-empty-grid", lambda e: run_args(e, "--set", "evaluation.attacks.fgsm.eps=[]"), "needs at least one eps"),
    Case(
        "attack-steps-zero",
        lambda e: run_args(e, "--set", "evaluation.attacks.pgd20={attack: pgd, eps: [0.1], params: {steps: 0}}"),
        "PGD steps must be an integer >= 1",
    ),
    Case("seeds-empty-grid", lambda e: run_args(e, "--set", "seeds=[]"), "needs at least one seed"),
    Case("seeds-negative", lambda e: run_args(e, "--set", "seeds=[-1]"), "seeds must be >= 0"),
    Case("seeds-repeated", lambda e: run_args(e, "--set", "seeds=[0, 0]"), "lists a value twice"),
    Case("regimes-empty", lambda e: run_args(e, "--set", "regimes={}"), "needs at least one training regime"),
    Case(
        "occlusion-too-large",
        lambda e: run_args(e, "--set", "evaluation.occlusion=[40]"),
        "occlusion size 40 is larger than the 28x28 images",
    ),
    # ---- model arguments that cannot work (issue 24, class 2): refused before anything is written --
    Case("model-width-zero", lambda e: run_args(e, "--set", "model.args.conv1=0"), "conv1 must be a whole number"),
    Case("model-width-negative", lambda e: run_args(e, "--set", "model.args.fc=-5"), "fc must be a whole number"),
    Case("model-width-fraction", lambda e: run_args(e, "--set", "model.args.conv2=2.5"), "conv2 must be a whole"),
    Case(
        "model-kernel-larger-than-image",
        lambda e: run_args(e, "--set", "model.args.kernel_size=30"),
        "cannot run on mnist images (1x28x28)",
    ),
    Case(
        "model-kernel-too-large-after-pooling",
        lambda e: run_args(e, "--set", "model.args.kernel_size=11"),
        "cannot run on mnist images (1x28x28)",
    ),
    Case("model-padding-negative", lambda e: run_args(e, "--set", "model.args.padding=-1"), "padding must be a"),
    Case(
        "model-resnet-width-zero",
        lambda e: run_args(e, "--set", "model={name: resnet20, args: {width: 0}}"),
        "width must be a whole number",
    ),
    Case(
        "model-vgg-width-mult-zero",
        lambda e: run_args(e, "--set", "model={name: vgg16_bn, args: {width_mult: 0}}"),
        "width_mult must be a number above 0",
    ),
    Case(
        "model-vit-heads-not-dividing",
        lambda e: run_args(e, "--set", "model={name: mobilevit_xs, args: {num_heads: 7}}"),
        "cannot run on mnist images",
    ),
    Case(
        "model-too-many-parameters",
        lambda e: run_args(e, "--set", "model.args={conv1: 65536, conv2: 65536}"),
        "parameters, over the limit of 1,000,000,000",
    ),
    # ---- the study's name is a label, not a path (class 3) ------------------------------------------
    Case("name-parent-path", lambda e: run_args(e, "--set", "name=../../x"), "is a label, not a path"),
    Case("name-absolute", lambda e: run_args(e, "--set", f"name={e.tmp / 'x'}"), "is a label, not a path"),
    Case("name-empty", lambda e: run_args(e, "--set", "name=''"), "is a label, not a path"),
    Case("name-dot-dot", lambda e: run_args(e, "--set", "name=.."), "is a label, not a path"),
    Case("name-too-long", lambda e: run_args(e, "--set", f"name={'a' * 101}"), "use 1 to 100 letters"),
    # ---- unbounded input (class 4) ----------------------------------------------------------------
    Case(
        "study-file-too-large",
        lambda e: run_args(e, study=with_text(e, "# " + "x" * 1_000_000 + "\n")),
        "is larger than 1 MB",
    ),
    Case(
        "yaml-alias-bomb",
        lambda e: run_args(e, study=e.study_with(alias_bomb() + "name: bomb\n")),
        "expands to more than 100000 values",
    ),
    Case(
        "yaml-deep-nesting",
        lambda e: run_args(e, study=with_text(e, "description: " + "[" * 5000 + "]" * 5000 + "\n")),
        "nesting is deeper than 50 levels",
    ),
    Case(
        "yaml-5000-digit-integer",
        lambda e: run_args(e, study=with_text(e, "description: " + "9" * 5000 + "\n")),
        "is out of range; integers must lie between -2**63 and 2**63 - 1",
    ),
    Case("seed-2-to-the-70", lambda e: run_args(e, "--set", f"seeds=[{2**70}]"), "is out of range"),
    Case("seed-2-to-the-32", lambda e: run_args(e, "--set", f"seeds=[{2**32}]"), "seeds must be >= 0 and < 2**32"),
    Case(
        "corruption-seed-2-to-the-40",
        lambda e: run_args(e, "--set", f"evaluation.corruptions={{seed: {2**40}}}"),
        "seeds must be >= 0 and < 2**32",
    ),
    Case("epochs-huge", lambda e: run_args(e, "--set", "train.epochs=1000000000"), "less than or equal to 10000"),
    Case("seeds-option-huge", lambda e: run_args(e, "--seeds", "100000000000"), "--seeds must be at most 1000"),
    Case("grid-over-max-cells", lambda e: run_args(e, "--max-cells", "1"), "2 cells, over the limit of 1"),
    Case(
        "grid-of-a-million-cells",
        lambda e: run_args(
            e, "--seeds", "1000", "--set", f"pruning.magnitude.sparsities={[i / 1000 for i in range(1000)]}"
        ),
        "1,001,000 cells, over the limit of 10,000",
    ),
    # ---- duplicate keys (class 5) -------------------------------------------------------------------
    Case(
        "duplicate-top-level-key",
        lambda e: run_args(e, study=with_text(e, "name: again\n")),
        "key 'name' appears twice (lines",
    ),
    Case(
        "duplicate-nested-key",
        lambda e: run_args(e, study=e.study_with("name: d\ntrain:\n  epochs: 1\n  lr: 0.1\n  epochs: 2\n")),
        "key 'epochs' appears twice in 'train' (lines 3 and 5)",
    ),
    Case(
        "duplicate-key-in-a-budget",
        lambda e: run_args(e, study=with_text(e, "budgets:\n  quick:\n    train.epochs: 1\n    train.epochs: 2\n")),
        "key 'train.epochs' appears twice in 'budgets.quick'",
    ),
    Case(
        "duplicate-key-in-set",
        lambda e: run_args(e, "--set", "model.args={conv1: 4, conv1: 6}"),
        "key 'conv1' appears twice",
    ),
    # ---- smaller messages (class 11) ----------------------------------------------------------------
    Case("set-empty-key", lambda e: run_args(e, "--set", "=5"), "--set =5 has no key; write --set KEY=VALUE"),
    Case("lr-inf", lambda e: run_args(e, "--set", "train.lr=.inf"), "'train.lr' is inf, not a finite number"),
    Case("lr-nan", lambda e: run_args(e, "--set", "train.lr=.nan"), "'train.lr' is nan, not a finite number"),
    Case("eps-inf", lambda e: run_args(e, "--set", "evaluation.attacks.fgsm.eps=[.inf]"), "is inf, not a finite"),
    Case("model-arg-inf", lambda e: run_args(e, "--set", "model.args.conv1=.inf"), "'model.args.conv1' is inf"),
    Case(
        "regime-param-nan",
        lambda e: run_args(e, "--set", "regimes={noisy_labels: {rate: .nan}}"),
        "'regimes.noisy_labels.rate' is nan",
    ),
    Case(
        "weights-raw-pickle",
        lambda e: run_args(e, "--set", f"model.weights={raw_pickle(e.tmp / 'raw.pkl')}"),
        "weights file",
    ),
    # ---- data files -------------------------------------------------------------------------------
    Case(
        "data-folder-missing",
        lambda e: run_args(e, *NEW_TRAINING, data=e.tmp / "no-data"),
        "is missing and downloading is off",
    ),
    Case("data-folder-is-file", lambda e: run_args(e, *NEW_TRAINING, data=e.study), "is a file; point --data-dir"),
    Case(
        "gz-truncated",
        lambda e: run_args(e, *NEW_TRAINING, data=e.mnist_copy(half)),
        "is corrupt or not the official file",
    ),
    Case(
        "gz-checksum",
        lambda e: run_args(e, *NEW_TRAINING, data=e.mnist_copy(flip_byte, MNIST_FILES[0])),
        "is corrupt or not the official file (MD5",
    ),
    Case(
        "gz-not-gzip",
        lambda e: run_args(e, *NEW_TRAINING, data=e.mnist_copy(lambda raw: b"<html>404</html>")),
        "is corrupt or not the official file",
    ),
    Case(
        "npz-truncated",
        lambda e: run_args(
            e, study=cifar_study(e), data=e.cifar_folder("cifar10.npz", half(npz_bytes(**cifar_arrays(n_train=10))))
        ),
        "is not a readable .npz archive",
    ),
    Case(
        "npz-wrong-shape",
        lambda e: run_args(
            e, study=cifar_study(e), data=e.cifar_folder("cifar10.npz", npz_bytes(**cifar_arrays(shape=(28, 28, 3))))
        ),
        "not uint8 of shape (50000, 32, 32, 3)",
    ),
    Case(
        "npz-missing-array",
        lambda e: run_args(e, study=cifar_study(e), data=e.cifar_folder("cifar10.npz", npz_bytes(x_train=np.zeros(3)))),
        "has no array 'y_train'",
    ),
    Case(
        "tar-corrupt",
        lambda e: run_args(
            e, study=cifar_study(e), data=e.cifar_folder("cifar-10-python.tar.gz", b"\x1f\x8b" + os.urandom(2000))
        ),
        "is corrupt or not the official file",
    ),
    # ---- checkpoints and weights files ------------------------------------------------------------
    Case("weights-missing", lambda e: run_args(e, "--set", f"model.weights={e.tmp / 'none.pt'}"), "model.weights file"),
    Case(
        "weights-other-architecture",
        lambda e: run_args(e, "--set", f"model.weights={e.weights(e.tiny_state(conv1=6))}"),
        "does not fit this model",
    ),
    Case(
        "weights-truncated",
        lambda e: run_args(e, "--set", f"model.weights={half_file(e.weights(e.tiny_state()))}"),
        "is truncated or corrupt",
    ),
    Case(
        "weights-not-state-dict",
        lambda e: run_args(e, "--set", f"model.weights={e.weights([1, 2, 3])}"),
        "holds no state dict",
    ),
    Case(
        "weights-pickle-payload",
        lambda e: run_args(e, "--set", f"model.weights={e.weights({'state': Payload(e.tmp / 'pwned')})}"),
        "holds objects other than tensors",
    ),
    Case(
        "cached-checkpoint-truncated",
        lambda e: [half_file(e.checkpoint("dense")), run_args(e, *NEW_EVAL)][1],
        "is truncated or corrupt",
    ),
    Case(
        "cached-checkpoint-payload",
        lambda e: [
            shutil.copy(e.weights({"state": Payload(e.tmp / "pwned")}), e.checkpoint("dense")),
            run_args(e, *NEW_EVAL),
        ][1],
        "holds objects other than tensors",
    ),
    # ---- output folders ---------------------------------------------------------------------------
    Case(
        "out-is-a-file", lambda e: ["run", e.study, "--data-dir", e.data, "--out", e.study], "is a file, not a folder"
    ),
    Case("report-out-is-a-file", lambda e: ["report", e.out, "--out", e.study], "is a file, not a folder"),
    # ---- special files where a file is expected (issue 24): refused by kind, never blocking on ----
    Case("study-is-a-folder", lambda e: run_args(e, study=e.special(e.tmp / "s.yaml", "folder")), "is a folder, not"),
    Case("study-is-a-fifo", lambda e: run_args(e, study=e.special(e.tmp / "s.yaml", "fifo")), "is a named pipe (FIFO)"),
    Case("study-is-dev-zero", lambda e: run_args(e, study=Path("/dev/zero")), "is a character device, not"),
    Case("study-is-dev-null", lambda e: run_args(e, study=Path("/dev/null")), "is a character device, not"),
    Case(
        "weights-is-a-fifo",
        lambda e: run_args(e, "--set", f"model.weights={e.special(e.tmp / 'w.pt', 'fifo')}"),
        "model.weights file",
    ),
    Case("weights-is-dev-zero", lambda e: run_args(e, "--set", "model.weights=/dev/zero"), "model.weights file"),
    Case(
        "data-file-is-a-fifo",
        lambda e: run_args(e, *NEW_TRAINING, data=e.mnist_special("fifo")),
        "is a named pipe (FIFO), not a regular file; replace it with the official",
    ),
    Case(
        "data-file-is-a-folder",
        lambda e: run_args(e, *NEW_TRAINING, data=e.mnist_special("folder")),
        "is a folder, not a regular file",
    ),
    Case(
        "data-file-is-dev-zero",
        lambda e: run_args(e, *NEW_TRAINING, data=e.mnist_special("dev-zero")),
        "is a character device, not a regular file",
    ),
    Case(
        "npz-is-a-fifo",
        lambda e: run_args(
            e, study=cifar_study(e), data=e.special(e.tmp / "cdata" / "cifar10" / "cifar10.npz", "fifo").parent.parent
        ),
        "cifar10.npz is a named pipe (FIFO)",
    ),
    Case(
        "cached-checkpoint-is-a-fifo",
        lambda e: [e.special(e.checkpoint("dense"), "fifo"), run_args(e, *NEW_EVAL)][1],
        "is a named pipe (FIFO), not a regular file; delete it so it is recomputed",
    ),
    # ---- a damaged result store (issue 24) --------------------------------------------------------
    Case("report-store-garbage", lambda e: ["report", e.damaged_store("garbage")], "is damaged (file is not a"),
    Case("report-store-empty", lambda e: ["report", e.damaged_store("empty")], "is damaged (the file is empty)"),
    Case("report-store-truncated", lambda e: ["report", e.damaged_store("truncated")], "is damaged (database disk"),
    Case("report-store-no-runs", lambda e: ["report", e.damaged_store("runs")], "is damaged (no such table: runs)"),
    Case("report-store-no-cells", lambda e: ["report", e.damaged_store("cells")], "is damaged (no such table: cells)"),
    Case("report-store-is-a-fifo", lambda e: ["report", e.damaged_store("fifo")], "is a named pipe (FIFO)"),
    Case(
        "run-into-a-damaged-store",
        lambda e: ["run", e.study, "--data-dir", e.data, "--out", e.damaged_store("garbage"), "--workers", "1"],
        "; run the study again into a new --out folder",
    ),
]


def half_file(path: Path) -> Path:
    path.write_bytes(half(path.read_bytes()))
    return path


def test_the_catalogue_has_at_least_40_cases():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_sentence_exit_2_and_changes_nothing(case, reference, data_dir, tmp_path, capsys, no_hang):
    study, ref_out, ref_snapshot = reference
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    env = Env(study, out, data_dir, tmp_path)
    args = [str(a) for a in case.args(env)]
    before = snapshot(out)  # (after the case's own set-up, e.g. a corrupted checkpoint)
    with no_hang(300):  # a FIFO or a device read by mistake would block or never end
        code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert case.expect in err
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("robustprune"), err
    assert snapshot(out) == before
    assert not (tmp_path / "pwned").exists()  # no payload ever ran


def test_a_malicious_pickle_runs_its_payload_when_loaded_unsafely_but_not_here(tmp_path):
    """The payload is real (plain pickle runs it), and robustprune refuses the file without running it."""
    from robustprune import checkpoint
    from robustprune.errors import UserError

    path = tmp_path / "evil.pt"
    torch.save({"state": Payload(tmp_path / "pwned")}, path)
    with pytest.raises(UserError, match="holds objects other than tensors"):
        checkpoint.load(path)
    with pytest.raises(UserError, match="holds objects other than tensors"):
        checkpoint.load_weights(path)
    assert not (tmp_path / "pwned").exists()
    torch.load(path, weights_only=False)  # what an unsafe loader would do
    assert (tmp_path / "pwned").exists()


def run_on_a_copy(reference, data_dir, tmp_path, capsys, *extra) -> tuple[int, str, Path, dict]:
    """Run the tiny study again (with `extra` options) on a copy of the finished folder; returns the
    exit code, stderr, the folder and its snapshot from before the run."""
    _, ref_out, _ = reference
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    before = snapshot(out)
    code = main([str(a) for a in run_args(Env(reference[0], out, data_dir, tmp_path), *extra)])
    return code, capsys.readouterr().err.strip(), out, before


def test_full_disk_while_writing_a_checkpoint(reference, data_dir, tmp_path, monkeypatch, capsys):
    """ENOSPC halfway through a checkpoint: exit 2, no half-written file left, the store unchanged."""
    from robustprune import checkpoint

    real_save = torch.save

    def save_until_full(obj, f, *a, **kw):
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[:1000])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", save_until_full)
    code, err, out, before = run_on_a_copy(reference, data_dir, tmp_path, capsys, *NEW_TRAINING)
    assert code == 2 and "No space left on device" in err and "free some space" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert snapshot(out) == before
    assert not list(out.rglob("*.tmp"))


def test_read_only_checkpoint_folder(reference, data_dir, tmp_path, monkeypatch, capsys):
    """EROFS when a checkpoint is moved in place: exit 2, nothing left behind."""
    from robustprune import checkpoint

    def refuse(src, dst):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(checkpoint.os, "replace", refuse)
    code, err, out, before = run_on_a_copy(reference, data_dir, tmp_path, capsys, *NEW_TRAINING)
    assert code == 2 and "Read-only file system" in err and "choose a writable folder" in err
    assert snapshot(out) == before and not list(out.rglob("*.tmp"))


def test_full_disk_while_writing_the_store(reference, data_dir, tmp_path, monkeypatch, capsys):
    """SQLite's own 'database or disk is full' (its size capped at what it holds): exit 2, the
    transaction rolled back, the rows already there intact."""
    from robustprune.study import store as store_mod

    real_init = store_mod.Store.__init__

    def capped(self, *a, **kw):
        real_init(self, *a, **kw)
        pages = self.db.execute("PRAGMA page_count").fetchone()[0]
        self.db.execute(f"PRAGMA max_page_count = {pages}")

    monkeypatch.setattr(store_mod.Store, "__init__", capped)
    code, err, out, before = run_on_a_copy(reference, data_dir, tmp_path, capsys, *NEW_EVAL)
    assert code == 2 and "database or disk is full" in err and "free some space" in err, err
    assert len(err.splitlines()) == 1
    assert snapshot(out) == before


def cli_as_a_user(*args, **kw) -> subprocess.CompletedProcess:
    """The CLI in a process bound by file modes (as root too: its override is dropped)."""
    return subprocess.run(
        [sys.executable, "-m", "robustprune", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=without_root_override,
        **kw,
    )


def test_read_only_output_folder(reference, data_dir, tmp_path):
    _, ref_out, _ = reference
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    before = snapshot(out)
    read_only(out)
    try:
        proc = cli_as_a_user(*run_args(Env(reference[0], out, data_dir, tmp_path), *NEW_TRAINING))
    finally:
        writable(out)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and "cannot write" in err and len(err.splitlines()) == 1, err
    assert "choose a writable" in err and "Traceback" not in err
    assert snapshot(out) == before


@pytest.mark.parametrize("what", ["folder", "store file"])
def test_report_reads_a_store_it_cannot_write(what, reference, tmp_path):
    """report needs no write access: a read-only folder (SQLite cannot make its index file beside
    the store) or a store file of mode 0444 gives the same tables as a writable copy."""
    _, ref_out, _ = reference
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    expected = cli_as_a_user("report", out, "--format", "markdown")
    assert expected.returncode == 0, expected.stderr
    before = sorted(p.name for p in out.rglob("*"))
    read_only(out if what == "folder" else out / "results.sqlite")
    try:
        proc = cli_as_a_user("report", out, "--format", "markdown")
        claims = cli_as_a_user("report", out, "--claims", "--format", "csv")
    finally:
        writable(out)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == expected.stdout and "Table" in proc.stdout
    assert claims.returncode in (0, 2) and "Traceback" not in claims.stderr  # (the tiny study lists no claims)
    if what == "folder":
        assert sorted(p.name for p in out.rglob("*")) == before  # not even SQLite's own -wal/-shm files


def test_full_disk_while_training(reference, data_dir, tmp_path, full_disk, capsys):
    """The new dense model's checkpoint goes to /dev/full (the kernel's own ENOSPC): the sentence,
    exit 2, no partial file, the store unchanged."""
    code, err, out, before = run_on_a_copy(reference, data_dir, tmp_path, capsys, *NEW_TRAINING)
    assert code == 2, err
    assert err.startswith(f"robustprune: error: cannot write {out / 'checkpoints'}/dense-"), err
    assert f"free some space in {out / 'checkpoints'} or choose another folder (--out, --checkpoints)" in err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert snapshot(out) == before and not list(out.rglob("*.tmp"))


@pytest.mark.parametrize("option", ["--out", "--figures"])
def test_full_disk_while_writing_a_report(option, reference, tmp_path, full_disk, capsys):
    _, ref_out, _ = reference
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    before = snapshot(out)
    target = tmp_path / "report"
    code = main(["report", str(out), option, str(target)])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert "No space left on device" in err and f"or choose another folder ({option}" in err, err
    assert err.endswith("the result store is not changed") and len(err.splitlines()) == 1
    assert not [p for p in target.rglob("*") if p.is_file()]  # no half-written file, no report.md
    assert snapshot(out) == before


def test_full_standard_output(reference, tmp_path):
    """report --format csv > a file on a full disk (/dev/full): one sentence, exit 2."""
    _, ref_out, _ = reference
    if not os.path.exists("/dev/full"):
        pytest.skip("needs /dev/full (Linux)")
    with open("/dev/full", "w") as full:
        proc = subprocess.run(
            [sys.executable, "-m", "robustprune", "report", str(ref_out), "--format", "csv"],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
        )
    err = proc.stderr.strip()
    assert proc.returncode == 2, err
    assert err == (
        "robustprune: error: cannot write the output (standard output) (No space left on device); "
        "free some space there or send the output elsewhere"
    )


def test_weights_file_is_the_dense_model(reference, data_dir, tmp_path):
    """model.weights: the dense model is the file's (not trained), and its SHA-256 is in every row's config."""
    import hashlib
    import json

    from robustprune import checkpoint

    study, ref_out, _ = reference
    dense_ckpt = next((ref_out / "checkpoints").glob("dense-*.pt"))
    weights = tmp_path / "w.pt"
    torch.save({"state": checkpoint.load(dense_ckpt)["state"]}, weights)
    out = tmp_path / "loaded"
    assert (
        main(
            [
                "run",
                str(study),
                "--data-dir",
                str(data_dir),
                "--out",
                str(out),
                "--workers",
                "1",
                "--set",
                f"model.weights={weights}",
            ]
        )
        == 0
    )
    with sqlite3.connect(out / "results.sqlite") as db:
        rows = db.execute("SELECT axes, metric, value, config FROM results").fetchall()
    with sqlite3.connect(ref_out / "results.sqlite") as db:
        ref = dict(((a, m), v) for a, m, v in db.execute("SELECT axes, metric, value FROM results"))
    dense = {m: v for a, m, v, _ in rows if json.loads(a)["pruning"] == "dense"}
    assert dense["acc_clean"] == ref[(next(a for (a, m) in ref if json.loads(a)["pruning"] == "dense"), "acc_clean")]
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert all(json.loads(c)["model"]["weights_sha256"] == sha for *_, c in rows)
    assert not list((out / "checkpoints").glob("dense-*.pt"))  # nothing was trained


def test_a_bad_checkpoint_found_by_a_ray_worker_is_one_sentence(reference, data_dir, tmp_path):
    """The same sentence and exit code when the error happens inside a Ray task."""
    if not os.environ.get("CI"):
        pytest.importorskip("ray")
    study, ref_out, _ = reference
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    half_file(next((out / "checkpoints").glob("dense-*.pt")))
    before = snapshot(out)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "robustprune",
            "run",
            str(study),
            "--data-dir",
            str(data_dir),
            "--out",
            str(out),
            "--executor",
            "ray",
            *NEW_EVAL,
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    err = proc.stderr.strip()
    assert proc.returncode == 2, err
    last = err.splitlines()[-1]  # (Ray may print its own notices first)
    assert last.startswith("robustprune: error: checkpoint") and "is truncated or corrupt" in last
    assert "Traceback" not in err and "RayTaskError" not in err
    assert snapshot(out) == before
