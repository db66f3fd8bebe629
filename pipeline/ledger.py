"""The run ledger: per run and stage, which entities were enqueued, done, gone or dead.

Entities are keyed (stage, entity key), so duplicate deliveries and redeliveries after a
crash count once: counts are exact under at-least-once delivery. A run is *settled* when
everything enqueued is done, gone or dead, and *complete* when it is settled with nothing
dead. `SqliteLedger` serves local runs; `DynamoLedger` keeps the same records in the
state table in AWS.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from pipeline.stages import STAGE_NAMES
from pipeline.stages import stage as stage_of

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

T = TypeVar("T")

QUEUED, DONE, GONE, DEAD = "queued", "done", "gone", "dead"
FINAL_STATES = (DONE, GONE, DEAD)
STAT_FIELDS = ("calls", "rate_limited", "retries")
# (entity key, final state, error) of one entity a drain has finished with.
Finished = tuple[str, str, str]
# (entity key, path) of one entity.
Entity = tuple[str, tuple[str, ...]]
# A listing is stored in items of at most this many bytes (DynamoDB's limit is 400 KB).
LISTING_CHUNK_BYTES = 300_000
# BatchWriteItem's limit, and how often its unprocessed items are sent again.
PUT_BATCH = 25
UNPROCESSED_ATTEMPTS = 8


def path_json(path: Sequence[str]) -> str:
    """An entity path as stored: JSON, ASCII-escaped (a bad id may hold a lone surrogate,
    which neither SQLite nor DynamoDB can store as text)."""
    return json.dumps(list(path), ensure_ascii=True)


def storable(text: str) -> str:
    """`text` with anything UTF-8 cannot encode (lone surrogates) escaped."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


@dataclass(frozen=True)
class StageCounts:
    enqueued: int = 0
    done: int = 0
    gone: int = 0
    dead: int = 0

    @property
    def pending(self) -> int:
        return self.enqueued - self.done - self.gone - self.dead


@dataclass(frozen=True)
class DeadEntity:
    stage: str
    path: tuple[str, ...]
    error: str


@dataclass(frozen=True)
class RunStatus:
    run_id: str
    window_from: str
    window_to: str
    kicked_off: bool
    started_at: float
    completed_at: float | None
    stages: Mapping[str, StageCounts]
    stats: Mapping[str, int] = field(default_factory=dict)
    # What the last manifest written for this run said (see `signature`), "" if none.
    manifest_signature: str = ""

    @property
    def signature(self) -> str:
        """The counts a manifest reports: a new manifest is due when they change."""
        return json.dumps(
            {n: [c.enqueued, c.done, c.gone, c.dead] for n, c in sorted(self.stages.items())}
        )

    @property
    def settled(self) -> bool:
        """Kicked off, and everything enqueued is done, gone or dead."""
        return self.kicked_off and all(c.pending == 0 for c in self.stages.values())

    @property
    def dead(self) -> int:
        return sum(c.dead for c in self.stages.values())

    @property
    def complete(self) -> bool:
        return self.settled and self.dead == 0


class Ledger(Protocol):
    """Run records and per-entity states; every write is idempotent."""

    def start_run(self, run_id: str, window_from: str, window_to: str) -> None: ...

    def kicked_off(self, run_id: str) -> None: ...

    def enqueued(
        self,
        run_id: str,
        stage: str,
        entities: Sequence[Entity],
        parent: tuple[str, str] | None = None,
    ) -> None:
        """Record (key, path) entities as queued unless already known.

        `parent` (its stage and key) remembers them as that parent's children.
        """

    def enqueued_many(
        self, run_id: str, stage: str, listings: Sequence[tuple[tuple[str, str], Sequence[Entity]]]
    ) -> None:
        """`enqueued` for several parents' listings at once: (parent, entities) each."""

    def children(self, run_id: str, parent_stage: str, parent_key: str) -> set[str]:
        """Keys of the children recorded for a parent by `enqueued`."""

    def finish_pending(self, run_id: str, stage: str, entries: Sequence[Finished]) -> int:
        """`finish` only the entities still queued; return how many changed."""

    def pending(self, run_id: str, stage: str) -> list[Entity]:
        """The entities of a stage still queued."""

    def finish(self, run_id: str, stage: str, key: str, state: str, error: str = "") -> None:
        """Move an entity to done, gone or dead. dead never overwrites done or gone."""

    def finish_many(self, run_id: str, stage: str, entries: Sequence[Finished]) -> None:
        """`finish` for several entities of one stage at once (one write where the store allows)."""

    def record_error(self, run_id: str, stage: str, key: str, error: str) -> None:
        """Remember the last error of an entity that will be retried."""

    def finished(self, run_id: str, stage: str, keys: Sequence[str]) -> set[str]:
        """Those of `keys` that are done or gone (nothing left to do for them)."""

    def add_stats(self, run_id: str, **amounts: int) -> None: ...

    def status(self, run_id: str) -> RunStatus | None: ...

    def dead(self, run_id: str) -> list[DeadEntity]: ...

    def last_error(self, run_id: str, stage: str, key: str) -> str: ...

    def mark_completed(self, run_id: str) -> bool:
        """Record completion; True only for the call that recorded it first."""

    def mark_manifest(self, run_id: str, signature: str) -> None:
        """Remember the signature of the manifest just written."""

    def mark_quiet(self, run_id: str, at: float | None) -> float | None:
        """Note that no queue held a message at `at` (None: one did); return since when
        they have been empty without interruption, or None."""

    def runs(self) -> list[str]:
        """Known run ids, newest first."""

    def open_runs(self, since: float) -> list[str]:
        """Runs started after `since` (epoch seconds) that have neither completed nor
        settled incomplete with their manifest written (a replay touches those again)."""


# ---------------------------------------------------------------------------------------
# SQLite (local runs)
# ---------------------------------------------------------------------------------------

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

    def __init__(self, path: str | Path) -> None:
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
                [(run_id, stage, k, path_json(p), QUEUED) for k, p in entities],
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

    def finish(self, run_id: str, stage: str, key: str, state: str, error: str = "") -> None:
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
            stages=_stage_counts((s, st, n) for s, st, n in counts),
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
        with self._lock:
            rows = self._db.execute(
                "SELECT run_id FROM runs WHERE completed_at IS NULL AND started_at >= ?"
                " AND manifest_signature IS NULL ORDER BY started_at",
                (since,),
            ).fetchall()
        return [r[0] for r in rows]


def _stage_counts(rows: Iterable[tuple[str, str, int]]) -> dict[str, StageCounts]:
    tally: dict[str, dict[str, int]] = {s: {} for s in STAGE_NAMES}
    for stage, state, n in rows:
        tally.setdefault(stage, {})[state] = tally.get(stage, {}).get(state, 0) + n
    return {
        stage: StageCounts(
            enqueued=sum(t.values()),
            done=t.get(DONE, 0),
            gone=t.get(GONE, 0),
            dead=t.get(DEAD, 0),
        )
        for stage, t in tally.items()
    }


# ---------------------------------------------------------------------------------------
# DynamoDB (AWS): pk/sk items in the state table
# ---------------------------------------------------------------------------------------


def _run_pk(run_id: str) -> str:
    return f"run#{run_id}"


def _entity_pk(run_id: str, stage: str) -> str:
    """Where a stage's entity states live: one item per entity that has one."""
    return f"run#{run_id}#{stage}"


def _listed_pk(run_id: str, stage: str) -> str:
    """Where a stage's listings live: the entities one parent (or the kickoff) enqueued."""
    return f"run#{run_id}#{stage}#listed"


def _listing_id(parent: tuple[str, str] | None, keys: Iterable[str]) -> str:
    """A listing's sort key: its parent, then a digest of what it named. The same listing
    recorded twice is one item; a relisting that names other entities is another."""
    digest = hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:16]
    return f"{parent[1] if parent else '-'}#{digest}"


def _listing_chunks(entities: Sequence[Entity]) -> list[list[tuple[str, str]]]:
    """(key, stored path) pairs in chunks that each fit a DynamoDB item (400 KB)."""
    chunks: list[list[tuple[str, str]]] = [[]]
    size = 0
    for key, path in entities:
        pair = (key, path_json(path))
        cost = len(key) + len(pair[1]) + 8
        if size + cost > LISTING_CHUNK_BYTES and chunks[-1]:
            chunks.append([])
            size = 0
        chunks[-1].append(pair)
        size += cost
    return chunks


def _listing_items(
    run_id: str, stage: str, parent: tuple[str, str] | None, entities: Sequence[Entity]
) -> list[dict[str, Any]]:
    """The items that record one listing (none for an empty one)."""
    if not entities:
        return []
    listing = _listing_id(parent, (k for k, _ in entities))
    pk = {"S": _listed_pk(run_id, stage)}
    return [
        {"pk": pk, "sk": {"S": f"{listing}#{n}"}, "entities": {"S": json.dumps(chunk)}}
        for n, chunk in enumerate(_listing_chunks(entities))
    ]


class DynamoLedger:
    """The ledger as items of the state table, written in batches.

    - one item per run (`run#R`, `meta`) and one in the run list (`runs`, R);
    - **listings**: what a parent enqueued, as one item per listing (`run#R#stage#listed`,
      parent key and a digest of the keys; split when it would pass 400 KB), holding the
      entities' keys and paths. One request records a warrior's thousand data groups, where
      an item per entity took a thousand conditional writes;
    - **states**: one item per entity that has finished or failed (`run#R#stage`, key):
      done, gone or dead and the last error. Done and gone are final, so they are put in
      batches of 25 (BatchWriteItem has no conditions); dead never overwrites them, so it
      is a conditional write of its own (rare).

    An entity counts as enqueued once whether it was listed once or many times, and as
    queued until it has a state. A state without a listing (an entity finished by a message
    no listing recorded) still counts, so counts stay exact under any delivery order.
    """

    RUNS_PK = "runs"
    # Writes of one call go out this many at a time (chunks of a batch, conditional writes).
    PARALLEL_WRITES = 16

    def __init__(self, client: DynamoDBClient, table: str) -> None:
        self._ddb = client
        self.table = table
        self._writers = ThreadPoolExecutor(self.PARALLEL_WRITES, thread_name_prefix="ledger")

    def _each(self, write: Callable[[T], object], items: Sequence[T]) -> list[Any]:
        """`write` every item, PARALLEL_WRITES at a time; the first error is raised."""
        if len(items) <= 1:
            return [write(item) for item in items]
        return list(self._writers.map(write, items))

    def _put_all(self, items: Sequence[dict[str, Any]]) -> None:
        """Put `items` with BatchWriteItem, 25 a request, until none is left unprocessed."""

        def put(chunk: Sequence[dict[str, Any]]) -> None:
            request: dict[str, Any] = {self.table: [{"PutRequest": {"Item": i}} for i in chunk]}
            for attempt in range(UNPROCESSED_ATTEMPTS):
                left = self._ddb.batch_write_item(RequestItems=request).get("UnprocessedItems")
                if not left:
                    return
                request = dict(left)
                time.sleep(min(1.0, 0.05 * 2**attempt))  # throttled: back off, as AWS asks
            raise RuntimeError(f"DynamoDB left {len(request[self.table])} writes unprocessed")

        self._each(put, [items[i : i + PUT_BATCH] for i in range(0, len(items), PUT_BATCH)])

    def start_run(self, run_id: str, window_from: str, window_to: str) -> None:
        now = str(time.time())
        self._ddb.update_item(
            TableName=self.table,
            Key={"pk": {"S": _run_pk(run_id)}, "sk": {"S": "meta"}},
            UpdateExpression="SET window_from = if_not_exists(window_from, :f),"
            " window_to = if_not_exists(window_to, :t), started_at = if_not_exists(started_at, :n)",
            ExpressionAttributeValues={
                ":f": {"S": window_from},
                ":t": {"S": window_to},
                ":n": {"N": now},
            },
        )
        # if_not_exists like the meta item: a rerun must not move the run up in runs().
        self._ddb.update_item(
            TableName=self.table,
            Key={"pk": {"S": self.RUNS_PK}, "sk": {"S": run_id}},
            UpdateExpression="SET started_at = if_not_exists(started_at, :n)",
            ExpressionAttributeValues={":n": {"N": now}},
        )

    def kicked_off(self, run_id: str) -> None:
        self._ddb.update_item(
            TableName=self.table,
            Key={"pk": {"S": _run_pk(run_id)}, "sk": {"S": "meta"}},
            UpdateExpression="SET kicked_off = :y",
            ExpressionAttributeValues={":y": {"BOOL": True}},
        )

    def enqueued(
        self,
        run_id: str,
        stage: str,
        entities: Sequence[Entity],
        parent: tuple[str, str] | None = None,
    ) -> None:
        self._put_all(_listing_items(run_id, stage, parent, entities))

    def enqueued_many(
        self, run_id: str, stage: str, listings: Sequence[tuple[tuple[str, str], Sequence[Entity]]]
    ) -> None:
        # A batch of parents' listings in one request where they fit (25 items).
        self._put_all(
            [i for parent, found in listings for i in _listing_items(run_id, stage, parent, found)]
        )

    def _listings(self, run_id: str, stage: str, parent_key: str = "") -> dict[str, str]:
        """Every entity a stage's listings named (or one parent's): key -> stored path."""
        condition = "pk = :pk"
        values: dict[str, Any] = {":pk": {"S": _listed_pk(run_id, stage)}}
        if parent_key:
            condition += " AND begins_with(sk, :parent)"
            values[":parent"] = {"S": f"{parent_key}#"}
        found: dict[str, str] = {}
        pages = self._ddb.get_paginator("query").paginate(
            TableName=self.table,
            KeyConditionExpression=condition,
            ExpressionAttributeValues=values,
            ProjectionExpression="entities",
            ConsistentRead=True,
        )
        for page in pages:
            for item in page.get("Items", []):
                found.update(json.loads(item["entities"]["S"]))
        return found

    def _states(self, run_id: str, stage: str) -> dict[str, dict[str, Any]]:
        """Every state item of a stage (those holding only an error included): key -> item."""
        return {
            item["sk"]["S"]: item for item in self._query(_entity_pk(run_id, stage), "sk, #s, #e")
        }

    def children(self, run_id: str, parent_stage: str, parent_key: str) -> set[str]:
        child = stage_of(parent_stage).child
        if child is None:
            return set()
        return set(self._listings(run_id, child, parent_key))

    def _conditional_state(
        self, run_id: str, stage: str, key: str, state: str, error: str, condition: str
    ) -> bool:
        """Set an entity's state where `condition` holds; whether it did."""
        try:
            self._ddb.update_item(
                TableName=self.table,
                Key={"pk": {"S": _entity_pk(run_id, stage)}, "sk": {"S": key}},
                UpdateExpression="SET #s = :s, #e = :e",
                ConditionExpression=condition,
                ExpressionAttributeNames={"#s": "state", "#e": "error"},
                ExpressionAttributeValues={
                    ":s": {"S": state},
                    ":e": {"S": storable(error)},
                    **({":d": {"S": DONE}, ":g": {"S": GONE}} if ":d" in condition else {}),
                },
            )
        except self._ddb.exceptions.ConditionalCheckFailedException:
            return False
        return True

    def finish_pending(self, run_id: str, stage: str, entries: Sequence[Finished]) -> int:
        changed = self._each(
            lambda e: self._conditional_state(
                run_id, stage, e[0], e[1], e[2], "attribute_not_exists(#s)"
            ),
            entries,
        )
        return sum(changed)

    def pending(self, run_id: str, stage: str) -> list[Entity]:
        states = self._states(run_id, stage)
        return sorted(
            (key, tuple(json.loads(path)))
            for key, path in self._listings(run_id, stage).items()
            if "state" not in states.get(key, {})
        )

    def finish(self, run_id: str, stage: str, key: str, state: str, error: str = "") -> None:
        self.finish_many(run_id, stage, [(key, state, error)])

    def finish_many(self, run_id: str, stage: str, entries: Sequence[Finished]) -> None:
        # Done and gone are final whatever came before: put in batches. The last entry of a
        # key wins, as one after another would (a batch may not name a key twice).
        final = {k: (s, e) for k, s, e in entries if s != DEAD}
        pk = {"S": _entity_pk(run_id, stage)}
        self._put_all(
            [
                {"pk": pk, "sk": {"S": k}, "state": {"S": s}, "error": {"S": storable(e)}}
                for k, (s, e) in final.items()
            ]
        )
        # Dead never overwrites done or gone (a late duplicate's failure).
        dead = [(k, s, e) for k, s, e in entries if s == DEAD and k not in final]
        self._each(
            lambda e: self._conditional_state(
                run_id, stage, e[0], DEAD, e[2], "NOT #s IN (:d, :g)"
            ),
            dead,
        )

    def record_error(self, run_id: str, stage: str, key: str, error: str) -> None:
        # An item holding only an error has no state and counts nowhere.
        self._ddb.update_item(
            TableName=self.table,
            Key={"pk": {"S": _entity_pk(run_id, stage)}, "sk": {"S": key}},
            UpdateExpression="SET #e = :e",
            ExpressionAttributeNames={"#e": "error"},
            ExpressionAttributeValues={":e": {"S": storable(error)}},
        )

    def finished(self, run_id: str, stage: str, keys: Sequence[str]) -> set[str]:
        found: set[str] = set()
        pk = _entity_pk(run_id, stage)
        unique = sorted(set(keys))  # BatchGetItem refuses a key named twice
        for i in range(0, len(unique), 100):  # BatchGetItem's limit
            request: dict[str, Any] = {
                self.table: {
                    "Keys": [{"pk": {"S": pk}, "sk": {"S": k}} for k in unique[i : i + 100]],
                    "ProjectionExpression": "sk, #s",
                    "ExpressionAttributeNames": {"#s": "state"},
                    "ConsistentRead": True,
                }
            }
            while request:
                result = self._ddb.batch_get_item(RequestItems=request)
                for item in result.get("Responses", {}).get(self.table, []):
                    if item.get("state", {}).get("S") in (DONE, GONE):
                        found.add(item["sk"]["S"])
                request = dict(result.get("UnprocessedKeys") or {})
        return found

    def add_stats(self, run_id: str, **amounts: int) -> None:
        names = [n for n in amounts if n in STAT_FIELDS and amounts[n]]
        if not names:
            return
        self._ddb.update_item(
            TableName=self.table,
            Key={"pk": {"S": _run_pk(run_id)}, "sk": {"S": "meta"}},
            UpdateExpression="ADD " + ", ".join(f"{n} :{n}" for n in names),
            ExpressionAttributeValues={f":{n}": {"N": str(amounts[n])} for n in names},
        )

    def status(self, run_id: str) -> RunStatus | None:
        item = self._ddb.get_item(
            TableName=self.table,
            Key={"pk": {"S": _run_pk(run_id)}, "sk": {"S": "meta"}},
            ConsistentRead=True,
        ).get("Item")
        if item is None:
            return None
        rows: list[tuple[str, str, int]] = []
        for stage in STAGE_NAMES:
            states = {
                key: item["state"]["S"]
                for key, item in self._states(run_id, stage).items()
                if "state" in item
            }
            queued = len(self._listings(run_id, stage).keys() - states.keys())
            rows.append((stage, QUEUED, queued))
            rows.extend((stage, state, 1) for state in states.values())
        return RunStatus(
            run_id=run_id,
            window_from=item.get("window_from", {}).get("S", ""),
            window_to=item.get("window_to", {}).get("S", ""),
            kicked_off=item.get("kicked_off", {}).get("BOOL", False),
            started_at=float(item.get("started_at", {}).get("N", "0")),
            completed_at=float(item["completed_at"]["N"]) if "completed_at" in item else None,
            stages=_stage_counts(rows),
            stats={n: int(item.get(n, {}).get("N", "0")) for n in STAT_FIELDS},
            manifest_signature=item.get("manifest_signature", {}).get("S", ""),
        )

    def _query(self, pk: str, projection: str) -> Iterable[dict[str, Any]]:
        pages = self._ddb.get_paginator("query").paginate(
            TableName=self.table,
            KeyConditionExpression="pk = :pk",
            ExpressionAttributeValues={":pk": {"S": pk}},
            ProjectionExpression=projection,
            # DynamoDB refuses names the expression does not use.
            ExpressionAttributeNames={
                k: v
                for k, v in {"#s": "state", "#p": "path", "#e": "error"}.items()
                if k in projection
            },
            ConsistentRead=True,
        )
        for page in pages:
            yield from page.get("Items", [])

    def dead(self, run_id: str) -> list[DeadEntity]:
        found = []
        for stage in STAGE_NAMES:
            dead = {
                key: item.get("error", {}).get("S", "")
                for key, item in self._states(run_id, stage).items()
                if item.get("state", {}).get("S") == DEAD
            }
            if dead:
                paths = self._listings(run_id, stage)
                for key, error in dead.items():
                    path = tuple(json.loads(paths.get(key, "[]")))
                    found.append(DeadEntity(stage, path, error))
        return found

    def last_error(self, run_id: str, stage: str, key: str) -> str:
        item = self._ddb.get_item(
            TableName=self.table,
            Key={"pk": {"S": _entity_pk(run_id, stage)}, "sk": {"S": key}},
        ).get("Item", {})
        return str(item.get("error", {}).get("S", ""))

    def mark_completed(self, run_id: str) -> bool:
        now = {":n": {"N": str(time.time())}}
        try:
            self._ddb.update_item(
                TableName=self.table,
                Key={"pk": {"S": _run_pk(run_id)}, "sk": {"S": "meta"}},
                UpdateExpression="SET completed_at = :n",
                ConditionExpression="attribute_not_exists(completed_at)",
                ExpressionAttributeValues=now,
            )
            first = True
        except self._ddb.exceptions.ConditionalCheckFailedException:
            first = False
        # The run list's item too, so that open_runs() can skip the run (also repairs a
        # list item that an interrupted first call left without it).
        self._ddb.update_item(
            TableName=self.table,
            Key={"pk": {"S": self.RUNS_PK}, "sk": {"S": run_id}},
            UpdateExpression="SET completed_at = if_not_exists(completed_at, :n)",
            ExpressionAttributeValues=now,
        )
        return first

    def mark_manifest(self, run_id: str, signature: str) -> None:
        for key in (
            {"pk": {"S": _run_pk(run_id)}, "sk": {"S": "meta"}},
            # The run list's item too: open_runs() skips the run from then on.
            {"pk": {"S": self.RUNS_PK}, "sk": {"S": run_id}},
        ):
            self._ddb.update_item(
                TableName=self.table,
                Key=key,
                UpdateExpression="SET manifest_signature = :s",
                ExpressionAttributeValues={":s": {"S": signature}},
            )

    def mark_quiet(self, run_id: str, at: float | None) -> float | None:
        key = {"pk": {"S": _run_pk(run_id)}, "sk": {"S": "meta"}}
        if at is None:
            self._ddb.update_item(
                TableName=self.table, Key=key, UpdateExpression="REMOVE quiet_since"
            )
            return None
        item = self._ddb.update_item(
            TableName=self.table,
            Key=key,
            UpdateExpression="SET quiet_since = if_not_exists(quiet_since, :n)",
            ExpressionAttributeValues={":n": {"N": repr(at)}},
            ReturnValues="ALL_NEW",
        ).get("Attributes", {})
        return float(item.get("quiet_since", {}).get("N", repr(at)))

    def _run_items(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        pages = self._ddb.get_paginator("query").paginate(
            TableName=self.table,
            KeyConditionExpression="pk = :pk",
            ExpressionAttributeValues={":pk": {"S": self.RUNS_PK}},
        )
        for page in pages:
            items.extend(page.get("Items", []))
        items.sort(key=lambda i: float(i.get("started_at", {}).get("N", "0")), reverse=True)
        return items

    def runs(self) -> list[str]:
        return [i["sk"]["S"] for i in self._run_items()]

    def open_runs(self, since: float) -> list[str]:
        return [
            i["sk"]["S"]
            for i in reversed(self._run_items())
            if "completed_at" not in i
            and "manifest_signature" not in i
            and float(i.get("started_at", {}).get("N", "0")) >= since
        ]
