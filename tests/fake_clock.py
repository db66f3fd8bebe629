"""A clock the test drives: `sleep` advances it instead of waiting."""

from __future__ import annotations


class FakeClock:
    """Callable like `time.monotonic`; `sleep` moves time forward at once."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = start
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def time(self) -> float:
        """The same reading, for code that calls `time.time()`."""
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if seconds > 0:
            self.now += seconds
