"""The drain loop on embedded queues against a `responses` vendor that follows vendor-api.md.

What is asserted is where things end up: which queue or DLQ holds a message (with which
attributes), what the ledger counts, what landed in the sink.
"""

from __future__ import annotations

import json
import re
import threading
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

from pipeline.budget import PacedBudget
from pipeline.drain import (
    DEAD_RECEIVES,
    DEAD_STAGE,
    ERROR_CLASS,
    ERROR_MESSAGE,
    Drain,
    DrainReport,
    monotonic_deadline,
)
from pipeline.envelope import MAX_BODY_BYTES, Envelope
from pipeline.ledger import SqliteLedger
from pipeline.local import LocalContext
from pipeline.queues import (
    Depth,
    LocalQueue,
    LocalQueueStore,
    Message,
    Outgoing,
    Queue,
    QueueError,
    SqsQueue,
)
from pipeline.runtime import reset_cache
from pipeline.sinks import DirectorySink, read_run
from pipeline.stages import STAGE_NAMES, stage, upstream
from pipeline.stats import CallStats
from pipeline.vendor import VendorClient

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

    def drain(self, stage_name: str, concurrency: int = 4) -> Drain:
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


def test_troop_stays_queued_when_sending_its_children_fails(pipeline: Pipeline) -> None:
    # GIVEN a warriors queue that refuses the first send
    pipeline.enqueue(troop())
    child_queue = pipeline.queues["warriors"]
    real_send = child_queue.send
    refusals = [QueueError("warriors: 2 messages not accepted by SQS")]

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


# -- output -------------------------------------------------------------------------------


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


def test_drain_handler_drains_the_stage_its_event_names(
    tmp_path: Path,
    simulator: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # GIVEN a kicked-off run and the HARVEST_* environment Lambda would give
    from pipeline.runtime import runtime
    from workers import drain as drain_worker

    sim = simulator()
    config = local_config(tmp_path, sim.url, safety_margin=1.0)
    for name, value in {**config.to_env(), "HARVEST_VENDOR_TOKEN": TOKEN}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("POWERTOOLS_METRICS_DISABLED", "true")
    monkeypatch.setenv("POWERTOOLS_TRACE_DISABLED", "true")
    reset_cache()
    try:
        runtime(config).run_kickoff(WINDOW)

        # WHEN the handler is invoked for the troops stage
        result = drain_worker.handler({"stage": "troops"}, LocalContext("drain", 10))

        # THEN it drained that stage and reports it
        assert result["stage"] == "troops"
        assert result["done"] == sim.config.troops
        assert result["runs"] == [RUN]
        assert runtime(config).queues["warriors"].depth().total == (
            sim.config.troops * sim.config.warriors_per_troop
        )
    finally:
        reset_cache()
