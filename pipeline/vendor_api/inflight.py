"""Vendor calls in flight and when each started, so that a stalled one can be named."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

# A call this long in flight is "stalled" in the live view and `harvest status`.
STALL_SECONDS = 5.0


class CallsInFlight:
    """Start time and URL of the vendor call each thread has in flight; thread-safe.

    One entry per thread (a thread makes one call at a time), so the hot path is a dict
    store and a pop under a lock that is never held for longer than that.
    """

    def __init__(self, prefix: str = "", clock: Callable[[], float] = time.monotonic) -> None:
        self._prefix = prefix  # cut from the URLs shown: the vendor's base URL
        self._clock = clock
        self._calls: dict[int, tuple[float, str]] = {}
        self._lock = threading.Lock()

    def start(self, url: str) -> None:
        """The calling thread sends a request to `url` now."""
        started = self._clock()
        with self._lock:
            self._calls[threading.get_ident()] = (started, url)

    def end(self) -> None:
        """The calling thread's call is over (answered, failed or abandoned)."""
        with self._lock:
            self._calls.pop(threading.get_ident(), None)

    def longer_than(self, seconds: float = STALL_SECONDS) -> list[tuple[str, float]]:
        """(URL without the prefix, seconds in flight) of calls out longer than `seconds`,
        the oldest first."""
        now = self._clock()
        with self._lock:
            calls = list(self._calls.values())
        stalled = [
            (url.removeprefix(self._prefix), now - started)
            for started, url in calls
            if now - started > seconds
        ]
        return sorted(stalled, key=lambda call: -call[1])
