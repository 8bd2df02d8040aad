"""A hostile file system (issue 24): every writer meets a full disk and every reader a special file.

A full disk is the kernel's own: the temporary file a writer fills is a link to /dev/full, so torch,
matplotlib and plain writes each fail the way they do on a full device (torch with a RuntimeError
and no errno). Each writer must give one sentence naming the file and its folder, leave no partial
file, and keep the previous version. Each reader must refuse a FIFO, a folder or a device by its
kind, at once, instead of blocking on it, reading forever, or calling it missing."""

from __future__ import annotations

import errno
import io
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from robustprune import checkpoint, files
from robustprune.errors import UserError

SENTENCE = re.compile(r"^cannot write (?P<path>\S+) \((?P<why>[^)]+)\); free some space in (?P<folder>\S+) or choose")


def assert_full_disk_sentence(e: UserError, path: Path) -> None:
    text = str(e)
    m = SENTENCE.match(text)
    assert m, text
    assert m["path"] == str(path) and m["folder"] == str(path.parent), text
    assert "\n" not in text


def only(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---- 1. a full disk, for each kind of writer -----------------------------------------------------


def test_checkpoint_on_a_full_disk_keeps_the_previous_version(tmp_path, full_disk):
    path = tmp_path / "c.pt"
    torch.save({"v": torch.tensor([1.0])}, path)  # (not through robustprune: the link is not made)
    with pytest.raises(UserError) as e:
        checkpoint.save({"v": torch.zeros(100_000)}, path)
    assert_full_disk_sentence(e.value, path)
    assert "(No space left on device)" in str(e.value) and "--checkpoints" in str(e.value)
    assert checkpoint.load(path)["v"].item() == 1.0 and only(tmp_path) == ["c.pt"]


@pytest.mark.parametrize(
    "message",
    [
        "[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598",
        "PytorchStreamWriter failed writing file data/0: file write failed",
        "[enforce fail at inline_container.cc:603] . PytorchStreamWriter failed writing central directory",
    ],
)
def test_the_runtime_errors_torch_gives_for_a_full_disk(tmp_path, monkeypatch, message):
    """Given a path rather than a file, torch.save reports a full disk as a RuntimeError with no errno."""
    real_save = torch.save

    def stops_halfway(obj, f, *a, **kw):
        buf = io.BytesIO()
        real_save(obj, buf)
        f.write(buf.getvalue()[:500])
        raise RuntimeError(message)

    monkeypatch.setattr(checkpoint.torch, "save", stops_halfway)
    with pytest.raises(UserError) as e:
        checkpoint.save({"v": torch.zeros(1000)}, tmp_path / "sub" / "c.pt")
    assert_full_disk_sentence(e.value, tmp_path / "sub" / "c.pt")
    assert only(tmp_path / "sub") == []


def test_torchs_runtime_error_for_a_file_it_cannot_open(tmp_path, monkeypatch):
    def refused(obj, f, *a, **kw):
        raise RuntimeError(
            "[enforce fail at inline_container.cc:747] . open file failed with strerror: Permission denied"
        )

    monkeypatch.setattr(checkpoint.torch, "save", refused)
    with pytest.raises(UserError, match=r"\(Permission denied\); choose a writable folder \(--out, --checkpoints\)"):
        checkpoint.save({"v": 1}, tmp_path / "c.pt")
    assert only(tmp_path) == []


def test_a_runtime_error_that_is_not_a_write_failure_stays_a_bug(tmp_path, monkeypatch):
    def broken(obj, f, *a, **kw):
        raise RuntimeError("something else went wrong")

    monkeypatch.setattr(checkpoint.torch, "save", broken)
    with pytest.raises(RuntimeError, match="something else"):
        checkpoint.save({"v": 1}, tmp_path / "c.pt")
    assert only(tmp_path) == []


def test_figure_on_a_full_disk(tmp_path, full_disk):
    from robustprune.report.figures import _pyplot, write_png

    fig = _pyplot().figure()
    fig.gca().plot([0, 1], [1, 0])
    path = tmp_path / "figures" / "f.png"
    with pytest.raises(UserError) as e:
        write_png(fig, path)
    assert_full_disk_sentence(e.value, path)
    assert "--figures" in str(e.value) and "the result store is not changed" in str(e.value)
    assert only(path.parent) == [] and not _pyplot().get_fignums()  # closed all the same


def test_security_figure_on_a_full_disk(tmp_path, full_disk):
    from robustprune.evaluation.security import plot_security_curves

    path = tmp_path / "security.png"
    with pytest.raises(UserError) as e:
        plot_security_curves({"dense": {"eps": [0, 0.1], "robust_accuracy": [1.0, 0.5]}}, path, "Linf")
    assert_full_disk_sentence(e.value, path)
    assert only(tmp_path) == []


def test_robustbench_entry_on_a_full_disk(tmp_path, full_disk):
    from robustprune.evaluation.robustbench import robustbench_entry, write_robustbench_json

    path = tmp_path / "model_info" / "m.json"
    with pytest.raises(UserError) as e:
        write_robustbench_json(robustbench_entry(0.9, 0.5, 0.3, "Linf", 100, "mnist", "m"), path)
    assert_full_disk_sentence(e.value, path)
    assert "--robustbench" in str(e.value) and only(path.parent) == []


def test_text_files_on_a_full_disk_keep_the_previous_version(tmp_path, full_disk):
    """Report files (markdown, CSV, LaTeX) and the bench's JSON go through one writer."""
    path = tmp_path / "report.md"
    path.write_text("the previous report\n")
    with pytest.raises(UserError) as e:
        files.write_text(path, "x" * 100_000, "--out", files.STORE_UNCHANGED)
    assert_full_disk_sentence(e.value, path)
    assert path.read_text() == "the previous report\n" and only(tmp_path) == ["report.md"]


def test_a_read_only_folder_is_its_own_sentence(tmp_path, monkeypatch):
    def refuse(src, dst):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(files.os, "replace", refuse)
    with pytest.raises(UserError, match=r"\(Read-only file system\); choose a writable folder \(--out\)"):
        files.write_text(tmp_path / "a.csv", "a,b\n", "--out")
    assert only(tmp_path) == []


def test_result_store_on_a_full_disk_rolls_back(tmp_path):
    """SQLite's own 'database or disk is full': the cell is not stored, the ones before are intact."""
    from robustprune.study.cells import Cell
    from robustprune.study.store import Store

    def cell(h: str) -> Cell:
        return Cell(study="s", axes={"seed": 0}, config={"h": h}, hash=h, dense_key={})

    store = Store(tmp_path / "results.sqlite")
    try:
        store.put(cell("a"), {"m": 1.0}, 1.0)
        pages = store.db.execute("PRAGMA page_count").fetchone()[0]
        store.db.execute(f"PRAGMA max_page_count = {pages}")
        with pytest.raises(UserError, match="database or disk is full.*free some space in .* or choose another --out"):
            store.put(cell("b"), {f"m{i}": float(i) for i in range(2000)}, 1.0, per_image={"acc": [True] * 10**5})
        assert store.done_hashes() == {"a"} and not store.db.in_transaction
        assert store.db.execute("SELECT count(*) FROM results").fetchone()[0] == 1
    finally:
        store.close()


def test_a_download_that_fills_the_disk(tmp_path, monkeypatch):
    from robustprune.data import base

    class Response(io.BytesIO):
        pass

    monkeypatch.setattr(base.urllib.request, "urlopen", lambda url, timeout: Response(b"x" * 1000))

    def full(src, dst):
        dst.write(b"x" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(base.shutil, "copyfileobj", full)
    with pytest.raises(UserError) as e:
        base.fetch(["https://a.example/f.gz", "https://b.example/f.gz"], tmp_path / "mnist" / "f.gz", "0" * 32)
    assert_full_disk_sentence(e.value, tmp_path / "mnist" / "f.gz")
    assert "--data-dir" in str(e.value) and only(tmp_path / "mnist") == []


# ---- 7. special files where a file is expected ----------------------------------------------------

KINDS = {
    "fifo": "is a named pipe (FIFO), not a regular file",
    "folder": "is a folder, not a regular file",
    "dev-zero": "is a character device, not a regular file",
    "dev-null": "is a character device, not a regular file",
}


def special(path: Path, kind: str) -> Path:
    """Make `path` a special file of `kind` (devices as links, so the name is the expected one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero" if kind == "dev-zero" else "/dev/null")
    return path


@pytest.fixture(params=list(KINDS))
def kind(request):
    if request.param == "fifo" and not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this system")
    if request.param.startswith("dev") and not os.path.exists("/dev/zero"):
        pytest.skip("no /dev/zero on this system")
    return request.param


def test_weights_file(tmp_path, kind, no_hang):
    path = special(tmp_path / "weights.pt", kind)
    with no_hang(20), pytest.raises(UserError, match=re.escape(f"weights file {path} {KINDS[kind]}")):
        checkpoint.load_weights(path)


def test_cached_checkpoint(tmp_path, kind, no_hang):
    path = special(tmp_path / "dense-abc.pt", kind)
    with no_hang(20), pytest.raises(UserError, match=re.escape(f"checkpoint {path} {KINDS[kind]}")):
        checkpoint.load(path)


def test_study_file(tmp_path, kind, no_hang):
    from robustprune.study.schema import load_study

    path = special(tmp_path / "study.yaml", kind)
    with no_hang(20), pytest.raises(UserError, match=re.escape(f"study file {path} {KINDS[kind]}")):
        load_study(path)


def test_mnist_data_file(tmp_path, kind, mnist_dir, no_hang):
    """The last of the four files is the special one; the others are links to the real files."""
    from robustprune.data import load_dataset
    from robustprune.data.mnist import FILES

    names = [f for f, _, _ in FILES.values()]
    (tmp_path / "mnist").mkdir()
    for name in names[:-1]:
        (tmp_path / "mnist" / name).symlink_to(mnist_dir / name)
    path = special(tmp_path / "mnist" / names[-1], kind)
    with no_hang(30), pytest.raises(UserError, match=re.escape(f"data file {path} {KINDS[kind]}")):
        load_dataset("mnist", tmp_path, download=False)


def test_cifar_file(tmp_path, kind, no_hang):
    from robustprune.data import load_dataset

    path = special(tmp_path / "cifar10" / "cifar10.npz", kind)
    with no_hang(20), pytest.raises(UserError, match=re.escape(f"{path} {KINDS[kind]}")):
        load_dataset("cifar10", tmp_path, download=False)


def test_cifar10c_file(tmp_path, kind, no_hang):
    from robustprune.attacks.cifar10c import load_cifar10c

    np.save(tmp_path / "labels.npy", np.zeros(50, np.uint8))
    path = special(tmp_path / "fog.npy", kind)
    with no_hang(20), pytest.raises(UserError, match=re.escape(f"CIFAR-10-C file {path} {KINDS[kind]}")):
        load_cifar10c(tmp_path, "fog", 1)


def test_result_store(tmp_path, kind, no_hang):
    from robustprune.study.store import Store

    path = special(tmp_path / "results.sqlite", kind)
    for readonly in (True, False):
        with no_hang(20), pytest.raises(UserError, match=re.escape(f"the result store {path} {KINDS[kind]}")):
            Store(path, readonly=readonly)


def test_a_link_to_a_regular_file_is_a_regular_file(tmp_path):
    target = tmp_path / "real.yaml"
    target.write_text(yaml.safe_dump({"name": "x"}))
    (tmp_path / "link.yaml").symlink_to(target)
    files.check_regular_file(tmp_path / "link.yaml", "study file", "fix")
    files.check_regular_file(tmp_path / "missing.yaml", "study file", "fix")  # missing: the caller's sentence


def test_a_reader_that_stops_early_ends_the_command_quietly():
    """`robustprune list | head -1`: the closed pipe is the reader's choice, not an error."""
    import os
    import subprocess
    import sys

    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first line: every write meets a broken pipe
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "robustprune", "list"], stdout=write_end, stderr=subprocess.PIPE, timeout=120
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 0 and proc.stderr.decode() == ""
