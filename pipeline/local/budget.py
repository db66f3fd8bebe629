"""The rate budget in process: a sliding log of call starts (local runs: every stage's drains
share one)."""

from __future__ import annotations

import bisect
import math
import threading
import time
from collections import deque

from pipeline.budget import Clock, Margin, Sleep, paused_error

# A PacedBudget recomputes a widened window at most this often.
NARROW_EVERY = 1.0
# Smallest gap between two starts of a PacedBudget, as a share of the even spacing W/L.
SPACING = 0.5


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
        self._margin = Margin(period)
        self.window = period + self._margin.base
        self._narrow_at = math.inf  # when to recompute a widened window
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        # Start times handed out, oldest first, back to one window ago.
        self._starts: deque[float] = deque()
        self._paused_until = 0.0

    def acquire(self, max_pause: float = math.inf) -> float:
        while True:
            with self._lock:
                now = self._clock()
                if now >= self._narrow_at:
                    self._narrow(now)
                if self._paused_until - now > max_pause:
                    raise paused_error(self._paused_until - now, max_pause)
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

    def _narrow(self, now: float) -> None:
        margin = self._margin.at(now)
        self.window = self.period + margin
        # A wider window than the margin asks for is only safer: look again in a while, and
        # not at all once the widening has all but gone.
        widened = margin - self._margin.base > 1e-6
        self._narrow_at = now + NARROW_EVERY if widened else math.inf

    def arrived(self, stamp: float, at: float, sent_after: float | None = None) -> None:
        # `at` is at or after the send, so restamping there covers `sent_after` too.
        if at > stamp:
            with self._lock:
                self._restamp(stamp, at)

    def send_by(self) -> float | None:
        return None  # a late call is restamped where it arrived (`arrived`)

    def missed(self, stamp: float) -> None:
        with self._lock:
            try:
                self._starts.remove(stamp)
            except ValueError:
                pass

    def _restamp(self, slot: float, actual: float) -> None:
        try:
            self._starts.remove(slot)
        except ValueError:
            return
        bisect.insort(self._starts, actual)

    def pause(self, seconds: float) -> None:
        """A 429: pause, and widen the margin (once per pause) since the window overflowed."""
        with self._lock:
            now = self._clock()
            self._paused_until = max(self._paused_until, now + max(0.0, seconds))
            if self._margin.widen(now, seconds):
                self._narrow(now)

    def hold(self, seconds: float) -> None:
        with self._lock:
            self._paused_until = max(self._paused_until, self._clock() + max(0.0, seconds))

    def winding_down(self, yes: bool) -> None:
        """Nothing to do: slots are taken one at a time, none claimed ahead."""

    def held(self) -> int:
        return 0

    def give_back(self, keep: int) -> int:
        return 0

    def paused_for(self) -> float:
        # One float read and a clock: no lock needed, and this is asked once per receive.
        return max(0.0, self._paused_until - self._clock())

    def observe(self, limit: int | None, remaining: int | None, reset: float | None) -> None:
        if limit is not None and 0 < limit < self.calls:
            with self._lock:
                self.calls = limit
        if remaining == 0 and reset is not None and reset > 0:
            # Not a 429: the window is full, as it is at the limit; the margin stays.
            with self._lock:
                self._paused_until = max(self._paused_until, self._clock() + reset)
