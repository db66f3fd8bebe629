"""The rate budget: at most L vendor calls in any rolling W seconds, shared by every drain.

Call start times are handed out so that no rolling window of W seconds plus a margin holds
more than L call starts, however many threads or invocations draw from the budget. A 429
pauses the whole budget for its Retry-After; the vendor's X-RateLimit headers lower the limit
when its real one is below the configured one. A caller that must not wait long (a queue
message has a visibility timeout) passes `max_pause` to `acquire`: a pause longer than that,
found on entry or arriving while it waits for its slot, raises RateLimitedError carrying the
rest of the pause instead.

The margin covers the jitter between our send time and the vendor's arrival stamp: at least
10 ms (1% of W). Jitter is not known in advance and changes with load, so each 429 (the
vendor's word that its window held L + 1) doubles the margin, at most once per pause and up
to a tenth of W; the widening then halves every ten minutes. A harvest under jitter wider
than the base margin pays about one 429 for it, not one every few seconds.

`pipeline.local.budget.PacedBudget` keeps a sliding log of starts in process (local runs:
every stage's drains share one). `pipeline.aws.budget.DynamoBudget` keeps a virtual schedule
in one item of the state table, so that the concurrent Lambda invocations of all stages
share it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Protocol

from pipeline.errors import RateLimitedError

Clock = Callable[[], float]
Sleep = Callable[[float], None]

# Slack added to every rolling window so that jitter between our send time and the
# vendor's arrival time cannot squeeze L + 1 calls into its window.
MARGIN_FRACTION = 0.01
MARGIN_MIN_SECONDS = 0.01
# After a 429 the margin doubles, up to this share of W (or 4 × the base margin if more)...
MARGIN_WIDEST_FRACTION = 0.1
# ...and then narrows back: the widening halves every this many seconds.
MARGIN_HALF_LIFE = 600.0


class Budget(Protocol):
    """What a vendor client asks of a rate budget."""

    def acquire(self, max_pause: float = math.inf) -> float:
        """Block until one vendor call may start now; return the time it is counted at.

        RateLimitedError (its `retry_after` the rest of the pause), without waiting for it,
        if the budget is paused for more than `max_pause` seconds when called or becomes so
        while the caller waits for its slot.
        """

    def paused_for(self) -> float:
        """Seconds left of the current pause as far as this process knows; 0 if none."""

    def arrived(self, stamp: float, at: float, sent_after: float | None = None) -> None:
        """The call counted at `stamp` reached the vendor by `at` at the latest (the budget's
        clock): count it there, so that jitter before the vendor's clock cannot crowd it.
        `sent_after`, where measured: seconds from the slot's handing out (acquire's return)
        to the request's write, how late the call left on this side."""

    def send_by(self) -> float | None:
        """For the slot this thread was last handed: the latest time (time.perf_counter) its
        request may start being written and still leave in time, or None if any time will
        do (the budget counts a late call where it arrived)."""

    def missed(self, stamp: float) -> None:
        """The call of this thread's slot `stamp` was not sent: it would have left too late
        (`send_by`). The slot is not used again; the thread asks for another."""

    def pause(self, seconds: float) -> None:
        """Start no call for `seconds` from now (a 429's Retry-After), however long that is."""

    def hold(self, seconds: float) -> None:
        """Start no call for `seconds` from now, for a reason of ours (not a 429: the
        margin stays as it is)."""

    def observe(self, limit: int | None, remaining: int | None, reset: float | None) -> None:
        """Adapt to the vendor's X-RateLimit-Limit / -Remaining / -Reset headers."""

    def winding_down(self, yes: bool) -> None:
        """Whether this process has stopped taking new work: from now on claim only for the
        calls waiting, not for callers expected back."""

    def held(self) -> int:
        """Slots this process has claimed ahead and not used yet, still usable: no other
        process can use them, so they are lost unless its own calls take them."""

    def give_back(self, keep: int) -> int:
        """Hand the slots held beyond `keep` back to every process, where that can be done
        (this process's work has run out); how many were."""


def margin_for(period: float) -> float:
    """The margin a budget adds to W for jitter while no 429 has asked for more."""
    return max(period * MARGIN_FRACTION, MARGIN_MIN_SECONDS)


def window_for(period: float) -> float:
    """The rolling window the budget enforces: the vendor's, plus the base margin."""
    return period + margin_for(period)


class Margin:
    """The margin added to W: its base, doubled by a 429, narrowing back slowly."""

    def __init__(self, period: float) -> None:
        self.period = period
        self.base = margin_for(period)
        self.widest = max(period * MARGIN_WIDEST_FRACTION, 4 * self.base)
        self.wide = self.base  # the margin at `since`
        self.since = -math.inf  # when it was last widened
        self._hold_until = -math.inf  # a 429 before then belongs to the widening before

    def at(self, now: float) -> float:
        return self.value(self.wide, self.since, now)

    def value(self, wide: float, since: float, now: float) -> float:
        """A margin widened to `wide` at `since`, as it has narrowed by `now`."""
        excess = wide - self.base
        if excess <= 0:
            return self.base
        return self.base + excess * math.pow(0.5, max(0.0, now - since) / MARGIN_HALF_LIFE)

    def widen(self, now: float, pause: float) -> bool:
        """A 429 at `now` asking for `pause` seconds: double the margin, unless it came before
        the end of the last pause that widened it (calls sent with the old margin); True if
        the margin changed."""
        if now < self._hold_until:
            return False
        self.adopt(min(self.widest, 2 * self.at(now)), now, pause)
        return True

    def adopt(self, wide: float, since: float, pause: float = 0.0) -> None:
        self.wide = max(self.base, wide)
        self.since = since
        self._hold_until = since + max(self.period, pause)


def paused_error(remaining: float, max_pause: float) -> RateLimitedError:
    return RateLimitedError(
        f"the vendor's rate limit pauses every call for {remaining:.0f} s more,"
        f" longer than the {max_pause:g} s a call may wait",
        remaining,
    )
