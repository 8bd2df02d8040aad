"""Checkpoint files: written whole or not at all, temporaries of dead writers cleaned up, user
weights files accepted in the usual layouts and refused with one sentence otherwise."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch

from robustprune import checkpoint
from robustprune.errors import UserError


def test_a_failed_write_keeps_the_previous_file_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "c.pt"
    checkpoint.save({"v": torch.tensor([1.0])}, path)
    real_save = torch.save

    def crash_midway(obj, f, *a, **kw):
        real_save({"partial": torch.zeros(3)}, f)
        raise KeyboardInterrupt  # any interruption between writing and renaming

    monkeypatch.setattr(checkpoint.torch, "save", crash_midway)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save({"v": torch.tensor([2.0])}, path)
    assert checkpoint.load(path)["v"].item() == 1.0
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_only_temporaries_of_dead_writers_on_this_host_are_removed(tmp_path):
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    host = socket.gethostname()
    files = {
        "dead": f"a.pt.{host}.{dead}.tmp",
        "alive": f"b.pt.{host}.{os.getpid()}.tmp",
        "other_host": f"c.pt.elsewhere.{dead}.tmp",
        "not_ours": "notes.tmp",
        "checkpoint": "d.pt",
    }
    for name in files.values():
        (tmp_path / name).write_bytes(b"x")
    assert checkpoint.remove_stale_temporaries(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(v for k, v in files.items() if k != "dead")
    assert checkpoint.remove_stale_temporaries(tmp_path / "missing") == 0


@pytest.mark.parametrize("layout", ["plain", "state", "state_dict"])
def test_weights_files_in_the_usual_layouts(tmp_path, layout, tiny_cnn):
    state = tiny_cnn.state_dict()
    path = tmp_path / "w.pt"
    torch.save(state if layout == "plain" else {layout: state, "epoch": 3}, path)
    loaded = checkpoint.load_weights(path)
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)


@pytest.mark.parametrize(
    "obj, expected",
    [
        ([1, 2], "holds no state dict"),
        ({}, "holds no state dict"),
        ({"state": {"w": 3}}, "holds no state dict"),
    ],
)
def test_weights_files_that_hold_no_state_dict(tmp_path, obj, expected):
    path = tmp_path / "w.pt"
    torch.save(obj, path)
    with pytest.raises(UserError, match=expected):
        checkpoint.load_weights(path)


def test_a_write_error_is_one_sentence_with_the_fix(tmp_path, monkeypatch):
    def full(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoint.torch, "save", full)
    with pytest.raises(UserError) as e:
        checkpoint.save({"v": 1}, tmp_path / "x.pt")
    assert "No space left on device" in str(e.value) and "free some space" in str(e.value)
    assert not list(tmp_path.iterdir())
