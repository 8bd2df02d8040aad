"""The catalogue of bad input (issue 8): options, study files, data files, checkpoints and output
folders. Every case gives exit code 2 and one sentence naming the problem and the fix, with no
traceback, and leaves a finished study's store (and every other file in its folder) unchanged."""

from __future__ import annotations

import errno
import io
import os
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
]


def half_file(path: Path) -> Path:
    path.write_bytes(half(path.read_bytes()))
    return path


def test_the_catalogue_has_at_least_40_cases():
    assert len(CASES) >= 40 and len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input_gives_one_sentence_exit_2_and_changes_nothing(case, reference, data_dir, tmp_path, capsys):
    study, ref_out, ref_snapshot = reference
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    env = Env(study, out, data_dir, tmp_path)
    args = [str(a) for a in case.args(env)]
    before = snapshot(out)  # (after the case's own set-up, e.g. a corrupted checkpoint)
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
        Path(f).write_bytes(buf.getvalue()[:1000])
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


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(reference, data_dir, tmp_path, capsys):
    _, ref_out, _ = reference
    out = tmp_path / "out"
    shutil.copytree(ref_out, out)
    before = snapshot(out)
    for p in [out, *out.rglob("*")]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        code = main([str(a) for a in run_args(Env(reference[0], out, data_dir, tmp_path), *NEW_TRAINING)])
    finally:
        for p in [out, *out.rglob("*")]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "cannot write" in err and len(err.splitlines()) == 1
    assert snapshot(out) == before


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
