"""The Queue contract, run against the embedded SQLite queues and SQS (moto).

Both must behave like SQS: batches of ten, a visibility timeout, a receive count, and a
redrive to the DLQ on the receive after `max_receive_count` receives without a delete.
The embedded queues run on a clock the test drives; SQS on moto runs on the real clock
with a one-second visibility timeout, so the tests poll with a deadline instead of sleeping.
"""

from __future__ import annotations

import sqlite3
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import boto3
import pytest
from aws_fakes import REGION, queue_with_dlq
from fake_clock import FakeClock
from moto import mock_aws

from pipeline.aws.queues import SqsQueue
from pipeline.local.queues import Hidden, LocalQueueStore
from pipeline.queues import Depth, Message, Outgoing, Queue

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient

VISIBILITY = 1  # seconds; SQS takes whole seconds
MAX_RECEIVES = 3
DEADLINE = 10.0  # seconds a poll may take before the test fails
NASTY_BODY = (
    'troop/../a?b#c%2F+d e "quoted" \\back\\ <tag>&amp; é ñ 漢字 🚀 עברית \u200d \t\n\r end'
)

T = TypeVar("T")


@dataclass
class QueueUnderTest:
    queue: Queue
    dlq: Queue
    let_visibility_lapse: Callable[[], None]
    # How long to keep watching before concluding that a message will not come back.
    quiet_period: float


def poll(fetch: Callable[[], list[T]], deadline: float = DEADLINE) -> list[T]:
    """Call `fetch` until it returns something or the deadline passes."""
    end = time.monotonic() + deadline
    while True:
        got = fetch()
        if got or time.monotonic() > end:
            return got
        time.sleep(0.02)  # a poll interval, not a wait for an expected event


def receive_again(q: Queue) -> list[Message]:
    """Receive messages that were just made visible (SQS's clock may need a moment)."""
    return poll(lambda: q.receive())


@pytest.fixture(scope="module")
def sqs() -> Iterator[SQSClient]:
    # One mock and client for the module (a client takes ~0.1 s to build); fresh queues per test.
    with mock_aws():
        yield boto3.client("sqs", region_name=REGION)


@pytest.fixture(params=["local", "sqs"])
def under_test(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[QueueUnderTest]:
    if request.param == "local":
        clock = FakeClock(1_000.0)
        store = LocalQueueStore(tmp_path / "q.sqlite", clock=clock)
        dlq = store.queue("work-dlq", visibility_timeout=VISIBILITY)
        queue = store.queue(
            "work", visibility_timeout=VISIBILITY, dlq=dlq, max_receive_count=MAX_RECEIVES
        )
        yield QueueUnderTest(queue, dlq, lambda: clock.advance(VISIBILITY + 0.001), 0.0)
        store.close()
    else:
        sqs: SQSClient = request.getfixturevalue("sqs")
        url, dlq_url = queue_with_dlq(
            sqs,
            f"work-{uuid.uuid4().hex[:12]}",
            visibility_timeout=VISIBILITY,
            max_receive_count=MAX_RECEIVES,
        )
        # SQS's own clock runs: the lapse happens while the test polls.
        yield QueueUnderTest(
            SqsQueue(sqs, url), SqsQueue(sqs, dlq_url), lambda: None, VISIBILITY + 0.2
        )


def drain_all(q: Queue) -> list[Message]:
    """Receive and delete until the queue is empty; every batch must hold at most ten."""
    got: list[Message] = []
    while batch := q.receive():
        assert len(batch) <= 10
        got.extend(batch)
        q.delete([m.receipt for m in batch])
    return got


# -- send and receive ----------------------------------------------------------------------


def test_send_delivers_every_message_when_more_than_one_batch(under_test: QueueUnderTest) -> None:
    # GIVEN 25 messages: three SQS batches
    bodies = [f"message {i}" for i in range(25)]

    # WHEN they are sent in one call
    under_test.queue.send([Outgoing(b) for b in bodies])

    # THEN each arrives exactly once
    assert Counter(m.body for m in drain_all(under_test.queue)) == Counter(bodies)


def test_receive_returns_at_most_ten_when_more_are_visible(under_test: QueueUnderTest) -> None:
    under_test.queue.send([Outgoing(str(i)) for i in range(25)])

    batch = under_test.queue.receive(max_messages=50)

    assert 1 <= len(batch) <= 10


def test_receive_returns_nothing_when_queue_is_empty(under_test: QueueUnderTest) -> None:
    assert under_test.queue.receive() == []


def test_attributes_round_trip_when_sent_with_a_message(under_test: QueueUnderTest) -> None:
    attributes = {"error_class": "PoisonError", "error_message": "400: bad cursor ✗ «x»"}
    under_test.queue.send([Outgoing("body", attributes)])

    (message,) = under_test.queue.receive()

    assert message.body == "body"
    assert dict(message.attributes) == attributes


def test_message_without_attributes_arrives_with_none(under_test: QueueUnderTest) -> None:
    under_test.queue.send([Outgoing("plain")])

    (message,) = under_test.queue.receive()

    assert dict(message.attributes) == {}


def test_unicode_body_with_reserved_characters_round_trips(under_test: QueueUnderTest) -> None:
    under_test.queue.send([Outgoing(NASTY_BODY, {"path": "a/b?c#d%e"})])

    (message,) = under_test.queue.receive()

    assert message.body == NASTY_BODY
    assert message.attributes["path"] == "a/b?c#d%e"


# -- visibility ----------------------------------------------------------------------------


def test_received_message_is_invisible_when_timeout_has_not_passed(
    under_test: QueueUnderTest,
) -> None:
    under_test.queue.send([Outgoing("once")])
    assert len(under_test.queue.receive()) == 1

    assert under_test.queue.receive() == []


def test_received_message_reappears_when_visibility_timeout_passes(
    under_test: QueueUnderTest,
) -> None:
    # GIVEN a received, undeleted message
    under_test.queue.send([Outgoing("lapse")])
    (first,) = under_test.queue.receive()

    # WHEN its visibility timeout passes
    under_test.let_visibility_lapse()

    # THEN it is delivered again, with a new receipt
    (again,) = receive_again(under_test.queue)
    assert again.body == "lapse"
    assert again.id == first.id
    assert again.receive_count == 2


def test_change_visibility_zero_makes_message_visible_again(under_test: QueueUnderTest) -> None:
    under_test.queue.send([Outgoing("release me")])
    (first,) = under_test.queue.receive()

    under_test.queue.change_visibility([first.receipt], 0)

    (again,) = receive_again(under_test.queue)
    assert again.body == "release me"


def test_change_visibility_keeps_message_hidden_when_extended(
    under_test: QueueUnderTest,
) -> None:
    under_test.queue.send([Outgoing("hold")])
    (first,) = under_test.queue.receive()

    under_test.queue.change_visibility([first.receipt], 30)
    under_test.let_visibility_lapse()

    assert poll(lambda: under_test.queue.receive(), deadline=under_test.quiet_period) == []
    assert under_test.queue.depth() == Depth(visible=0, in_flight=1)


def test_receive_count_grows_when_message_is_received_again(under_test: QueueUnderTest) -> None:
    under_test.queue.send([Outgoing("counted")])

    counts = []
    for _ in range(MAX_RECEIVES):
        (message,) = receive_again(under_test.queue)
        counts.append(message.receive_count)
        under_test.queue.change_visibility([message.receipt], 0)

    assert counts == [1, 2, 3]


# -- delete --------------------------------------------------------------------------------


def test_delete_removes_message_when_given_its_receipt(under_test: QueueUnderTest) -> None:
    under_test.queue.send([Outgoing("gone")])
    (message,) = under_test.queue.receive()

    under_test.queue.delete([message.receipt])
    under_test.let_visibility_lapse()

    assert poll(lambda: under_test.queue.receive(), deadline=under_test.quiet_period) == []
    assert under_test.queue.depth() == Depth(visible=0, in_flight=0)


def test_delete_removes_every_message_when_more_than_one_batch(
    under_test: QueueUnderTest,
) -> None:
    under_test.queue.send([Outgoing(str(i)) for i in range(25)])
    received: list[Message] = []
    while len(received) < 25 and (batch := under_test.queue.receive()):
        received.extend(batch)

    under_test.queue.delete([m.receipt for m in received])

    assert len(received) == 25
    assert under_test.queue.depth() == Depth(visible=0, in_flight=0)


# -- dead-letter queue ---------------------------------------------------------------------


def test_message_moves_to_dlq_on_the_receive_after_max_receive_count(
    under_test: QueueUnderTest,
) -> None:
    # GIVEN a message received max_receive_count times without a delete
    under_test.queue.send([Outgoing("poison", {"run_id": "r1"})])
    for _ in range(MAX_RECEIVES):
        (message,) = receive_again(under_test.queue)
        under_test.queue.change_visibility([message.receipt], 0)

    # WHEN the queue is received from again
    def redriven() -> list[Message]:
        assert under_test.queue.receive() == [], "delivered beyond max_receive_count"
        return under_test.dlq.receive()

    # THEN it is not delivered but lands in the DLQ, body and attributes intact
    (dead,) = poll(redriven)
    assert dead.body == "poison"
    assert dict(dead.attributes) == {"run_id": "r1"}
    assert under_test.queue.depth() == Depth(visible=0, in_flight=0)


def test_message_stays_when_received_exactly_max_receive_count_times(
    under_test: QueueUnderTest,
) -> None:
    under_test.queue.send([Outgoing("almost")])
    for _ in range(MAX_RECEIVES - 1):
        (message,) = receive_again(under_test.queue)
        under_test.queue.change_visibility([message.receipt], 0)

    (last,) = receive_again(under_test.queue)

    assert last.body == "almost"
    assert last.receive_count == MAX_RECEIVES
    assert under_test.dlq.depth() == Depth(visible=0, in_flight=0)


# -- depth ---------------------------------------------------------------------------------


def test_depth_counts_visible_and_in_flight_messages(under_test: QueueUnderTest) -> None:
    # GIVEN five messages, two of them received
    under_test.queue.send([Outgoing(str(i)) for i in range(5)])
    received = under_test.queue.receive(max_messages=2)
    assert len(received) == 2

    # THEN depth reports three visible and two in flight
    assert under_test.queue.depth() == Depth(visible=3, in_flight=2)

    # WHEN the received ones are deleted THEN only the visible remain
    under_test.queue.delete([m.receipt for m in received])
    assert under_test.queue.depth() == Depth(visible=3, in_flight=0)


def test_depth_is_zero_when_queue_is_empty(under_test: QueueUnderTest) -> None:
    depth = under_test.queue.depth()

    assert depth == Depth(visible=0, in_flight=0)
    assert depth.total == 0


# -- embedded queues only ------------------------------------------------------------------


def test_local_stores_share_messages_when_opened_on_the_same_file(tmp_path: Path) -> None:
    # GIVEN two stores on one file, as two processes would open it
    clock = FakeClock(1_000.0)
    producer = LocalQueueStore(tmp_path / "q.sqlite", clock=clock)
    consumer = LocalQueueStore(tmp_path / "q.sqlite", clock=clock)
    try:
        # WHEN one sends
        producer.queue("work").send([Outgoing(f"m{i}", {"i": str(i)}) for i in range(12)])

        # THEN the other receives them, and the first sees them in flight
        got = drain_after_receive(consumer.queue("work", visibility_timeout=30))
        assert sorted(m.body for m in got) == sorted(f"m{i}" for i in range(12))
        assert producer.queue("work").depth() == Depth(visible=0, in_flight=12)
    finally:
        producer.close()
        consumer.close()


def drain_after_receive(q: Queue) -> list[Message]:
    got: list[Message] = []
    while batch := q.receive():
        got.extend(batch)
    return got


def test_local_dlq_is_readable_from_another_store_after_redrive(tmp_path: Path) -> None:
    # GIVEN a message redriven to the DLQ in one "process"
    clock = FakeClock(1_000.0)
    run = LocalQueueStore(tmp_path / "q.sqlite", clock=clock)
    dlq = run.queue("work-dlq")
    queue = run.queue("work", visibility_timeout=5, dlq=dlq, max_receive_count=1)
    queue.send([Outgoing("dies")])
    assert len(queue.receive()) == 1
    clock.advance(6)
    assert queue.receive() == []
    run.close()

    # WHEN another "process" opens the file afterwards
    later = LocalQueueStore(tmp_path / "q.sqlite", clock=clock)
    try:
        # THEN the dead letter is there
        (dead,) = later.queue("work-dlq").receive()
        assert dead.body == "dies"
    finally:
        later.close()


def test_local_message_is_invisible_until_exactly_the_timeout(tmp_path: Path) -> None:
    clock = FakeClock(1_000.0)
    store = LocalQueueStore(tmp_path / "q.sqlite", clock=clock)
    queue = store.queue("work", visibility_timeout=30)
    queue.send([Outgoing("x")])
    assert len(queue.receive()) == 1

    clock.advance(29.999)
    assert queue.receive() == []
    clock.advance(0.001)
    assert [m.body for m in queue.receive()] == ["x"]
    store.close()


def test_local_receive_returns_a_message_sent_while_it_waits(tmp_path: Path) -> None:
    # GIVEN a receiver long-polling an empty queue
    store = LocalQueueStore(tmp_path / "q.sqlite")
    queue = store.queue("work")
    got: list[Message] = []
    receiver = threading.Thread(target=lambda: got.extend(queue.receive(wait_seconds=DEADLINE)))
    receiver.start()

    # WHEN a message is sent
    queue.send([Outgoing("wake up")])

    # THEN the waiting receive returns it
    receiver.join(timeout=DEADLINE + 5)
    assert not receiver.is_alive()
    assert [m.body for m in got] == ["wake up"]
    store.close()


def test_local_hidden_tells_held_messages_from_those_given_back_with_a_delay(
    tmp_path: Path,
) -> None:
    # GIVEN three received messages: one still held, two given back with delays
    clock = FakeClock(1_000.0)
    store = LocalQueueStore(tmp_path / "q.sqlite", clock=clock)
    queue = store.queue("work", visibility_timeout=30)
    queue.send([Outgoing("held"), Outgoing("soon"), Outgoing("later")])
    got = {m.body: m for m in queue.receive()}
    queue.change_visibility([got["later"].receipt], 20)
    queue.change_visibility([got["soon"].receipt], 5)

    # WHEN asked what is hidden
    hidden = store.hidden("work")

    # THEN the held one shows until its visibility timeout, the delayed ones until the first
    # of their delays, with that message's body
    assert hidden == Hidden(
        held=1, held_until=1_030.0, delayed=2, delayed_until=1_005.0, first_delayed="soon"
    )
    store.close()


def test_local_release_in_flight_keeps_the_delay_of_a_message_given_back(tmp_path: Path) -> None:
    # GIVEN one message held and one given back with a delay (a retry, a Retry-After)
    clock = FakeClock(1_000.0)
    store = LocalQueueStore(tmp_path / "q.sqlite", clock=clock)
    queue = store.queue("work", visibility_timeout=30)
    queue.send([Outgoing("held"), Outgoing("delayed")])
    got = {m.body: m for m in queue.receive()}
    queue.change_visibility([got["delayed"].receipt], 60)

    # WHEN a new owner releases what the old one held
    released = store.release_in_flight()

    # THEN only the held one is visible again; the delayed one waits out its delay
    assert released == 1
    assert [m.body for m in queue.receive()] == ["held"]
    assert store.hidden("work").delayed_until == 1_060.0
    store.close()


def test_local_state_from_before_the_held_column_counts_a_received_message_as_held(
    tmp_path: Path,
) -> None:
    # GIVEN a state file written before `held` existed, with one message received
    db = sqlite3.connect(tmp_path / "q.sqlite")
    db.executescript(
        "CREATE TABLE messages (seq INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT NOT NULL,"
        " id TEXT NOT NULL, body TEXT NOT NULL, attributes TEXT NOT NULL,"
        " visible_at REAL NOT NULL, receive_count INTEGER NOT NULL DEFAULT 0, receipt TEXT);"
        "INSERT INTO messages (queue, id, body, attributes, visible_at, receive_count, receipt)"
        " VALUES ('work', 'm1', 'x', '{}', 1030.0, 1, 'r1');"
    )
    db.commit()
    db.close()

    # WHEN this version opens it
    store = LocalQueueStore(tmp_path / "q.sqlite", clock=FakeClock(1_000.0))

    # THEN the message counts as held, and a new owner releases it
    assert store.hidden("work").held == 1
    assert store.release_in_flight() == 1
    store.close()
