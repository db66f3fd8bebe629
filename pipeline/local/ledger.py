"""The run ledger in a SQLite file (local runs)."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from pipeline.ledger import (
    STAT_FIELDS,
    DeadEntity,
    Entity,
    Finished,
    RunStatus,
    State,
    path_json,
    stage_counts,
    storable,
)
from pipeline.profile import load as load_profile

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, window_from TEXT, window_to TEXT, started_at REAL,
    kicked_off INTEGER DEFAULT 0, completed_at REAL,
    calls INTEGER DEFAULT 0, rate_limited INTEGER DEFAULT 0, retries INTEGER DEFAULT 0,
    quiet_since REAL, manifest_signature TEXT
);
CREATE TABLE IF NOT EXISTS entities (
    run_id TEXT, stage TEXT, key TEXT, path TEXT, state TEXT, error TEXT DEFAULT '',
    PRIMARY KEY (run_id, stage, key)
);
CREATE TABLE IF NOT EXISTS children (
    run_id TEXT, parent_stage TEXT, parent_key TEXT, child_key TEXT,
    PRIMARY KEY (run_id, parent_stage, parent_key, child_key)
);
-- Counts per state, kept by triggers in the same transaction as the entity rows, so that
-- status is a few row reads however large the run.
CREATE TABLE IF NOT EXISTS counts (
    run_id TEXT, stage TEXT, state TEXT, n INTEGER NOT NULL,
    PRIMARY KEY (run_id, stage, state)
);
CREATE TRIGGER IF NOT EXISTS entities_counted AFTER INSERT ON entities BEGIN
    INSERT INTO counts VALUES (NEW.run_id, NEW.stage, NEW.state, 1)
        ON CONFLICT (run_id, stage, state) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS entities_recounted AFTER UPDATE OF state ON entities
WHEN OLD.state <> NEW.state BEGIN
    UPDATE counts SET n = n - 1
        WHERE run_id = OLD.run_id AND stage = OLD.stage AND state = OLD.state;
    INSERT INTO counts VALUES (NEW.run_id, NEW.stage, NEW.state, 1)
        ON CONFLICT (run_id, stage, state) DO UPDATE SET n = n + 1;
END;
"""


class SqliteLedger:
    """The ledger in a SQLite file; thread-safe, readable by other processes (`harvest status`)."""

    def __init__(self, path: str | Path, stages: Sequence[str] | None = None) -> None:
        # The profile's stages, in order (the default profile's if None).
        self.stages = tuple(stages) if stages is not None else load_profile().stage_names
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(_SCHEMA)
        # Columns added since the first release: state directories made before still open.
        have = {row[1] for row in self._db.execute("PRAGMA table_info(runs)")}
        for column, kind in (("quiet_since", "REAL"), ("manifest_signature", "TEXT")):
            if column not in have:
                try:
                    self._db.execute(f"ALTER TABLE runs ADD COLUMN {column} {kind}")
                except sqlite3.OperationalError as exc:
                    if "duplicate column" not in str(exc):  # another process added it
                        raise

    def _write(self, sql: str, rows: Iterable[Sequence[Any]]) -> int:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            cur = self._db.executemany(sql, rows)
            self._db.execute("COMMIT")
            return cur.rowcount

    def start_run(self, run_id: str, window_from: str, window_to: str) -> None:
        self._write(
            "INSERT OR IGNORE INTO runs (run_id, window_from, window_to, started_at)"
            " VALUES (?, ?, ?, ?)",
            [(run_id, window_from, window_to, time.time())],
        )

    def kicked_off(self, run_id: str) -> None:
        self._write("UPDATE runs SET kicked_off = 1 WHERE run_id = ?", [(run_id,)])

    def enqueued(
        self,
        run_id: str,
        stage: str,
        entities: Sequence[Entity],
        parent: tuple[str, str] | None = None,
    ) -> None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "INSERT OR IGNORE INTO entities (run_id, stage, key, path, state)"
                " VALUES (?, ?, ?, ?, ?)",
                [(run_id, stage, k, path_json(p), State.QUEUED) for k, p in entities],
            )
            if parent is not None:
                self._db.executemany(
                    "INSERT OR IGNORE INTO children VALUES (?, ?, ?, ?)",
                    [(run_id, parent[0], parent[1], k) for k, _ in entities],
                )
            self._db.execute("COMMIT")

    def enqueued_many(
        self, run_id: str, stage: str, listings: Sequence[tuple[tuple[str, str], Sequence[Entity]]]
    ) -> None:
        for parent, entities in listings:
            self.enqueued(run_id, stage, entities, parent)

    def children(self, run_id: str, parent_stage: str, parent_key: str) -> set[str]:
        with self._lock:
            rows = self._db.execute(
                "SELECT child_key FROM children"
                " WHERE run_id = ? AND parent_stage = ? AND parent_key = ?",
                (run_id, parent_stage, parent_key),
            ).fetchall()
        return {r[0] for r in rows}

    def finish_pending(self, run_id: str, stage: str, entries: Sequence[Finished]) -> int:
        return self._write(
            "UPDATE entities SET state = ?, error = ?"
            " WHERE run_id = ? AND stage = ? AND key = ? AND state = 'queued'",
            [(state, storable(error), run_id, stage, key) for key, state, error in entries],
        )

    def pending(self, run_id: str, stage: str) -> list[Entity]:
        with self._lock:
            rows = self._db.execute(
                "SELECT key, path FROM entities"
                " WHERE run_id = ? AND stage = ? AND state = 'queued' ORDER BY key",
                (run_id, stage),
            ).fetchall()
        return [(k, tuple(json.loads(p))) for k, p in rows]

    def finish(self, run_id: str, stage: str, key: str, state: State, error: str = "") -> None:
        self.finish_many(run_id, stage, [(key, state, error)])

    def finish_many(self, run_id: str, stage: str, entries: Sequence[Finished]) -> None:
        self._write(
            "UPDATE entities SET state = ?, error = ?"
            " WHERE run_id = ? AND stage = ? AND key = ?"
            " AND (? <> 'dead' OR state NOT IN ('done', 'gone'))",
            [(state, storable(error), run_id, stage, key, state) for key, state, error in entries],
        )

    def record_error(self, run_id: str, stage: str, key: str, error: str) -> None:
        self._write(
            "UPDATE entities SET error = ? WHERE run_id = ? AND stage = ? AND key = ?",
            [(storable(error), run_id, stage, key)],
        )

    def finished(self, run_id: str, stage: str, keys: Sequence[str]) -> set[str]:
        found: set[str] = set()
        with self._lock:
            for i in range(0, len(keys), 500):
                chunk = list(keys[i : i + 500])
                rows = self._db.execute(
                    "SELECT key FROM entities WHERE run_id = ? AND stage = ?"
                    f" AND state IN ('done', 'gone') AND key IN ({','.join('?' * len(chunk))})",
                    (run_id, stage, *chunk),
                ).fetchall()
                found.update(r[0] for r in rows)
        return found

    def add_stats(self, run_id: str, **amounts: int) -> None:
        names = [n for n in amounts if n in STAT_FIELDS]
        if names:
            sets = ", ".join(f"{n} = {n} + ?" for n in names)
            self._write(
                f"UPDATE runs SET {sets} WHERE run_id = ?",
                [(*(amounts[n] for n in names), run_id)],
            )

    def status(self, run_id: str) -> RunStatus | None:
        with self._lock:
            row = self._db.execute(
                "SELECT window_from, window_to, kicked_off, started_at, completed_at,"
                " calls, rate_limited, retries, manifest_signature FROM runs WHERE run_id = ?",
                (run_id,),
            ).fetchone()
            if row is None:
                return None
            counts = self._db.execute(
                "SELECT stage, state, n FROM counts WHERE run_id = ?", (run_id,)
            ).fetchall()
        return RunStatus(
            run_id=run_id,
            window_from=row[0],
            window_to=row[1],
            kicked_off=bool(row[2]),
            started_at=row[3],
            completed_at=row[4],
            stages=stage_counts(((s, st, n) for s, st, n in counts), self.stages),
            stats=dict(zip(STAT_FIELDS, row[5:8], strict=True)),
            manifest_signature=row[8] or "",
        )

    def dead(self, run_id: str) -> list[DeadEntity]:
        with self._lock:
            rows = self._db.execute(
                "SELECT stage, path, error FROM entities WHERE run_id = ? AND state = 'dead'"
                " ORDER BY stage, key",
                (run_id,),
            ).fetchall()
        return [DeadEntity(s, tuple(json.loads(p)), e) for s, p, e in rows]

    def last_error(self, run_id: str, stage: str, key: str) -> str:
        with self._lock:
            row = self._db.execute(
                "SELECT error FROM entities WHERE run_id = ? AND stage = ? AND key = ?",
                (run_id, stage, key),
            ).fetchone()
        return str(row[0]) if row and row[0] else ""

    def mark_completed(self, run_id: str) -> bool:
        return (
            self._write(
                "UPDATE runs SET completed_at = ? WHERE run_id = ? AND completed_at IS NULL",
                [(time.time(), run_id)],
            )
            > 0
        )

    def mark_manifest(self, run_id: str, signature: str) -> None:
        self._write(
            "UPDATE runs SET manifest_signature = ? WHERE run_id = ?", [(signature, run_id)]
        )

    def mark_quiet(self, run_id: str, at: float | None) -> float | None:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            self._db.execute(
                "UPDATE runs SET quiet_since = CASE WHEN ? IS NULL THEN NULL"
                " ELSE coalesce(quiet_since, ?) END WHERE run_id = ?",
                (at, at, run_id),
            )
            row = self._db.execute(
                "SELECT quiet_since FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
            self._db.execute("COMMIT")
        return None if row is None or row[0] is None else float(row[0])

    def runs(self) -> list[str]:
        with self._lock:
            rows = self._db.execute("SELECT run_id FROM runs ORDER BY started_at DESC").fetchall()
        return [r[0] for r in rows]

    def open_runs(self, since: float) -> list[str]:
        return list(self.open_run_starts(since))

    def open_run_starts(self, since: float) -> dict[str, float]:
        with self._lock:
            rows = self._db.execute(
                "SELECT run_id, started_at FROM runs WHERE completed_at IS NULL"
                " AND started_at >= ? AND manifest_signature IS NULL ORDER BY started_at",
                (since,),
            ).fetchall()
        return {r[0]: float(r[1]) for r in rows}
