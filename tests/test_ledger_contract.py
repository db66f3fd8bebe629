"""The Ledger contract, run against SqliteLedger and DynamoLedger (moto).

Counts must be exact under at-least-once delivery: every write is idempotent, dead never
overwrites done or gone, and a replayed entity that finally succeeds becomes done.
"""

from __future__ import annotations

import types
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import pytest
from aws_fakes import REGION, state_table
from fake_clock import FakeClock
from moto import mock_aws

import pipeline.aws.ledger
import pipeline.local.ledger
from pipeline.aws.ledger import DynamoLedger
from pipeline.ledger import DeadEntity, Ledger, StageCounts, State
from pipeline.local.ledger import SqliteLedger

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

RUN = "20240101T000000Z-20240102T000000Z"
FROM, TO = "2024-01-01T00:00:00Z", "2024-01-02T00:00:00Z"
TROOP = ("troop/1?#%+ ..",)
WARRIOR = (*TROOP, "wárrior 漢字 🚀")


@pytest.fixture(scope="module")
def dynamodb() -> Iterator[DynamoDBClient]:
    with mock_aws():
        yield boto3.client("dynamodb", region_name=REGION)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    """Drive the ledger's wall clock (run start and completion times)."""
    fake = FakeClock(1_700_000_000.0)
    for module in (pipeline.aws.ledger, pipeline.local.ledger):
        monkeypatch.setattr(module, "time", types.SimpleNamespace(time=fake.time))
    return fake


@pytest.fixture(params=["sqlite", "dynamo"])
def ledger(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> Ledger:
    if request.param == "sqlite":
        return SqliteLedger(tmp_path / "ledger.sqlite")
    ddb: DynamoDBClient = request.getfixturevalue("dynamodb")
    return DynamoLedger(ddb, state_table(ddb, f"state-{uuid.uuid4().hex[:12]}"))


def started(ledger: Ledger, run_id: str = RUN) -> Ledger:
    ledger.start_run(run_id, FROM, TO)
    return ledger


def counts(ledger: Ledger, stage: str, run_id: str = RUN) -> StageCounts:
    status = ledger.status(run_id)
    assert status is not None
    return status.stages[stage]


# -- runs ----------------------------------------------------------------------------------


def test_status_is_none_when_run_is_unknown(ledger: Ledger) -> None:
    assert ledger.status("never-started") is None


def test_start_run_records_window_and_start_time(ledger: Ledger, clock: FakeClock) -> None:
    started(ledger)

    status = ledger.status(RUN)

    assert status is not None
    assert (status.window_from, status.window_to) == (FROM, TO)
    assert status.started_at == clock.now
    assert status.completed_at is None
    assert not status.kicked_off
    assert {name: c.enqueued for name, c in status.stages.items()} == {
        "troops": 0,
        "warriors": 0,
        "data_groups": 0,
    }


def test_start_run_is_idempotent_when_called_again(ledger: Ledger, clock: FakeClock) -> None:
    # GIVEN a started run
    started(ledger)
    first = ledger.status(RUN)

    # WHEN it is started again later (a rerun of the same window)
    clock.advance(60)
    ledger.start_run(RUN, "2030-01-01T00:00:00Z", "2030-01-02T00:00:00Z")

    # THEN nothing about it changes
    assert ledger.status(RUN) == first
    assert ledger.runs() == [RUN]


def test_runs_lists_newest_first(ledger: Ledger, clock: FakeClock) -> None:
    for run_id in ("run-a", "run-b", "run-c"):
        started(ledger, run_id)
        clock.advance(10)

    assert ledger.runs() == ["run-c", "run-b", "run-a"]


def test_runs_keeps_order_when_an_old_run_is_started_again(
    ledger: Ledger, clock: FakeClock
) -> None:
    # GIVEN two runs, a then b
    started(ledger, "run-a")
    clock.advance(10)
    started(ledger, "run-b")
    clock.advance(10)

    # WHEN run a is started again (kickoff retried for its window)
    started(ledger, "run-a")

    # THEN it keeps its original start time and place
    assert ledger.runs() == ["run-b", "run-a"]


def test_runs_is_empty_when_nothing_started(ledger: Ledger) -> None:
    assert ledger.runs() == []


# -- entity states -------------------------------------------------------------------------


def test_enqueued_counts_once_when_recorded_twice(ledger: Ledger) -> None:
    started(ledger)

    ledger.enqueued(RUN, "troops", [("k1", TROOP), ("k2", ("t2",))])
    ledger.enqueued(RUN, "troops", [("k1", TROOP)])

    assert counts(ledger, "troops") == StageCounts(enqueued=2)


def test_enqueued_keeps_final_state_when_recorded_again(ledger: Ledger) -> None:
    # GIVEN an entity already done
    started(ledger)
    ledger.enqueued(RUN, "troops", [("k1", TROOP)])
    ledger.finish(RUN, "troops", "k1", State.DONE)

    # WHEN its parent is redelivered and enqueues it again
    ledger.enqueued(RUN, "troops", [("k1", TROOP)])

    # THEN it stays done
    assert counts(ledger, "troops") == StageCounts(enqueued=1, done=1)


def test_finish_counts_done_gone_and_dead(ledger: Ledger) -> None:
    started(ledger)
    ledger.enqueued(RUN, "warriors", [(f"k{i}", (*TROOP, f"w{i}")) for i in range(5)])

    ledger.finish(RUN, "warriors", "k0", State.DONE)
    ledger.finish(RUN, "warriors", "k1", State.DONE)
    ledger.finish(RUN, "warriors", "k2", State.GONE)
    ledger.finish(RUN, "warriors", "k3", State.DEAD, "PoisonError: 400")

    c = counts(ledger, "warriors")
    assert c == StageCounts(enqueued=5, done=2, gone=1, dead=1)
    assert c.pending == 1
    assert counts(ledger, "troops") == StageCounts()


def test_finish_counts_once_when_delivered_twice(ledger: Ledger) -> None:
    started(ledger)
    ledger.enqueued(RUN, "troops", [("k1", TROOP)])

    ledger.finish(RUN, "troops", "k1", State.DONE)
    ledger.finish(RUN, "troops", "k1", State.DONE)

    assert counts(ledger, "troops") == StageCounts(enqueued=1, done=1)


def test_finish_many_records_every_entry(ledger: Ledger) -> None:
    started(ledger)
    ledger.enqueued(RUN, "troops", [("a", ("a",)), ("b", ("b",)), ("c", ("c",))])

    ledger.finish_many(
        RUN, "troops", [("a", State.DONE, ""), ("b", State.GONE, ""), ("c", State.DEAD, "boom")]
    )

    assert counts(ledger, "troops") == StageCounts(enqueued=3, done=1, gone=1, dead=1)


def test_finished_names_only_done_and_gone_entities(ledger: Ledger) -> None:
    # GIVEN entities in every state, and one never enqueued
    started(ledger)
    keys = [f"k{i}" for i in range(4)]
    ledger.enqueued(RUN, "troops", [(k, (k,)) for k in keys])
    ledger.finish_many(
        RUN, "troops", [("k0", State.DONE, ""), ("k1", State.GONE, ""), ("k2", State.DEAD, "x")]
    )

    # WHEN asked which are finished
    found = ledger.finished(RUN, "troops", [*keys, "unknown"])

    # THEN only done and gone count: dead and queued entities still have work to do
    assert found == {"k0", "k1"}


def test_finished_answers_for_more_keys_than_one_batch(ledger: Ledger) -> None:
    started(ledger)
    keys = [f"k{i:03d}" for i in range(250)]
    ledger.enqueued(RUN, "troops", [(k, (k,)) for k in keys])
    ledger.finish_many(RUN, "troops", [(k, State.DONE, "") for k in keys[::2]])

    assert ledger.finished(RUN, "troops", keys) == set(keys[::2])


@pytest.mark.parametrize("final", [State.DONE, State.GONE])
def test_dead_does_not_overwrite_when_already_final(ledger: Ledger, final: str) -> None:
    # GIVEN an entity that finished
    started(ledger)
    ledger.enqueued(RUN, "troops", [("k1", TROOP)])
    ledger.finish(RUN, "troops", "k1", final)

    # WHEN a late duplicate of its message dies
    ledger.finish(RUN, "troops", "k1", State.DEAD, "RetryableError: 503")
    ledger.finish_many(RUN, "troops", [("k1", State.DEAD, "RetryableError: 503")])

    # THEN the first outcome stands
    assert counts(ledger, "troops") == StageCounts(
        enqueued=1, done=int(final == State.DONE), gone=int(final == State.GONE)
    )
    assert ledger.dead(RUN) == []


def test_done_overwrites_dead_when_replayed(ledger: Ledger) -> None:
    # GIVEN a dead entity
    started(ledger)
    ledger.enqueued(RUN, "troops", [("k1", TROOP)])
    ledger.finish(RUN, "troops", "k1", State.DEAD, "RetryableError: 503")

    # WHEN its replayed message succeeds
    ledger.finish(RUN, "troops", "k1", State.DONE)

    # THEN it counts as done, no longer dead
    assert counts(ledger, "troops") == StageCounts(enqueued=1, done=1)
    assert ledger.dead(RUN) == []


def test_gone_overwrites_dead_when_replayed(ledger: Ledger) -> None:
    started(ledger)
    ledger.enqueued(RUN, "troops", [("k1", TROOP)])
    ledger.finish(RUN, "troops", "k1", State.DEAD, "RetryableError: 503")

    ledger.finish(RUN, "troops", "k1", State.GONE)

    assert counts(ledger, "troops") == StageCounts(enqueued=1, gone=1)


def test_dead_lists_path_and_error_of_each_dead_entity(ledger: Ledger) -> None:
    started(ledger)
    ledger.enqueued(RUN, "troops", [("t", TROOP)])
    ledger.enqueued(RUN, "warriors", [("w", WARRIOR), ("ok", (*TROOP, "fine"))])
    ledger.finish(RUN, "troops", "t", State.DEAD, "PoisonError: 400 bad cursor")
    ledger.finish(RUN, "warriors", "w", State.DEAD, "RetryableError: 503 «vendor» ✗")
    ledger.finish(RUN, "warriors", "ok", State.DONE)

    dead = ledger.dead(RUN)

    assert sorted(dead, key=lambda d: d.stage) == [
        DeadEntity("troops", TROOP, "PoisonError: 400 bad cursor"),
        DeadEntity("warriors", WARRIOR, "RetryableError: 503 «vendor» ✗"),
    ]


def test_runs_are_counted_apart(ledger: Ledger) -> None:
    started(ledger, "run-a")
    started(ledger, "run-b")
    ledger.enqueued("run-a", "troops", [("k1", TROOP)])
    ledger.finish("run-a", "troops", "k1", State.DEAD, "x")

    assert counts(ledger, "troops", "run-b") == StageCounts()
    assert ledger.dead("run-b") == []


# -- errors and stats ----------------------------------------------------------------------


def test_last_error_returns_the_latest_recorded_error(ledger: Ledger) -> None:
    started(ledger)
    ledger.enqueued(RUN, "troops", [("k1", TROOP)])

    ledger.record_error(RUN, "troops", "k1", "RetryableError: 502")
    ledger.record_error(RUN, "troops", "k1", "RateLimitedError: 429 ✗")

    assert ledger.last_error(RUN, "troops", "k1") == "RateLimitedError: 429 ✗"
    assert counts(ledger, "troops") == StageCounts(enqueued=1)


def test_last_error_is_empty_when_none_recorded(ledger: Ledger) -> None:
    started(ledger)
    ledger.enqueued(RUN, "troops", [("k1", TROOP)])

    assert ledger.last_error(RUN, "troops", "k1") == ""
    assert ledger.last_error(RUN, "troops", "unknown") == ""


def test_record_error_of_an_unknown_entity_counts_nowhere(ledger: Ledger) -> None:
    started(ledger)
    ledger.enqueued(RUN, "troops", [("k1", TROOP)])

    ledger.record_error(RUN, "troops", "never-enqueued", "RetryableError: 503")

    assert counts(ledger, "troops") == StageCounts(enqueued=1)
    assert ledger.pending(RUN, "troops") == [("k1", TROOP)]
    assert ledger.dead(RUN) == []


def test_record_error_leaves_a_finished_entity_as_it_was(ledger: Ledger) -> None:
    started(ledger)
    ledger.enqueued(RUN, "troops", [("k1", TROOP)])
    ledger.finish(RUN, "troops", "k1", State.DONE)

    ledger.record_error(RUN, "troops", "k1", "RetryableError: 503 from a late duplicate")

    assert counts(ledger, "troops") == StageCounts(enqueued=1, done=1)
    assert ledger.finished(RUN, "troops", ["k1"]) == {"k1"}


def test_add_stats_accumulates_when_called_repeatedly(ledger: Ledger) -> None:
    started(ledger)

    ledger.add_stats(RUN, calls=10, rate_limited=1)
    ledger.add_stats(RUN, calls=5, retries=2, rate_limited=0)
    ledger.add_stats(RUN, not_a_stat=99)

    status = ledger.status(RUN)
    assert status is not None
    assert dict(status.stats) == {"calls": 15, "rate_limited": 1, "retries": 2}


# -- settled and complete ------------------------------------------------------------------


def test_run_is_not_settled_when_not_kicked_off(ledger: Ledger) -> None:
    # GIVEN every troop recorded so far is done, but the kickoff has not finished listing
    started(ledger)
    ledger.enqueued(RUN, "troops", [("k1", TROOP)])
    ledger.finish(RUN, "troops", "k1", State.DONE)

    status = ledger.status(RUN)

    assert status is not None
    assert not status.settled
    assert not status.complete


def test_run_is_not_settled_when_entities_are_pending(ledger: Ledger) -> None:
    started(ledger)
    ledger.enqueued(RUN, "troops", [("k1", TROOP)])
    ledger.kicked_off(RUN)
    ledger.finish(RUN, "troops", "k1", State.DONE)
    ledger.enqueued(RUN, "warriors", [("w", WARRIOR)])

    status = ledger.status(RUN)

    assert status is not None
    assert status.kicked_off
    assert not status.settled


def test_run_is_complete_when_kicked_off_and_everything_done_or_gone(ledger: Ledger) -> None:
    started(ledger)
    ledger.enqueued(RUN, "troops", [("k1", TROOP), ("k2", ("t2",))])
    ledger.kicked_off(RUN)
    ledger.finish(RUN, "troops", "k1", State.DONE)
    ledger.finish(RUN, "troops", "k2", State.GONE)

    status = ledger.status(RUN)

    assert status is not None
    assert status.settled
    assert status.complete
    assert status.dead == 0


def test_run_is_settled_but_not_complete_when_something_is_dead(ledger: Ledger) -> None:
    started(ledger)
    ledger.enqueued(RUN, "troops", [("k1", TROOP), ("k2", ("t2",))])
    ledger.kicked_off(RUN)
    ledger.finish(RUN, "troops", "k1", State.DONE)
    ledger.finish(RUN, "troops", "k2", State.DEAD, "PoisonError: 400")

    status = ledger.status(RUN)

    assert status is not None
    assert status.settled
    assert not status.complete
    assert status.dead == 1


def test_empty_run_is_complete_when_kicked_off(ledger: Ledger) -> None:
    # An account with no troops: nothing to wait for.
    started(ledger)
    ledger.kicked_off(RUN)

    status = ledger.status(RUN)

    assert status is not None
    assert status.complete


def test_mark_completed_is_true_only_for_the_first_call(ledger: Ledger, clock: FakeClock) -> None:
    started(ledger)
    ledger.kicked_off(RUN)
    clock.advance(5)

    first = ledger.mark_completed(RUN)
    clock.advance(5)
    second = ledger.mark_completed(RUN)

    status = ledger.status(RUN)
    assert (first, second) == (True, False)
    assert status is not None
    assert status.completed_at == clock.now - 5


# -- what keeps every run settling ---------------------------------------------------------


def test_children_are_remembered_under_their_parent(ledger: Ledger) -> None:
    started(ledger)
    ledger.enqueued(RUN, "warriors", [("w1", WARRIOR), ("w2", (*TROOP, "w2"))], ("troops", "t"))
    ledger.enqueued(RUN, "warriors", [("w3", (*TROOP, "w3"))], ("troops", "other"))

    assert ledger.children(RUN, "troops", "t") == {"w1", "w2"}
    assert ledger.children(RUN, "troops", "nobody") == set()


def test_enqueued_many_records_each_parents_listing(ledger: Ledger) -> None:
    # GIVEN 30 parents' listings recorded at once (more than one DynamoDB batch of items)
    started(ledger)
    listings = [
        (("troops", f"t{p}"), [(f"w{p}-{c}", (f"t{p}", f"w{c}")) for c in range(3)])
        for p in range(30)
    ]

    ledger.enqueued_many(RUN, "warriors", listings)

    assert counts(ledger, "warriors") == StageCounts(enqueued=90)
    assert ledger.children(RUN, "troops", "t29") == {"w29-0", "w29-1", "w29-2"}
    assert ("w7-2", ("t7", "w2")) in ledger.pending(RUN, "warriors")


def test_a_relisting_that_names_other_children_adds_to_them(ledger: Ledger) -> None:
    # GIVEN a parent listed twice (redelivered), the second time naming one child more
    started(ledger)
    first = [("w1", WARRIOR), ("w2", (*TROOP, "w2"))]
    ledger.enqueued(RUN, "warriors", first, ("troops", "t"))
    ledger.enqueued(RUN, "warriors", [*first, ("w3", (*TROOP, "w3"))], ("troops", "t"))

    # THEN every child either listing named counts once
    assert ledger.children(RUN, "troops", "t") == {"w1", "w2", "w3"}
    assert counts(ledger, "warriors") == StageCounts(enqueued=3)


def test_a_listing_larger_than_one_item_is_recorded_whole(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN a listing that does not fit one stored item (made small here)
    monkeypatch.setattr(pipeline.aws.ledger, "LISTING_CHUNK_BYTES", 1_000)
    started(ledger)
    children = [(f"k{i:04d}", (*TROOP, f"w{i}")) for i in range(300)]

    ledger.enqueued(RUN, "warriors", children, ("troops", "t"))
    ledger.finish(RUN, "warriors", "k0007", State.DONE)

    assert counts(ledger, "warriors") == StageCounts(enqueued=300, done=1)
    assert len(ledger.pending(RUN, "warriors")) == 299
    assert ledger.children(RUN, "troops", "t") == {k for k, _ in children}


def test_finish_pending_changes_only_queued_entities(ledger: Ledger) -> None:
    started(ledger)
    ledger.enqueued(RUN, "troops", [("a", ("a",)), ("b", ("b",)), ("c", ("c",))])
    ledger.finish(RUN, "troops", "a", State.DONE)
    ledger.finish(RUN, "troops", "b", State.DEAD, "earlier")

    changed = ledger.finish_pending(
        RUN,
        "troops",
        [("a", State.GONE, "x"), ("b", State.GONE, "x"), ("c", State.GONE, "vanished")],
    )

    assert changed == 1
    assert counts(ledger, "troops") == StageCounts(enqueued=3, done=1, gone=1, dead=1)
    assert ledger.pending(RUN, "troops") == []


def test_pending_lists_queued_entities_with_their_paths(ledger: Ledger) -> None:
    started(ledger)
    ledger.enqueued(RUN, "warriors", [("k1", WARRIOR), ("k2", (*TROOP, "w2"))])
    ledger.finish(RUN, "warriors", "k2", State.DONE)

    assert ledger.pending(RUN, "warriors") == [("k1", WARRIOR)]


def test_a_path_holding_a_lone_surrogate_is_stored_and_read_back(ledger: Ledger) -> None:
    # A bad id from the vendor is recorded dead under its own path; no store takes a lone
    # surrogate as text, so paths are stored ASCII-escaped.
    started(ledger)
    path = (*TROOP, "w\ud800")
    ledger.enqueued(RUN, "warriors", [("k", path)])
    ledger.finish(RUN, "warriors", "k", State.DEAD, "invalid id 'w\ud800'")

    [dead] = ledger.dead(RUN)
    assert dead.path == path
    assert "invalid id" in dead.error


def test_open_runs_are_recent_and_neither_completed_nor_reported(
    ledger: Ledger, clock: FakeClock
) -> None:
    started(ledger, "old")
    clock.advance(100)
    started(ledger, "done")
    ledger.kicked_off("done")
    ledger.mark_completed("done")
    started(ledger, "open")

    started(ledger, "reported")
    ledger.mark_manifest("reported", "signature")

    assert ledger.open_runs(since=0) == ["old", "open"]
    assert ledger.open_runs(since=clock.now - 50) == ["open"]
    # with when each started, from the run list alone
    assert ledger.open_run_starts(since=0) == {"old": clock.now - 100, "open": clock.now}


def test_mark_quiet_keeps_the_first_time_until_reset(ledger: Ledger) -> None:
    started(ledger)

    first = ledger.mark_quiet(RUN, 10.0)
    again = ledger.mark_quiet(RUN, 20.0)
    reset = ledger.mark_quiet(RUN, None)
    after = ledger.mark_quiet(RUN, 30.0)

    assert (first, again, reset, after) == (10.0, 10.0, None, 30.0)


def test_manifest_signature_is_kept_and_follows_the_counts(ledger: Ledger) -> None:
    started(ledger)
    ledger.kicked_off(RUN)
    ledger.enqueued(RUN, "troops", [("a", ("a",))])
    status = ledger.status(RUN)
    assert status is not None and status.manifest_signature == ""

    ledger.mark_manifest(RUN, status.signature)
    ledger.finish(RUN, "troops", "a", State.DEAD, "x")

    after = ledger.status(RUN)
    assert after is not None
    assert after.manifest_signature == status.signature != after.signature


def test_two_copies_of_one_parent_recorded_in_one_batch_count_once(ledger: Ledger) -> None:
    # Two copies of a warrior's message (a relisting and the original) in one receive batch
    started(ledger)
    listing = [("g1", (*WARRIOR, "g1")), ("g2", (*WARRIOR, "g2"))]

    ledger.enqueued_many(RUN, "data_groups", [(("warriors", "w"), listing)] * 2)

    assert ledger.children(RUN, "warriors", "w") == {"g1", "g2"}
    assert counts(ledger, "data_groups") == StageCounts(enqueued=2)


def test_a_listing_of_ids_full_of_quotes_and_backslashes_is_recorded_whole(
    ledger: Ledger,
) -> None:
    # Each such character is escaped twice as stored (the path's JSON inside the listing's):
    # a listing's items must still fit DynamoDB's 400 KB
    started(ledger)
    ugly = [(f"{i:032x}", ('t"' * 60, "w\\" * 60, f"{i}" + '"' * 120)) for i in range(2000)]

    ledger.enqueued(RUN, "data_groups", ugly, ("warriors", "w"))

    assert len(ledger.children(RUN, "warriors", "w")) == 2000
    assert counts(ledger, "data_groups") == StageCounts(enqueued=2000)


# -- DynamoLedger only -------------------------------------------------------------------


def test_dynamo_status_reads_every_listing_after_the_run_and_every_state(
    dynamodb: DynamoDBClient,
) -> None:
    # GIVEN a run with listings and states at every stage, and the requests of a status
    # read recorded as they start and as they end
    ledger = DynamoLedger(dynamodb, state_table(dynamodb, f"state-{uuid.uuid4().hex[:12]}"))
    started(ledger)
    ledger.enqueued(RUN, "troops", [("k1", TROOP)])
    ledger.kicked_off(RUN)
    ledger.enqueued(RUN, "warriors", [("w1", WARRIOR)], parent=("troops", "k1"))
    ledger.finish(RUN, "troops", "k1", State.DONE)
    events: list[tuple[str, str]] = []

    def kind(params: dict[str, Any]) -> str:
        pk = str(params.get("ExpressionAttributeValues", {}).get(":pk", {}).get("S", "meta"))
        return "listing" if pk.endswith("#listed") else "state or run"

    def before(params: dict[str, Any], context: dict[str, Any], **_: Any) -> None:
        context["bench_kind"] = kind(params)
        events.append(("start", context["bench_kind"]))

    def after(context: dict[str, Any], **_: Any) -> None:
        events.append(("end", context["bench_kind"]))

    hooks = [("before-parameter-build.dynamodb.*", before), ("after-call.dynamodb.*", after)]
    for name, hook in hooks:
        dynamodb.meta.events.register(name, hook)
    try:
        # WHEN its status is read
        status = ledger.status(RUN)
    finally:
        for name, hook in hooks:
            dynamodb.meta.events.unregister(name, hook)

    # THEN the counts are right, and no listing was asked for before the run's item and
    # every stage's states had come back: a listing written before a state or `kicked_off`
    # that the read saw is always seen too
    assert status is not None and not status.settled
    assert status.stages["warriors"] == StageCounts(enqueued=1)
    first_listing = events.index(("start", "listing"))
    assert ("end", "state or run") not in events[first_listing:]
    assert events.count(("end", "state or run")) == 1 + len(ledger.stages)
    assert events.count(("end", "listing")) == len(ledger.stages)
