"""DLQ inspection and replay: why messages died, and moving them back once the cause is fixed.

Replay sends each message to the stage's queue (body and attributes kept) before deleting
it from the DLQ, so an interruption can only duplicate a message, never lose one;
processing is idempotent, so duplicates are harmless. SQS's StartMessageMoveTask would do
the move too, but it is not available everywhere (moto lacks it) and reports no per-message
counts; this works the same on SQS and the embedded queues.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from pipeline.queues import (
    BATCH,
    DEAD_RECEIVES,
    ERROR_CLASS,
    ERROR_MESSAGE,
    RELISTED,
    Message,
    Outgoing,
    Queue,
)

# A listing holds the DLQ messages it received invisible this long (and releases them when
# done): long enough that none comes round again while the listing goes on.
INSPECT_VISIBILITY = 300.0
# Seconds a DLQ receive waits: SQS's short poll (0) samples some servers only and can come
# back empty while messages remain; a long poll asks them all.
REPLAY_WAIT = 1.0


@dataclass(frozen=True)
class DeadLetter:
    """One dead-lettered message and why it died."""

    body: str
    reason: str
    path: tuple[str, ...]
    run_id: str


@dataclass
class ReplayReport:
    stage: str
    moved: int = 0
    seen: int = 0
    dry_run: bool = False
    reasons: Counter[str] = field(default_factory=Counter)


def reason_of(message: Message, last_error: Callable[[str], str] | None = None) -> str:
    """The recorded reason, or for a message SQS redrove itself, the last error the ledger saw."""
    if ERROR_CLASS in message.attributes:
        return f"{message.attributes[ERROR_CLASS]}: {message.attributes.get(ERROR_MESSAGE, '')}"
    receives = message.attributes.get(DEAD_RECEIVES) or "too many"
    note = f"redriven by the queue after {receives} receives"
    if last_error is not None:
        error = last_error(message.body)
        if error:
            return f"{error} ({note})"
    return f"no error recorded ({note}: the drain crashed or timed out)"


def _identity(body: str) -> tuple[tuple[str, ...], str]:
    try:
        data = json.loads(body)
        path = tuple(str(p) for p in data.get("path", []))
        return path, str(data.get("run_id", ""))
    except (ValueError, AttributeError, TypeError):
        return (), ""


def inspect(
    dlq: Queue, *, limit: int = 1000, last_error: Callable[[str], str] | None = None
) -> list[DeadLetter]:
    """Up to `limit` dead letters with their reasons; the messages stay in the DLQ.

    Each message is counted once: received messages stay hidden while the listing goes on,
    and one seen again (a listing outlasting INSPECT_VISIBILITY) ends it.
    """
    found: dict[str, Message] = {}
    try:
        while len(found) < limit:
            batch = dlq.receive(
                min(BATCH, limit - len(found)),
                wait_seconds=REPLAY_WAIT,
                visibility_timeout=INSPECT_VISIBILITY,
            )
            repeated = any(m.id in found for m in batch)
            # The latest receipt of each: only it can release the message again.
            found.update((m.id, m) for m in batch)
            if not batch or repeated:
                break
    finally:
        dlq.change_visibility([m.receipt for m in found.values()], 0)
    letters = []
    for m in found.values():
        path, run_id = _identity(m.body)
        letters.append(DeadLetter(m.body, reason_of(m, last_error), path, run_id))
    return letters


def replay(
    dlq: Queue,
    queue: Queue,
    *,
    max_messages: int | None = None,
    dry_run: bool = False,
    rate: float | None = None,
    sleep: Callable[[float], None] = time.sleep,
) -> ReplayReport:
    """Move up to `max_messages` from `dlq` to `queue` (send, then delete), `rate` per second."""
    report = ReplayReport(stage=queue.name, dry_run=dry_run)
    if dry_run:
        letters = inspect(dlq, limit=max_messages or 10**9)
        report.seen = len(letters)
        report.reasons.update(letter.reason for letter in letters)
        return report
    started = time.monotonic()
    while max_messages is None or report.moved < max_messages:
        want = BATCH if max_messages is None else min(BATCH, max_messages - report.moved)
        batch = dlq.receive(want, wait_seconds=REPLAY_WAIT)
        if not batch:
            break
        report.seen += len(batch)
        report.reasons.update(reason_of(m) for m in batch)
        # Marked, so the drain reads the ledger first: a dead letter SQS moved itself carries
        # no attributes of ours, and its entity may be partly or wholly done.
        queue.send([Outgoing(m.body, {**m.attributes, **RELISTED}) for m in batch])
        dlq.delete([m.receipt for m in batch])
        report.moved += len(batch)
        if rate:
            ahead = report.moved / rate - (time.monotonic() - started)
            if ahead > 0:
                sleep(ahead)
    return report
