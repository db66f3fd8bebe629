"""The rate budget: at most L vendor calls in any rolling W seconds, shared by every drain.

Call start times are handed out in order, so no rolling window of W seconds (plus a
small margin for network jitter) holds more than L call starts, however many threads or
invocations draw from the budget. A 429 pauses the whole budget for its Retry-After; the
vendor's X-RateLimit headers lower the limit when its real one is below the configured one.
A caller that must not wait long (a queue message has a visibility timeout) passes
`max_pause` to `acquire`: a pause longer than that, found on entry or arriving while it
waits for its slot, raises RateLimitedError carrying the rest of the pause instead.

`PacedBudget` keeps a sliding log of starts in process (local runs: every stage's drains
share one). `DynamoBudget` keeps a virtual schedule (GCRA: one slot every W/L seconds) in
one DynamoDB item, so concurrent Lambda invocations of all stages share it; each
conditional write reserves a quarter second of slots to keep its cost low.
"""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from typing import Any, Protocol

from pipeline.errors import RateLimitedError

Clock = Callable[[], float]
Sleep = Callable[[float], None]

# Slack added to every rolling window so that jitter between our send time and the
# vendor's arrival time cannot squeeze L + 1 calls into its window.
MARGIN_FRACTION = 0.01
MARGIN_MIN_SECONDS = 0.01
DYNAMO_MARGIN_MIN_SECONDS = 0.025
# Smallest gap between two starts of a PacedBudget, as a share of the even spacing W/L.
SPACING = 0.5
# How long a vendor limit learned from X-RateLimit-Limit overrides the configured one.
LEARNED_LIMIT_SECONDS = 3600.0


class Budget(Protocol):
    """What a vendor client asks of a rate budget."""

    def acquire(self, priority: int = 0, max_pause: float = math.inf) -> float:
        """Block until one vendor call may start now; return the time it is counted at.

        While calls of a higher `priority` wait for the budget, lower ones wait behind them.
        RateLimitedError (its `retry_after` the rest of the pause), without waiting for it,
        if the budget is paused for more than `max_pause` seconds when called or becomes so
        while the caller waits for its slot.
        """

    def paused_for(self) -> float:
        """Seconds left of the current pause as far as this process knows; 0 if none."""

    def arrived(self, stamp: float, at: float) -> None:
        """The call counted at `stamp` reached the vendor by `at` at the latest (the budget's
        clock): count it there, so that jitter before the vendor's clock cannot crowd it."""

    def pause(self, seconds: float) -> None:
        """Start no call for `seconds` from now (a 429's Retry-After), however long that is."""

    def observe(self, limit: int | None, remaining: int | None, reset: float | None) -> None:
        """Adapt to the vendor's X-RateLimit-Limit / -Remaining / -Reset headers."""


def window_for(period: float, minimum: float = MARGIN_MIN_SECONDS) -> float:
    """The rolling window the budget enforces: the vendor's, plus a margin for jitter."""
    return period + max(period * MARGIN_FRACTION, minimum)


def interval_for(calls: int, period: float) -> float:
    """Seconds between DynamoBudget slots so that `calls` fit in any rolling `period`.

    Its margin is wider than PacedBudget's: its slots are not restamped with the time the
    vendor saw them, so a thread that wakes late must still fit.
    """
    return window_for(period, DYNAMO_MARGIN_MIN_SECONDS) / calls


class PacedBudget:
    """In-process sliding log of call starts; thread-safe.

    A call may start once fewer than L calls started in the last W seconds (plus margin):
    the same rule as the vendor's, so after a lull the budget can catch up to a full window
    instead of losing the slots nobody took, which a fixed pace would.
    """

    def __init__(
        self,
        calls: int,
        period: float,
        *,
        clock: Clock = time.monotonic,
        sleep: Sleep = time.sleep,
    ) -> None:
        self.calls = calls
        self.period = period
        self.window = window_for(period)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._turn = threading.Condition(self._lock)
        self._waiting: Counter[int] = Counter()  # calls in acquire, by priority
        # Start times handed out, oldest first, back to one window ago.
        self._starts: deque[float] = deque()
        self._paused_until = 0.0

    def acquire(self, priority: int = 0, max_pause: float = math.inf) -> float:
        with self._turn:
            while any(n for p, n in self._waiting.items() if p > priority):
                self._turn.wait(0.05)
            self._waiting[priority] += 1
        try:
            return self._acquire(max_pause)
        finally:
            with self._turn:
                self._waiting[priority] -= 1
                self._turn.notify_all()

    def _acquire(self, max_pause: float) -> float:
        while True:
            with self._lock:
                now = self._clock()
                if self._paused_until - now > max_pause:
                    raise _paused_error(self._paused_until - now, max_pause)
                slot = max(now, self._paused_until)
                if self._starts:
                    # No bursts: starts at least half the even spacing apart, so a vendor
                    # that counts arrivals a little late never sees a crowd at once.
                    slot = max(slot, self._starts[-1] + SPACING * self.window / self.calls)
                if len(self._starts) >= self.calls:
                    slot = max(slot, self._starts[-self.calls] + self.window)
                self._starts.append(slot)
                # Only starts inside the window matter; keep them all (not just the last L)
                # so that a voided slot given back cannot hide an older one.
                while self._starts[0] <= now - self.window:
                    self._starts.popleft()
            if slot > now:
                self._sleep(slot - now)
            with self._lock:
                if slot >= self._paused_until:
                    # Count the call when it really starts: a thread that woke late (the
                    # GIL, a busy core) must not leave an early time in the log.
                    late = self._clock()
                    if late > slot and late > now:
                        self._restamp(slot, late)
                        return late
                    return slot
                # A pause that arrived while we slept voids this slot: give it back (it was
                # never used, so it must not count against a window) and take a new one (or
                # raise, if the pause is longer than max_pause).
                try:
                    self._starts.remove(slot)
                except ValueError:
                    pass  # already aged out of the log

    def arrived(self, stamp: float, at: float) -> None:
        if at > stamp:
            with self._lock:
                self._restamp(stamp, at)

    def _restamp(self, slot: float, actual: float) -> None:
        try:
            self._starts.remove(slot)
        except ValueError:
            return
        bisect.insort(self._starts, actual)

    def pause(self, seconds: float) -> None:
        with self._lock:
            until = self._clock() + max(0.0, seconds)
            self._paused_until = max(self._paused_until, until)

    def paused_for(self) -> float:
        # One float read and a clock: no lock needed, and this is asked once per receive.
        return max(0.0, self._paused_until - self._clock())

    def observe(self, limit: int | None, remaining: int | None, reset: float | None) -> None:
        if limit is not None and 0 < limit < self.calls:
            with self._lock:
                self.calls = limit
        if remaining == 0 and reset is not None and reset > 0:
            self.pause(reset)


def _paused_error(remaining: float, max_pause: float) -> RateLimitedError:
    return RateLimitedError(
        f"the vendor's rate limit pauses every call for {remaining:.0f} s more,"
        f" longer than the {max_pause:g} s a call may wait",
        remaining,
    )


def slots_per_reservation(calls: int, period: float, horizon: float = 0.25) -> int:
    """How many slots one shared-state write reserves: about `horizon` seconds of calls."""
    return max(1, math.ceil(calls / period * horizon))


class DynamoBudget:
    """The GCRA schedule in one item of the state table, shared by every invocation.

    Each conditional write reserves `slots_per_reservation` consecutive slots (about a
    quarter second of calls), so the table sees a few writes per second at any rate. A
    slot that its holder does not use is lost, never reused: the vendor can see fewer
    calls than the budget allows, never more.

    A pause is shared through the item's `paused_until`. An invocation learns another's
    pause when it next reserves (reading the item it reads anyway): from then on
    `paused_for` reports it and `acquire` raises instead of waiting if it is longer than
    `max_pause`. The slots it reserved before the pause (a quarter second) are still used.
    """

    def __init__(
        self,
        client: Any,
        table: str,
        calls: int,
        period: float,
        *,
        name: str = "vendor",
        clock: Clock = time.time,
        sleep: Sleep = time.sleep,
    ) -> None:
        self._ddb = client
        self.table = table
        self.calls = calls
        self.period = period
        self.interval = interval_for(calls, period)
        self._key = {"pk": {"S": f"budget#{name}"}, "sk": {"S": "schedule"}}
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._slots: deque[float] = deque()
        self._paused_until = 0.0

    def acquire(self, priority: int = 0, max_pause: float = math.inf) -> float:
        # Priority is not shared between invocations: each serves one stage.
        while True:
            with self._lock:
                # A reserved slot whose time has passed is lost: spent late, it would land on
                # top of the slots other invocations reserved after it.
                now = self._clock()
                if self._paused_until - now > max_pause:
                    raise _paused_error(self._paused_until - now, max_pause)
                while self._slots and self._slots[0] < now:
                    self._slots.popleft()
                if not self._slots:
                    self._reserve(max_pause)
                slot = self._slots.popleft()
            delay = slot - self._clock()
            if delay > 0:
                self._sleep(delay)
            if self._clock() - slot > self.interval / 2:
                continue  # woke too late: spent now, it would crowd the next slot
            with self._lock:
                if slot >= self._paused_until:
                    return slot

    def arrived(self, stamp: float, at: float) -> None:
        """Not needed: slots are evenly spaced, never crowded, and the spacing has margin."""

    def _reserve(self, max_pause: float = math.inf) -> None:
        count = slots_per_reservation(self.calls, self.period)
        while True:
            item = self._ddb.get_item(TableName=self.table, Key=self._key, ConsistentRead=True).get(
                "Item", {}
            )
            old = item.get("tat", {}).get("N")
            now = self._clock()
            # A lower vendor limit learned by any invocation holds for an hour.
            shared_interval = float(item.get("interval", {}).get("N", "0"))
            if float(item.get("interval_expires", {}).get("N", "0")) < now:
                shared_interval = 0.0
            interval = max(self.interval, shared_interval)
            # Another invocation's pause (a 429, or the vendor saying none remain) holds here
            # too: learn it, and reserve nothing if the caller will not wait that long.
            shared_pause = float(item.get("paused_until", {}).get("N", "0"))
            self._paused_until = max(self._paused_until, shared_pause)
            if self._paused_until - now > max_pause:
                raise _paused_error(self._paused_until - now, max_pause)
            start = max(float(old or 0), now, self._paused_until)
            new = start + count * interval
            condition = "tat = :old" if old is not None else "attribute_not_exists(tat)"
            values: dict[str, Any] = {":new": {"N": repr(new)}}
            if old is not None:
                values[":old"] = {"N": old}
            try:
                self._ddb.update_item(
                    TableName=self.table,
                    Key=self._key,
                    UpdateExpression="SET tat = :new",
                    ConditionExpression=condition,
                    ExpressionAttributeValues=values,
                )
            except self._ddb.exceptions.ConditionalCheckFailedException:
                continue  # another invocation reserved first: read again
            self._slots.extend(start + i * interval for i in range(count))
            return

    def pause(self, seconds: float) -> None:
        until = self._clock() + max(0.0, seconds)
        with self._lock:
            self._paused_until = max(self._paused_until, until)
            self._slots.clear()
        try:
            self._ddb.update_item(
                TableName=self.table,
                Key=self._key,
                UpdateExpression="SET paused_until = :p",
                ConditionExpression="attribute_not_exists(paused_until) OR paused_until < :p",
                ExpressionAttributeValues={":p": {"N": repr(until)}},
            )
        except self._ddb.exceptions.ConditionalCheckFailedException:
            pass  # someone paused longer already

    def paused_for(self) -> float:
        """This invocation's pauses and the shared ones learned at its last reservation."""
        return max(0.0, self._paused_until - self._clock())

    def observe(self, limit: int | None, remaining: int | None, reset: float | None) -> None:
        if limit is not None and 0 < limit < self.calls:
            with self._lock:
                self.calls = limit
                self.interval = interval_for(limit, self.period)
                self._slots.clear()
            try:
                self._ddb.update_item(
                    TableName=self.table,
                    Key=self._key,
                    UpdateExpression="SET #i = :i, interval_expires = :x",
                    ConditionExpression="attribute_not_exists(#i) OR #i < :i"
                    " OR interval_expires < :now",
                    ExpressionAttributeNames={"#i": "interval"},
                    ExpressionAttributeValues={
                        ":i": {"N": repr(self.interval)},
                        ":x": {"N": repr(self._clock() + LEARNED_LIMIT_SECONDS)},
                        ":now": {"N": repr(self._clock())},
                    },
                )
            except self._ddb.exceptions.ConditionalCheckFailedException:
                pass
        if remaining == 0 and reset is not None and reset > 0:
            self.pause(reset)
