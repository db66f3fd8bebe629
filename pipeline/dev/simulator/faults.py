"""How the simulated vendor misbehaves and pushes back: injected faults and its rate limit.

Faults are deterministic from the seed and the request (decoded path segments plus query),
so a rerun sees the same faults in the same places. An error-faulty request answers 5xx (one
of the profile's retried codes, no Retry-After) for its first ``max_failures_per_path``
attempts; a stalling or truncating one misbehaves on its first attempt only. Refusals of the
token (401) and of the rate limit (429) are not attempts, so faults heal the same way however
hard the client is throttled. The rate limit is a per-token sliding log.
"""

from __future__ import annotations

import bisect
import math
import random
import threading
import time
from collections import deque

from pipeline.dev.simulator.model import (
    ERROR_NAMES,
    ERROR_STATUSES,
    SimulatorConfig,
    SimulatorStats,
    draw,
)
from pipeline.profile import RateLimitHeaders

__all__ = ["ERROR_NAMES", "ERROR_STATUSES", "Faults", "SlidingLog", "rate_headers"]


class Faults:
    """Which requests fail, stall or come back truncated, and which entities fail for good."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self._attempts: dict[str, int] = {}
        self._attempts_lock = threading.Lock()
        self.failing: frozenset[str] = frozenset()

    def fail_permanently(self, entity_id: str) -> None:
        """From now on every request whose path names this entity answers 503 (or the
        profile's least retried code, if 503 means something else there)."""
        self.failing = self.failing | {entity_id}

    def heal(self) -> None:
        """Lift every fail_permanently fault."""
        self.failing = frozenset()

    def roll(self, key: str) -> tuple[str | None, int]:
        """The fault injected on this request, if any, and which attempt at it this is."""
        config = self.config
        roll = draw(config.seed, "fault", key)
        fault: str | None = None
        for name, rate in (
            ("error", config.error_rate),
            ("stall", config.stall_rate),
            ("truncate", config.truncate_rate),
        ):
            if roll < rate:
                fault = name
                break
            roll -= rate
        if fault is None:
            return None, 0
        with self._attempts_lock:
            attempt = self._attempts.get(key, 0) + 1
            self._attempts[key] = attempt
        return fault, attempt


class SlidingLog:
    """Per-token sliding-log rate limit: at most `calls` accepted requests in any `period`.

    With `jitter`, each request is stamped up to that much later than it is taken, so stamps
    no longer come in order: a request is accepted only if no rolling `period` around its
    stamp would then hold more than `calls` stamps, however the later ones fall.
    """

    def __init__(
        self, calls: int, period: float, stats: SimulatorStats, jitter: float = 0.0, seed: int = 0
    ) -> None:
        self._calls = calls
        self._period = period
        self._stats = stats
        self._jitter = jitter
        self._random = random.Random(seed)
        self._logs: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def configure(self, calls: int, period: float) -> None:
        with self._lock:
            self._calls = calls
            self._period = period

    def _trim(self, log: deque[float], now: float) -> None:
        horizon = now - self._period
        while log and log[0] <= horizon:
            log.popleft()

    def _reset_after(self, log: deque[float], now: float) -> float:
        """Seconds until one more request fits the window."""
        if len(log) < self._calls:
            return 0.0
        return log[len(log) - self._calls] + self._period - now

    def peek(self, token: str) -> tuple[int, int, float]:
        """(limit, remaining, reset) for a token, without taking a slot."""
        with self._lock:
            now = time.monotonic()
            log = self._logs.get(token, deque())
            self._trim(log, now)
            return self._calls, max(0, self._calls - len(log)), self._reset_after(log, now)

    def acquire(self, token: str) -> tuple[bool, int, int, float]:
        """(accepted, limit, remaining, reset); a rejected request leaves no trace in the log."""
        with self._lock:
            now = time.monotonic()
            log = self._logs.setdefault(token, deque())
            self._trim(log, now)
            if self._jitter > 0:
                accepted = self._admit(log, now + self._random.uniform(0.0, self._jitter))
            else:
                accepted = len(log) < self._calls
                if accepted:
                    log.append(now)
                    self._stats.observe_window(len(log))
            if not accepted:
                self._stats.refused(now, list(log))
            remaining = max(0, self._calls - len(log))
            return accepted, self._calls, remaining, self._reset_after(log, now)

    def _admit(self, log: deque[float], stamp: float) -> bool:
        """Log `stamp` unless some rolling window holding it would then hold over `calls`.

        The log is sorted; stamps after `stamp` are at most `jitter` later than now. Windows
        are half-open, (t - period, t], as `_trim` ages them out.
        """
        stamps = list(log)
        at = bisect.bisect_right(stamps, stamp)
        stamps.insert(at, stamp)
        busiest = 0
        for first in range(max(0, at - self._calls), at + 1):
            held = bisect.bisect_left(stamps, stamps[first] + self._period) - first
            busiest = max(busiest, held)
        if busiest > self._calls:
            return False
        log.clear()
        log.extend(stamps)
        self._stats.observe_window(busiest)
        return True


def rate_headers(
    limit: int,
    remaining: int,
    reset: float,
    names: RateLimitHeaders | None = None,
    now: float = 0.0,
) -> tuple[tuple[str, str], ...]:
    """The rate-limit headers under the profile's `names` (Hermes' by default; a name left
    empty is not sent). The reset is decimal seconds until one more request is allowed, or
    with reset_format "epoch" the Unix second it is allowed at, given the wall clock `now`."""
    names = names or _HERMES_HEADERS
    if names.reset_format == "epoch":
        reset_text = str(math.ceil(now + reset) if reset > 0 else math.floor(now))
    else:
        reset_text = "0" if reset <= 0 else f"{max(reset, 0.001):.3f}"
    headers = (
        (names.limit, str(limit)),
        (names.remaining, str(remaining)),
        (names.reset, reset_text),
    )
    return tuple((name, value) for name, value in headers if name)


_HERMES_HEADERS = RateLimitHeaders()
