"""The drain loop: receive up to 10 messages, call the vendor, fan out, delete; until time runs out.

One loop serves every stage (the stage definition says which listing to call and where
the results go). Messages are processed by a thread pool so that vendor latency does not
cap throughput: the rate budget, not the thread count, sets the pace. A batch of 10 is
finished as a unit: children are recorded and sent in batches of 10, dead messages are sent
to the DLQ with their reason, then done, gone and dead messages are deleted in one call.
Retryable failures go back to the queue with a growing visibility delay and are
dead-lettered by the drain itself at the last allowed receive, with the error as reason.

Every message ends as an outcome, whatever goes wrong while it is handled: an exception
that escapes the vendor client or the parser becomes a retry or a dead letter of that one
message, never the loss of its batch. A message whose entity the ledger already holds as
done or gone (a duplicate, a stale DLQ copy, a second kickoff) is deleted without a vendor
call. State-store steps (ledger, queues, sink) are retried in place before a failure costs
the message a receive.
"""

from __future__ import annotations

import math
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import ROUND_FLOOR, Decimal
from enum import StrEnum
from typing import Any, TypeVar

from aws_lambda_powertools import Logger
from tenacity import Retrying, stop_after_attempt, wait_random_exponential

from pipeline.envelope import Envelope, listed
from pipeline.errors import (
    AuthError,
    GoneError,
    MessageError,
    PoisonError,
    RetryableError,
    quoted,
)
from pipeline.ledger import Finished, Ledger, State
from pipeline.profile import Missing, Profile, Stage, TimeFormat, select
from pipeline.profile import load as load_profile
from pipeline.queues import (
    BATCH,
    DEAD_AT,
    DEAD_RECEIVES,
    DEAD_STAGE,
    ERROR_CLASS,
    ERROR_MESSAGE,
    RELISTED,
    Message,
    Outgoing,
    Queue,
    any_waiting,
)
from pipeline.sinks import Sink, write_records
from pipeline.stats import CallStats
from pipeline.vendor_api.client import VendorClient
from pipeline.vendor_api.latency import Latency
from pipeline.window import point_text

logger = Logger(service="harvest", child=True)
T = TypeVar("T")
K = TypeVar("K")

MAX_ERROR_CHARS = 1000
# SQS keeps a message hidden at most 12 hours.
MAX_VISIBILITY_SECONDS = 43200.0
VANISHED = "no longer listed by its parent"
# In-flight sizing (see Drain.in_flight_target): a message takes more than its vendor call
# (ledger, queue and sink requests, the budget's wait), hence the headroom; before the first
# call the latency is assumed to be this.
HEADROOM = 2.0
INITIAL_LATENCY = 0.1
# Finished messages are recorded and deleted together (Drain._flush): once this many wait
# (one BatchWriteItem holds 25), or the first has waited this long.
FLUSH_ENTRIES = 25
FLUSH_SECONDS = 3.0
# While a drain's own work runs it does not long-poll (a run's tail would wait for it); after
# a receive came back short of a batch, the first wait on that work before the next look
# (doubling while the answers stay short, up to the long poll's length).
TAIL_POLL_SECONDS = 0.1
# Past its deadline a drain keeps taking messages for the budget slots it holds (claimed
# ahead for its threads; no other invocation can use them) for at most this long.
WIND_DOWN_SECONDS = 1.0
# However few states they carry (skips carry none), this many waiting messages are deleted.
MAX_SETTLING = 100


class OutcomeKind(StrEnum):
    """What becomes of one message: finished (done, gone, dead), or given back to its queue."""

    DONE = "done"
    GONE = "gone"
    DEAD = "dead"
    RETRY = "retry"  # back to the queue after a delay
    STOP = "stop"  # back at once: the vendor rejected the token
    RELEASE = "release"  # back at once: the invocation ran out of time
    SKIP = "skip"  # deleted uncalled: the ledger holds it as finished


class StopReason(StrEnum):
    """Why a drain invocation stopped taking messages."""

    DEADLINE = "deadline"
    IDLE = "idle"
    AUTH = "auth"
    PAUSED = "paused"


@dataclass
class Outcome:
    message: Message
    envelope: Envelope | None
    kind: OutcomeKind
    children: list[Envelope] = field(default_factory=list)
    error: str = ""
    error_class: str = ""
    # Listed children whose id no envelope accepts, as (key, path to store, reason):
    # recorded dead.
    rejected: list[tuple[str, tuple[str, ...], str]] = field(default_factory=list)
    # Keys of children an earlier listing of this parent named and this one does not.
    vanished: list[str] = field(default_factory=list)
    # The vendor's own wait (a long Retry-After): the message stays hidden this long.
    retry_after: float | None = None


@dataclass
class DrainReport:
    """What one drain invocation did: handlers turn it into metrics, `harvest local` too."""

    stage: str
    received: int = 0
    done: int = 0
    gone: int = 0
    dead: int = 0
    retried: int = 0
    skipped: int = 0
    children: int = 0
    stopped: StopReason | None = None
    auth_error: str = ""
    # Age of the oldest run not settled yet, seen after the drain (0: none).
    oldest_unsettled_seconds: float = 0.0
    # Out of time with work left, it started the next invocation of its stage at once.
    successor_started: bool = False
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


@dataclass
class _Settling:
    """Finished messages waiting for one ledger write and their deletes (`Drain._flush`)."""

    # ((run id, state) or None where nothing is recorded (a skip), receipt) per message
    items: list[tuple[tuple[str, Finished] | None, str]] = field(default_factory=list)
    states: int = 0  # how many of them carry a state
    since: float = 0.0  # when the first of them came


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
        concurrency: int = 64,
        rate: float | None = None,
        max_receive_count: int = 5,
        retry_delay: float = 5.0,
        wait_seconds: float = 1.0,
        idle_grace: float = 20.0,
        halt: Halt | None = None,
        store_attempts: int = 5,
        store_backoff: float = 0.2,
        economical: bool = False,
        profile: Profile | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if stage.child is not None and child_queue is None:
            raise ValueError(f"stage {stage.name} fans out to {stage.child} but has no child queue")
        self.stage = stage
        # Whose stages a message body may name (a message of another stage is dead-lettered).
        self.profile = profile if profile is not None else load_profile()
        self.queue, self.dlq, self.child_queue = queue, dlq, child_queue
        self.upstream = upstream
        self.client, self.sink, self.ledger, self.stats = client, sink, ledger, stats
        # The most messages in process at once (threads); how many are used follows from
        # `rate` (vendor calls per second) and the vendor's latency: see in_flight_target.
        self.concurrency = concurrency
        self.rate = rate
        self.max_receive_count = max_receive_count
        self.retry_delay = retry_delay
        self.wait_seconds = wait_seconds
        self.idle_grace = idle_grace
        self._expect_until = 0.0  # see run(expect_work=)
        self.halt = halt
        # Economical (DynamoDB): finished messages are recorded 25 a write, and only a message
        # that may repeat (`_again`) is looked up. Else (SQLite, where a write or read costs
        # next to nothing) every batch is recorded at once and every message looked up, so a
        # crash repeats as little work as possible.
        self.economical = economical
        self.flush_entries = FLUSH_ENTRIES if economical else 1
        self._settling = _Settling()
        self._settling_lock = threading.Lock()
        self._held = Latency(math.inf)  # seconds a message holds its thread (in_flight_target)
        # Ledger, queue and sink steps: a throttle or a 5xx is retried here, in place
        # (botocore has retried it a few times already), before it costs a receive.
        self._store = Retrying(
            stop=stop_after_attempt(store_attempts),
            wait=wait_random_exponential(multiplier=store_backoff, max=10.0),
            reraise=True,
            before_sleep=_log_store_retry,
            sleep=sleep,
        )

    # -- the loop -------------------------------------------------------------------------

    def run(
        self,
        remaining: Callable[[], float],
        safety_margin: float,
        *,
        expect_work: bool = False,
        at_deadline: Callable[[DrainReport], None] | None = None,
    ) -> DrainReport:
        """Drain until `remaining()` falls to `safety_margin`, the stage is idle, or a 401.

        `expect_work`: started by a kickoff that may not have sent anything yet (or whose
        messages SQS's counts do not show yet): until it receives a message, empty queues
        here and upstream do not stop it before `idle_grace` seconds.
        `at_deadline`: called with the report as it stops taking messages for the deadline,
        before it finishes the ones it has.
        """
        report = DrainReport(self.stage.name)
        self._expect_until = time.monotonic() + self.idle_grace if expect_work else 0.0
        self.client.winding_down(False)  # a warm sandbox's budget, after an earlier deadline
        # Most scheduled invocations find nothing to do (between harvests): say so after a
        # few depth reads, before paying for a long poll.
        if self.halt is not None and self.halt.is_set():
            report.stopped, report.auth_error = StopReason.AUTH, self.halt.reason
            return report
        if self._idle(0.0):
            report.stopped = StopReason.IDLE
            return report
        flow = _Flow(*_flow_limits(self.in_flight_target()))
        # Set by a 401 here or, through the Runtime, in any drain sharing this process.
        stop = self.halt if self.halt is not None else Halt()
        empty_since = 0.0  # when the queue was first found empty, if it still is
        last_got = BATCH  # messages the last receive returned
        look = TAIL_POLL_SECONDS  # the next wait on own work between short receives
        winding_until = 0.0  # past the deadline: the end of its wind-down (monotonic)
        pool = ThreadPoolExecutor(self.concurrency, thread_name_prefix=f"drain-{self.stage.name}")
        try:
            while not stop.is_set():
                if remaining() <= safety_margin:
                    if not winding_until:
                        # Past the deadline it claims budget slots only for calls waiting,
                        # and takes messages only for the slots it already holds beyond those
                        # it has in process (no other invocation can use them), for
                        # WIND_DOWN_SECONDS at most.
                        winding_until = time.monotonic() + WIND_DOWN_SECONDS
                        self.client.winding_down(True)
                        if at_deadline is not None:
                            try:
                                at_deadline(report)
                            except Exception:
                                logger.exception("the deadline hook failed; the drain goes on")
                    if (
                        time.monotonic() >= winding_until
                        or last_got == 0  # nothing to spend the slots on
                        or self.client.budget_held() <= flow.processing()
                    ):
                        report.stopped = StopReason.DEADLINE
                        break
                flow.resize(*_flow_limits(self.in_flight_target()))
                self._flush(older_than=FLUSH_SECONDS)
                paused = self.client.paused_for()
                if paused > self.client.max_retry_after or (
                    not winding_until and paused >= remaining() - safety_margin
                ):
                    # The vendor asked for a longer wait than a message sits out inside a
                    # call, or one past this invocation: every message taken now would only
                    # be charged a receive. The next scheduled invocation looks again.
                    report.stopped = StopReason.PAUSED
                    break
                # A 401 or the deadline may have come while waiting for room: look again
                # before receiving (the loop's head stops).
                if (
                    not flow.wait_for_room(timeout=0.2)
                    or stop.is_set()
                    or (remaining() <= safety_margin and not winding_until)
                ):
                    continue
                wait = max(0.0, min(self.wait_seconds, remaining() - safety_margin))
                if not flow.idle() or self._settling.items:
                    # While this drain's own work runs or waits to be recorded, no long poll:
                    # at a run's tail the last of that work is what the run waits for, and a
                    # long poll on the empty queue would notice its end up to `wait_seconds`
                    # late. After a short answer it waits on that work instead, and wakes
                    # when it is done; between looks it waits twice as long each time, up
                    # to the long poll (a stalled call must not make it poll the queue fast).
                    if last_got < BATCH:
                        flow.wait_until_idle(timeout=look)
                        look = min(2 * look, max(self.wait_seconds, TAIL_POLL_SECONDS))
                    wait = 0.0
                messages = self.queue.receive(BATCH, wait_seconds=wait)
                last_got = len(messages)
                if last_got == BATCH:
                    look = TAIL_POLL_SECONDS
                if not messages:
                    # Nothing more now: budget slots claimed for threads that will find no
                    # more messages go back to every invocation (while nobody has claimed
                    # behind them); what waits to be recorded goes out (a run's tail), whole
                    # ledger batches only while this drain's own work still runs.
                    self.client.give_back_budget(keep=flow.processing())
                    idle = flow.idle()
                    self._flush(whole=idle)
                    if idle and self._idle(empty_since):
                        report.stopped = StopReason.IDLE
                        break
                    empty_since = empty_since or time.monotonic()
                    continue
                empty_since = 0.0
                self._expect_until = 0.0  # the work it was started for has shown up
                report.received += len(messages)
                flow.opened(len(messages))
                batch = _Batch(messages)
                # Parsed once here: the skip check needs the keys, process() the rest.
                parsed = {m.id: _parsed(m, self.profile) for m in messages}
                finished = self._finished_already(messages, parsed)
                for message in messages:
                    pool.submit(
                        self._work,
                        batch,
                        message,
                        report,
                        stop,
                        remaining,
                        safety_margin,
                        flow,
                        parsed[message.id],
                        message.id in finished,
                    )
        finally:
            # Past the loop nothing waits for company: whatever finishes from now on is
            # recorded and deleted at once, not left for a kill at the timeout to undo.
            self.flush_entries = 1
            self._flush()
            pool.shutdown(wait=True)
            self._flush()
            self.client.give_back_budget(keep=0)  # nothing of this invocation's calls them
        if stop.is_set():
            report.stopped, report.auth_error = StopReason.AUTH, stop.reason
        return report

    def in_flight_target(self) -> int:
        """Messages to keep in process: the budget's rate × the time a message recently held
        its thread (at least the vendor's mean latency) × HEADROOM (Little's law), at least
        one batch, at most `concurrency`.

        Without a rate (tests driving one drain by hand) it is `concurrency`.
        """
        if self.rate is None:
            return self.concurrency
        # How long a message holds its thread, waits for the budget aside (they would feed
        # back: more threads, longer waits): the call, the sink, the batch's records.
        held = max(self.client.latency.mean or 0.0, self._held.mean or 0.0) or INITIAL_LATENCY
        want = math.ceil(self.rate * held * HEADROOM)
        return min(self.concurrency, max(BATCH, want))

    def _idle(self, empty_since: float) -> bool:
        """Stop polling: nothing left here or upstream, or nothing here for `idle_grace` s.

        The grace bounds what an empty stage costs while upstream is stuck (a 401 there, a
        long retry delay); the next scheduled invocation picks up whatever arrives later.
        """
        if self.queue.depth().total:
            return False
        if empty_since and time.monotonic() - empty_since >= self.idle_grace:
            return True
        if time.monotonic() < self._expect_until:
            return False
        return not any_waiting(self.upstream)

    def _work(
        self,
        batch: _Batch,
        message: Message,
        report: DrainReport,
        stop: Halt,
        remaining: Callable[[], float],
        safety_margin: float,
        flow: _Flow,
        parsed: Envelope | None = None,
        skip: bool = False,
    ) -> None:
        started, waited = time.perf_counter(), self.client.budget_waited()
        try:
            if stop.is_set():
                outcome = self._release(message, OutcomeKind.STOP, "the vendor rejected the token")
            elif remaining() <= safety_margin / 2:
                outcome = self._release(
                    message, OutcomeKind.RELEASE, "the invocation ran out of time"
                )
            else:
                outcome = self.process(message, skip=skip, parsed=parsed)
                if outcome.kind == OutcomeKind.STOP:
                    stop.stop(outcome.error)
                    if self._last_receive(message):
                        outcome = self._release(message, OutcomeKind.STOP, outcome.error)
        except Exception as exc:  # whatever it is, it is this message's
            logger.exception("handling a message failed", extra={"stage": self.stage.name})
            outcome = self._retry_or_dead(message, None, exc)
        flow.processed()
        with batch.lock:
            batch.outcomes.append(outcome)
            finished = len(batch.outcomes) == len(batch.messages)
        if finished:
            try:
                self.finish(batch.outcomes, report)
            except Exception:  # the store stayed down through every retry
                # Nothing was deleted that was not safely recorded: the messages come back.
                logger.exception("finishing a batch failed; its messages will be redelivered")
            finally:
                flow.closed()
        self._held.observe(time.perf_counter() - started - (self.client.budget_waited() - waited))

    # -- one message ----------------------------------------------------------------------

    def process(
        self, message: Message, *, skip: bool = False, parsed: Envelope | None = None
    ) -> Outcome:
        """Process one message and say what becomes of it; never raises.

        `skip`: the ledger holds the entity as done or gone already; delete it uncalled.
        `parsed`: the message's envelope, if the caller parsed it already.
        """
        try:
            envelope = parsed or Envelope.from_json(message.body, self.profile)
            if envelope.stage != self.stage.name:
                raise MessageError(f"a {envelope.stage} message on the {self.stage.name} queue")
        except MessageError as exc:
            return _failed(message, None, OutcomeKind.DEAD, exc)
        if skip:
            return Outcome(message, envelope, OutcomeKind.SKIP)
        try:
            if self.stage.child is not None:
                return self._fan_out(message, envelope)
            self._harvest(envelope)
            return Outcome(message, envelope, OutcomeKind.DONE)
        except GoneError as exc:
            return _failed(message, envelope, OutcomeKind.GONE, exc)
        except PoisonError as exc:
            return _failed(message, envelope, OutcomeKind.DEAD, exc)
        except AuthError as exc:
            return _failed(message, envelope, OutcomeKind.STOP, exc)
        except RetryableError as exc:
            outcome = self._retry_or_dead(message, envelope, exc)
            outcome.retry_after = exc.retry_after
            return outcome
        except Exception as exc:  # a bug or an unforeseen response: retry, then dead-letter
            logger.exception(
                "unexpected error processing a message", extra={"stage": self.stage.name}
            )
            return self._retry_or_dead(message, envelope, exc)

    def _retry_or_dead(
        self, message: Message, envelope: Envelope | None, exc: BaseException
    ) -> Outcome:
        kind = (
            OutcomeKind.DEAD
            if message.receive_count >= self.max_receive_count
            else OutcomeKind.RETRY
        )
        return _failed(message, envelope, kind, exc)

    def _last_receive(self, message: Message) -> bool:
        """SQS moves the message to the DLQ itself at its next receive, unseen by the ledger."""
        return message.receive_count > self.max_receive_count

    def _release(self, message: Message, kind: OutcomeKind, why: str) -> Outcome:
        """Give an unprocessed message back; at its last receive, dead-letter it instead."""
        if not self._last_receive(message):
            return Outcome(message, None, kind)
        envelope = _parsed(message, self.profile)
        error = f"released unprocessed at its last receive ({message.receive_count}): {why}"
        return Outcome(message, envelope, OutcomeKind.DEAD, error=error, error_class="Released")

    def _finished_already(
        self, messages: Sequence[Message], parsed: Mapping[str, Envelope | None]
    ) -> set[str]:
        """Ids of the messages, redelivered or replayed, whose entity the ledger holds as
        done or gone.

        Economical (DynamoDB), only those are looked up (one read per batch that has any;
        see `_again`): a first delivery of a message without attributes is new work, but
        for SQS's rare duplicate, or the first copy of a child its parent sent again after
        a crash, which cost one repeated, idempotent harvest. Else every message is.
        """
        by_run: dict[str, dict[str, str]] = {}
        for m in messages:
            e = parsed[m.id]
            # Unparsable or another stage's: dead-lettered by process().
            if e is not None and e.stage == self.stage.name and (_again(m) or not self.economical):
                by_run.setdefault(e.run_id, {})[e.key] = m.id
        return {
            keys[k]
            for run_id, keys in by_run.items()
            for k in self._finished(run_id, self.stage.name, list(keys))
        }

    def _finished(self, run_id: str, stage: str, keys: Sequence[str]) -> set[str]:
        """`ledger.finished`, or nothing where the ledger cannot say (only an optimisation:
        the work is done again, idempotently)."""
        try:
            return self.ledger.finished(run_id, stage, keys)
        except Exception:
            logger.warning("could not read which entities are done already", exc_info=True)
            return set()

    def _unfinished(self, children: Sequence[Envelope]) -> list[Envelope]:
        """The children the ledger does not hold as done or gone."""
        done: set[tuple[str, str]] = set()
        for (run_id, stage), group in _group(children, lambda c: (c.run_id, c.stage)).items():
            done.update((run_id, k) for k in self._finished(run_id, stage, [c.key for c in group]))
        return [c for c in children if (c.run_id, c.key) not in done]

    def _fan_out(self, message: Message, envelope: Envelope) -> Outcome:
        child_stage = self.stage.child
        assert child_stage is not None
        found = listed(
            self.client.items(self.stage.listing, self.stage.ids(envelope.path)),
            lambda child_id: envelope.child(child_stage, child_id),
            self.stage.name,
            self.stage.child_level,
        )
        vanished: list[str] = []
        if _again(message):
            # An earlier attempt may have recorded children this listing no longer names.
            earlier = self._store(
                self.ledger.children, envelope.run_id, self.stage.name, envelope.key
            )
            named = {c.key for c in found.children} | {k for k, _, _ in found.rejected}
            vanished = sorted(earlier - named)
        return Outcome(
            message,
            envelope,
            OutcomeKind.DONE,
            found.children,
            rejected=found.rejected,
            vanished=vanished,
        )

    def _harvest(self, envelope: Envelope) -> None:
        data = self.stage.data
        assert data is not None  # the last stage's
        window = envelope.window
        points: list[dict[str, Any]] = []
        append = points.append
        params = {
            data.from_param: _time_param(window.start, window.from_text, data.window_format),
            data.to_param: _time_param(window.end, window.to_text, data.window_format),
        }
        start, end = window.start, window.end
        ts_field, value_field, ts_format = data.ts_field, data.value_field, data.ts_format
        # The client hands over pages whose items are all JSON objects.
        for items in self.client.pages(self.stage.listing, self.stage.ids(envelope.path), params):
            for item in items:
                ts, value = _field(item, ts_field), _field(item, value_field)
                append(
                    {
                        "ts": _checked_ts(ts, item, start, end, ts_format),
                        "value": _checked_value(value),
                    }
                )
        record: dict[str, Any] = {"run_id": envelope.run_id}
        record.update(zip(self.stage.keys, envelope.path, strict=True))
        record.update({"from": window.from_text, "to": window.to_text, "points": points})
        self._store(write_records, self.sink, envelope.run_id, envelope.key, [record])

    # -- one batch ------------------------------------------------------------------------

    def finish(self, outcomes: Sequence[Outcome], report: DrainReport) -> None:
        """Record, fan out, dead-letter, delete: in the order that never loses a message.

        Each step is retried in place (`_store`); every step is idempotent, so a retry
        after a half-done call repeats nothing harmful.
        """
        store = self._store
        by_kind = _group(outcomes, lambda o: o.kind)
        done, gone, dead = (
            by_kind.get(OutcomeKind.DONE, []),
            by_kind.get(OutcomeKind.GONE, []),
            by_kind.get(OutcomeKind.DEAD, []),
        )
        skipped = by_kind.get(OutcomeKind.SKIP, [])
        child_stage = self.stage.child

        children = [c for o in done for c in o.children]
        if child_stage is not None and self.child_queue is not None:
            listing = [o for o in done if o.envelope is not None and (o.children or o.rejected)]
            for run_id, parents in _group(listing, _run_of).items():
                store(
                    self.ledger.enqueued_many,
                    run_id,
                    child_stage,
                    [
                        (
                            (self.stage.name, _key_of(o)),
                            [(c.key, c.path) for c in o.children]
                            + [(key, path) for key, path, _ in o.rejected],
                        )
                        for o in parents
                    ],
                )
            # A parent listed again (redelivered, replayed, or itself sent again) sends only
            # the children not finished yet, marked so that theirs are checked in turn.
            fresh = [c for o in done if not _again(o.message) for c in o.children]
            again = [c for o in done if _again(o.message) for c in o.children]
            outgoing = [Outgoing(c.to_json()) for c in fresh]
            outgoing += [Outgoing(c.to_json(), RELISTED) for c in self._unfinished(again)]
            if outgoing:
                store(self.child_queue.send, outgoing)
            for o in done:
                if o.envelope is not None and o.rejected:
                    entries = [(key, State.DEAD, why) for key, _, why in o.rejected]
                    store(self.ledger.finish_many, o.envelope.run_id, child_stage, entries)
                    for _, path, why in o.rejected:
                        logger.warning(
                            "listed entity rejected", extra={"path": ascii(path), "reason": why}
                        )
                if o.envelope is not None and o.vanished:
                    entries = [(key, State.GONE, VANISHED) for key in o.vanished]
                    store(self.ledger.finish_pending, o.envelope.run_id, child_stage, entries)
        if dead:
            store(self.dlq.send, [self._dead_letter(o) for o in dead])
        # Recorded and deleted with other batches' (`_flush`): one ledger write for 25.
        self._settle(
            [
                (
                    (_run_of(o), (_key_of(o), State(o.kind), o.error))
                    if o.envelope is not None and o.kind != OutcomeKind.SKIP
                    else None,
                    o.message.receipt,
                )
                for o in (*done, *gone, *dead, *skipped)
            ]
        )

        retry = by_kind.get(OutcomeKind.RETRY, [])
        for o in retry:
            if o.envelope is not None:
                store(
                    self.ledger.record_error,
                    o.envelope.run_id,
                    self.stage.name,
                    o.envelope.key,
                    f"{o.error_class}: {o.error}",
                )
        for delay, delayed in _group(retry, self._retry_delay).items():
            store(self.queue.change_visibility, [o.message.receipt for o in delayed], delay)
        # Messages not processed (401 or the deadline) become visible again at once; their
        # receive count grows by one, which is why the drain stops at the first 401 (and
        # dead-letters one at its last receive rather than let SQS move it unrecorded).
        released = [
            o.message.receipt
            for o in (*by_kind.get(OutcomeKind.STOP, []), *by_kind.get(OutcomeKind.RELEASE, []))
        ]
        if released:
            store(self.queue.change_visibility, released, 0)

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
            skipped=len(skipped),
            children=len(children),
        )
        self.stats.add(
            messages_done=len(done),
            messages_gone=len(gone),
            messages_dead=len(dead),
            messages_failed=len(retry),
            messages_skipped=len(skipped),
        )

    def _settle(self, items: Sequence[tuple[tuple[str, Finished] | None, str]]) -> None:
        """Queue finished messages (their ledger state, if any, and receipt); record and
        delete them once `flush_entries` states wait (`_flush`)."""
        with self._settling_lock:
            if not self._settling.items:
                self._settling.since = time.monotonic()
            self._settling.items.extend(items)
            self._settling.states += sum(entry is not None for entry, _ in items)
            full = len(self._settling.items) >= MAX_SETTLING
            due = self._settling.states >= self.flush_entries
        if full:
            self._flush()
        elif due:
            self._flush(whole=False)

    def _flush(self, older_than: float = 0.0, *, whole: bool = True) -> None:
        """Record the waiting states (per run, batched by the ledger), then delete their
        messages: a message is never deleted before its outcome is recorded. If the store
        stays down, the messages come back and are done again, idempotently.

        `whole=False`: only as many states as fill the ledger's batches (`flush_entries`
        each); the rest wait for more.
        """
        with self._settling_lock:
            waiting = self._settling
            if not waiting.items or time.monotonic() - waiting.since < older_than:
                return
            take = waiting.items
            if not whole:
                room, cut = waiting.states - waiting.states % self.flush_entries, 0
                for entry, _ in waiting.items:
                    if entry is not None:
                        if room == 0:
                            break
                        room -= 1
                    cut += 1
                take = waiting.items[:cut]
                if not take:
                    return
            rest = waiting.items[len(take) :]
            # What is left keeps its age (at most that of the first taken).
            self._settling = _Settling(rest, sum(e is not None for e, _ in rest), waiting.since)
        entries = [entry for entry, _ in take if entry is not None]
        try:
            for run_id, group in _group(entries, lambda e: e[0]).items():
                self._store(self.ledger.finish_many, run_id, self.stage.name, [e for _, e in group])
            self._store(self.queue.delete, [receipt for _, receipt in take])
        except Exception:
            logger.exception("recording finished messages failed; they will be redelivered")

    def _retry_delay(self, o: Outcome) -> float:
        """Exponential backoff by receive count: base, 2 × base, 4 × base, … at most 15 min;
        or the vendor's longer Retry-After, up to the 12 hours SQS allows."""
        backoff = min(self.retry_delay * 2.0 ** max(0, o.message.receive_count - 1), 900.0)
        return min(max(backoff, o.retry_after or 0.0), MAX_VISIBILITY_SECONDS)

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


def _flow_limits(target: int) -> tuple[int, int]:
    """(most messages in process, most open batches) for `target` calls in flight."""
    return (
        # Keep every thread busy with one more batch waiting, and no more: the rest stay
        # visible to other invocations.
        target + BATCH,
        # Batches whose last message is slow (a stall) hold their finished messages until
        # it ends; allow enough of them that the threads keep working meanwhile.
        2 * math.ceil(target / BATCH) + 2,
    )


class _Flow:
    """How much a drain has received and not finished: messages in process, open batches."""

    def __init__(self, max_processing: int, max_open_batches: int) -> None:
        self._cond = threading.Condition()
        self._processing = 0
        self._open = 0
        self._max_processing = max_processing
        self._max_open = max_open_batches

    def resize(self, max_processing: int, max_open_batches: int) -> None:
        with self._cond:
            self._max_processing, self._max_open = max_processing, max_open_batches
            if self._has_room():
                self._cond.notify()

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
            if self._open == 0 or self._has_room():
                self._cond.notify()

    def idle(self) -> bool:
        with self._cond:
            return self._open == 0

    def processing(self) -> int:
        with self._cond:
            return self._processing

    def wait_until_idle(self, timeout: float) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self._open == 0, timeout)


def _log_store_retry(state: Any) -> None:
    outcome = state.outcome
    logger.warning(
        "state store call failed, retrying",
        extra={
            "attempt": state.attempt_number,
            "error": repr(outcome.exception()) if outcome is not None else "",
        },
    )


EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# RFC 3339 with a UTC offset or Z (vendor-api.md: ts is RFC 3339, UTC).
_TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,9})?(?:Z|[+-]\d\d:\d\d)")


def _field(item: Mapping[str, Any], dotted: str) -> Any:
    """A point's field (a dotted path), None if it has none (then rejected as not a number
    or not a time)."""
    if "." not in dotted:
        return item.get(dotted)
    try:
        return select(item, dotted)
    except Missing:
        return None


def _time_param(value: datetime, text: str, form: TimeFormat) -> str:
    """A window bound as the data call's query takes it."""
    if form == TimeFormat.RFC3339:
        return text
    seconds = int(value.timestamp())
    return str(seconds if form == TimeFormat.UNIX else seconds * 1000)


def _checked_ts(
    ts: object,
    item: Mapping[str, Any],
    start: datetime,
    end: datetime,
    form: TimeFormat = TimeFormat.RFC3339,
) -> str:
    """`ts` if it is an instant in [start, end) (RFC 3339 kept as sent; a Unix number
    written as RFC 3339, `point_text`); PoisonError naming the point if not."""
    if form != TimeFormat.RFC3339:
        return _checked_epoch(ts, item, start, end, form)
    if type(ts) is not str or _TS.fullmatch(ts) is None:
        raise PoisonError(f"data point whose ts is not an RFC 3339 instant: {quoted(item, 300)}")
    try:
        at = datetime.fromisoformat(ts)
    except ValueError:
        raise PoisonError(
            f"data point whose ts is not a real instant: {quoted(item, 300)}"
        ) from None
    if not start <= at < end:
        raise PoisonError(f"data point outside the window: {quoted(item, 300)}")
    return ts


def _checked_epoch(
    ts: object, item: Mapping[str, Any], start: datetime, end: datetime, form: TimeFormat
) -> str:
    """A Unix time (seconds or milliseconds) in [start, end), written as RFC 3339. Cut to
    the microsecond downwards, in decimal (a float's shortest form): a point just before
    the window's end stays before it."""
    if type(ts) not in (int, float) or (type(ts) is float and not math.isfinite(ts)):
        raise PoisonError(f"data point whose ts is not a Unix time ({form}): {quoted(item, 300)}")
    scale = 1_000_000 if form == TimeFormat.UNIX else 1_000
    micros = int((Decimal(repr(ts)) * scale).to_integral_value(rounding=ROUND_FLOOR))
    if not _micros(start) <= micros < _micros(end):
        raise PoisonError(f"data point outside the window: {quoted(item, 300)}")
    return point_text(EPOCH + timedelta(microseconds=micros))


def _micros(value: datetime) -> int:
    return (value - EPOCH) // timedelta(microseconds=1)


def _checked_value(value: object) -> int | float:
    """A finite number (not a boolean); PoisonError if not: strict JSON holds no NaN or Infinity."""
    if type(value) is float:
        if math.isfinite(value):
            return value
        raise PoisonError(f"data point whose value is not finite: {value!r}")
    if type(value) is int:
        return value
    raise PoisonError(f"data point whose value is not a number: {quoted(value, 300)}")


def _again(message: Message) -> bool:
    """Whether a message's entity may have been worked on before: it is redelivered, or
    replayed from a DLQ (it carries the dead-letter attributes), or sent by a relisting
    (RELISTED). Only then does the drain read the ledger to skip what is finished."""
    return message.receive_count > 1 or bool(message.attributes)


def _parsed(message: Message, profile: Profile) -> Envelope | None:
    """The message's envelope, or None if it has none (process() says why)."""
    try:
        return Envelope.from_json(message.body, profile)
    except MessageError:
        return None


def _failed(
    message: Message, envelope: Envelope | None, kind: OutcomeKind, exc: BaseException
) -> Outcome:
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
