"""`harvest local` end to end: kickoff, the scheduled drain handlers, the manifest, the CLI."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import TOKEN, WINDOW, local_config

from pipeline.config import Config
from pipeline.dev import cli
from pipeline.dev.simulator import Simulator, SimulatorConfig, SimulatorProcess
from pipeline.dev.verify import compare
from pipeline.drain import monotonic_deadline
from pipeline.local.scheduler import LocalOptions, LocalResult, run_local
from pipeline.local.sinks import DirectorySink
from pipeline.runtime import Runtime
from pipeline.stages import STAGE_NAMES

RUN = WINDOW.run_id
# 2 troops × 3 warriors × 3 data groups with awkward ids; seed 1 makes one warrior and
# three data groups gone.
TREE = SimulatorConfig(
    seed=1,
    troops=2,
    warriors_per_troop=3,
    data_groups_per_warrior=3,
    gone_rate=0.15,
    error_rate=0.05,
    nasty_ids=True,
)


def options(out: Path, **changes: object) -> LocalOptions:
    """The defaults, but ticking fast and with invocations short enough for a test."""
    settings: dict[str, object] = {
        "window": WINDOW,
        "out": out,
        "tick": 0.2,
        "invocation_timeout": 10.0,
        "safety_margin": 2.0,
        "simulator": SimulatorProcess(TREE),
    }
    settings.update(changes)
    return LocalOptions(**settings)  # type: ignore[arg-type]


def output_files(out: Path) -> dict[str, bytes]:
    data = out / "runs" / RUN / "data"
    return {p.name: p.read_bytes() for p in sorted(data.iterdir())}


def assert_complete(result: LocalResult) -> None:
    assert result.exit_code == 0
    assert result.comparison is not None and result.comparison.exact
    assert result.status is not None and result.status.complete
    manifest = json.loads(result.manifest.read_text())
    assert manifest["status"] == "complete"
    assert manifest["stages"] == {
        name: {"enqueued": c.enqueued, "done": c.done, "gone": c.gone, "dead": c.dead}
        for name, c in result.status.stages.items()
    }
    assert manifest["output"]["files"] == result.comparison.found


def test_local_run_of_a_simulated_tree_is_complete_and_exact(tmp_path: Path) -> None:
    # GIVEN the built-in simulator with gone entities, 5xx faults and awkward ids
    out = tmp_path / "out"

    # WHEN `harvest local` runs with defaults-like options
    result = run_local(options(out))

    # THEN the run is complete, the output equals the ground truth, the manifest says so
    assert_complete(result)
    assert result.status is not None
    assert result.status.stages["warriors"].gone == 1
    assert result.status.stages["data_groups"].gone == 3
    assert result.dlq_depth == 0


def test_local_run_again_on_the_same_out_changes_nothing(tmp_path: Path) -> None:
    # GIVEN a finished local run
    out = tmp_path / "out"
    assert run_local(options(out)).exit_code == 0
    first = output_files(out)

    # WHEN it runs again on the same directory
    again = run_local(options(out))

    # THEN it resumes the same run: no kickoff, no vendor call, the same output, exact
    assert again.run_id == RUN
    assert again.calls == 0
    assert output_files(out) == first
    assert_complete(again)


def test_local_run_resumes_a_run_started_elsewhere_without_a_new_kickoff(
    tmp_path: Path,
    simulator: Callable[..., Simulator],
    local_runtime: Callable[[Config], Runtime],
) -> None:
    # GIVEN a fault-free vendor, and a run kicked off there with only its troops drained
    sim = simulator(replace(TREE, error_rate=0.0))
    rt = local_runtime(local_config(tmp_path, sim.url))
    rt.run_kickoff(WINDOW)
    rt.run_drain("troops", monotonic_deadline(5.0))
    assert rt.queues["warriors"].depth().total == TREE.troops * TREE.warriors_per_troop
    rt.close()
    out = tmp_path / "out"

    # WHEN `harvest local` runs on the same directory and vendor
    result = run_local(options(out, vendor_url=sim.url, allow_http=True, token=TOKEN))

    # THEN it finishes that run with exactly the calls left to make: neither the troop
    # listing (the kickoff) nor the troops' warrior listings again
    assert result.exit_code == 0
    assert result.status is not None and result.status.complete
    expected = sim.expected_calls(WINDOW.start, WINDOW.end)
    assert result.calls == expected - 1 - TREE.troops
    comparison = compare(DirectorySink(out), RUN, sim.ground_truth(WINDOW.start, WINDOW.end))
    assert comparison.exact, comparison.describe()


# -- the command --------------------------------------------------------------------------

FLAGS = ["--from", WINDOW.from_text, "--to", WINDOW.to_text, "--tick", "0.2"]


def test_harvest_local_exits_zero_on_a_small_simulated_tree(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN the contract's flags and a tiny simulated tree
    out = tmp_path / "out"
    argv = ["local", "--out", str(out), *FLAGS, "--rate-calls", "100", "--rate-period", "1"]
    argv += ["--sim-troops", "2", "--sim-warriors", "2", "--sim-data-groups", "2"]

    # WHEN `harvest local` runs
    code = cli.main(argv)

    # THEN it succeeds, says the output matches, and wrote the manifest
    assert code == 0
    said = capsys.readouterr().out
    assert "complete" in said and "output equals the ground truth" in said
    assert (out / "runs" / RUN / "manifest.json").exists()


def test_harvest_local_with_a_wrong_token_fails_clearly_and_dead_letters_nothing(
    tmp_path: Path,
    simulator: Callable[..., Simulator],
    local_runtime: Callable[[Config], Runtime],
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN a separately started vendor and a token it does not know
    sim = simulator(TREE)
    out = tmp_path / "out"

    # WHEN `harvest local` is pointed at it
    code = cli.main(
        ["local", "--vendor-url", sim.url, "--allow-http", "--token", "not-the-token"]
        + ["--out", str(out), *FLAGS]
    )

    # THEN it fails with the token's exit code, saying the vendor refused the token, with
    # nothing queued or dead
    assert code == 3
    captured = capsys.readouterr()
    said = captured.out + captured.err
    assert "401" in said and "token" in said
    rt = local_runtime(local_config(tmp_path, sim.url))
    assert all(rt.queues[s].depth().total == 0 for s in STAGE_NAMES)
    assert all(rt.dlqs[s].depth().total == 0 for s in STAGE_NAMES)
    assert sim.stats.by_status == {401: sim.stats.requests}


def test_local_run_with_a_wrong_token_stops_its_drains_and_keeps_the_messages(
    tmp_path: Path,
    simulator: Callable[..., Simulator],
    local_runtime: Callable[[Config], Runtime],
) -> None:
    # GIVEN a kicked-off run, then a token the vendor refuses
    sim = simulator(TREE)
    rt = local_runtime(local_config(tmp_path, sim.url))
    rt.run_kickoff(WINDOW)
    rt.close()

    # WHEN `harvest local` resumes it with the wrong token
    result = run_local(
        options(
            tmp_path / "out",
            vendor_url=sim.url,
            allow_http=True,
            token="not-the-token",
            invocation_timeout=4.0,
            safety_margin=1.0,
        )
    )

    # THEN it stops on the 401 with exit code 3 and says why; the troops stay queued and
    # nothing is dead-lettered
    assert result.exit_code == 3
    assert "401" in result.auth_error
    assert result.dlq_depth == 0
    rt = local_runtime(local_config(tmp_path, sim.url))
    assert rt.queues["troops"].depth().total == TREE.troops
    assert all(rt.dlqs[s].depth().total == 0 for s in STAGE_NAMES)
    status = rt.ledger.status(RUN)
    assert status is not None and status.dead == 0 and not status.settled
