"""Every run settles: lost entities are swept, every open run is checked, manifests once.

Runs on the embedded queues and the SQLite ledger; the same code runs against SQS and
DynamoDB (whose contracts the queue and ledger suites check).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.completion import LOST, settle_runs, sweep_lost
from pipeline.ledger import State
from pipeline.local.ledger import SqliteLedger
from pipeline.local.queues import LocalQueueStore
from pipeline.local.sinks import DirectorySink
from pipeline.queues import Outgoing, Queue
from pipeline.sinks import manifest_key
from pipeline.stages import STAGE_NAMES

RUN = "20240301T000000Z-20240302T000000Z"
GRACE = 60.0


@pytest.fixture
def ledger(tmp_path: Path) -> SqliteLedger:
    ledger = SqliteLedger(tmp_path / "ledger.sqlite")
    ledger.start_run(RUN, "2024-03-01T00:00:00Z", "2024-03-02T00:00:00Z")
    ledger.kicked_off(RUN)
    return ledger


@pytest.fixture
def queues(tmp_path: Path) -> list[Queue]:
    store = LocalQueueStore(tmp_path / "queues.sqlite")
    return [store.queue(s) for s in STAGE_NAMES]


@pytest.fixture
def sink(tmp_path: Path) -> DirectorySink:
    return DirectorySink(tmp_path / "out")


def manifest(sink: DirectorySink) -> dict[str, object] | None:
    blob = sink.get(manifest_key(RUN))
    return None if blob is None else dict(json.loads(blob))


def test_entity_with_no_message_anywhere_is_recorded_dead_after_the_grace(
    ledger: SqliteLedger, queues: list[Queue], sink: DirectorySink
) -> None:
    # GIVEN a troop done and one whose message SQS moved to the DLQ itself (a drain died
    # at its last receive): the ledger still says "queued", every stage queue is empty
    ledger.enqueued(RUN, "troops", [("t1", ("t1",)), ("t2", ("t2",))])
    ledger.finish(RUN, "troops", "t1", State.DONE)

    # WHEN the runs are checked, once now and once after the grace
    early = settle_runs(ledger, sink, queues, quiet_grace=GRACE, now=1000.0)
    late = settle_runs(ledger, sink, queues, quiet_grace=GRACE, now=1000.0 + GRACE)

    # THEN the first look only notes the quiet; the second records t2 dead with the reason,
    # the run settles incomplete and its manifest names t2
    assert (early.lost, early.unsettled) == (0, 1)
    assert (late.lost, late.unsettled) == (1, 0)
    [dead] = ledger.dead(RUN)
    assert (dead.path, dead.error) == (("t2",), LOST)
    written = manifest(sink)
    assert written is not None and written["status"] == "incomplete"


def test_nothing_is_swept_while_any_stage_queue_holds_a_message(
    ledger: SqliteLedger, queues: list[Queue]
) -> None:
    # GIVEN a warrior pending and a message in flight on the data_groups queue (a drain
    # may be between recording children and sending them)
    ledger.enqueued(RUN, "warriors", [("w1", ("t", "w1"))])
    queues[2].send([Outgoing("{}")])
    assert queues[2].receive(1)
    status = ledger.status(RUN)
    assert status is not None

    # WHEN the sweep looks, long after any grace
    lost = sweep_lost(ledger, queues, status, quiet_grace=0.0, now=10**9)

    # THEN nothing is touched, and the quiet clock is reset
    assert lost == 0
    assert ledger.pending(RUN, "warriors") == [("w1", ("t", "w1"))]
    assert ledger.mark_quiet(RUN, 5.0) == 5.0


def test_run_nobody_touches_is_completed_by_the_next_check(
    ledger: SqliteLedger, queues: list[Queue], sink: DirectorySink
) -> None:
    # GIVEN a run kicked off with an empty troop listing: no drain will ever touch it
    # WHEN any drain invocation checks the open runs
    result = settle_runs(ledger, sink, queues, quiet_grace=GRACE, now=2000.0)

    # THEN it is complete, with a manifest, and no longer open
    status = ledger.status(RUN)
    assert status is not None and status.completed_at is not None
    written = manifest(sink)
    assert written is not None and written["status"] == "complete"
    assert (result.open_runs, result.unsettled) == (1, 0)
    assert ledger.open_runs(since=0) == []


def test_incomplete_run_rewrites_its_manifest_only_when_its_counts_change(
    ledger: SqliteLedger, queues: list[Queue], sink: DirectorySink
) -> None:
    # GIVEN a run settled with one dead troop and its manifest written
    ledger.enqueued(RUN, "troops", [("t1", ("t1",)), ("t2", ("t2",))])
    ledger.finish(RUN, "troops", "t1", State.DONE)
    ledger.finish(RUN, "troops", "t2", "dead", "boom")
    settle_runs(ledger, sink, queues, quiet_grace=GRACE)
    sink.put(manifest_key(RUN), b"{}", "application/json")  # marks what a rewrite replaces

    # WHEN it is checked again with nothing changed, then after a replay finished t2
    settle_runs(ledger, sink, queues, quiet_grace=GRACE)
    unchanged = manifest(sink)
    ledger.finish(RUN, "troops", "t2", State.DONE)
    settle_runs(ledger, sink, queues, quiet_grace=GRACE, touched=[RUN])

    # THEN no rewrite the first time (nor is it open any more); once the replay's drain
    # touched it, a complete manifest
    assert unchanged == {}
    assert ledger.open_runs(since=0) == []
    written = manifest(sink)
    assert written is not None and written["status"] == "complete"


def test_oldest_unsettled_run_age_is_reported(
    ledger: SqliteLedger, queues: list[Queue], sink: DirectorySink
) -> None:
    # GIVEN a run with a troop still in its queue
    ledger.enqueued(RUN, "troops", [("t1", ("t1",))])
    queues[0].send([Outgoing("{}")])
    status = ledger.status(RUN)
    assert status is not None

    # WHEN the runs are checked an hour after it started
    result = settle_runs(ledger, sink, queues, quiet_grace=GRACE, now=status.started_at + 3600)

    # THEN the age the "not settled in time" alarm watches is that hour
    assert result.oldest_unsettled_seconds == pytest.approx(3600)


def test_no_run_is_read_in_full_while_a_stage_queue_holds_a_message(
    ledger: SqliteLedger, queues: list[Queue], sink: DirectorySink, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN a run whose last troop is done (settled) while another message waits in a queue
    ledger.enqueued(RUN, "troops", [("t1", ("t1",))])
    ledger.finish(RUN, "troops", "t1", State.DONE)
    queues[1].send([Outgoing("{}")])
    reads: list[str] = []
    real_status = ledger.status

    def status(run_id: str) -> object:
        reads.append(run_id)
        return real_status(run_id)

    monkeypatch.setattr(ledger, "status", status)

    # WHEN the runs are checked (the end of every drain invocation)
    busy = settle_runs(ledger, sink, queues, quiet_grace=GRACE, now=2000.0)

    # THEN no status was read (in DynamoDB, a query over every entity of the run), the run
    # counts as unsettled; once the queues are empty it completes
    assert reads == [] and (busy.open_runs, busy.unsettled) == (1, 1)
    assert manifest(sink) is None
    [waiting] = queues[1].receive(10)
    queues[1].delete([waiting.receipt])
    quiet = settle_runs(ledger, sink, queues, quiet_grace=GRACE, now=2001.0)
    assert reads == [RUN] and quiet.unsettled == 0
    assert manifest(sink) is not None


def test_a_complete_runs_manifest_reads_no_dead_entities(
    ledger: SqliteLedger, queues: list[Queue], sink: DirectorySink, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN a run whose every troop is done, and a ledger that counts reads of the dead (in
    # DynamoDB another query over every entity of the run)
    ledger.enqueued(RUN, "troops", [("t1", ("t1",)), ("t2", ("t2",))])
    ledger.finish_many(RUN, "troops", [("t1", State.DONE, ""), ("t2", State.GONE, "")])
    reads: list[str] = []
    real_dead = ledger.dead
    monkeypatch.setattr(ledger, "dead", lambda run_id: reads.append(run_id) or real_dead(run_id))

    # WHEN a drain checks the open runs
    settle_runs(ledger, sink, queues, quiet_grace=GRACE, now=2000.0)

    # THEN the manifest says complete with no dead, and the dead were never read
    written = manifest(sink)
    assert written is not None and (written["status"], written["dead"]) == ("complete", [])
    assert reads == []
