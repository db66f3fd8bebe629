"""`harvest kickoff`: a backfill starts one run per window, once, with a dry run first."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.dev import cli
from pipeline.dev.simulator import Simulator, SimulatorConfig
from pipeline.local.ledger import SqliteLedger
from pipeline.local.runtime import STATE_DB

TREE = SimulatorConfig(troops=2, warriors_per_troop=1, data_groups_per_warrior=1)
SPAN = ["--from", "2024-03-01T00:00:00Z", "--to", "2024-03-04T00:00:00Z"]
RUNS = [
    "20240301T000000Z-20240302T000000Z",
    "20240302T000000Z-20240303T000000Z",
    "20240303T000000Z-20240304T000000Z",
]


@pytest.fixture
def kickoff(
    tmp_path: Path, simulator: Callable[..., Simulator], monkeypatch: pytest.MonkeyPatch
) -> tuple[Simulator, Callable[..., int]]:
    sim = simulator(TREE)
    monkeypatch.setenv("HARVEST_VENDOR_TOKEN", TREE.token)
    out = tmp_path / "out"

    def run(*extra: str) -> int:
        args = ["kickoff", *SPAN, "--vendor-url", sim.url, "--allow-http", "--out", str(out)]
        return cli.main([*args, *extra])

    return sim, run


def test_backfill_dry_run_lists_the_windows_and_starts_nothing(
    tmp_path: Path,
    kickoff: tuple[Simulator, Callable[..., int]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    sim, run = kickoff

    assert run("--dry-run") == 0

    printed = capsys.readouterr().out
    assert [line.split(":")[0] for line in printed.splitlines()[:3]] == RUNS
    assert "would start 3 of 3 windows" in printed
    assert sim.stats.requests == 0
    assert SqliteLedger(tmp_path / "out" / ".harvest" / STATE_DB).runs() == []


def test_backfill_starts_one_run_per_day_and_never_twice(
    tmp_path: Path,
    kickoff: tuple[Simulator, Callable[..., int]],
    capsys: pytest.CaptureFixture[str],
) -> None:
    # GIVEN three days to backfill
    sim, run = kickoff

    # WHEN the backfill runs, then runs again
    assert run() == 0
    calls = sim.stats.requests
    first = capsys.readouterr().out
    assert run() == 0
    again = capsys.readouterr().out

    # THEN three runs were kicked off once (one troop listing each); the rerun started
    # nothing and called nobody
    ledger = SqliteLedger(tmp_path / "out" / ".harvest" / STATE_DB)
    assert sorted(ledger.runs()) == RUNS
    assert all(ledger.status(r) is not None for r in RUNS)
    assert calls == 3
    assert "started 3 of 3 windows" in first
    assert sim.stats.requests == calls
    assert "started 0 of 3 windows; 3 already started" in again


def test_windows_cut_a_span_into_days_the_last_one_shorter() -> None:
    cut = cli.windows("2024-03-01T00:00:00Z", "2024-03-02T12:00:00Z", "day")

    assert [(w.from_text, w.to_text) for w in cut] == [
        ("2024-03-01T00:00:00Z", "2024-03-02T00:00:00Z"),
        ("2024-03-02T00:00:00Z", "2024-03-02T12:00:00Z"),
    ]
