"""The benchmark's bookkeeping (the benchmarks themselves are not part of the suite)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.__main__ import combine, scratch_dir


def run(cpu: float, exact: bool = True, wall: float = 10.0) -> dict[str, float]:
    return {"cpu_ms_per_call": cpu, "wall": wall, "exact": exact, "complete": True}


def test_combine_takes_medians_and_the_cpu_range() -> None:
    got = combine([run(2.4, wall=11.0), run(1.6, wall=9.0), run(1.9, wall=30.0)])

    assert (got["cpu_ms_per_call"], got["wall"]) == (1.9, 11.0)
    assert (got["cpu_min"], got["cpu_max"]) == (1.6, 2.4)
    assert got["exact"] and got["complete"]


def test_combine_is_exact_only_if_every_run_was() -> None:
    assert not combine([run(1.0), run(1.0, exact=False), run(1.0)])["exact"]


def test_scratch_dir_follows_bench_dir_and_falls_back_to_the_default_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BENCH_DIR", str(tmp_path))
    assert scratch_dir() == str(tmp_path)

    monkeypatch.setenv("BENCH_DIR", str(tmp_path / "missing"))
    assert scratch_dir() is None
