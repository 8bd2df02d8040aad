"""The SQLite result store and the long CSV export."""

from __future__ import annotations

import csv
import io
import json
import shutil
import sqlite3
import subprocess
import sys

import pytest
import torch
from conftest import damage_store, read_only, without_root_override, writable

from robustprune.errors import UserError
from robustprune.report.tables import long_csv
from robustprune.study.cells import Cell
from robustprune.study.store import Store

AXES = {
    "regime": "clean",
    "pruning": "magnitude",
    "method": "global_magnitude",
    "sparsity": 0.5,
    "finetune_epochs": 2,
    "round": None,
    "seed": 3,
}


def cell(h="abc", **axes) -> Cell:
    return Cell(
        study="s",
        axes=AXES | axes,
        config={"train": {"epochs": 3}, "pruning": {"sparsity": 0.5}, "h": h},
        hash=h,
        dense_key={},
    )


@pytest.fixture
def store(tmp_path):
    s = Store(tmp_path / "out" / "results.sqlite")
    yield s
    s.close()


def count(store: Store, table: str) -> int:
    return store.db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


def test_put_then_done(store):
    assert store.done_hashes() == set() and not store.is_done("abc")
    assert store.put(cell(), {"acc_clean": 0.98, "sparsity": 0.5}, 1.25, history=[{"epoch": 1}]) is True
    assert store.done_hashes() == {"abc"} and store.is_done("abc")
    assert count(store, "cells") == 1 and count(store, "results") == 2


def test_put_twice_keeps_one_set_of_rows(store):
    assert store.put(cell(), {"acc_clean": 0.98, "sparsity": 0.5}, 1.0) is True
    assert store.put(cell(), {"acc_clean": 0.10, "other": 1.0}, 9.0) is False
    assert count(store, "cells") == 1 and count(store, "results") == 2
    assert store.cells()[0]["metrics"] == {"acc_clean": 0.98, "sparsity": 0.5}
    assert store.cells()[0]["wall_time_s"] == 1.0


def test_two_connections_store_a_cell_once(tmp_path):
    a, b = Store(tmp_path / "r.sqlite"), Store(tmp_path / "r.sqlite")
    try:
        assert a.put(cell(), {"m": 1.0}, 1.0) is True
        assert b.put(cell(), {"m": 2.0}, 1.0) is False
        assert count(b, "results") == 1
    finally:
        a.close()
        b.close()


def test_rows_carry_config_hash_seed_versions_wall_time(store):
    c = cell()
    store.put(c, {"acc_clean": 0.75}, 2.5, history=[{"epoch": 1, "loss": 0.3}])
    h, study, seed, metric, value, axes, config, versions, wall = store.db.execute(
        "SELECT hash, study, seed, metric, value, axes, config, versions, wall_time_s FROM results"
    ).fetchone()
    assert (h, study, seed, metric, value, wall) == ("abc", "s", 3, "acc_clean", 0.75, 2.5)
    assert json.loads(config) == c.config and json.loads(axes) == c.axes
    v = json.loads(versions)
    assert v["torch"] == torch.__version__ and v["robustprune"] == "0.1.0"
    assert {"numpy", "torch_pruning", "python"} <= set(v)
    status, error, finished, cell_versions = store.db.execute(
        "SELECT status, error, finished_at, versions FROM cells"
    ).fetchone()
    assert status == "done" and error is None and finished and json.loads(cell_versions) == v
    [row] = store.cells()
    assert row == {
        "hash": "abc",
        "axes": c.axes,
        "config": c.config,
        "status": "done",
        "error": None,
        "wall_time_s": 2.5,
        "metrics": {"acc_clean": 0.75},
        "history": [{"epoch": 1, "loss": 0.3}],
        "per_image": {},
    }


def test_failed_cell_recorded(store):
    assert store.put(cell("bad"), {}, 0.5, status="failed", error="loss became nan in epoch 1") is True
    assert store.done_hashes() == {"bad"}
    [row] = store.cells()
    assert row["status"] == "failed" and row["error"] == "loss became nan in epoch 1"
    assert row["metrics"] == {} and row["history"] is None
    assert count(store, "results") == 0


def test_cells_filter_by_hash(store):
    store.put(cell("h1"), {"m": 1.0}, 1.0)
    store.put(cell("h2", seed=4), {"m": 2.0}, 1.0)
    assert [c["hash"] for c in store.cells(["h2"])] == ["h2"]
    assert {c["hash"] for c in store.cells()} == {"h1", "h2"}
    assert store.cells([]) == []


def test_store_survives_reopening(tmp_path):
    path = tmp_path / "r.sqlite"
    s = Store(path)
    s.put(cell(), {"m": 1.0}, 1.0)
    s.record_run("s", "smoke", "robustprune run x", {"name": "s"}, ["abc"])
    s.close()
    ro = Store(path, readonly=True)
    try:
        assert ro.done_hashes() == {"abc"}
        assert ro.last_run()["budget"] == "smoke" and ro.last_run()["cell_hashes"] == ["abc"]
        with pytest.raises(sqlite3.OperationalError):
            ro.db.execute("DELETE FROM cells")
    finally:
        ro.close()


@pytest.mark.parametrize("folder", ["run#1", "what?", "x%41y"])
def test_store_path_with_uri_characters(tmp_path, folder):
    # BUG: robustprune/study/store.py Store.__init__ builds the SQLite URI as f"file:{self.path}" without
    # percent-encoding, so '#' or '?' in the output folder cut the path short (the database is written
    # to tmp_path/'run' or tmp_path/'what' instead) and '%' fails to open. Suggested fix:
    # uri = self.path.resolve().as_uri() + ("?mode=ro" if readonly else "") (as_uri percent-encodes).
    path = tmp_path / folder / "results.sqlite"
    s = Store(path)
    try:
        s.put(cell(), {"m": 1.0}, 1.0)
    finally:
        s.close()
    assert path.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [folder]
    ro = Store(path, readonly=True)
    try:
        assert ro.done_hashes() == {"abc"}
    finally:
        ro.close()


def test_last_run_empty(store):
    assert store.last_run() is None


def test_garbage_file_is_a_user_error(tmp_path):
    path = tmp_path / "results.sqlite"
    path.write_bytes(b"this is not an sqlite database at all " * 200)
    with pytest.raises(UserError, match="is damaged .file is not a database.; run the study again into a new --out"):
        Store(path)
    with pytest.raises(UserError, match="is damaged .file is not a database.; run the study again into a new --out"):
        Store(path, readonly=True)


# ---- reading never writes (issue 24) -----------------------------------------------------------------


def filled(path) -> None:
    s = Store(path)
    for i in range(40):
        s.put(cell(f"h{i}"), {f"m{j}": 0.5 for j in range(20)}, 1.0, per_image={"acc": [True, False] * 2000})
    s.record_run("s", "smoke", "robustprune run x", {"name": "s"}, [f"h{i}" for i in range(40)])
    s.close()


DAMAGES = ["garbage", "empty", "truncated", "no-table:runs", "no-table:cells", "no-table:results"]


@pytest.mark.parametrize("how", DAMAGES)
def test_a_damaged_store_is_read_as_one_sentence_and_left_as_it_is(tmp_path, how):
    path = tmp_path / "results.sqlite"
    filled(path)
    damage_store(path, how)
    before = path.read_bytes()
    with pytest.raises(UserError) as e:
        store = Store(path, readonly=True)  # the damage is found on opening, or by the first read
        store.last_run(), store.cells(), store.per_image(["h1"], "acc")
    text = str(e.value)
    assert text.startswith(f"the result store {path} is damaged (") and "\n" not in text, text
    assert text.endswith("; run the study again into a new --out folder"), text
    if how == "empty":
        assert "(the file is empty)" in text
    assert path.read_bytes() == before  # reading it created no table, repaired nothing


def test_reading_an_old_store_creates_no_table(tmp_path):
    """A store written before per-image results were kept is read as it is, not migrated."""
    path = tmp_path / "results.sqlite"
    filled(path)
    damage_store(path, "no-table:per_image")
    before = path.read_bytes()
    store = Store(path, readonly=True)
    try:
        assert len(store.cells()) == 40 and store.per_image(["h1"], "acc") == {}
        tables = {t for (t,) in store.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}
    finally:
        store.close()
    assert "per_image" not in tables and path.read_bytes() == before


READ = (
    "import sys; from robustprune.study.store import Store; s = Store(sys.argv[1], readonly=True); "
    "print(len(s.done_hashes()), len(s.cells()), s.last_run()['budget'])"
)


def read_as_a_user(path) -> subprocess.CompletedProcess:
    """Read the store in a process bound by the file modes (root's override dropped)."""
    return subprocess.run(
        [sys.executable, "-c", READ, str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=without_root_override,
    )


def test_a_store_in_a_read_only_folder_is_read(tmp_path):
    """SQLite needs to write an index file beside a WAL store to read it; where the folder is
    read-only the store is read as an immutable file."""
    folder = tmp_path / "study"
    folder.mkdir()
    filled(folder / "results.sqlite")
    read_only(folder)
    try:
        proc = read_as_a_user(folder / "results.sqlite")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == ["40", "40", "smoke"]
        assert sorted(p.name for p in folder.iterdir()) == ["results.sqlite"]
    finally:
        writable(folder)


def test_a_read_only_store_file_is_read(tmp_path):
    filled(tmp_path / "results.sqlite")
    read_only(tmp_path / "results.sqlite")
    try:
        proc = read_as_a_user(tmp_path / "results.sqlite")
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.split() == ["40", "40", "smoke"]
    finally:
        writable(tmp_path / "results.sqlite")


def test_unmerged_writes_in_a_read_only_folder_are_explained(tmp_path):
    """A killed writer's -wal file holds rows the store file lacks: reading it as immutable would
    silently drop them, so the sentence says to copy the folder."""
    folder = tmp_path / "study"
    folder.mkdir()
    filled(folder / "results.sqlite")
    writer = sqlite3.connect(folder / "results.sqlite")
    writer.execute("PRAGMA wal_autocheckpoint = 0")
    writer.execute("UPDATE results SET value = 0.25")
    writer.commit()
    copy = tmp_path / "copy"
    copy.mkdir()
    for p in folder.iterdir():  # what a killed writer leaves: the store and its -wal, no live index
        if not p.name.endswith("-shm"):
            shutil.copy(p, copy / p.name)
    writer.close()
    read_only(copy)
    try:
        proc = read_as_a_user(copy / "results.sqlite")
        assert proc.returncode == 1 and "results.sqlite-wal holds writes not yet merged" in proc.stderr
        assert "copy the folder somewhere writable" in proc.stderr
    finally:
        writable(copy)


def test_readonly_missing_store(tmp_path):
    with pytest.raises(UserError, match="no result store"):
        Store(tmp_path / "nope.sqlite", readonly=True)
    assert not (tmp_path / "nope.sqlite").exists()


# ---- long CSV ----------------------------------------------------------------------------------------

HEADER = [
    "regime",
    "pruning",
    "method",
    "sparsity",
    "finetune_epochs",
    "round",
    "seed",
    "metric",
    "value",
    "config_hash",
    "status",
]


def test_long_csv_one_row_per_cell_and_metric(store):
    store.put(cell("h1"), {"acc_clean": 0.5, "macs": 1000.0}, 1.0)
    store.put(cell("h2", pruning="dense", method=None, sparsity=0.0, finetune_epochs=0), {"acc_clean": 0.25}, 1.0)
    rows = list(csv.reader(io.StringIO(long_csv(store.cells()))))
    assert rows[0] == HEADER
    assert len(rows) == 1 + 3
    assert rows[1:] == [
        ["clean", "dense", "", "0.0", "0", "", "3", "acc_clean", "0.25", "h2", "done"],
        ["clean", "magnitude", "global_magnitude", "0.5", "2", "", "3", "acc_clean", "0.5", "h1", "done"],
        ["clean", "magnitude", "global_magnitude", "0.5", "2", "", "3", "macs", "1000.0", "h1", "done"],
    ]


def test_long_csv_failed_cell(store):
    store.put(cell("bad", round=2), {}, 1.0, status="failed", error="diverged")
    rows = list(csv.reader(io.StringIO(long_csv(store.cells()))))
    assert rows == [
        HEADER,
        ["clean", "magnitude", "global_magnitude", "0.5", "2", "2", "3", "error", "diverged", "bad", "failed"],
    ]


def test_long_csv_empty():
    assert long_csv([]).splitlines() == [",".join(HEADER)]
