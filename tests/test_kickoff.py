"""The kickoff: a second kickoff of the same window does not harvest finished troops again."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from conftest import WINDOW, local_config, settle

from pipeline.config import Config
from pipeline.runtime import Runtime
from pipeline.simulator import Simulator, SimulatorConfig

TREE = SimulatorConfig(troops=3, warriors_per_troop=2, data_groups_per_warrior=2)


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
    # GIVEN a kicked-off run whose first troop message was lost before any drain ran
    sim = simulator(TREE)
    rt = local_runtime(local_config(tmp_path, sim.url))
    rt.run_kickoff(WINDOW)
    lost = rt.queues["troops"].receive(1)
    rt.queues["troops"].delete([m.receipt for m in lost])
    status = settle(rt, WINDOW.run_id, until=lambda s: s.stages["troops"].pending == 1)
    assert not status.settled

    # WHEN the window is kicked off again
    rt.run_kickoff(WINDOW)

    # THEN only the lost troop is sent, and the run completes
    assert rt.queues["troops"].depth().total == 1
    assert settle(rt, WINDOW.run_id).complete
