"""The drain loop on embedded queues against a `responses` vendor that follows vendor-api.md.

What is asserted is where things end up: which queue or DLQ holds a message (with which
attributes), what the ledger counts, what landed in the sink.
"""

from __future__ import annotations

import json
import re
import threading
import time
import types
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import boto3
import pytest
import requests
import responses
from conftest import TOKEN, WINDOW, local_config
from moto import mock_aws

import pipeline.drain as drain_module
from pipeline.aws.queues import SqsQueue
from pipeline.config import Config
from pipeline.drain import FLUSH_ENTRIES, FLUSH_SECONDS, Drain, DrainReport, monotonic_deadline
from pipeline.envelope import MAX_BODY_BYTES, Envelope
from pipeline.errors import RetryableError
from pipeline.ledger import State
from pipeline.local.budget import PacedBudget
from pipeline.local.ledger import SqliteLedger
from pipeline.local.queues import LocalQueue, LocalQueueStore
from pipeline.local.scheduler import LocalContext
from pipeline.local.sinks import DirectorySink
from pipeline.queues import (
    DEAD_RECEIVES,
    DEAD_STAGE,
    ERROR_CLASS,
    ERROR_MESSAGE,
    RELISTED,
    Depth,
    Message,
    Outgoing,
    Queue,
    QueueError,
)
from pipeline.replay import replay
from pipeline.runtime import reset_cache
from pipeline.sinks import read_run
from pipeline.stages import STAGE_NAMES, stage, upstream
from pipeline.stats import CallStats
from pipeline.vendor_api.client import VendorClient

BASE = "http://vendor.test"
RUN = WINDOW.run_id
VISIBILITY = 30.0
MAX_RECEIVES = 2
RETRY_DELAY = 10.0
POINTS = [{"ts": "2024-03-01T00:00:00Z", "value": 1.5}, {"ts": "2024-03-01T01:00:00Z", "value": 2}]
# An id with reserved characters: the drain must hand it to the vendor as one path segment.
TROOP = "troop 1/?#%"


def troop(troop_id: str = TROOP) -> Envelope:
    return Envelope(RUN, "troops", (troop_id,), WINDOW)


def group(data_group_id: str, warrior_id: str = "w1", troop_id: str = TROOP) -> Envelope:
    return Envelope(RUN, "data_groups", (troop_id, warrior_id, data_group_id), WINDOW)


# -- the vendor ---------------------------------------------------------------------------


@dataclass
class FakeVendor:
    """A `responses` callback serving a fixed tree; `fail` forces a status per entity id."""

    warriors: dict[str, list[str]] = field(default_factory=dict)
    groups: dict[str, list[str]] = field(default_factory=dict)
    points: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    fail: dict[str, int] = field(default_factory=dict)
    token: str = TOKEN
    calls: list[str] = field(default_factory=list)
    on_call: Callable[[int], None] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        parts = urlsplit(request.url or "")
        _, version, kind, raw_id, listing = parts.path.split("/")
        entity_id = unquote(raw_id)
        with self._lock:
            self.calls.append(entity_id)
            count = len(self.calls)
        if self.on_call is not None:
            self.on_call(count)
        headers = {
            "X-RateLimit-Limit": "10000",
            "X-RateLimit-Remaining": "9999",
            "X-RateLimit-Reset": "0",
            **self.headers,
        }
        if request.headers.get("Authorization") != f"Bearer {self.token}":
            return 401, headers, json.dumps({"error": "unauthorized"})
        status = self.fail.get(entity_id)
        if status == 400:
            body = {"error": "bad_request", "message": "'from' is not an RFC 3339 instant"}
            return 400, headers, json.dumps(body)
        if status is not None:
            return status, headers, json.dumps({"error": "vendor trouble"})
        items: list[dict[str, Any]] | None
        if (kind, listing) == ("troops", "warriors"):
            ids = self.warriors.get(entity_id)
            items = None if ids is None else [{"id": i, "troop_id": entity_id} for i in ids]
        elif (kind, listing) == ("warriors", "data-groups"):
            ids = self.groups.get(entity_id)
            items = None if ids is None else [{"id": i, "warrior_id": entity_id} for i in ids]
        else:
            query = parse_qs(parts.query)
            if "from" not in query or "to" not in query:
                return 400, headers, json.dumps({"error": "bad_request", "message": "no window"})
            items = self.points.get(entity_id)
        if items is None:
            return 404, headers, json.dumps({"error": "not_found"})
        return 200, headers, json.dumps({"items": items, "next_cursor": None})


@pytest.fixture
def vendor() -> Iterator[FakeVendor]:
    fake = FakeVendor(
        warriors={TROOP: ["w1", "w2"], "t2": ["w3"], "t3": ["w4"]},
        groups={"w1": ["d1", "d2"], "w2": ["d3"]},
        points={"d1": POINTS, "d2": POINTS[:1], "d3": []},
    )
    with responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.add_callback(responses.GET, re.compile(re.escape(BASE) + "/.*"), callback=fake)
        yield fake


def data_groups_with_a_point(vendor: FakeVendor, count: int) -> list[str]:
    """The ids of `count` data groups the vendor serves one point each for."""
    ids = [f"d{i}" for i in range(count)]
    for d in ids:
        vendor.points[d] = [POINTS[0]]
    return ids


# -- the pipeline around one drain --------------------------------------------------------


class Clock:
    """The queues' clock: visibility timeouts pass when the test says so."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class Pipeline:
    store: LocalQueueStore
    queues: dict[str, Queue]
    dlqs: dict[str, LocalQueue]
    ledger: SqliteLedger
    sink: DirectorySink
    clock: Clock
    client: VendorClient

    def drain(self, stage_name: str, concurrency: int = 4, economical: bool = False) -> Drain:
        s = stage(stage_name)
        return Drain(
            s,
            queue=self.queues[s.name],
            dlq=self.dlqs[s.name],
            child_queue=self.queues[s.child] if s.child else None,
            upstream=[self.queues[u] for u in upstream(s.name)],
            client=self.client,
            sink=self.sink,
            ledger=self.ledger,
            stats=CallStats(),
            concurrency=concurrency,
            max_receive_count=MAX_RECEIVES,
            retry_delay=RETRY_DELAY,
            wait_seconds=0.05,
            store_backoff=0.001,
            economical=economical,
        )

    def run(self, stage_name: str, seconds: float = 10.0, margin: float = 0.0) -> DrainReport:
        return self.drain(stage_name).run(monotonic_deadline(seconds), margin)

    def enqueue(self, *envelopes: Envelope) -> None:
        """What the kickoff or a parent's drain does: record, then send."""
        for e in envelopes:
            self.ledger.enqueued(e.run_id, e.stage, [(e.key, e.path)])
        self.queues[envelopes[0].stage].send([Outgoing(e.to_json()) for e in envelopes])

    def counts(self, stage_name: str) -> tuple[int, int, int, int]:
        status = self.ledger.status(RUN)
        assert status is not None
        c = status.stages[stage_name]
        return c.enqueued, c.done, c.gone, c.dead

    def output(self) -> dict[str, bytes]:
        """Every output file of the run, by key."""
        keys = self.sink.keys(f"runs/{RUN}/data/")
        return {k: self.sink.get(k) or b"" for k in keys}


def count_finish_writes(pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The sizes of the ledger's finish_many calls from now on, in order."""
    writes: list[int] = []
    real = pipeline.ledger.finish_many

    def counted(run_id: str, stage: str, entries: Sequence[Any]) -> None:
        writes.append(len(entries))
        real(run_id, stage, entries)

    monkeypatch.setattr(pipeline.ledger, "finish_many", counted)
    return writes


def peek(queue: Queue) -> list[Message]:
    """Every message in `queue`, received and at once released again."""
    found: list[Message] = []
    while batch := queue.receive(10):
        found.extend(batch)
    queue.change_visibility([m.receipt for m in found], 0)
    return found


@pytest.fixture
def pipeline(tmp_path: Path, vendor: FakeVendor) -> Iterator[Pipeline]:
    clock = Clock()
    store = LocalQueueStore(tmp_path / "queues.sqlite", clock=clock)
    dlqs = {s: store.queue(f"{s}-dlq") for s in STAGE_NAMES}
    queues: dict[str, Queue] = {
        s: store.queue(
            s, visibility_timeout=VISIBILITY, dlq=dlqs[s], max_receive_count=MAX_RECEIVES + 1
        )
        for s in STAGE_NAMES
    }
    ledger = SqliteLedger(tmp_path / "ledger.sqlite")
    ledger.start_run(RUN, WINDOW.from_text, WINDOW.to_text)
    ledger.kicked_off(RUN)
    client = VendorClient(
        BASE, TOKEN, PacedBudget(10_000, 1.0), CallStats(), read_timeout=2, sleep=lambda s: None
    )
    yield Pipeline(store, queues, dlqs, ledger, DirectorySink(tmp_path / "out"), clock, client)
    client.close()
    store.close()


# -- fan-out ------------------------------------------------------------------------------


def test_troop_fans_out_its_warriors_before_it_is_deleted(
    pipeline: Pipeline, vendor: FakeVendor
) -> None:
    # GIVEN a troop with 25 warriors, and a spy on the warriors queue
    warriors = [f"w{i}" for i in range(25)]
    vendor.warriors = {TROOP: warriors}
    pipeline.enqueue(troop())
    troops_at_send: list[int] = []
    child_queue = pipeline.queues["warriors"]
    real_send = child_queue.send

    def spying_send(messages: Sequence[Outgoing]) -> None:
        troops_at_send.append(pipeline.queues["troops"].depth().in_flight)
        real_send(messages)

    child_queue.send = spying_send  # type: ignore[method-assign]

    # WHEN the troops stage drains
    report = pipeline.run("troops")

    # THEN every warrior is queued once, the troop was still held while they were sent,
    # and only then deleted
    sent = sorted(Envelope.from_json(m.body).path for m in peek(pipeline.queues["warriors"]))
    assert sent == sorted((TROOP, w) for w in warriors)
    assert troops_at_send == [1]
    assert pipeline.queues["troops"].depth().total == 0
    assert pipeline.counts("troops") == (1, 1, 0, 0)
    assert pipeline.counts("warriors") == (25, 0, 0, 0)
    assert (report.done, report.children, report.stopped) == (1, 25, "idle")


def test_children_reach_sqs_in_batches_of_ten_when_a_troop_has_many(
    pipeline: Pipeline, vendor: FakeVendor, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN SQS queues (moto refuses a batch of more than 10) and a troop with 23 warriors
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "eu-west-1",
    }.items():
        monkeypatch.setenv(name, value)
    vendor.warriors = {TROOP: [f"w{i}" for i in range(23)]}
    # moto passes calls it does not serve to the network, past the `vendor` fixture's mock:
    # a mock started inside mock_aws sees the vendor calls first.
    with mock_aws(), responses.RequestsMock(assert_all_requests_are_fired=False) as mock:
        mock.add_callback(responses.GET, re.compile(re.escape(BASE) + "/.*"), callback=vendor)
        sqs = boto3.client("sqs")
        for name in ("troops", "warriors"):
            url = sqs.create_queue(QueueName=name)["QueueUrl"]
            pipeline.queues[name] = SqsQueue(sqs, url, name)
        pipeline.enqueue(troop())

        # WHEN the troops stage drains
        report = pipeline.run("troops")

        # THEN all 23 warriors are in SQS and the troop is gone from its queue
        sent = {Envelope.from_json(m.body).path for m in peek(pipeline.queues["warriors"])}
        assert sent == {(TROOP, f"w{i}") for i in range(23)}
        assert pipeline.queues["troops"].depth().total == 0
        assert (report.done, report.children) == (1, 23)


def test_troop_is_done_at_once_when_a_child_send_is_refused_once(pipeline: Pipeline) -> None:
    # GIVEN a warriors queue that refuses the first send
    pipeline.enqueue(troop())
    child_queue = pipeline.queues["warriors"]
    flaky = Flaky(child_queue.send, 1)
    child_queue.send = flaky  # type: ignore[method-assign]

    # WHEN the troops stage drains
    report = pipeline.run("troops")

    # THEN the send was retried in place: done on the first receive, warriors queued once
    assert (report.done, report.retried) == (1, 0)
    sent = sorted(Envelope.from_json(m.body).path for m in peek(pipeline.queues["warriors"]))
    assert sent == [(TROOP, "w1"), (TROOP, "w2")]
    assert flaky.calls == 2


def test_troop_stays_queued_when_sending_its_children_keeps_failing(pipeline: Pipeline) -> None:
    # GIVEN a warriors queue that refuses every send of the first receive
    pipeline.enqueue(troop())
    child_queue = pipeline.queues["warriors"]
    real_send = child_queue.send
    refusals = [QueueError("warriors: 2 messages not accepted by SQS")] * 5

    def flaky_send(messages: Sequence[Outgoing]) -> None:
        if refusals:
            raise refusals.pop()
        real_send(messages)

    child_queue.send = flaky_send  # type: ignore[method-assign]

    # WHEN the troops stage drains
    pipeline.run("troops", seconds=1.0)

    # THEN the troop is neither deleted nor done, and no warrior was queued
    assert pipeline.queues["troops"].depth().in_flight == 1
    assert pipeline.queues["warriors"].depth().total == 0
    assert pipeline.counts("troops") == (1, 0, 0, 0)

    # WHEN its visibility timeout passes and the stage drains again
    pipeline.clock.advance(VISIBILITY + 1)
    pipeline.run("troops")

    # THEN it is done, and each warrior is queued and counted once
    sent = sorted(Envelope.from_json(m.body).path for m in peek(pipeline.queues["warriors"]))
    assert sent == [(TROOP, "w1"), (TROOP, "w2")]
    assert pipeline.queues["troops"].depth().total == 0
    assert pipeline.counts("troops") == (1, 1, 0, 0)
    assert pipeline.counts("warriors") == (2, 0, 0, 0)


def test_relisted_parent_sends_only_its_unfinished_children_marked_relisted(
    pipeline: Pipeline, vendor: FakeVendor
) -> None:
    # GIVEN a troop whose warriors w1 and w2 were recorded and w1 harvested since, but
    # whose own outcome never landed (its drain died); the troop is sent again, marked
    w1, w2 = (troop().child("warriors", w) for w in ("w1", "w2"))
    pipeline.ledger.enqueued(RUN, "troops", [(troop().key, troop().path)])
    pipeline.ledger.enqueued(RUN, "warriors", [(w.key, w.path) for w in (w1, w2)])
    pipeline.ledger.finish(RUN, "warriors", w1.key, State.DONE)
    pipeline.queues["troops"].send([Outgoing(troop().to_json(), RELISTED)])
    calls = len(vendor.calls)

    # WHEN the troops stage drains
    report = pipeline.run("troops")

    # THEN it is listed again (one call), and only w2 is sent, marked in turn
    assert (report.done, len(vendor.calls)) == (1, calls + 1)
    [sent] = peek(pipeline.queues["warriors"])
    assert Envelope.from_json(sent.body).key == w2.key
    assert sent.attributes == RELISTED
    assert pipeline.counts("warriors") == (2, 1, 0, 0)


def test_data_group_lands_in_the_sink_with_the_output_contract(pipeline: Pipeline) -> None:
    # GIVEN a data group message
    pipeline.enqueue(group("d1"))

    # WHEN the data_groups stage drains
    pipeline.run("data_groups")

    # THEN one record holds its ids, the run and its points, and the message is done
    assert list(read_run(pipeline.sink, RUN)) == [
        {
            "run_id": RUN,
            "troop_id": TROOP,
            "warrior_id": "w1",
            "data_group_id": "d1",
            "from": WINDOW.from_text,
            "to": WINDOW.to_text,
            "points": POINTS,
        }
    ]
    assert pipeline.queues["data_groups"].depth().total == 0
    assert pipeline.counts("data_groups") == (1, 1, 0, 0)


def test_data_group_processed_twice_leaves_one_file_and_counts_once(pipeline: Pipeline) -> None:
    # GIVEN two data groups that have been harvested once
    pipeline.enqueue(group("d1"), group("d2"))
    pipeline.run("data_groups")
    first_output, first_counts = pipeline.output(), pipeline.counts("data_groups")

    # WHEN the same messages are delivered again, one of them twice
    bodies = [group("d1").to_json(), group("d2").to_json(), group("d1").to_json()]
    pipeline.queues["data_groups"].send([Outgoing(b) for b in bodies])
    pipeline.run("data_groups")

    # THEN the output is byte for byte the same, one file per data group, counts unchanged
    assert len(first_output) == 2
    assert pipeline.output() == first_output
    assert pipeline.counts("data_groups") == first_counts == (2, 2, 0, 0)
    assert pipeline.queues["data_groups"].depth().total == 0


def test_troop_processed_twice_counts_its_warriors_once(pipeline: Pipeline) -> None:
    # GIVEN the same troop delivered twice
    pipeline.enqueue(troop())
    pipeline.queues["troops"].send([Outgoing(troop().to_json())])

    # WHEN the troops stage drains
    pipeline.run("troops")

    # THEN its warriors are queued twice (at-least-once) but recorded once
    assert pipeline.queues["warriors"].depth().total == 4
    assert pipeline.counts("troops") == (1, 1, 0, 0)
    assert pipeline.counts("warriors") == (2, 0, 0, 0)


# -- poison messages ----------------------------------------------------------------------


def _envelope_dict(**changes: Any) -> str:
    data = json.loads(troop("t2").to_json())
    data.update(changes)
    return json.dumps(data)


MALFORMED = {
    "not JSON": ("{'v': 1, stage: troops", "not JSON"),
    "not an object": ("[1, 2, 3]", "not a JSON object"),
    "oversize": (_envelope_dict(padding="x" * MAX_BODY_BYTES), "over"),
    "unknown version": (_envelope_dict(v=2), "version"),
    "unknown stage": (_envelope_dict(stage="platoons"), "stage"),
    "path not a list": (_envelope_dict(path="t2"), "path"),
    "run id not a string": (_envelope_dict(run_id=7), "run_id"),
    "window not a string": (_envelope_dict(**{"from": 20240301}), "from"),
    "another stage's message": (group("d1").to_json(), "data_groups message"),
}


@pytest.mark.parametrize(("body", "says"), MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_message_is_dead_lettered_at_once_and_the_batch_goes_on(
    pipeline: Pipeline, body: str, says: str
) -> None:
    # GIVEN a malformed message in one batch with a good one
    pipeline.enqueue(troop())
    pipeline.queues["troops"].send([Outgoing(body, {"origin": "test"})])

    # WHEN the troops stage drains
    report = pipeline.run("troops")

    # THEN the malformed one is in the DLQ after one receive, as it was, with its reason
    [dead] = peek(pipeline.dlqs["troops"])
    assert dead.body == body
    assert dead.attributes["origin"] == "test"
    assert dead.attributes[ERROR_CLASS] == "MessageError"
    assert says in dead.attributes[ERROR_MESSAGE]
    assert (dead.attributes[DEAD_STAGE], dead.attributes[DEAD_RECEIVES]) == ("troops", "1")
    # AND the good one was done and fanned out; nothing is left in the queue
    assert pipeline.queues["troops"].depth().total == 0
    assert pipeline.queues["warriors"].depth().total == 2
    assert pipeline.counts("troops") == (1, 1, 0, 0)
    assert (report.done, report.dead) == (1, 1)


# -- vendor errors ------------------------------------------------------------------------


def test_bad_request_is_dead_lettered_at_once_with_the_vendor_reason(
    pipeline: Pipeline, vendor: FakeVendor
) -> None:
    # GIVEN a data group the vendor answers 400 for
    vendor.fail["d1"] = 400
    pipeline.enqueue(group("d1"), group("d2"))

    # WHEN the data_groups stage drains
    pipeline.run("data_groups")

    # THEN it is dead after one receive with the vendor's message; the other is done
    [dead] = peek(pipeline.dlqs["data_groups"])
    assert Envelope.from_json(dead.body) == group("d1")
    assert dead.attributes[ERROR_CLASS] == "PoisonError"
    assert "400" in dead.attributes[ERROR_MESSAGE]
    assert "RFC 3339" in dead.attributes[ERROR_MESSAGE]
    assert dead.attributes[DEAD_RECEIVES] == "1"
    assert pipeline.queues["data_groups"].depth().total == 0
    assert pipeline.counts("data_groups") == (2, 1, 0, 1)
    [entity] = pipeline.ledger.dead(RUN)
    assert entity.path == group("d1").path
    assert "400" in entity.error
    assert [r["data_group_id"] for r in read_run(pipeline.sink, RUN)] == ["d2"]


def test_gone_data_group_is_deleted_and_recorded_without_output(
    pipeline: Pipeline, vendor: FakeVendor
) -> None:
    # GIVEN a data group that answers 404
    vendor.fail["d1"] = 404
    pipeline.enqueue(group("d1"))

    # WHEN the data_groups stage drains
    report = pipeline.run("data_groups")

    # THEN it is gone: deleted, counted as gone, no output, nothing dead-lettered
    assert pipeline.queues["data_groups"].depth().total == 0
    assert pipeline.dlqs["data_groups"].depth().total == 0
    assert pipeline.counts("data_groups") == (1, 0, 1, 0)
    assert pipeline.output() == {}
    assert report.gone == 1


def test_gone_warrior_fans_out_nothing(pipeline: Pipeline) -> None:
    # GIVEN a warrior the vendor no longer knows
    pipeline.enqueue(Envelope(RUN, "warriors", (TROOP, "vanished"), WINDOW))

    # WHEN the warriors stage drains
    pipeline.run("warriors")

    # THEN it is recorded gone and has no children
    assert pipeline.counts("warriors") == (1, 0, 1, 0)
    assert pipeline.queues["data_groups"].depth().total == 0
    assert pipeline.dlqs["warriors"].depth().total == 0


def test_vendor_errors_return_the_message_until_its_last_receive(
    pipeline: Pipeline, vendor: FakeVendor
) -> None:
    # GIVEN a data group whose every call answers 503
    vendor.fail["d1"] = 503
    pipeline.enqueue(group("d1"))

    # WHEN the data_groups stage drains once (receive 1 of MAX_RECEIVES)
    report = pipeline.run("data_groups", seconds=1.0)

    # THEN the message is back in the queue, hidden for the retry delay, not dead
    assert report.retried == 1
    assert pipeline.queues["data_groups"].depth().in_flight == 1
    assert pipeline.dlqs["data_groups"].depth().total == 0
    assert pipeline.counts("data_groups") == (1, 0, 0, 0)
    error = pipeline.ledger.last_error(RUN, "data_groups", group("d1").key)
    assert "RetryableError" in error and "503" in error

    # WHEN the delay has passed and the stage drains again (the last allowed receive)
    pipeline.clock.advance(RETRY_DELAY + 1)
    report = pipeline.run("data_groups")

    # THEN the drain dead-letters it with the error as reason
    [dead] = peek(pipeline.dlqs["data_groups"])
    assert dead.attributes[ERROR_CLASS] == "RetryableError"
    assert "503" in dead.attributes[ERROR_MESSAGE]
    assert dead.attributes[DEAD_RECEIVES] == str(MAX_RECEIVES)
    assert pipeline.queues["data_groups"].depth().total == 0
    assert pipeline.counts("data_groups") == (1, 0, 0, 1)
    assert pipeline.output() == {}


def test_unauthorized_stops_the_drain_and_leaves_messages_queued(
    pipeline: Pipeline, vendor: FakeVendor
) -> None:
    # GIVEN a token the vendor rejects and 15 troops (two batches' worth)
    vendor.token = "another-token"
    pipeline.enqueue(*(troop(f"t{i}") for i in range(15)))

    # WHEN the troops stage drains
    report = pipeline.run("troops")

    # THEN it stops after the first batch; every troop is visible in the queue, none dead
    assert report.stopped == "auth"
    assert "401" in report.auth_error
    assert report.received == 10
    assert pipeline.queues["troops"].depth() == Depth(visible=15, in_flight=0)
    assert pipeline.dlqs["troops"].depth().total == 0
    assert pipeline.counts("troops") == (15, 0, 0, 0)


# -- the deadline -------------------------------------------------------------------------


def test_drain_stops_taking_batches_when_time_runs_low(
    pipeline: Pipeline, vendor: FakeVendor
) -> None:
    # GIVEN 15 troops, and time that falls below the 5 s safety margin (but not below half
    # of it, where received messages are released) as soon as the first vendor call starts
    vendor.warriors = {f"t{i}": ["w"] for i in range(15)}
    pipeline.enqueue(*(troop(f"t{i}") for i in range(15)))
    left = [60.0]

    def time_runs_low(calls: int) -> None:
        left[0] = 3.0

    vendor.on_call = time_runs_low

    # WHEN the troops stage drains with a safety margin of 5 s
    report = pipeline.drain("troops").run(lambda: left[0], 5.0)

    # THEN the batch in hand is finished and no second batch is taken
    assert report.stopped == "deadline"
    assert (report.received, report.done) == (10, 10)
    depth = pipeline.queues["troops"].depth()
    assert (depth.visible, depth.in_flight) == (5, 0)
    assert pipeline.counts("troops") == (15, 10, 0, 0)


def test_drain_releases_received_messages_when_time_runs_out_mid_batch(
    pipeline: Pipeline, vendor: FakeVendor
) -> None:
    # GIVEN 12 troops, and time that runs out as soon as a batch has been received
    pipeline.enqueue(*(troop(f"t{i}") for i in range(12)))
    left = [60.0]
    queue = pipeline.queues["troops"]
    real_receive = queue.receive

    def receive_then_run_out(max_messages: int = 10, wait_seconds: float = 0.0) -> list[Message]:
        got = real_receive(max_messages, wait_seconds)
        if got:
            left[0] = 1.0
        return got

    queue.receive = receive_then_run_out  # type: ignore[method-assign]

    # WHEN the troops stage drains with a safety margin of 5 s
    report = pipeline.drain("troops").run(lambda: left[0], 5.0)

    # THEN the received messages are released at once, untouched: visible, none processed
    assert report.stopped == "deadline"
    assert report.received == 10
    depth = pipeline.queues["troops"].depth()
    assert (depth.visible, depth.in_flight) == (12, 0)
    assert vendor.calls == []
    assert pipeline.counts("troops") == (12, 0, 0, 0)
    assert pipeline.dlqs["troops"].depth().total == 0


# -- the handler --------------------------------------------------------------------------


@pytest.fixture
def kicked_off_in_lambda_env(
    tmp_path: Path, simulator: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[Any, Config]]:
    """A kicked-off run, and this process given the HARVEST_* environment Lambda would give."""
    from workers.backends import runtime

    sim = simulator()
    config = local_config(tmp_path, sim.url, safety_margin=1.0)
    for name, value in {**config.to_env(), "HARVEST_VENDOR_TOKEN": TOKEN}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("POWERTOOLS_TRACE_DISABLED", "true")
    reset_cache()
    try:
        runtime(config).run_kickoff(WINDOW)
        yield sim, config
    finally:
        reset_cache()


def test_drain_handler_drains_the_stage_its_event_names(
    kicked_off_in_lambda_env: tuple[Any, Config], monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN a kicked-off run and the HARVEST_* environment Lambda would give
    from workers import drain as drain_worker
    from workers.backends import runtime

    sim, config = kicked_off_in_lambda_env
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "true")

    # WHEN the handler is invoked for the troops stage
    result = drain_worker.handler({"stage": "troops"}, LocalContext("drain", 10))

    # THEN it drained that stage and reports it
    assert result["stage"] == "troops"
    assert result["done"] == sim.config.troops
    assert result["runs"] == [RUN]
    assert runtime(config).queues["warriors"].depth().total == (
        sim.config.troops * sim.config.warriors_per_troop
    )


def test_drain_handler_publishes_the_oldest_unsettled_run_age_per_service(
    kicked_off_in_lambda_env: tuple[Any, Config], capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a kicked-off run that the troops drain alone cannot settle
    from workers import drain as drain_worker

    capsys.readouterr()

    # WHEN the troops drain runs
    drain_worker.handler({"stage": "troops"}, LocalContext("drain", 10))

    # THEN it emits OldestUnsettledRunAge with the service dimension alone (what the
    # alarm asks for), beside its per-stage metrics
    blobs = [json.loads(line) for line in capsys.readouterr().out.splitlines() if '"_aws"' in line]
    ages = [b for b in blobs if "OldestUnsettledRunAge" in b]
    assert len(ages) == 1
    [directive] = ages[0]["_aws"]["CloudWatchMetrics"]
    assert directive["Namespace"] == "Harvest"
    assert directive["Dimensions"] == [["service"]]
    assert ages[0]["service"] == "harvest"
    assert ages[0]["OldestUnsettledRunAge"][0] > 0


# -- every message ends somewhere (issue: the deployed path never stalls) ----------------


BAD_IDS = {
    "lone surrogate": "w\ud800x",
    "over 128 characters": "w" * 129,
    "control character": "w\x07",
}


@pytest.mark.parametrize("bad_id", BAD_IDS.values(), ids=BAD_IDS.keys())
def test_child_id_no_envelope_accepts_is_recorded_dead_and_its_siblings_go_on(
    pipeline: Pipeline, vendor: FakeVendor, bad_id: str
) -> None:
    # GIVEN a batch of troops, one of which lists a warrior whose id the child envelope
    # rejects (valid JSON, but no valid entity id)
    vendor.warriors = {f"t{i}": [f"w{i}"] for i in range(9)}
    vendor.warriors["t0"] = ["w0", bad_id]
    pipeline.enqueue(*(troop(f"t{i}") for i in range(9)))

    # WHEN the troops stage drains
    report = pipeline.run("troops")

    # THEN every troop is done and deleted, the good warriors are queued, and the bad one
    # is recorded dead with the reason instead of sitting "queued" forever
    assert (report.done, report.dead, report.retried) == (9, 0, 0)
    assert pipeline.queues["troops"].depth().total == 0
    sent = {Envelope.from_json(m.body).entity_id for m in peek(pipeline.queues["warriors"])}
    assert sent == {f"w{i}" for i in range(9)}
    assert pipeline.counts("warriors") == (10, 0, 0, 1)
    [dead] = pipeline.ledger.dead(RUN)
    assert dead.stage == "warriors"
    assert dead.path[0] == "t0"
    assert "invalid warriors id" in dead.error
    status = pipeline.ledger.status(RUN)
    assert status is not None and status.stages["troops"].pending == 0


def test_body_nested_too_deep_is_dead_lettered_and_the_batch_goes_on(
    pipeline: Pipeline,
) -> None:
    # GIVEN three good troops and a body of 5,000 "[" (under the size limit; the JSON
    # parser gives up with RecursionError, not ValueError)
    pipeline.enqueue(troop(), troop("t2"), troop("t3"))
    pipeline.queues["troops"].send([Outgoing("[" * 5000)])

    # WHEN the troops stage drains
    report = pipeline.run("troops")

    # THEN the deep one is dead with its reason, the others are done: the batch finished
    [dead] = peek(pipeline.dlqs["troops"])
    assert dead.attributes[ERROR_CLASS] == "MessageError"
    assert "not JSON" in dead.attributes[ERROR_MESSAGE]
    assert (report.done, report.dead) == (3, 1)
    assert pipeline.queues["troops"].depth().total == 0


def test_an_exception_escaping_processing_costs_only_its_own_message(
    pipeline: Pipeline, vendor: FakeVendor, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN a vendor client that blows up with an error no handler expects, for one troop
    vendor.warriors = {f"t{i}": [f"w{i}"] for i in range(5)}
    pipeline.enqueue(*(troop(f"t{i}") for i in range(5)))
    real_items = pipeline.client.items

    def items(path: str, entity_id: Any = None, *args: Any, **kwargs: Any) -> Any:
        if "t3" in (entity_id, *dict(entity_id or {}).values()):
            raise RecursionError("maximum recursion depth exceeded")
        return real_items(path, entity_id, *args, **kwargs)

    monkeypatch.setattr(pipeline.client, "items", items)

    # WHEN the troops stage drains
    report = pipeline.run("troops", seconds=1.0)

    # THEN the other four finished; t3 alone comes back for a retry, with the error recorded
    assert (report.done, report.retried) == (4, 1)
    assert pipeline.queues["troops"].depth() == Depth(visible=0, in_flight=1)
    assert "RecursionError" in pipeline.ledger.last_error(RUN, "troops", troop("t3").key)


def receive_times(queue: Queue, times: int) -> None:
    """What drains that died mid-batch leave behind: a message received `times` times."""
    for _ in range(times):
        [m] = queue.receive(1)
        queue.change_visibility([m.receipt], 0)


def test_message_released_at_its_last_receive_is_dead_lettered_not_left_to_sqs(
    pipeline: Pipeline, vendor: FakeVendor
) -> None:
    # GIVEN a troop whose message was received MAX_RECEIVES times by drains that died, so
    # the next receive is the last before SQS moves it to the DLQ unrecorded
    pipeline.enqueue(troop())
    receive_times(pipeline.queues["troops"], MAX_RECEIVES)
    left = [60.0]
    queue = pipeline.queues["troops"]
    real_receive = queue.receive

    def receive_then_run_out(*args: Any, **kwargs: Any) -> list[Message]:
        got = real_receive(*args, **kwargs)
        if got:
            left[0] = 1.0
        return got

    queue.receive = receive_then_run_out  # type: ignore[method-assign]

    # WHEN a drain receives it and runs out of time before processing it
    report = pipeline.drain("troops").run(lambda: left[0], 5.0)

    # THEN it is dead-lettered by the drain, with the reason, and the ledger knows
    assert report.dead == 1
    [dead] = peek(pipeline.dlqs["troops"])
    assert dead.attributes[ERROR_CLASS] == "Released"
    assert "last receive" in dead.attributes[ERROR_MESSAGE]
    assert pipeline.counts("troops") == (1, 0, 0, 1)
    assert vendor.calls == []


def test_unauthorized_at_the_last_receive_dead_letters_with_the_reason(
    pipeline: Pipeline, vendor: FakeVendor
) -> None:
    # GIVEN a rejected token and a troop at its last receive
    vendor.token = "another-token"
    pipeline.enqueue(troop())
    receive_times(pipeline.queues["troops"], MAX_RECEIVES)

    # WHEN the troops stage drains
    report = pipeline.run("troops")

    # THEN the drain stops for the 401, and the message is dead with the 401 as reason
    assert report.stopped == "auth"
    [dead] = peek(pipeline.dlqs["troops"])
    assert "401" in dead.attributes[ERROR_MESSAGE]
    assert pipeline.counts("troops") == (1, 0, 0, 1)


def test_child_that_vanished_from_a_relisted_parent_is_recorded_gone(
    pipeline: Pipeline, vendor: FakeVendor
) -> None:
    # GIVEN a troop whose batch-finish failed after its warriors were recorded (every
    # retry of the send failed), and whose listing then loses w2
    pipeline.enqueue(troop())
    child_queue = pipeline.queues["warriors"]
    real_send = child_queue.send

    def refusing_send(messages: Sequence[Outgoing]) -> None:
        raise QueueError("warriors: 2 messages not accepted by SQS")

    child_queue.send = refusing_send  # type: ignore[method-assign]
    pipeline.run("troops", seconds=1.0)
    assert pipeline.counts("warriors") == (2, 0, 0, 0)
    child_queue.send = real_send  # type: ignore[method-assign]
    vendor.warriors[TROOP] = ["w1"]

    # WHEN the troop comes back and is processed again
    pipeline.clock.advance(VISIBILITY + 1)
    pipeline.run("troops")

    # THEN w1 is queued, and w2 is recorded gone instead of "queued" forever
    sent = [Envelope.from_json(m.body).entity_id for m in peek(pipeline.queues["warriors"])]
    assert sent == ["w1"]
    assert pipeline.counts("warriors") == (2, 0, 1, 0)
    assert pipeline.counts("troops") == (1, 1, 0, 0)


BAD_POINTS = {
    "boolean value": ({"ts": "2024-03-01T00:00:00Z", "value": True}, "not a number"),
    "infinite value": ({"ts": "2024-03-01T00:00:00Z", "value": float("inf")}, "not finite"),
    "nan value": ({"ts": "2024-03-01T00:00:00Z", "value": float("nan")}, "not finite"),
    "string value": ({"ts": "2024-03-01T00:00:00Z", "value": "1.5"}, "not a number"),
    "ts not RFC 3339": ({"ts": "01/03/2024 10:00", "value": 1}, "RFC 3339"),
    "ts not a real day": ({"ts": "2024-02-30T00:00:00Z", "value": 1}, "real instant"),
    "ts before the window": ({"ts": "2024-02-29T23:59:59Z", "value": 1}, "outside the window"),
    "ts at the window end": ({"ts": "2024-03-02T00:00:00Z", "value": 1}, "outside the window"),
    "ts missing": ({"value": 1}, "RFC 3339"),
}


@pytest.mark.parametrize(("point", "says"), BAD_POINTS.values(), ids=BAD_POINTS.keys())
def test_malformed_point_dead_letters_its_data_group_with_the_reason(
    pipeline: Pipeline, vendor: FakeVendor, point: dict[str, Any], says: str
) -> None:
    # GIVEN a data group with a good point and a malformed one, and a good data group
    vendor.points["d1"] = [POINTS[0], point]
    pipeline.enqueue(group("d1"), group("d2"))

    # WHEN the data_groups stage drains
    pipeline.run("data_groups")

    # THEN d1 is dead with the reason and wrote nothing; d2 is written as strict JSON
    [dead] = peek(pipeline.dlqs["data_groups"])
    assert dead.attributes[ERROR_CLASS] == "PoisonError"
    assert says in dead.attributes[ERROR_MESSAGE]
    assert pipeline.counts("data_groups") == (2, 1, 0, 1)
    [record] = read_run(pipeline.sink, RUN)
    assert record["data_group_id"] == "d2"


def test_points_with_offsets_and_fractions_inside_the_window_are_kept_as_sent(
    pipeline: Pipeline, vendor: FakeVendor
) -> None:
    # GIVEN points whose ts use a fraction and a zero offset, and integral values
    points = [
        {"ts": "2024-03-01T00:00:00.250Z", "value": 0},
        {"ts": "2024-03-01T23:59:59+00:00", "value": -7},
    ]
    vendor.points["d1"] = points
    pipeline.enqueue(group("d1"))

    # WHEN the data_groups stage drains
    pipeline.run("data_groups")

    # THEN they are written unchanged
    [record] = read_run(pipeline.sink, RUN)
    assert record["points"] == points


def test_message_of_an_entity_already_done_is_deleted_without_a_vendor_call(
    pipeline: Pipeline, vendor: FakeVendor
) -> None:
    # GIVEN a troop harvested to done, then a stale DLQ copy of its message replayed
    pipeline.enqueue(troop())
    pipeline.run("troops")
    peek(pipeline.queues["warriors"])
    calls = len(vendor.calls)
    stale = {DEAD_STAGE: "troops", DEAD_RECEIVES: "5"}
    pipeline.queues["troops"].send([Outgoing(troop().to_json(), stale)])

    # WHEN the troops stage drains again
    report = pipeline.run("troops")

    # THEN the duplicate is deleted uncalled, and its subtree is not queued again
    assert len(vendor.calls) == calls
    assert (report.skipped, report.done) == (1, 0)
    assert pipeline.queues["troops"].depth().total == 0
    assert pipeline.counts("troops") == (1, 1, 0, 0)
    assert pipeline.counts("warriors") == (2, 0, 0, 0)


def test_dead_entity_is_processed_again_when_replayed(
    pipeline: Pipeline, vendor: FakeVendor
) -> None:
    # GIVEN a data group recorded dead (its message is back from the DLQ)
    pipeline.enqueue(group("d1"))
    pipeline.ledger.finish(RUN, "data_groups", group("d1").key, State.DEAD, "earlier trouble")

    # WHEN the stage drains
    report = pipeline.run("data_groups")

    # THEN it is harvested: only done and gone are skipped
    assert (report.done, report.skipped) == (1, 0)
    assert pipeline.counts("data_groups") == (1, 1, 0, 0)


class Flaky:
    """Wraps a callable; its first `failures` calls raise a throttling-like error."""

    def __init__(self, real: Callable[..., Any], failures: int) -> None:
        self.real, self.failures, self.calls = real, failures, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls <= self.failures:
            raise RuntimeError("ProvisionedThroughputExceededException (simulated)")
        return self.real(*args, **kwargs)


def test_state_store_trouble_is_retried_in_place_before_costing_a_receive(
    pipeline: Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN a ledger and a sink that each fail their first three writes
    finish = Flaky(pipeline.ledger.finish_many, 3)
    put = Flaky(pipeline.sink.put, 3)
    monkeypatch.setattr(pipeline.ledger, "finish_many", finish)
    monkeypatch.setattr(pipeline.sink, "put", put)
    pipeline.enqueue(group("d1"), group("d2"))

    # WHEN the data_groups stage drains once
    report = pipeline.run("data_groups")

    # THEN both were done on their first receive: no retry, nothing dead
    assert (report.done, report.retried, report.dead) == (2, 0, 0)
    assert pipeline.counts("data_groups") == (2, 2, 0, 0)
    assert pipeline.queues["data_groups"].depth().total == 0
    assert finish.calls > 3 and put.calls > 3
    assert len(list(read_run(pipeline.sink, RUN))) == 2


def test_dead_letter_reason_is_kept_when_it_holds_characters_no_store_takes(
    pipeline: Pipeline, vendor: FakeVendor
) -> None:
    # GIVEN a data group whose points carry a lone surrogate in the ts (valid JSON)
    vendor.points["d1"] = [{"ts": "2024-03-01T00:00:00Z\ud800", "value": 1}]
    pipeline.enqueue(group("d1"))

    # WHEN the stage drains
    pipeline.run("data_groups")

    # THEN it is dead with a reason the ledger could store
    [entity] = pipeline.ledger.dead(RUN)
    assert "RFC 3339" in entity.error
    assert pipeline.ledger.status(RUN) is not None


def test_long_retry_after_hides_the_message_that_long_instead_of_sleeping(
    pipeline: Pipeline, vendor: FakeVendor
) -> None:
    # GIVEN a vendor that answers 503 with Retry-After: 86400 for one data group
    vendor.fail["d1"] = 503
    vendor.headers["Retry-After"] = "86400"
    pipeline.enqueue(group("d1"))

    # WHEN the stage drains (the client sleeps nothing: a longer wait than its cap is the
    # queue's)
    report = pipeline.run("data_groups", seconds=5.0)

    # THEN the message is back, hidden for the 12 hours SQS allows at most, not dead
    assert (report.retried, report.dead) == (1, 0)
    pipeline.clock.advance(RETRY_DELAY * 10)
    assert pipeline.queues["data_groups"].depth() == Depth(visible=0, in_flight=1)
    pipeline.clock.advance(12 * 3600)
    assert pipeline.queues["data_groups"].depth() == Depth(visible=1, in_flight=0)


def test_drain_takes_nothing_while_the_vendor_asked_for_a_long_pause(
    pipeline: Pipeline, vendor: FakeVendor
) -> None:
    # GIVEN a budget paused for an hour by a 429 another invocation saw
    pipeline.enqueue(group("d1"))
    pipeline.client._budget.pause(3600)

    # WHEN the stage drains
    report = pipeline.run("data_groups")

    # THEN it stops at once, saying why; the message was not received, no call made
    assert (report.stopped, report.received) == ("paused", 0)
    assert vendor.calls == []
    assert pipeline.queues["data_groups"].depth() == Depth(visible=1, in_flight=0)


@pytest.mark.parametrize(
    ("rate", "latency", "ceiling", "target"),
    [
        (100.0, None, 64, 20),  # nothing seen yet: 100 ms assumed
        (100.0, 0.4, 64, 64),  # 100/s at 400 ms needs 40 in flight (x2 headroom), capped
        (100.0, 0.4, 200, 80),
        (100.0, 0.02, 64, 10),  # at least one batch
        (50.0, 0.2, 1, 1),  # the ceiling wins: the one-at-a-time baseline
    ],
)
def test_in_flight_target_follows_rate_times_latency(
    pipeline: Pipeline, rate: float, latency: float | None, ceiling: int, target: int
) -> None:
    drain = pipeline.drain("data_groups", concurrency=ceiling)
    drain.rate = rate
    for _ in range(0 if latency is None else 100):
        pipeline.client.latency.observe(latency or 0.0)

    assert drain.in_flight_target() == target


def test_finished_messages_of_several_batches_are_recorded_in_one_write_each_25(
    pipeline: Pipeline, vendor: FakeVendor, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN 30 data groups (three receive batches), and a ledger that counts its writes
    ids = data_groups_with_a_point(vendor, 30)
    writes = count_finish_writes(pipeline, monkeypatch)
    monkeypatch.setattr(drain_module, "FLUSH_SECONDS", 3600.0)  # however slow this host
    pipeline.enqueue(*(group(d) for d in ids))

    # WHEN the data_groups stage drains, economical (as on DynamoDB)
    report = pipeline.drain("data_groups", economical=True).run(monotonic_deadline(10.0), 0.0)

    # THEN all are done, recorded and deleted: a full batch of 25 as soon as there was one,
    # the 5 left at the end, rather than one write per receive batch
    assert report.done == 30
    assert pipeline.counts("data_groups") == (30, 30, 0, 0)
    assert pipeline.queues["data_groups"].depth().total == 0
    assert writes == [FLUSH_ENTRIES, 30 - FLUSH_ENTRIES]


def test_a_message_whose_outcome_cannot_be_recorded_is_not_deleted(
    pipeline: Pipeline, vendor: FakeVendor, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN a ledger that refuses every finish
    vendor.points["d1"] = [POINTS[0]]
    monkeypatch.setattr(pipeline.ledger, "finish_many", Flaky(pipeline.ledger.finish_many, 99))
    pipeline.enqueue(group("d1"))

    # WHEN the data_groups stage drains
    pipeline.run("data_groups", seconds=2.0)

    # THEN its message stays (in flight: it comes back), and nothing counts it done
    assert pipeline.queues["data_groups"].depth().total == 1
    assert pipeline.counts("data_groups") == (1, 0, 0, 0)


def test_in_flight_target_counts_the_time_a_message_holds_its_thread_after_its_call(
    pipeline: Pipeline, vendor: FakeVendor, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN a vendor answering in 20 ms but a sink taking 80 ms a write, at 200 calls/s
    ids = data_groups_with_a_point(vendor, 20)
    real_put = pipeline.sink.put

    def slow_put(key: str, blob: bytes, content_type: str) -> str:
        time.sleep(0.08)
        return real_put(key, blob, content_type)

    monkeypatch.setattr(pipeline.sink, "put", slow_put)
    drain = pipeline.drain("data_groups", concurrency=64)
    drain.rate = 200.0
    for _ in range(100):
        pipeline.client.latency.observe(0.02)
    assert drain.in_flight_target() == 10  # from the call alone: 200 x 0.02 x 2 = 8

    # WHEN it has drained some messages
    pipeline.enqueue(*(group(d) for d in ids))
    drain.run(monotonic_deadline(10.0), 0.0)

    # THEN it keeps enough in flight for call and write: 200 x >= 0.08 x 2 >= 32
    assert drain.in_flight_target() >= 32


def test_every_batch_is_recorded_at_once_and_every_message_looked_up_unless_economical(
    pipeline: Pipeline, vendor: FakeVendor, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN 30 data groups, one of them done already though its message is a first delivery
    # (its parent sent it again after a crash), and a ledger that counts its writes
    ids = data_groups_with_a_point(vendor, 30)
    pipeline.enqueue(*(group(d) for d in ids))
    pipeline.ledger.finish(RUN, "data_groups", group("d0").key, State.DONE)
    writes = count_finish_writes(pipeline, monkeypatch)

    # WHEN the stage drains as locally (SQLite: not economical)
    report = pipeline.run("data_groups")

    # THEN the done one is skipped uncalled, and every batch was recorded by itself
    assert (report.done, report.skipped) == (29, 1)
    assert sum(writes) == 29
    assert len(writes) >= 3


def test_replayed_parent_sqs_redrove_itself_settles_what_its_first_listing_recorded(
    pipeline: Pipeline, vendor: FakeVendor
) -> None:
    # GIVEN a troop whose first attempt recorded warriors w1 and w2 (w1 harvested since),
    # then whose message SQS moved to the DLQ itself (no dead-letter attributes of ours);
    # the vendor no longer lists w2
    w1, w2 = (troop().child("warriors", w) for w in ("w1", "w2"))
    pipeline.ledger.enqueued(RUN, "troops", [(troop().key, troop().path)])
    pipeline.ledger.enqueued(
        RUN, "warriors", [(w.key, w.path) for w in (w1, w2)], ("troops", troop().key)
    )
    pipeline.ledger.finish(RUN, "warriors", w1.key, State.DONE)
    pipeline.dlqs["troops"].send([Outgoing(troop().to_json())])
    vendor.warriors[TROOP] = ["w1"]

    # WHEN the DLQ is replayed and the troops stage drains, economical (as on DynamoDB)
    replay(pipeline.dlqs["troops"], pipeline.queues["troops"])
    pipeline.drain("troops", economical=True).run(monotonic_deadline(5.0), 0.0)

    # THEN w2 is recorded gone rather than queued for ever, and done w1 is not sent again
    assert pipeline.counts("warriors") == (2, 1, 1, 0)
    assert peek(pipeline.queues["warriors"]) == []


def test_past_the_deadline_finished_messages_are_recorded_without_waiting_for_company(
    pipeline: Pipeline, vendor: FakeVendor, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN a batch of ten quick data groups, then a batch of nine quick ones and one whose
    # write hangs until released; economical, so the first batch waits for company
    first = [f"a{i}" for i in range(10)]
    second = [f"b{i}" for i in range(9)]
    for d in [*first, *second, "slow"]:
        vendor.points[d] = [POINTS[0]]
    slow_started, release = threading.Event(), threading.Event()
    real_put = pipeline.sink.put

    def put(key: str, blob: bytes, content_type: str) -> str:
        if group("slow").key in key:
            slow_started.set()
            release.wait(10.0)
        return real_put(key, blob, content_type)

    monkeypatch.setattr(pipeline.sink, "put", put)
    pipeline.enqueue(*(group(d) for d in first))
    pipeline.enqueue(group("slow"), *(group(d) for d in second))
    # the invocation reaches its safety margin once the slow one is under way
    remaining = lambda: 0.0 if slow_started.is_set() else 10.0  # noqa: E731
    seen: list[int] = []

    def watch() -> None:
        # WHEN the loop has stopped while the slow message still hangs
        slow_started.wait(10.0)
        for _ in range(60):
            seen.append(pipeline.queues["data_groups"].depth().total)
            if seen[-1] == 10:
                break
            time.sleep(0.05)
        release.set()

    watcher = threading.Thread(target=watch)
    watcher.start()
    pipeline.drain("data_groups", concurrency=10, economical=True).run(remaining, 1.0)
    watcher.join()

    # THEN the first batch was recorded and deleted while the second waited on its slow one
    # (of which those not started by the deadline were given back)
    assert seen[-1] == 10
    keys = [group(d).key for d in first]
    assert pipeline.ledger.finished(RUN, "data_groups", keys) == set(keys)


class _Recorder:
    """A queue and ledger that only remember what was deleted and recorded."""

    def __init__(self) -> None:
        self.deleted: list[str] = []
        self.recorded: list[Any] = []

    def delete(self, receipts: Sequence[str]) -> None:
        self.deleted.extend(receipts)

    def finish_many(self, run_id: str, stage: str, entries: Sequence[Any]) -> None:
        self.recorded.extend(entries)


def test_a_finished_message_among_many_skips_is_recorded_within_flush_seconds(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [0.0]
    monkeypatch.setattr(drain_module, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    store = _Recorder()
    drain = Drain(
        stage("data_groups"),
        queue=store,  # type: ignore[arg-type]
        dlq=store,  # type: ignore[arg-type]
        child_queue=None,
        upstream=[],
        client=None,  # type: ignore[arg-type]
        sink=None,  # type: ignore[arg-type]
        ledger=store,  # type: ignore[arg-type]
        stats=None,  # type: ignore[arg-type]
        economical=True,
    )
    # GIVEN one done message among skipped ones (copies of entities done already)
    drain._settle([(("run", ("k0", State.DONE, "")), "r0")] + [(None, f"s{i}") for i in range(98)])

    # WHEN more skips finish every 2 s, the loop's head looking after each
    for t in range(1, 4):
        now[0] = 2.0 * t
        drain._settle([(None, f"x{t}")])
        drain._flush(older_than=FLUSH_SECONDS)

    # THEN the done one is recorded and deleted: past 100 waiting, or past FLUSH_SECONDS
    assert "r0" in store.deleted
    assert store.recorded == [("k0", State.DONE, "")]


def test_a_token_check_after_a_401_that_fails_otherwise_does_not_keep_the_drains_stopped(
    tmp_path: Path,
    simulator: Callable[..., Any],
    local_runtime: Callable[[Config], Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GIVEN a run kicked off, drains stopped by a 401, and a vendor that then refuses the
    # one-item check page for another reason (a 5xx, a page size it does not take)
    sim = simulator(troops=2, warriors_per_troop=1, data_groups_per_warrior=1)
    rt = local_runtime(local_config(tmp_path, sim.url))
    rt.run_kickoff(WINDOW)
    rt.auth_failed.stop("GET /v1/troops: 401 unauthorized")

    def refused() -> None:
        raise RetryableError("GET /v1/troops: 503 after 4 attempts")

    monkeypatch.setattr(rt, "_probe", refused)

    # WHEN the next drain invocation comes
    report = rt.run_drain("troops", monotonic_deadline(5))

    # THEN it drains: the check says nothing about the token, the messages say the rest
    assert report.stopped != "auth"
    assert report.done == 2
    assert not rt.auth_failed.is_set()


def receive_waits(queue: Queue) -> list[float]:
    """What each receive of `queue` from now on was allowed to wait, in order."""
    real_receive = queue.receive
    waits: list[float] = []

    def receive(max_messages: int = 10, wait_seconds: float = 0.0) -> list[Message]:
        waits.append(wait_seconds)
        return real_receive(max_messages, wait_seconds)

    queue.receive = receive  # type: ignore[method-assign]
    return waits


def test_at_a_runs_tail_the_drain_does_not_long_poll_while_its_own_work_runs(
    pipeline: Pipeline, vendor: FakeVendor
) -> None:
    # GIVEN ten data groups (one full receive batch: nothing says the queue is now empty)
    # whose calls take 0.3 s each, and a drain whose long poll (30 s) would outlast them
    ids = data_groups_with_a_point(vendor, 10)
    vendor.on_call = lambda _count: time.sleep(0.3)
    pipeline.enqueue(*(group(d) for d in ids))
    drain = pipeline.drain("data_groups", concurrency=10)
    drain.wait_seconds = 30.0
    waits = receive_waits(pipeline.queues["data_groups"])

    # WHEN it drains them
    report = drain.run(monotonic_deadline(60.0), 0.0)

    # THEN all are done and it stopped idle; the receive that took the batch was the only
    # one allowed to wait: while the work ran, no receive waited (a long poll of the empty
    # queue would have held the run's end by up to 30 s)
    assert report.done == 10 and report.stopped == "idle"
    assert waits[0] == 30.0
    assert len(waits) >= 2
    assert all(wait == 0.0 for wait in waits[1:])
    assert pipeline.counts("data_groups") == (10, 10, 0, 0)


def test_while_its_own_call_stalls_the_drain_looks_at_the_queue_about_as_often_as_it_long_polls(
    pipeline: Pipeline, vendor: FakeVendor
) -> None:
    # GIVEN one data group whose call stalls 3 s, and a drain with the deployed 1 s long poll
    vendor.points["d1"] = [POINTS[0]]
    vendor.on_call = lambda _count: time.sleep(3.0)
    pipeline.enqueue(group("d1"))
    drain = pipeline.drain("data_groups")
    drain.wait_seconds = 1.0
    receives = receive_waits(pipeline.queues["data_groups"])

    # WHEN it drains it
    report = drain.run(monotonic_deadline(60.0), 0.0)

    # THEN it is done, having looked at the empty queue a handful of times during the 3 s
    # (0.1 + 0.2 + 0.4 + 0.8 + 1 + 1 s apart: at most 7 looks, 3 long polls before), not
    # every 0.1 s (30)
    assert report.done == 1 and report.stopped == "idle"
    assert len(receives) <= 9, receives


def past_the_margin_after_a_receive(queue: Queue) -> Callable[[], float]:
    """Remaining time that falls to 7 s (inside a 10 s safety margin, not past half of it)
    once `queue` has been received from."""
    left = [60.0]
    real_receive = queue.receive

    def receive(max_messages: int = 10, wait_seconds: float = 0.0) -> list[Message]:
        got = real_receive(max_messages, wait_seconds)
        left[0] = 7.0
        return got

    queue.receive = receive  # type: ignore[method-assign]
    return lambda: left[0]


def test_past_its_deadline_a_drain_takes_messages_only_for_the_budget_slots_it_holds(
    pipeline: Pipeline, vendor: FakeVendor, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN 40 data groups, a drain whose deadline comes after its first batch, and a budget
    # holding slots claimed ahead (as a DynamoBudget does): 15 now, one fewer per call
    ids = data_groups_with_a_point(vendor, 40)
    pipeline.enqueue(*(group(d) for d in ids))
    held = [15]
    told: list[bool] = []
    client = pipeline.client
    monkeypatch.setattr(client, "budget_held", lambda: held[0])
    monkeypatch.setattr(client, "winding_down", told.append)
    vendor.on_call = lambda _count: held.__setitem__(0, max(0, held[0] - 1))
    remaining = past_the_margin_after_a_receive(pipeline.queues["data_groups"])

    # WHEN it drains
    report = pipeline.drain("data_groups").run(remaining, 10.0)

    # THEN it told the budget it winds down (after being told at its start it does not),
    # took more than its first batch while it held slots, stopped for its deadline when
    # they ran out, and left the rest queued
    assert told[0] is False and True in told
    assert report.stopped == "deadline"
    assert 10 < report.received < 40
    assert held[0] == 0
    assert pipeline.queues["data_groups"].depth().total == 40 - report.done


def test_past_its_deadline_with_slots_held_and_the_queue_empty_a_drain_stops_at_once(
    pipeline: Pipeline, vendor: FakeVendor, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN one batch of data groups, a deadline that comes with it, a budget that keeps
    # holding many slots, nothing else queued here, and a warrior still queued upstream (so
    # the stage is not idle)
    ids = data_groups_with_a_point(vendor, 10)
    pipeline.enqueue(*(group(d) for d in ids))
    pipeline.enqueue(Envelope(RUN, "warriors", (TROOP, "w9"), WINDOW))
    monkeypatch.setattr(pipeline.client, "budget_held", lambda: 50)
    receives = receive_waits(pipeline.queues["data_groups"])
    remaining = past_the_margin_after_a_receive(pipeline.queues["data_groups"])

    # WHEN it drains
    report = pipeline.drain("data_groups").run(remaining, 10.0)

    # THEN it stopped for its deadline after the first empty look, not polling the empty
    # queue for the rest of its wind-down
    assert report.stopped == "deadline" and report.done == 10
    assert len(receives) <= 3, receives


def test_a_drain_whose_queue_runs_dry_gives_back_the_budget_slots_its_work_cannot_use(
    pipeline: Pipeline, vendor: FakeVendor, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN 25 data groups, and the budget's give_back watched
    ids = data_groups_with_a_point(vendor, 25)
    pipeline.enqueue(*(group(d) for d in ids))
    queue = pipeline.queues["data_groups"]
    kept: list[tuple[int, int]] = []  # (keep, messages taken and not yet deleted)

    def give_back(keep: int) -> int:
        kept.append((keep, queue.depth().in_flight))
        return 0

    monkeypatch.setattr(pipeline.client, "give_back_budget", give_back)

    # WHEN it drains them
    report = pipeline.drain("data_groups").run(lambda: 60.0, 10.0)

    # THEN when it found its queue empty it gave back the slots beyond what its messages in
    # process could use, and at its end all of them
    assert report.done == 25
    assert len(kept) >= 2
    assert all(keep <= taken for keep, taken in kept)
    assert kept[-1] == (0, 0)
