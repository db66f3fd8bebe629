"""Fault injection: whatever the vendor, the queues or a crash do, the output is exact.

Every test drives a whole run (kickoff, then the three drains until the ledger settles)
against the simulator and checks the outcome against its ground truth: every data group
once with exactly its points, the ledger's counts equal to the tree, the run complete.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import requests
from conftest import TOKEN, WINDOW, assert_counts_exact, local_config, settle

from pipeline.config import Config
from pipeline.dev import cli
from pipeline.dev.simulator import Simulator, SimulatorConfig
from pipeline.dev.verify import compare
from pipeline.drain import Drain, DrainReport, Outcome
from pipeline.ledger import DeadEntity, RunStatus
from pipeline.queues import Outgoing
from pipeline.replay import inspect
from pipeline.runtime import Runtime
from pipeline.sinks import manifest_key
from pipeline.stages import STAGE_NAMES

RUN = WINDOW.run_id
VENDOR_LIMIT = 20
# 3 troops × 3 warriors × 4 data groups; seed 7 makes 2 warriors and 4 data groups gone.
TREE = SimulatorConfig(
    seed=7,
    troops=3,
    warriors_per_troop=3,
    data_groups_per_warrior=4,
    gone_rate=0.15,
    nasty_ids=True,
    rate_calls=10**6,
)
FAULTY = SimulatorConfig(
    **{
        **TREE.__dict__,
        "error_rate": 0.15,
        "stall_rate": 0.1,
        "stall_seconds": 1.5,
        "truncate_rate": 0.1,
    }
)


class Killed(Exception):
    """The drain process died here."""


def assert_exact(rt: Runtime, sim: Simulator) -> None:
    comparison = compare(rt.sink, RUN, sim.ground_truth(WINDOW.start, WINDOW.end))
    assert comparison.exact, comparison.describe()
    assert comparison.found == len(sim.ground_truth(WINDOW.start, WINDOW.end))


def manifest(rt: Runtime) -> dict[str, Any]:
    blob = rt.sink.get(manifest_key(RUN))
    assert blob is not None, "no manifest written"
    data: dict[str, Any] = json.loads(blob)
    return data


def assert_complete(rt: Runtime, sim: Simulator, status: RunStatus) -> None:
    assert status.complete
    assert_counts_exact(status, sim)
    assert_exact(rt, sim)
    written = manifest(rt)
    assert written["status"] == "complete"
    assert written["stages"] == {
        name: {"enqueued": c.enqueued, "done": c.done, "gone": c.gone, "dead": c.dead}
        for name, c in status.stages.items()
    }
    assert all(rt.dlqs[s].depth().total == 0 for s in STAGE_NAMES)


@pytest.fixture
def harvest(
    tmp_path: Path,
    simulator: Callable[..., Simulator],
    local_runtime: Callable[[Config], Runtime],
) -> Callable[..., tuple[Simulator, Runtime]]:
    """Factory: a started simulator and a Runtime pointed at it."""

    def make(sim_config: SimulatorConfig, **overrides: Any) -> tuple[Simulator, Runtime]:
        sim = simulator(sim_config)
        return sim, local_runtime(local_config(tmp_path, sim.url, **overrides))

    return make


# -- the vendor misbehaving ---------------------------------------------------------------


def test_output_is_exact_despite_vendor_faults_and_a_lower_vendor_limit(
    harvest: Callable[..., tuple[Simulator, Runtime]],
) -> None:
    # GIVEN a vendor with 5xx, stalls, truncated bodies and gone entities, whose limit
    # (20/s) is a tenth of the configured one (200/s)
    sim, rt = harvest(FAULTY, rate_calls=200, read_timeout=0.5)
    sim.set_rate_limit(VENDOR_LIMIT, 1.0)

    # WHEN the run is kicked off and drained until it settles
    rt.run_kickoff(WINDOW)
    status = settle(rt, RUN)

    # THEN the output equals the ground truth and the run is complete with exact counts
    assert_complete(rt, sim, status)
    # AND every kind of fault happened: 5xx, 404s, and retries beyond the 5xx (stalls and
    # truncated bodies)
    by_status = sim.stats.snapshot()["by_status"]
    five_xx = sum(n for code, n in by_status.items() if code >= 500)
    assert five_xx > 0 and by_status.get(404, 0) > 0
    assert rt.stats.snapshot()["retries"] > five_xx
    # AND the budget learned the vendor's limit from its headers: 429s stay under the 5%
    # that gets an account flagged
    assert sim.stats.rate_limited <= 0.05 * sim.stats.requests


def test_output_is_exact_when_another_client_exhausts_the_rate_limit(
    harvest: Callable[..., tuple[Simulator, Runtime]],
) -> None:
    # GIVEN a faulty vendor at 20/s, configured as such, and another client of the same
    # account that uses up the window just before the kickoff and twice more during the run
    sim, rt = harvest(FAULTY, rate_calls=VENDOR_LIMIT, read_timeout=0.5)
    sim.set_rate_limit(VENDOR_LIMIT, 1.0)
    exhaust_rate_limit(sim)

    # WHEN the run is kicked off and drained until it settles
    rt.run_kickoff(WINDOW)
    with neighbour(sim, bursts=2):
        status = settle(rt, RUN)

    # THEN the harvest met 429s, and still the output and counts are exact
    assert rt.stats.snapshot()["rate_limited"] >= 1
    assert_complete(rt, sim, status)


def test_calls_stay_within_the_vendor_limit_when_configured_to_it(
    harvest: Callable[..., tuple[Simulator, Runtime]],
) -> None:
    # GIVEN a faulty vendor at 20 calls/s and a budget configured to the same limit
    sim, rt = harvest(FAULTY, rate_calls=VENDOR_LIMIT, read_timeout=0.5)
    sim.set_rate_limit(VENDOR_LIMIT, 1.0)

    # WHEN the run is kicked off and drained until it settles
    rt.run_kickoff(WINDOW)
    status = settle(rt, RUN)

    # THEN no rolling second held more than 20 accepted calls, and none was refused
    assert sim.stats.max_in_window <= VENDOR_LIMIT
    assert sim.stats.rate_limited == 0
    assert_complete(rt, sim, status)


# -- the drain dying ----------------------------------------------------------------------


def _crash_once_per_stage(crashed: set[str], stage: str) -> bool:
    """True the first time a stage reaches the crash point, False ever after."""
    with _CRASH_LOCK:
        if stage in crashed:
            return False
        crashed.add(stage)
        return True


_CRASH_LOCK = threading.Lock()


def kill_at_start(monkeypatch: pytest.MonkeyPatch, rt: Runtime, crashed: set[str]) -> None:
    """Dies before recording, sending or deleting anything."""
    real = Drain.finish

    def finish(self: Drain, outcomes: Sequence[Outcome], report: DrainReport) -> None:
        if _crash_once_per_stage(crashed, self.stage.name):
            raise Killed("before anything")
        real(self, outcomes, report)

    monkeypatch.setattr(Drain, "finish", finish)


def kill_after_fan_out(monkeypatch: pytest.MonkeyPatch, rt: Runtime, crashed: set[str]) -> None:
    """Dies right after the children are sent, before the batch is recorded or deleted.

    (The data_groups stage has no children: its crash after output is `kill_at_start`.)
    """
    for parent, child in (("troops", "warriors"), ("warriors", "data_groups")):
        queue = rt.queues[child]

        def send(
            messages: Sequence[Outgoing], _stage: str = parent, _real: Any = queue.send
        ) -> None:
            _real(messages)
            if _crash_once_per_stage(crashed, _stage):
                raise Killed("after fan-out")

        monkeypatch.setattr(queue, "send", send)


def kill_before_delete(monkeypatch: pytest.MonkeyPatch, rt: Runtime, crashed: set[str]) -> None:
    """Dies after everything is recorded, before any message is deleted."""
    for name in STAGE_NAMES:
        queue = rt.queues[name]

        def delete(receipts: Sequence[str], _name: str = name, _real: Any = queue.delete) -> None:
            if receipts and _crash_once_per_stage(crashed, _name):
                raise Killed("before delete")
            _real(receipts)

        monkeypatch.setattr(queue, "delete", delete)


def kill_mid_delete(monkeypatch: pytest.MonkeyPatch, rt: Runtime, crashed: set[str]) -> None:
    """Dies after deleting the first half of a batch."""
    for name in STAGE_NAMES:
        queue = rt.queues[name]

        def delete(receipts: Sequence[str], _name: str = name, _real: Any = queue.delete) -> None:
            if receipts and _crash_once_per_stage(crashed, _name):
                _real(receipts[: len(receipts) // 2])
                raise Killed("mid delete")
            _real(receipts)

        monkeypatch.setattr(queue, "delete", delete)


@pytest.mark.parametrize(
    "kill", [kill_at_start, kill_after_fan_out, kill_before_delete, kill_mid_delete]
)
def test_output_is_exact_when_a_drain_dies_mid_batch(
    harvest: Callable[..., tuple[Simulator, Runtime]],
    monkeypatch: pytest.MonkeyPatch,
    kill: Callable[[pytest.MonkeyPatch, Runtime, set[str]], None],
) -> None:
    # GIVEN drains that die once per stage at the given point of finishing a batch; the
    # messages they held come back after the visibility timeout
    sim, rt = harvest(TREE, visibility_timeout=1.0)
    crashed: set[str] = set()
    kill(monkeypatch, rt, crashed)

    # WHEN the run is kicked off and drained until it settles
    rt.run_kickoff(WINDOW)
    status = settle(rt, RUN)

    # THEN every stage died once, and yet everything counts once and the output is exact
    assert crashed == ({"troops", "warriors"} if kill is kill_after_fan_out else set(STAGE_NAMES))
    assert_complete(rt, sim, status)


# -- the queue delivering twice -----------------------------------------------------------


def test_output_is_exact_when_messages_are_delivered_twice(
    harvest: Callable[..., tuple[Simulator, Runtime]], monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN a troops queue that delivers every message twice and a data_groups queue that
    # delivers every other message twice
    sim, rt = harvest(TREE)
    duplicate(monkeypatch, rt, "troops", every=1)
    duplicate(monkeypatch, rt, "data_groups", every=2)

    # WHEN the run is kicked off and drained until it settles
    rt.run_kickoff(WINDOW)
    status = settle(rt, RUN)

    # THEN the duplicates were processed, and still everything counts once
    entities = sum(c.enqueued for c in status.stages.values())
    assert rt.stats.snapshot()["messages_done"] + rt.stats.snapshot()["messages_gone"] > entities
    assert_complete(rt, sim, status)


def duplicate(monkeypatch: pytest.MonkeyPatch, rt: Runtime, stage: str, every: int) -> None:
    queue = rt.queues[stage]
    real = queue.send

    def send(messages: Sequence[Outgoing]) -> None:
        real([*messages, *messages[::every]])

    monkeypatch.setattr(queue, "send", send)


# -- an entity that never heals until the operator steps in -------------------------------


def test_permanent_failure_settles_incomplete_until_replayed(
    harvest: Callable[..., tuple[Simulator, Runtime]],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN a data group whose every call fails
    sim, rt = harvest(TREE, max_receive_count=2)
    (troop_id, warrior_id, group_id) = sorted(sim.ground_truth(WINDOW.start, WINDOW.end))[0]
    sim.fail_permanently(group_id)
    out = str(tmp_path / "out")

    # WHEN the run is kicked off and drained until it settles
    rt.run_kickoff(WINDOW)
    status = settle(rt, RUN)

    # THEN it settles incomplete, with exactly that data group dead, and why
    assert (status.settled, status.complete, status.dead) == (True, False, 1)
    [dead] = rt.ledger.dead(RUN)
    assert dead == DeadEntity("data_groups", (troop_id, warrior_id, group_id), dead.error)
    assert "503" in dead.error
    [letter] = inspect(rt.dlqs["data_groups"])
    assert letter.path == (troop_id, warrior_id, group_id)
    assert letter.reason.startswith("RetryableError:") and "503" in letter.reason
    written = manifest(rt)
    assert written["status"] == "incomplete"
    assert [d["path"] for d in written["dead"]] == [[troop_id, warrior_id, group_id]]
    # AND the operator's commands say so
    assert cli.main(["status", "--out", out]) == 1
    assert cli.main(["dlq", "data_groups", "--out", out]) == 0
    assert "503" in capsys.readouterr().out

    # WHEN the vendor heals, the operator replays the DLQ and the drains run again
    sim.heal()
    assert cli.main(["replay", "data_groups", "--out", out]) == 0
    assert "moved 1 messages" in capsys.readouterr().out
    assert rt.dlqs["data_groups"].depth().total == 0
    status = settle(rt, RUN, until=lambda s: s.complete)

    # THEN the run is complete and exact, and `harvest status` agrees
    assert_complete(rt, sim, status)
    assert cli.main(["status", "--out", out]) == 0


# -- helpers ------------------------------------------------------------------------------


def exhaust_rate_limit(sim: Simulator) -> None:
    """Call the vendor with the harvest's token until it answers 429: the window is full."""
    with requests.Session() as http:
        http.headers["Authorization"] = f"Bearer {TOKEN}"
        for _ in range(10 * VENDOR_LIMIT):
            # Not an endpoint: answered at once, never faulty, but counted by the limit.
            if http.get(f"{sim.url}/v1/elsewhere", timeout=5).status_code == 429:
                return
    raise AssertionError("the vendor never answered 429")


@contextmanager
def neighbour(sim: Simulator, bursts: int) -> Iterator[None]:
    """Another client of the account, using up the window `bursts` times, a second apart."""
    stop = threading.Event()

    def run() -> None:
        for _ in range(bursts):
            if stop.wait(1.0):
                return
            exhaust_rate_limit(sim)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=10)
