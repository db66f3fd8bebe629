"""The queue interface embedded in one SQLite file, with SQS's semantics.

Every queue of a local run lives in one file, so that its DLQ can be inspected and replayed
after the run, from another process.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.queues import BATCH, Depth, Message, Outgoing, chunks


@dataclass(frozen=True)
class Hidden:
    """A local queue's invisible messages: those a consumer holds (received, neither
    deleted nor given back), and those given back with a delay; times are epoch seconds."""

    held: int = 0
    held_until: float | None = None  # when the first held one is visible again
    delayed: int = 0
    delayed_until: float | None = None
    first_delayed: str | None = None  # the body of the delayed message visible first


_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    queue TEXT NOT NULL,
    id TEXT NOT NULL,
    body TEXT NOT NULL,
    attributes TEXT NOT NULL,
    visible_at REAL NOT NULL,
    receive_count INTEGER NOT NULL DEFAULT 0,
    receipt TEXT,
    -- 1 from a receive until the message is deleted or given back (change_visibility): a
    -- hidden message a consumer holds, as opposed to one given back with a delay.
    held INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS messages_visible ON messages (queue, visible_at, seq);
CREATE INDEX IF NOT EXISTS messages_receipt ON messages (receipt);
-- Messages per queue, kept by triggers, so that depth() reads the in-flight rows only.
CREATE TABLE IF NOT EXISTS sizes (queue TEXT PRIMARY KEY, n INTEGER NOT NULL);
CREATE TRIGGER IF NOT EXISTS messages_in AFTER INSERT ON messages BEGIN
    INSERT INTO sizes VALUES (NEW.queue, 1) ON CONFLICT (queue) DO UPDATE SET n = n + 1;
END;
CREATE TRIGGER IF NOT EXISTS messages_out AFTER DELETE ON messages BEGIN
    UPDATE sizes SET n = n - 1 WHERE queue = OLD.queue;
END;
CREATE TRIGGER IF NOT EXISTS messages_moved AFTER UPDATE OF queue ON messages
WHEN OLD.queue <> NEW.queue BEGIN
    UPDATE sizes SET n = n - 1 WHERE queue = OLD.queue;
    INSERT INTO sizes VALUES (NEW.queue, 1) ON CONFLICT (queue) DO UPDATE SET n = n + 1;
END;
"""


class LocalQueueStore:
    """One SQLite file holding every local queue; thread-safe, shareable between processes."""

    def __init__(self, path: str | Path, *, clock: Any = time.time) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._lock = threading.Lock()
        self._arrived = threading.Condition(self._lock)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA busy_timeout=10000")
        self._db.executescript(_SCHEMA)
        self._add_held_column()
        self.requests = 0
        self._hurry = False

    def _add_held_column(self) -> None:
        """A state file written before `held` existed: a message with a receipt was held."""

        def missing() -> bool:
            return "held" not in {row[1] for row in self._db.execute("PRAGMA table_info(messages)")}

        if missing():
            self._db.execute("BEGIN IMMEDIATE")
            if missing():  # another process may have added it meanwhile
                self._db.execute("ALTER TABLE messages ADD COLUMN held INTEGER NOT NULL DEFAULT 0")
                self._db.execute("UPDATE messages SET held = 1 WHERE receipt IS NOT NULL")
            self._db.execute("COMMIT")

    def hurry(self) -> None:
        """End every long poll now, and wait no more in later ones (the run is over)."""
        with self._arrived:
            self._hurry = True
            self._arrived.notify_all()

    def queue(
        self,
        name: str,
        *,
        visibility_timeout: float = 30.0,
        dlq: LocalQueue | None = None,
        max_receive_count: int = 0,
    ) -> LocalQueue:
        return LocalQueue(self, name, visibility_timeout, dlq, max_receive_count)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- operations, called by LocalQueue under the store's lock --------------------------

    def _send(self, queue: str, messages: Sequence[Outgoing]) -> None:
        now = self._clock()
        with self._arrived:
            self.requests += len(chunks(messages))
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "INSERT INTO messages (queue, id, body, attributes, visible_at)"
                " VALUES (?, ?, ?, ?, ?)",
                [
                    (queue, uuid.uuid4().hex, m.body, json.dumps(dict(m.attributes)), now)
                    for m in messages
                ],
            )
            self._db.execute("COMMIT")
            self._arrived.notify_all()

    def _receive(
        self,
        q: LocalQueue,
        max_messages: int,
        wait_seconds: float,
        visibility_timeout: float | None = None,
    ) -> list[Message]:
        deadline = time.monotonic() + wait_seconds
        with self._arrived:
            self.requests += 1
            while True:
                got = self._take(q, min(max_messages, BATCH), visibility_timeout)
                remaining = deadline - time.monotonic()
                if got or remaining <= 0 or self._hurry:
                    return got
                # Woken by a send in this process; other processes' sends are seen on timeout.
                self._arrived.wait(min(remaining, 1.0))

    def _take(self, q: LocalQueue, limit: int, visibility_timeout: float | None) -> list[Message]:
        now = self._clock()
        hidden = q.visibility_timeout if visibility_timeout is None else visibility_timeout
        got: list[Message] = []
        self._db.execute("BEGIN IMMEDIATE")
        try:
            while len(got) < limit:
                rows = self._db.execute(
                    "SELECT seq, id, body, attributes, receive_count FROM messages"
                    " WHERE queue = ? AND visible_at <= ? ORDER BY visible_at, seq LIMIT ?",
                    (q.name, now, limit - len(got)),
                ).fetchall()
                if not rows:
                    break
                for seq, mid, body, attrs, count in rows:
                    if q.dlq is not None and q.max_receive_count and count >= q.max_receive_count:
                        # SQS redrive: received too often without a delete.
                        self._db.execute(
                            "UPDATE messages SET queue = ?, visible_at = ?, receive_count = 0,"
                            " receipt = NULL, held = 0 WHERE seq = ?",
                            (q.dlq.name, now, seq),
                        )
                        continue
                    receipt = uuid.uuid4().hex
                    self._db.execute(
                        "UPDATE messages SET visible_at = ?, receive_count = ?, receipt = ?,"
                        " held = 1 WHERE seq = ?",
                        (now + hidden, count + 1, receipt, seq),
                    )
                    got.append(Message(mid, receipt, body, json.loads(attrs), count + 1))
            self._db.execute("COMMIT")
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        return got

    def release_in_flight(self) -> int:
        """Make every held message (received, neither deleted nor given back) visible now;
        return how many.

        For the owner of a local run at its start: whoever received them (a process that
        was killed or interrupted) is gone, so they need not wait out their visibility. A
        message given back with a delay (a retry's backoff, the vendor's Retry-After) keeps it.
        """
        now = self._clock()
        with self._arrived:
            self._db.execute("BEGIN IMMEDIATE")
            cur = self._db.execute(
                "UPDATE messages SET visible_at = ?, receipt = NULL, held = 0"
                " WHERE held = 1 AND visible_at > ?",
                (now, now),
            )
            self._db.execute("COMMIT")
            self._arrived.notify_all()
            return cur.rowcount

    def _delete(self, receipts: Sequence[str]) -> None:
        with self._lock:
            self.requests += len(chunks(receipts))
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany("DELETE FROM messages WHERE receipt = ?", [(r,) for r in receipts])
            self._db.execute("COMMIT")

    def _change_visibility(self, receipts: Sequence[str], seconds: float) -> None:
        visible_at = self._clock() + seconds
        with self._arrived:
            self.requests += len(chunks(receipts))
            self._db.execute("BEGIN IMMEDIATE")
            self._db.executemany(
                "UPDATE messages SET visible_at = ?, held = 0 WHERE receipt = ?",
                [(visible_at, r) for r in receipts],
            )
            self._db.execute("COMMIT")
            self._arrived.notify_all()

    def _depth(self, queue: str) -> Depth:
        now = self._clock()
        with self._lock:
            self.requests += 1
            row = self._db.execute("SELECT n FROM sizes WHERE queue = ?", (queue,)).fetchone()
            (in_flight,) = self._db.execute(
                "SELECT COUNT(*) FROM messages WHERE queue = ? AND visible_at > ?", (queue, now)
            ).fetchone()
        total = int(row[0]) if row else 0
        return Depth(total - int(in_flight), int(in_flight))

    def hidden(self, queue: str) -> Hidden:
        """What of `queue` is invisible now, and until when."""
        now = self._clock()
        with self._lock:
            groups = self._db.execute(
                "SELECT held, COUNT(*), MIN(visible_at) FROM messages"
                " WHERE queue = ? AND visible_at > ? GROUP BY held",
                (queue, now),
            ).fetchall()
            first = self._db.execute(
                "SELECT body FROM messages WHERE queue = ? AND visible_at > ? AND held = 0"
                " ORDER BY visible_at LIMIT 1",
                (queue, now),
            ).fetchone()
        found = {bool(held): (int(n), float(at)) for held, n, at in groups}
        held, held_until = found.get(True, (0, None))
        delayed, delayed_until = found.get(False, (0, None))
        return Hidden(held, held_until, delayed, delayed_until, first[0] if first else None)


class LocalQueue:
    """One named queue of a LocalQueueStore, with SQS's semantics."""

    def __init__(
        self,
        store: LocalQueueStore,
        name: str,
        visibility_timeout: float,
        dlq: LocalQueue | None,
        max_receive_count: int,
    ) -> None:
        self.store = store
        self.name = name
        self.visibility_timeout = visibility_timeout
        self.dlq = dlq
        self.max_receive_count = max_receive_count

    def send(self, messages: Sequence[Outgoing]) -> None:
        if messages:
            self.store._send(self.name, messages)

    def receive(
        self,
        max_messages: int = BATCH,
        wait_seconds: float = 0.0,
        visibility_timeout: float | None = None,
    ) -> list[Message]:
        return self.store._receive(self, max_messages, wait_seconds, visibility_timeout)

    def delete(self, receipts: Sequence[str]) -> None:
        if receipts:
            self.store._delete(receipts)

    def change_visibility(self, receipts: Sequence[str], seconds: float) -> None:
        if receipts:
            self.store._change_visibility(receipts, seconds)

    def depth(self) -> Depth:
        return self.store._depth(self.name)
