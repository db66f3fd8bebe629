"""Thread-safe counters of what a harvest did: the numbers behind metrics, summaries, benches."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields


@dataclass
class CallStats:
    """Counters of vendor calls and message outcomes; safe to share between threads."""

    calls: int = 0
    rate_limited: int = 0  # 429 responses
    retries: int = 0  # attempts after the first, any cause
    failures: int = 0  # calls that ended in an error response or transport failure
    latency_total: float = 0.0  # seconds, over all calls
    messages_done: int = 0
    messages_gone: int = 0
    messages_failed: int = 0  # returned to the queue for a retry
    messages_dead: int = 0  # sent to a DLQ by the drain
    messages_skipped: int = 0  # deleted uncalled: the ledger held the entity as finished
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def add(self, **amounts: float) -> None:
        with self._lock:
            for name, amount in amounts.items():
                setattr(self, name, getattr(self, name) + amount)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "_lock"}
