"""The rate budget: at most L vendor calls in any rolling W seconds, shared by every drain.

The algorithm is virtual scheduling (GCRA): call slots are handed out strictly in order,
one every `period / calls` seconds plus a small margin, so no rolling window of W seconds
can hold more than L call starts, however many threads or invocations draw from it. A
429 pauses the whole budget for its Retry-After; the vendor's X-RateLimit headers lower
the pace when its real limit is below the configured one.

`PacedBudget` keeps the schedule in process (local runs, one Lambda invocation's
threads); `DynamoBudget` keeps it in one DynamoDB item so concurrent invocations of all
stages share it, reserving several slots per conditional write to keep its cost low.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any, Protocol

Clock = Callable[[], float]
Sleep = Callable[[float], None]

# Slack added to every rolling window so that jitter between our send time and the
# vendor's arrival time cannot squeeze L + 1 calls into its window.
MARGIN_FRACTION = 0.01
MARGIN_MIN_SECONDS = 0.02
# How long a vendor limit learned from X-RateLimit-Limit overrides the configured one.
LEARNED_LIMIT_SECONDS = 3600.0


class Budget(Protocol):
    """What a vendor client asks of a rate budget."""

    def acquire(self) -> None:
        """Block until one vendor call may start now."""

    def pause(self, seconds: float) -> None:
        """Start no call for `seconds` from now (a 429's Retry-After)."""

    def observe(self, limit: int | None, remaining: int | None, reset: float | None) -> None:
        """Adapt to the vendor's X-RateLimit-Limit / -Remaining / -Reset headers."""


def interval_for(calls: int, period: float) -> float:
    """Seconds between call slots so that `calls` fit in any rolling `period`, with margin."""
    margin = max(period * MARGIN_FRACTION, MARGIN_MIN_SECONDS)
    return (period + margin) / calls


class PacedBudget:
    """In-process GCRA schedule; thread-safe."""

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
        self.interval = interval_for(calls, period)
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        self._next_slot = clock()
        self._paused_until = 0.0

    def acquire(self) -> None:
        while True:
            with self._lock:
                now = self._clock()
                slot = max(self._next_slot, now, self._paused_until)
                self._next_slot = slot + self.interval
            if slot > now:
                self._sleep(slot - now)
            with self._lock:
                # A pause that arrived while we slept voids this slot: take a new one.
                if slot >= self._paused_until:
                    return

    def pause(self, seconds: float) -> None:
        with self._lock:
            until = self._clock() + max(0.0, seconds)
            self._paused_until = max(self._paused_until, until)
            self._next_slot = max(self._next_slot, self._paused_until)

    def observe(self, limit: int | None, remaining: int | None, reset: float | None) -> None:
        if limit is not None and 0 < limit < self.calls:
            with self._lock:
                self.calls = limit
                self.interval = interval_for(limit, self.period)
        if remaining == 0 and reset is not None and reset > 0:
            self.pause(reset)

    @property
    def rate(self) -> float:
        """Calls per second this budget currently allows."""
        return 1.0 / self.interval


def slots_per_reservation(calls: int, period: float, horizon: float = 0.25) -> int:
    """How many slots one shared-state write reserves: about `horizon` seconds of calls."""
    return max(1, math.ceil(calls / period * horizon))


class DynamoBudget:
    """The GCRA schedule in one item of the state table, shared by every invocation.

    Each conditional write reserves `slots_per_reservation` consecutive slots (about a
    quarter second of calls), so the table sees a few writes per second at any rate. A
    slot that its holder does not use is lost, never reused: the vendor can see fewer
    calls than the budget allows, never more.
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
        self.writes = 0  # conditional writes made, for the cost model

    def acquire(self) -> None:
        while True:
            with self._lock:
                if not self._slots:
                    self._reserve()
                slot = self._slots.popleft()
            delay = slot - self._clock()
            if delay > 0:
                self._sleep(delay)
            with self._lock:
                if slot >= self._paused_until:
                    return

    def _reserve(self) -> None:
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
            paused_until = float(item.get("paused_until", {}).get("N", "0"))
            start = max(float(old or 0), now, paused_until, self._paused_until)
            new = start + count * interval
            condition = "tat = :old" if old is not None else "attribute_not_exists(tat)"
            values: dict[str, Any] = {":new": {"N": repr(new)}}
            if old is not None:
                values[":old"] = {"N": old}
            try:
                self.writes += 1
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
            self.writes += 1
            self._ddb.update_item(
                TableName=self.table,
                Key=self._key,
                UpdateExpression="SET paused_until = :p",
                ConditionExpression="attribute_not_exists(paused_until) OR paused_until < :p",
                ExpressionAttributeValues={":p": {"N": repr(until)}},
            )
        except self._ddb.exceptions.ConditionalCheckFailedException:
            pass  # someone paused longer already

    def observe(self, limit: int | None, remaining: int | None, reset: float | None) -> None:
        if limit is not None and 0 < limit < self.calls:
            with self._lock:
                self.calls = limit
                self.interval = interval_for(limit, self.period)
                self._slots.clear()
            try:
                self.writes += 1
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
