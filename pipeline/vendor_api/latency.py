"""The vendor's recent latency: the read timeout it has earned, the calls in flight it needs.

Two things follow from how fast the vendor answers, and both were fixed numbers before:

- **The read timeout.** A stall held its message for the whole configured read timeout
  (10 s) even when the vendor answers in 30 ms; at a run's tail nothing else is left to do,
  so each stall cost the run its length. The timeout is now `TAIL_FACTOR` × the recent
  95th percentile, at least `TAIL_FLOOR` seconds and at most the configured timeout. A
  call that times out is recorded as twice the timeout it had: if the vendor really has
  slowed, the percentile climbs and the timeout follows within `RECOMPUTE_EVERY` calls
  instead of failing every call.
- **Calls in flight (Little's law).** To start R calls per second when each takes T
  seconds, R × T calls must be in flight. A drain sizes its in-flight messages from the
  budget's rate and the recent mean latency (`Drain`), bounded by a configured ceiling,
  so a slow vendor is not capped by a thread count chosen for a fast one.
"""

from __future__ import annotations

import math
import threading
from collections import deque

# read timeout = clamp(TAIL_FLOOR, TAIL_FACTOR × p95, configured read timeout)
TAIL_FACTOR = 10.0
TAIL_FLOOR = 1.0
# Recent calls the percentile and mean are taken over, and how often they are recomputed
# (sorting a few hundred floats every 64 calls costs well under a microsecond per call);
# until that many calls have been seen, after every call: a run's first calls (the
# upstream listings) set the timeout that its first data calls get.
WINDOW = 512
RECOMPUTE_EVERY = 64
# Below this many samples the configured timeout holds: too little is known. A timeout
# learned too short corrects itself: a timed-out call counts as twice its timeout.
MIN_SAMPLES = 16


class Latency:
    """Recent vendor round trips; thread-safe. Reads are lock-free (a float each)."""

    def __init__(self, read_timeout: float) -> None:
        self.ceiling = read_timeout
        self._samples: deque[float] = deque(maxlen=WINDOW)
        self._lock = threading.Lock()
        self._since = 0
        self._timeout = read_timeout
        self._mean: float | None = None

    def observe(self, seconds: float) -> None:
        """One call's round trip (a response of any status)."""
        with self._lock:
            self._samples.append(seconds)
            self._since += 1
            if self._since >= RECOMPUTE_EVERY or len(self._samples) <= RECOMPUTE_EVERY:
                self._recompute()

    def timed_out(self) -> None:
        """A call hit the read timeout: count it as twice that long."""
        self.observe(2 * self._timeout)

    def _recompute(self) -> None:
        self._since = 0
        ordered = sorted(self._samples)
        self._mean = sum(ordered) / len(ordered)
        if len(ordered) >= MIN_SAMPLES:
            p95 = ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]
            self._timeout = min(self.ceiling, max(TAIL_FLOOR, TAIL_FACTOR * p95))

    @property
    def read_timeout(self) -> float:
        """The read timeout for the next call."""
        return self._timeout

    @property
    def mean(self) -> float | None:
        """Mean round trip of the recent calls; None before the first."""
        return self._mean
