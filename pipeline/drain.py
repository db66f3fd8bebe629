"""The drain loop: receive up to 10 messages, call the vendor, fan out, delete; until time runs out.

One loop serves every stage (the stage definition says which listing to call and where
the results go). Messages are processed by a thread pool so that vendor latency does not
cap throughput: the rate budget, not the thread count, sets the pace. A batch of 10 is
finished as a unit: children are recorded and sent in batches of 10, dead messages are sent
to the DLQ with their reason, then done, gone and dead messages are deleted in one call.
Retryable failures go back to the queue with a growing visibility delay and are
dead-lettered by the drain itself at the last allowed receive, with the error as reason.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, TypeVar

from aws_lambda_powertools import Logger

from pipeline.envelope import Envelope
from pipeline.errors import (
    AuthError,
    GoneError,
    MessageError,
    PoisonError,
    RetryableError,
)
from pipeline.ledger import DEAD, DONE, GONE, Ledger
from pipeline.queues import BATCH, Message, Outgoing, Queue
from pipeline.sinks import Sink, write_records
from pipeline.stages import Stage
from pipeline.stats import CallStats
from pipeline.vendor import VendorClient

logger = Logger(service="harvest", child=True)
T = TypeVar("T")
K = TypeVar("K")

RETRY, STOP, RELEASE = "retry", "stop", "release"
MAX_ERROR_CHARS = 1000
# Attribute names that a dead-lettered message carries (besides its own).
ERROR_CLASS, ERROR_MESSAGE = "error_class", "error_message"
DEAD_STAGE, DEAD_AT, DEAD_RECEIVES = "dead_stage", "dead_at", "dead_receive_count"


@dataclass
class Outcome:
    message: Message
    envelope: Envelope | None
    kind: str
    children: list[Envelope] = field(default_factory=list)
    error: str = ""
    error_class: str = ""


@dataclass
class DrainReport:
    """What one drain invocation did: handlers turn it into metrics, `harvest local` too."""

    stage: str
    received: int = 0
    done: int = 0
    gone: int = 0
    dead: int = 0
    retried: int = 0
    children: int = 0
    stopped: str = ""  # deadline | idle | auth
    auth_error: str = ""
    runs: set[str] = field(default_factory=set)
    # Batches finish on several threads at once.
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        fields = {k: v for k, v in self.__dict__.items() if not k.startswith("_")}
        return {**fields, "runs": sorted(self.runs)}

    def add(self, runs: Iterable[str], **counts: int) -> None:
        with self._lock:
            self.runs.update(runs)
            for name, n in counts.items():
                setattr(self, name, getattr(self, name) + n)


@dataclass
class _Batch:
    messages: Sequence[Message]
    outcomes: list[Outcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


def describe(exc: BaseException) -> tuple[str, str]:
    """(class name, message) of an error, the message cut to a size a queue attribute holds."""
    return type(exc).__name__, str(exc)[:MAX_ERROR_CHARS]


class Drain:
    """Drains one stage's queue into the next stage's queue (or the sink)."""

    def __init__(
        self,
        stage: Stage,
        *,
        queue: Queue,
        dlq: Queue,
        child_queue: Queue | None,
        upstream: Sequence[Queue],
        client: VendorClient,
        sink: Sink,
        ledger: Ledger,
        stats: CallStats,
        concurrency: int = 16,
        max_receive_count: int = 5,
        retry_delay: float = 5.0,
        wait_seconds: float = 1.0,
        idle_grace: float = 20.0,
        halt: Halt | None = None,
        deeper_first: bool = False,
    ) -> None:
        if stage.child is not None and child_queue is None:
            raise ValueError(f"stage {stage.name} fans out to {stage.child} but has no child queue")
        self.stage = stage
        self.queue, self.dlq, self.child_queue = queue, dlq, child_queue
        self.upstream = upstream
        self.client, self.sink, self.ledger, self.stats = client, sink, ledger, stats
        self.concurrency = concurrency
        self.max_receive_count = max_receive_count
        self.retry_delay = retry_delay
        self.wait_seconds = wait_seconds
        self.idle_grace = idle_grace
        self.halt = halt
        # Deeper stages first: their calls go ahead of upstream ones in a shared budget.
        self.priority = stage.depth if deeper_first else 0

    # -- the loop -------------------------------------------------------------------------

    def run(self, remaining: Callable[[], float], safety_margin: float) -> DrainReport:
        """Drain until `remaining()` falls to `safety_margin`, the stage is idle, or a 401."""
        report = DrainReport(self.stage.name)
        # Most scheduled invocations find nothing to do (between harvests): say so after a
        # few depth reads, before paying for a long poll.
        if self.halt is not None and self.halt.is_set():
            report.stopped, report.auth_error = "auth", self.halt.reason
            return report
        if self._idle(0.0):
            report.stopped = "idle"
            return report
        flow = _Flow(
            # Keep every thread busy with one more batch waiting, and no more: the rest stay
            # visible to other invocations.
            max_processing=self.concurrency + BATCH,
            # Batches whose last message is slow (a stall) hold their finished messages
            # until it ends; allow enough of them that the threads keep working meanwhile.
            max_open_batches=2 * math.ceil(self.concurrency / BATCH) + 2,
        )
        # Set by a 401 here or, through the Runtime, in any drain sharing this process.
        stop = self.halt if self.halt is not None else Halt()
        empty_since = 0.0  # when the queue was first found empty, if it still is
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix=f"drain-{self.stage.name}")
        try:
            while not stop.is_set():
                if remaining() <= safety_margin:
                    report.stopped = "deadline"
                    break
                # A 401 or the deadline may have come while waiting for room: look again
                # before receiving (the loop's head stops).
                if (
                    not flow.wait_for_room(timeout=0.2)
                    or stop.is_set()
                    or remaining() <= safety_margin
                ):
                    continue
                wait = max(0.0, min(self.wait_seconds, remaining() - safety_margin))
                messages = self.queue.receive(BATCH, wait_seconds=wait)
                if not messages:
                    if flow.idle() and self._idle(empty_since):
                        report.stopped = "idle"
                        break
                    empty_since = empty_since or time.monotonic()
                    continue
                empty_since = 0.0
                report.received += len(messages)
                flow.opened(len(messages))
                batch = _Batch(messages)
                for message in messages:
                    pool.submit(
                        self._work, batch, message, report, stop, remaining, safety_margin, flow
                    )
        finally:
            pool.shutdown(wait=True)
        if stop.is_set():
            report.stopped, report.auth_error = "auth", stop.reason
        return report

    def _idle(self, empty_since: float) -> bool:
        """Stop polling: nothing left here or upstream, or nothing here for `idle_grace` s.

        The grace bounds what an empty stage costs while upstream is stuck (a 401 there, a
        long retry delay); the next scheduled invocation picks up whatever arrives later.
        """
        if self.queue.depth().total:
            return False
        if empty_since and time.monotonic() - empty_since >= self.idle_grace:
            return True
        return all(q.depth().total == 0 for q in self.upstream)

    def _work(
        self,
        batch: _Batch,
        message: Message,
        report: DrainReport,
        stop: Halt,
        remaining: Callable[[], float],
        safety_margin: float,
        flow: _Flow,
    ) -> None:
        if stop.is_set():
            outcome = Outcome(message, None, STOP)
        elif remaining() <= safety_margin / 2:
            outcome = Outcome(message, None, RELEASE)
        else:
            outcome = self.process(message)
            if outcome.kind == STOP:
                stop.stop(outcome.error)
        flow.processed()
        with batch.lock:
            batch.outcomes.append(outcome)
            finished = len(batch.outcomes) == len(batch.messages)
        if finished:
            try:
                self.finish(batch.outcomes, report)
            except Exception:
                # Nothing was deleted that was not safely recorded: the messages come back.
                logger.exception("finishing a batch failed; its messages will be redelivered")
            finally:
                flow.closed()

    # -- one message ----------------------------------------------------------------------

    def process(self, message: Message) -> Outcome:
        """Process one message and say what becomes of it; never raises."""
        try:
            envelope = Envelope.from_json(message.body)
            if envelope.stage != self.stage.name:
                raise MessageError(f"a {envelope.stage} message on the {self.stage.name} queue")
        except MessageError as exc:
            return _failed(message, None, DEAD, exc)
        try:
            if self.stage.child is not None:
                children = [
                    envelope.child(self.stage.child, child_id)
                    for child_id in self._child_ids(envelope)
                ]
                return Outcome(message, envelope, DONE, children)
            self._harvest(envelope)
            return Outcome(message, envelope, DONE)
        except GoneError as exc:
            return _failed(message, envelope, GONE, exc)
        except PoisonError as exc:
            return _failed(message, envelope, DEAD, exc)
        except AuthError as exc:
            return _failed(message, envelope, STOP, exc)
        except RetryableError as exc:
            return self._retry_or_dead(message, envelope, exc)
        except Exception as exc:  # a bug or an unforeseen response: retry, then dead-letter
            logger.exception(
                "unexpected error processing a message", extra={"stage": self.stage.name}
            )
            return self._retry_or_dead(message, envelope, exc)

    def _retry_or_dead(self, message: Message, envelope: Envelope, exc: Exception) -> Outcome:
        kind = DEAD if message.receive_count >= self.max_receive_count else RETRY
        return _failed(message, envelope, kind, exc)

    def _child_ids(self, envelope: Envelope) -> list[str]:
        ids: list[str] = []
        for item in self.client.items(self.stage.path, envelope.entity_id, priority=self.priority):
            child_id = item.get("id") if isinstance(item, dict) else None
            if not isinstance(child_id, str) or not child_id:
                raise PoisonError(
                    f"{self.stage.name} listing returned an item without an id: {item!r}"
                )
            ids.append(child_id)
        # A listing that repeats an id must not make the entity twice.
        return list(dict.fromkeys(ids))

    def _harvest(self, envelope: Envelope) -> None:
        window = envelope.window
        points: list[dict[str, Any]] = []
        append = points.append
        params = {"from": window.from_text, "to": window.to_text}
        # The client hands over pages whose items are all JSON objects.
        for items in self.client.pages(
            self.stage.path, envelope.entity_id, params, priority=self.priority
        ):
            for item in items:
                ts, value = item.get("ts"), item.get("value")
                if type(ts) is not str or not isinstance(value, int | float):
                    raise PoisonError(f"data point without ts/value: {item!r}")
                append({"ts": ts, "value": value})
        troop_id, warrior_id, data_group_id = envelope.path
        record = {
            "run_id": envelope.run_id,
            "troop_id": troop_id,
            "warrior_id": warrior_id,
            "data_group_id": data_group_id,
            "from": window.from_text,
            "to": window.to_text,
            "points": points,
        }
        write_records(self.sink, envelope.run_id, envelope.key, [record])

    # -- one batch ------------------------------------------------------------------------

    def finish(self, outcomes: Sequence[Outcome], report: DrainReport) -> None:
        """Record, fan out, dead-letter, delete: in the order that never loses a message."""
        by_kind = _group(outcomes, lambda o: o.kind)
        done, gone, dead = by_kind.get(DONE, []), by_kind.get(GONE, []), by_kind.get(DEAD, [])

        children = [c for o in done for c in o.children]
        if children and self.child_queue is not None:
            for run_id, kids in _group(children, lambda c: c.run_id).items():
                self.ledger.enqueued(run_id, kids[0].stage, [(c.key, c.path) for c in kids])
            self.child_queue.send([Outgoing(c.to_json()) for c in children])
        if dead:
            self.dlq.send([self._dead_letter(o) for o in dead])
        finished = [o for o in (*done, *gone, *dead) if o.envelope is not None]
        for run_id, group in _group(finished, _run_of).items():
            self.ledger.finish_many(
                run_id, self.stage.name, [(_key_of(o), o.kind, o.error) for o in group]
            )
        self.queue.delete([o.message.receipt for o in (*done, *gone, *dead)])

        retry = by_kind.get(RETRY, [])
        for o in retry:
            if o.envelope is not None:
                self.ledger.record_error(
                    o.envelope.run_id,
                    self.stage.name,
                    o.envelope.key,
                    f"{o.error_class}: {o.error}",
                )
        for delay, delayed in _group(retry, self._retry_delay).items():
            self.queue.change_visibility([o.message.receipt for o in delayed], delay)
        # Messages not processed (401 or the deadline) become visible again at once; their
        # receive count grows by one, which is why the drain stops at the first 401.
        released = [o.message.receipt for o in (*by_kind.get(STOP, []), *by_kind.get(RELEASE, []))]
        if released:
            self.queue.change_visibility(released, 0)

        for o in dead:
            logger.warning(
                "message dead-lettered",
                extra={"stage": self.stage.name, "reason": f"{o.error_class}: {o.error}"},
            )
        report.add(
            (_run_of(o) for o in outcomes if o.envelope is not None),
            done=len(done),
            gone=len(gone),
            dead=len(dead),
            retried=len(retry),
            children=len(children),
        )
        self.stats.add(
            messages_done=len(done),
            messages_gone=len(gone),
            messages_dead=len(dead),
            messages_failed=len(retry),
        )

    def _retry_delay(self, o: Outcome) -> float:
        """Exponential backoff by receive count: base, 2 × base, 4 × base, … at most 15 min."""
        return min(self.retry_delay * 2.0 ** max(0, o.message.receive_count - 1), 900.0)

    def _dead_letter(self, o: Outcome) -> Outgoing:
        attributes: Mapping[str, str] = {
            **o.message.attributes,
            ERROR_CLASS: o.error_class or "Error",
            # Escaped to ASCII: SQS refuses some characters a vendor message may carry.
            ERROR_MESSAGE: (o.error or "(no message)").encode("unicode_escape").decode("ascii"),
            DEAD_STAGE: self.stage.name,
            DEAD_RECEIVES: str(o.message.receive_count),
            DEAD_AT: datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        }
        return Outgoing(o.message.body, attributes)


class Halt(threading.Event):
    """Set by a 401: every drain sharing it stops; `reason` keeps what the vendor said."""

    def __init__(self) -> None:
        super().__init__()
        self.reason = ""
        self._reason_lock = threading.Lock()

    def stop(self, reason: str) -> None:
        with self._reason_lock:
            self.reason = self.reason or reason
        self.set()

    def clear(self) -> None:
        self.reason = ""
        super().clear()


class _Flow:
    """How much a drain has received and not finished: messages in process, open batches."""

    def __init__(self, max_processing: int, max_open_batches: int) -> None:
        self._cond = threading.Condition()
        self._processing = 0
        self._open = 0
        self._max_processing = max_processing
        self._max_open = max_open_batches

    def _has_room(self) -> bool:
        return self._processing + BATCH <= self._max_processing and self._open < self._max_open

    def wait_for_room(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(self._has_room, timeout)

    def opened(self, messages: int) -> None:
        with self._cond:
            self._processing += messages
            self._open += 1

    def processed(self) -> None:
        with self._cond:
            self._processing -= 1
            # Wake the receiving loop (the only waiter) only when this made room.
            if self._has_room():
                self._cond.notify()

    def closed(self) -> None:
        with self._cond:
            self._open -= 1
            if self._has_room():
                self._cond.notify()

    def idle(self) -> bool:
        with self._cond:
            return self._open == 0


def _failed(message: Message, envelope: Envelope | None, kind: str, exc: BaseException) -> Outcome:
    error_class, error = describe(exc)
    return Outcome(message, envelope, kind, error=error, error_class=error_class)


def _group(items: Iterable[T], key: Callable[[T], K]) -> dict[K, list[T]]:
    groups: dict[K, list[T]] = {}
    for item in items:
        groups.setdefault(key(item), []).append(item)
    return groups


def _run_of(o: Outcome) -> str:
    assert o.envelope is not None
    return o.envelope.run_id


def _key_of(o: Outcome) -> str:
    assert o.envelope is not None
    return o.envelope.key


def monotonic_deadline(seconds: float) -> Callable[[], float]:
    """A `remaining()` for code that has no Lambda context: seconds left of `seconds` from now."""
    end = time.monotonic() + seconds
    return lambda: end - time.monotonic()
