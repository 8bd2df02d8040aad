"""The result store: one SQLite file per study folder. A cell's rows are written in one
transaction, so a killed run leaves either all of a cell or none of it."""

from __future__ import annotations

import json
import os
import platform
import sqlite3
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterable

from robustprune.errors import UserError
from robustprune.files import check_regular_file, write_failed

SCHEMA = """
CREATE TABLE IF NOT EXISTS cells (
    hash TEXT PRIMARY KEY, study TEXT, axes TEXT, config TEXT, seed INTEGER,
    status TEXT NOT NULL, error TEXT, wall_time_s REAL, versions TEXT, finished_at TEXT, history TEXT);
CREATE TABLE IF NOT EXISTS results (
    hash TEXT NOT NULL, study TEXT, seed INTEGER, metric TEXT NOT NULL, value REAL,
    axes TEXT, config TEXT, versions TEXT, wall_time_s REAL,
    PRIMARY KEY (hash, metric));
CREATE TABLE IF NOT EXISTS per_image (
    hash TEXT NOT NULL, metric TEXT NOT NULL, n INTEGER, correct BLOB, PRIMARY KEY (hash, metric));
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT, study TEXT, budget TEXT, command TEXT, started_at TEXT,
    study_config TEXT, cell_hashes TEXT);
"""


def library_versions() -> dict[str, str]:
    import numpy
    import torch
    import torch_pruning

    import robustprune

    return {
        "robustprune": robustprune.__version__,
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "torch_pruning": getattr(torch_pruning, "__version__", "?"),
        "python": platform.python_version(),
        # Float results can differ in the last bits with the thread count; it is part of the record.
        "torch_threads": str(torch.get_num_threads()),
    }


def pack(hits) -> bytes:
    import numpy as np

    return np.packbits(np.asarray(hits, dtype=bool)).tobytes()


def unpack(blob: bytes, n: int):
    import numpy as np

    return np.unpackbits(np.frombuffer(blob, dtype=np.uint8), count=n).astype(bool)


TABLES = ("cells", "results", "runs")  # per_image is optional: stores written before it existed lack it
DAMAGED = ("no such table", "not a database", "malformed", "file is not", "corrupt")


class Store:
    def __init__(self, path: str | Path, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        if readonly and not self.path.exists():
            raise UserError(f"no result store at {self.path}; run the study first or check the folder")
        check_regular_file(self.path, "the result store", "move it away or point to another folder")
        try:
            if readonly:
                self.db = self._open_readonly()
                missing = set(TABLES) - self._tables()
                if missing:
                    raise sqlite3.DatabaseError(f"no such table: {sorted(missing)[0]}")
            else:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self.db = self._connect("")
                self._set_up()
                self.db.execute("SELECT count(*) FROM cells").fetchone()
        except sqlite3.DatabaseError as e:
            raise self._error(e) from None
        except OSError as e:
            raise write_failed(self.path, e, "--out", "the cells stored before are kept") from None
        self._versions = None

    def _connect(self, query: str) -> sqlite3.Connection:
        return sqlite3.connect(self.path.resolve().as_uri() + query, uri=True, timeout=60, isolation_level=None)

    def _tables(self) -> set[str]:
        return {t for (t,) in self.db.execute("SELECT name FROM sqlite_master WHERE type='table'")}

    def _open_readonly(self) -> sqlite3.Connection:
        """Reading never needs write access. SQLite reads a WAL store through an index file it makes
        beside it; where the folder is read-only, the store is read as an immutable file instead,
        which is exact when no writes wait in its -wal file."""
        db = self._connect("?mode=ro")
        try:
            db.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return db
        except sqlite3.OperationalError as e:
            db.close()
            if any(s in str(e) for s in DAMAGED) or not os.access(self.path, os.R_OK):
                raise
            wal = self.path.with_name(self.path.name + "-wal")
            if wal.exists() and wal.stat().st_size > 0:
                raise UserError(
                    f"cannot read the result store {self.path} ({e}): its folder is read-only and {wal.name} "
                    "holds writes not yet merged into it; copy the folder somewhere writable and report from the copy"
                ) from None
        db = self._connect("?mode=ro&immutable=1")
        db.execute("SELECT count(*) FROM sqlite_master").fetchone()
        return db

    def _set_up(self) -> None:
        """WAL mode and the tables."""

        def attempt():
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.executescript(SCHEMA)

        self._patiently(attempt)

    def _patiently(self, attempt, patience_s: float = 60.0):
        """Run a write, retrying while another process holds the lock. SQLite's busy timeout does
        not cover every case (e.g. switching the journal mode, or a lock met in the middle of a
        transaction), so 'locked' is retried here for up to `patience_s`."""
        deadline = time.monotonic() + patience_s
        while True:
            try:
                return attempt()
            except sqlite3.OperationalError as e:
                if self.db.in_transaction:
                    self.db.execute("ROLLBACK")
                if not ("locked" in str(e) or "busy" in str(e)) or time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def close(self):
        self.db.close()

    def _error(self, e: sqlite3.DatabaseError) -> UserError:
        """One sentence for a store SQLite cannot read or write: damaged, full disk, read-only folder,
        lock held too long."""
        text = str(e)
        if any(s in text for s in DAMAGED) or type(e) is sqlite3.DatabaseError:
            if "no such table" in text and self.path.stat().st_size == 0:
                text = "the file is empty"
            return UserError(
                f"the result store {self.path} is damaged ({text}); run the study again into a new --out folder"
            )
        if "full" in text or "disk I/O error" in text:
            fix = f"free some space in {self.path.parent} or choose another --out folder"
        elif "locked" in text or "busy" in text:
            fix = "another process held it for over a minute; wait for it or use another --out folder"
        elif self.readonly:
            why = f"cannot read the result store {self.path} ({text})"
            return UserError(f"{why}; check that the file and its folder are readable")
        else:
            fix = "choose a writable --out folder"
        return UserError(f"cannot write the result store {self.path} ({text}); {fix}; the cells stored before are kept")

    @contextmanager
    def _reading(self):
        """A damaged page found while reading (a truncated file) is one sentence too."""
        try:
            yield
        except sqlite3.DatabaseError as e:
            raise self._error(e) from None

    def done_hashes(self) -> set[str]:
        with self._reading():
            return {h for (h,) in self.db.execute("SELECT hash FROM cells WHERE status IN ('done', 'failed')")}

    def is_done(self, h: str) -> bool:
        with self._reading():
            return self._is_done(h)

    def _is_done(self, h: str) -> bool:
        return (
            self.db.execute("SELECT 1 FROM cells WHERE hash=? AND status IN ('done','failed')", (h,)).fetchone()
            is not None
        )

    def versions(self) -> dict:
        if self._versions is None:
            self._versions = library_versions()
        import torch

        return {**self._versions, "torch_threads": str(torch.get_num_threads())}  # a worker's may change

    def put(
        self,
        cell,
        metrics: dict[str, float],
        wall_time_s: float,
        history: Any = None,
        status: str = "done",
        error: str | None = None,
        per_image: dict | None = None,
    ) -> bool:
        """Write a finished (or failed) cell and all its metrics at once. Returns False when another
        process stored the same cell first (its rows are kept, nothing is duplicated). per_image:
        {metric: bool vector} of which test images each accuracy counted correct, bit-packed."""
        versions = json.dumps(self.versions())
        axes, config = json.dumps(cell.axes), json.dumps(cell.config, sort_keys=True)
        seed = cell.axes["seed"]

        def attempt() -> bool:
            self.db.execute("BEGIN IMMEDIATE")
            if self._is_done(cell.hash):
                self.db.execute("ROLLBACK")
                return False
            self.db.execute(
                "INSERT OR REPLACE INTO cells VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (
                    cell.hash,
                    cell.study,
                    axes,
                    config,
                    seed,
                    status,
                    error,
                    wall_time_s,
                    versions,
                    time.strftime("%Y-%m-%dT%H:%M:%S"),
                    json.dumps(history),
                ),
            )
            self.db.executemany(
                "INSERT OR REPLACE INTO results VALUES (?,?,?,?,?,?,?,?,?)",
                [
                    (cell.hash, cell.study, seed, m, float(v), axes, config, versions, wall_time_s)
                    for m, v in metrics.items()
                ],
            )
            self.db.executemany(
                "INSERT OR REPLACE INTO per_image VALUES (?,?,?,?)",
                [(cell.hash, m, len(v), pack(v)) for m, v in (per_image or {}).items()],
            )
            self.db.execute("COMMIT")
            return True

        try:
            return self._patiently(attempt)
        except BaseException as e:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            if isinstance(e, sqlite3.DatabaseError):
                raise self._error(e) from None
            raise

    def per_image(self, hashes: Iterable[str], metric: str) -> dict:
        """{cell hash: bool array} of one metric's per-image results (cells stored before per-image
        results were kept have none)."""
        hashes = list(hashes)
        out = {}
        if "per_image" not in self._tables():  # a store written before the table existed, opened read-only
            return out
        with self._reading():
            for i in range(0, len(hashes), 500):
                part = hashes[i : i + 500]
                rows = self.db.execute(
                    f"SELECT hash, n, correct FROM per_image WHERE metric=? AND hash IN ({','.join('?' * len(part))})",
                    (metric, *part),
                )
                out.update({h: unpack(blob, n) for h, n, blob in rows})
        return out

    def record_run(
        self, study: str, budget: str | None, command: str, study_config: dict, hashes: Iterable[str]
    ) -> None:
        try:
            self._patiently(lambda: self._record_run(study, budget, command, study_config, hashes))
        except sqlite3.DatabaseError as e:
            raise self._error(e) from None

    def _record_run(self, study, budget, command, study_config, hashes) -> None:
        self.db.execute(
            "INSERT INTO runs (study, budget, command, started_at, study_config, cell_hashes) VALUES (?,?,?,?,?,?)",
            (
                study,
                budget,
                command,
                time.strftime("%Y-%m-%dT%H:%M:%S"),
                json.dumps(study_config),
                json.dumps(list(hashes)),
            ),
        )

    def last_run(self) -> dict | None:
        with self._reading():
            row = self.db.execute(
                "SELECT study, budget, command, started_at, study_config, cell_hashes FROM runs "
                "ORDER BY id DESC LIMIT 1"
            ).fetchone()
        if row is None:
            return None
        return {
            "study": row[0],
            "budget": row[1],
            "command": row[2],
            "started_at": row[3],
            "study_config": json.loads(row[4]),
            "cell_hashes": json.loads(row[5]),
        }

    def cells(self, hashes: Iterable[str] | None = None) -> list[dict]:
        """Stored cells (optionally only those hashes) with their metrics."""
        with self._reading():
            return self._cells(hashes)

    def _cells(self, hashes: Iterable[str] | None) -> list[dict]:
        rows = self.db.execute("SELECT hash, axes, config, status, error, wall_time_s, history FROM cells").fetchall()
        wanted = set(hashes) if hashes is not None else None
        metrics: dict[str, dict[str, float]] = {}
        for h, m, v in self.db.execute("SELECT hash, metric, value FROM results"):
            metrics.setdefault(h, {})[m] = v
        per_image: dict[str, dict] = {}
        if "per_image" in self._tables():  # a store written before per-image results were kept has none
            for h, m, n, blob in self.db.execute("SELECT hash, metric, n, correct FROM per_image"):
                if wanted is None or h in wanted:
                    per_image.setdefault(h, {})[m] = unpack(blob, n)
        out = []
        for h, axes, config, status, error, wall, history in rows:
            if wanted is not None and h not in wanted:
                continue
            out.append(
                {
                    "hash": h,
                    "axes": json.loads(axes),
                    "config": json.loads(config),
                    "status": status,
                    "error": error,
                    "wall_time_s": wall,
                    "metrics": metrics.get(h, {}),
                    "history": json.loads(history) if history else None,
                    "per_image": per_image.get(h, {}),
                }
            )
        return out
