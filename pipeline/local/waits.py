"""What a harvest waits for when nothing moves, named for people.

A wait is found in the queues (messages hidden until a time, and why), in the rate budget
(a pause the vendor asked for), among the vendor calls in flight (one out for longer than
STALL_SECONDS), in the dead-letter queues (dead letters and nothing else queued), or in the
local scheduler (messages visible, no drain running until the next tick). The live view of
`harvest local` and `harvest status` show the same `Wait`s.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum

from pipeline.envelope import Envelope
from pipeline.errors import MessageError
from pipeline.ledger import Ledger
from pipeline.local.queues import Hidden, LocalQueueStore
from pipeline.local.samples import LIVE_SECONDS, Sample
from pipeline.profile import Profile
from pipeline.queues import Depth, Queue
from pipeline.vendor_api.inflight import STALL_SECONDS

# Untrusted text (a recorded error, a vendor path) is cut to this long on a status line.
SHOWN_CHARS = 160


class WaitKind(StrEnum):
    IN_FLIGHT = "in flight"  # held by a drain, or by a run that is no longer running
    RETRY_DELAY = "retry delay"  # given back after an error, with a backoff
    RETRY_AFTER = "retry-after"  # given back for as long as the vendor asked
    NOT_VISIBLE = "not visible"  # SQS: one of the three above, and it does not say which
    PAUSED = "paused"  # the rate budget holds every vendor call back
    STALLED = "stalled"  # a vendor call out for longer than STALL_SECONDS
    DLQ = "dlq"  # dead letters, and nothing else queued
    NEXT_TICK = "next tick"  # messages visible, no drain running until the next tick


@dataclass(frozen=True)
class Wait:
    kind: WaitKind
    text: str  # one line for people
    stage: str = ""
    count: int = 0
    until: float | None = None  # epoch seconds, where known


def _shown(text: str) -> str:
    """Untrusted text made safe for one terminal line."""
    clean = "".join(c if c.isprintable() else "?" for c in text)
    return clean if len(clean) <= SHOWN_CHARS else clean[:SHOWN_CHARS] + "..."


def _at(until: float, now: float) -> str:
    return f"{time.strftime('%H:%M:%S', time.localtime(until))} (in {max(0.0, until - now):.0f} s)"


def hidden_waits(
    stage: str,
    hidden: Hidden,
    *,
    now: float,
    running: bool,
    last_error: Callable[[str], str],
) -> list[Wait]:
    """Why a local stage's hidden messages are hidden, and until when.

    `running`: a live process holds the state directory (its drains hold what is held);
    `last_error(body)`: the error the ledger recorded for the message with that body.
    """
    waits = []
    if hidden.held and hidden.held_until is not None:
        if running:
            text = (
                f"{stage}: {hidden.held} messages in flight, held by the drains; visible"
                f" again at {_at(hidden.held_until, now)} if not finished by then"
            )
        else:
            text = (
                f"{stage}: {hidden.held} messages in flight until {_at(hidden.held_until, now)},"
                " held by a run that is no longer running: the next `harvest local` on this"
                " directory releases them at once"
            )
        waits.append(Wait(WaitKind.IN_FLIGHT, text, stage, hidden.held, hidden.held_until))
    if hidden.delayed and hidden.delayed_until is not None:
        error = last_error(hidden.first_delayed) if hidden.first_delayed else ""
        when = _at(hidden.delayed_until, now)
        if "Retry-After" in error:
            kind = WaitKind.RETRY_AFTER
            text = (
                f"{stage}: {hidden.delayed} messages given back for as long as the vendor asked"
                f" (Retry-After), the first visible again at {when}: {_shown(error)}"
            )
        else:
            kind = WaitKind.RETRY_DELAY
            after = f" after {_shown(error)}" if error else ""
            text = (
                f"{stage}: {hidden.delayed} messages waiting out a retry delay, the first"
                f" visible again at {when}{after}"
            )
        waits.append(Wait(kind, text, stage, hidden.delayed, hidden.delayed_until))
    return waits


def not_visible_waits(depths: Mapping[str, Depth]) -> list[Wait]:
    """What SQS's ApproximateNumberOfMessagesNotVisible can say: how many, not why or until."""
    return [
        Wait(
            WaitKind.NOT_VISIBLE,
            f"{stage}: about {d.in_flight} messages not visible: held by a drain, or given back"
            " with a retry delay or for the vendor's Retry-After (SQS says neither which nor"
            " until when)",
            stage,
            d.in_flight,
        )
        for stage, d in depths.items()
        if d.in_flight
    ]


def dlq_waits(queued: Mapping[str, int], dead: Mapping[str, int], where: str) -> list[Wait]:
    """Dead letters, when no stage queue holds anything else: the run waits on a person."""
    if any(queued.values()):
        return []
    return [
        Wait(
            WaitKind.DLQ,
            f"{n} messages in the {stage} DLQ and nothing else queued: run"
            f" `harvest replay {stage} {where}` once the cause is fixed"
            f" (`harvest dlq {stage} {where}` says what failed)",
            stage,
            n,
        )
        for stage, n in dead.items()
        if n
    ]


def pause_wait(paused_for: float, why: str, now: float) -> Wait | None:
    """The rate budget's pause (epoch `now`), if any."""
    if paused_for <= 0:
        return None
    until = now + paused_for
    return Wait(
        WaitKind.PAUSED,
        f"every vendor call held back {paused_for:.1f} s more, until {_at(until, now)}: {why}",
        until=until,
    )


def stalled_wait(stalled: Sequence[tuple[str, float]]) -> Wait | None:
    """Vendor calls out for longer than STALL_SECONDS, the oldest first."""
    if not stalled:
        return None
    call, seconds = stalled[0]
    if len(stalled) == 1:
        text = f"a vendor call in flight for {seconds:.0f} s: GET {_shown(call)}"
    else:
        text = (
            f"{len(stalled)} vendor calls in flight for over {STALL_SECONDS:g} s, the oldest"
            f" {seconds:.0f} s: GET {_shown(call)}"
        )
    return Wait(WaitKind.STALLED, text, count=len(stalled))


def tick_wait(visible: int, drains_running: int, next_tick_in: float) -> Wait | None:
    """Messages ready, and no drain to take them until the scheduler's next tick."""
    if not visible or drains_running:
        return None
    return Wait(
        WaitKind.NEXT_TICK,
        f"{visible} messages ready; the next drain invocations start in"
        f" {max(0.0, next_tick_in):.0f} s",
        count=visible,
    )


def local_waits(
    store: LocalQueueStore,
    ledger: Ledger,
    queued: Mapping[str, int],
    dead: Mapping[str, int],
    *,
    now: float,
    running: bool,
    where: str,
    profile: Profile | None = None,
) -> list[Wait]:
    """What a local state directory shows: hidden messages, and dead letters nothing else
    is queued beside (`queued` and `dead`: messages per stage queue and per DLQ; message
    bodies read against `profile`, the default if None)."""

    def last_error(body: str) -> str:
        try:
            e = Envelope.from_json(body, profile)
        except MessageError:
            return ""
        return ledger.last_error(e.run_id, e.stage, e.key)

    waits = []
    for stage in queued:
        hidden = store.hidden(stage)
        waits += hidden_waits(stage, hidden, now=now, running=running, last_error=last_error)
    return waits + dlq_waits(queued, dead, where)


@dataclass(frozen=True)
class LiveRun:
    """What a state directory's samples say of the `harvest local` running on it."""

    running: bool = False
    calls_per_second: float = 0.0  # between its last two samples
    waits: tuple[Wait, ...] = ()  # what only it knows: its pause, its stalled calls

    @property
    def moving(self) -> bool:
        return self.running and self.calls_per_second > 0


def live_run(recent: Sequence[Sample], now: float, owner_alive: bool) -> LiveRun:
    """The running process as of its last samples (`recent`, oldest first), if the
    directory's owner is alive and sampled itself within LIVE_SECONDS of `now`."""
    if not owner_alive or not recent or now - recent[-1].at > LIVE_SECONDS:
        return LiveRun()
    last = recent[-1]
    rate = 0.0
    if len(recent) > 1:
        before = recent[-2]
        if before.started == last.started and last.at > before.at:
            rate = (last.calls - before.calls) / (last.at - before.at)
    age = max(0.0, now - last.at)
    found = [
        pause_wait(last.paused_for - age, last.pause_why, now),
        stalled_wait([(call, seconds + age) for call, seconds in last.stalled]),
    ]
    return LiveRun(True, rate, tuple(w for w in found if w is not None))


def sqs_waits(queues: Mapping[str, Queue], dlqs: Mapping[str, Queue], where: str) -> list[Wait]:
    """What the deployed queues' attributes say: messages not visible, and dead letters."""
    depths = {stage: q.depth() for stage, q in queues.items()}
    dead = {stage: q.depth().total for stage, q in dlqs.items()}
    return not_visible_waits(depths) + dlq_waits(
        {stage: d.total for stage, d in depths.items()}, dead, where
    )
