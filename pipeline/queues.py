"""The queue interface: what the pipeline asks of a queue with SQS's semantics.

Receive up to 10 messages, a visibility timeout, a receive count, batch send and delete,
and a redrive to the dead-letter queue once a message has been received more than
`max_receive_count` times. `pipeline.aws.queues` implements it on SQS,
`pipeline.local.queues` in one SQLite file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol

from pipeline.errors import HarvestError

BATCH = 10  # SQS's limit for one receive, send or delete call
# Attribute names a message dead-lettered by a drain carries besides its own (why it died,
# where, after how many receives, when); replay reads them back.
ERROR_CLASS, ERROR_MESSAGE = "error_class", "error_message"
DEAD_STAGE, DEAD_AT, DEAD_RECEIVES = "dead_stage", "dead_at", "dead_receive_count"
# The attribute a relisting's messages carry: sent again by a repeated kickoff or by a
# parent listed again, so the drain reads the ledger before working on them.
RELISTED = {"relisted": "1"}


class QueueError(HarvestError):
    """A queue operation failed for some entries even after retrying them."""


@dataclass(frozen=True)
class Outgoing:
    """A message to send: body plus string attributes."""

    body: str
    attributes: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Message:
    """A received message; `receipt` deletes it or changes its visibility."""

    id: str
    receipt: str
    body: str
    attributes: Mapping[str, str]
    receive_count: int


@dataclass(frozen=True)
class Depth:
    visible: int
    in_flight: int

    @property
    def total(self) -> int:
        return self.visible + self.in_flight


class Queue(Protocol):
    """The queue operations the pipeline uses; implemented for SQS and locally."""

    name: str

    def send(self, messages: Sequence[Outgoing]) -> None:
        """Send all `messages`, in batches of 10; raise QueueError if any is not accepted."""

    def receive(
        self,
        max_messages: int = BATCH,
        wait_seconds: float = 0.0,
        visibility_timeout: float | None = None,
    ) -> list[Message]:
        """Up to `max_messages` (<= 10) visible messages, waiting up to `wait_seconds` for one;
        hidden for `visibility_timeout` seconds (the queue's default if None)."""

    def delete(self, receipts: Sequence[str]) -> None:
        """Delete received messages, in batches of 10."""

    def change_visibility(self, receipts: Sequence[str], seconds: float) -> None:
        """Make received messages visible again after `seconds`."""

    def depth(self) -> Depth:
        """Approximate number of visible and in-flight messages."""


def chunks(items: Sequence[Any], size: int = BATCH) -> list[Sequence[Any]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def any_waiting(queues: Sequence[Queue]) -> bool:
    """Whether any of `queues` holds a message (visible or in flight).

    Their depths are read at once: in SQS each is a request of its own, and a run's tail
    waits for them (the drain that finds its stage idle, then the run's completion check).
    """
    if len(queues) <= 1:
        return any(q.depth().total for q in queues)
    with ThreadPoolExecutor(len(queues), thread_name_prefix="depth") as pool:
        return any(depth.total for depth in pool.map(lambda q: q.depth(), queues))
