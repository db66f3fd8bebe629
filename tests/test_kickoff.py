"""The kickoff: a second kickoff does not harvest finished troops again; bad or empty listings
still settle the run."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import responses
from conftest import WINDOW, local_config, settle

from pipeline.config import Config
from pipeline.dev.simulator import Simulator, SimulatorConfig
from pipeline.envelope import Envelope
from pipeline.kickoff import kickoff
from pipeline.local.ledger import SqliteLedger
from pipeline.local.queues import LocalQueueStore
from pipeline.queues import RELISTED
from pipeline.runtime import Runtime
from pipeline.sinks import manifest_key

TREE = SimulatorConfig(troops=3, warriors_per_troop=2, data_groups_per_warrior=2)
VENDOR = "http://vendor.test"


def test_kickoff_again_sends_nothing_when_every_troop_is_finished(
    tmp_path: Path,
    simulator: Callable[..., Simulator],
    local_runtime: Callable[[Config], Runtime],
) -> None:
    # GIVEN a run harvested to completion
    sim = simulator(TREE)
    rt = local_runtime(local_config(tmp_path, sim.url))
    rt.run_kickoff(WINDOW)
    assert settle(rt, WINDOW.run_id).complete
    calls = sim.stats.requests

    # WHEN the same window is kicked off again (by hand, or a schedule delivered twice)
    report = rt.run_kickoff(WINDOW)

    # THEN the troops are listed again, but none is queued: one call, no re-harvest
    assert report.troops == TREE.troops
    assert rt.queues["troops"].depth().total == 0
    assert sim.stats.requests == calls + 1


def test_kickoff_again_resends_only_the_unfinished_troops(
    tmp_path: Path,
    simulator: Callable[..., Simulator],
    local_runtime: Callable[[Config], Runtime],
) -> None:
    # GIVEN a kicked-off run whose first troop message was lost before any drain ran: the
    # run settles with that troop recorded dead, since no queue holds a message for it
    sim = simulator(TREE)
    rt = local_runtime(local_config(tmp_path, sim.url))
    rt.run_kickoff(WINDOW)
    lost = rt.queues["troops"].receive(1)
    rt.queues["troops"].delete([m.receipt for m in lost])
    status = settle(rt, WINDOW.run_id)
    assert (status.settled, status.complete, status.stages["troops"].dead) == (True, False, 1)
    [dead] = rt.ledger.dead(WINDOW.run_id)
    assert "no stage queue" in dead.error

    # WHEN the window is kicked off again
    rt.run_kickoff(WINDOW)

    # THEN only the lost troop is sent, marked as sent again, and the run completes
    [resent] = rt.queues["troops"].receive(10)
    assert resent.attributes == RELISTED
    rt.queues["troops"].change_visibility([resent.receipt], 0)
    assert settle(rt, WINDOW.run_id).complete


def test_first_kickoff_sends_its_troops_unmarked(
    tmp_path: Path,
    simulator: Callable[..., Simulator],
    local_runtime: Callable[[Config], Runtime],
) -> None:
    # A first delivery needs no ledger read in the drain: nothing of it can be done yet.
    sim = simulator(TREE)
    rt = local_runtime(local_config(tmp_path, sim.url))

    rt.run_kickoff(WINDOW)

    sent = rt.queues["troops"].receive(10)
    assert len(sent) == TREE.troops
    assert all(m.attributes == {} for m in sent)


def troop_listing(items: list[dict[str, object]]) -> responses.RequestsMock:
    """A vendor whose troop listing is `items`, in one page."""
    mock = responses.RequestsMock(assert_all_requests_are_fired=False)
    mock.add(
        responses.GET,
        f"{VENDOR}/v1/troops",
        body=json.dumps({"items": items, "next_cursor": None}),
        content_type="application/json",
    )
    return mock


def test_kickoff_of_an_empty_listing_completes_the_run_with_a_manifest(
    tmp_path: Path, local_runtime: Callable[[Config], Runtime]
) -> None:
    # GIVEN an account with no troops
    rt = local_runtime(local_config(tmp_path, VENDOR))

    # WHEN the window is kicked off
    with troop_listing([]):
        report = rt.run_kickoff(WINDOW)

    # THEN the run is complete at once: manifest written, completion recorded
    status = rt.ledger.status(WINDOW.run_id)
    assert report.troops == 0
    assert status is not None and status.complete and status.completed_at is not None
    blob = rt.sink.get(manifest_key(WINDOW.run_id))
    assert blob is not None and json.loads(blob)["status"] == "complete"


def test_kickoff_records_a_troop_with_an_invalid_id_dead_and_sends_the_rest(
    tmp_path: Path, local_runtime: Callable[[Config], Runtime]
) -> None:
    # GIVEN a troop listing holding a lone surrogate id (valid JSON) among good ones
    rt = local_runtime(local_config(tmp_path, VENDOR))
    items: list[dict[str, object]] = [{"id": "t1"}, {"id": "t\ud800"}, {"id": "t2"}]

    # WHEN the window is kicked off
    with troop_listing(items):
        rt.run_kickoff(WINDOW)

    # THEN the good troops are queued, the bad one is dead with the reason
    sent = [Envelope.from_json(m.body).entity_id for m in rt.queues["troops"].receive(10)]
    assert sorted(sent) == ["t1", "t2"]
    [dead] = rt.ledger.dead(WINDOW.run_id)
    assert dead.path == ("t\ud800",)
    assert "lone surrogate" in dead.error


class _Troops:
    """A vendor listing two troops."""

    def items(self, path: str, entity_id: str | None = None) -> Iterator[dict[str, object]]:
        return iter([{"id": "t1"}, {"id": "t2"}])


def test_kickoff_retried_after_failing_past_its_sends_marks_what_it_sends_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN a kickoff that sent its troops, then failed before recording the run kicked off
    # (a throttle on that last write: the operator runs it again)
    ledger = SqliteLedger(tmp_path / "ledger.sqlite")
    queue = LocalQueueStore(tmp_path / "queues.sqlite").queue("troops")

    def throttled(run_id: str) -> None:
        raise RuntimeError("ThrottlingException (simulated)")

    with monkeypatch.context() as m:
        m.setattr(ledger, "kicked_off", throttled)
        with pytest.raises(RuntimeError):
            kickoff(WINDOW, client=_Troops(), queue=queue, ledger=ledger)  # type: ignore[arg-type]

    # WHEN it runs again
    kickoff(WINDOW, client=_Troops(), queue=queue, ledger=ledger)  # type: ignore[arg-type]

    # THEN the copies it sends again are marked: the drain checks them and their subtrees
    sent = queue.receive(10)
    assert sorted(m.attributes == RELISTED for m in sent) == [False, False, True, True]


def test_kickoff_that_sends_troops_leaves_the_completion_check_to_the_drains(
    tmp_path: Path, local_runtime: Callable[[Config], Runtime], monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN an account with two troops, and the run's status reads counted
    rt = local_runtime(local_config(tmp_path, VENDOR))
    reads: list[str] = []
    read = rt.ledger.status
    monkeypatch.setattr(rt.ledger, "status", lambda run_id: reads.append(run_id) or read(run_id))

    # WHEN the window is kicked off
    with troop_listing([{"id": "t1"}, {"id": "t2"}]):
        report = rt.run_kickoff(WINDOW)

    # THEN both troops are sent, and the run's status is not read: it could only find them
    # queued (the drains that finish them check the run)
    assert (report.troops, report.sent) == (2, 2)
    assert rt.queues["troops"].depth().total == 2
    assert reads == []
