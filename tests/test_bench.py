"""The benchmark's bookkeeping (the benchmarks themselves are not part of the suite)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from bench import VENDOR_NICE, nice_note
from bench.__main__ import combine, scratch_dir
from bench.aws import (
    AwsScenario,
    CpuShare,
    Settings,
    _own_cgroup,
    create_state_table,
    line,
    phases_line,
    run_one,
)


def run(
    cpu: float, exact: bool = True, wall: float = 10.0, rate_limited: float = 0
) -> dict[str, float]:
    return {
        "cpu_ms_per_call": cpu,
        "wall": wall,
        "exact": exact,
        "complete": True,
        "rate_limited": rate_limited,
    }


def test_combine_takes_medians_and_the_cpu_range() -> None:
    got = combine([run(2.4, wall=11.0), run(1.6, wall=9.0), run(1.9, wall=30.0)])

    assert (got["cpu_ms_per_call"], got["wall"]) == (1.9, 11.0)
    assert (got["cpu_min"], got["cpu_max"]) == (1.6, 2.4)
    assert got["exact"] and got["complete"]


def test_combine_shows_the_most_429s_any_run_drew_not_the_median() -> None:
    got = combine([run(1.0), run(1.0, rate_limited=2), run(1.0)])

    assert got["rate_limited"] == 2


def test_combine_is_exact_only_if_every_run_was() -> None:
    assert not combine([run(1.0), run(1.0, exact=False), run(1.0)])["exact"]


def test_scratch_dir_follows_bench_dir_and_falls_back_to_the_default_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BENCH_DIR", str(tmp_path))
    assert scratch_dir() == str(tmp_path)

    monkeypatch.setenv("BENCH_DIR", str(tmp_path / "missing"))
    assert scratch_dir() is None


@pytest.mark.integration
def test_aws_mode_harvests_exactly_and_fills_every_column(tmp_path: Path) -> None:
    pytest.importorskip("moto.server", reason="moto[server] not installed")
    # GIVEN a tiny tree (10 vendor calls) and no injected AWS latency
    scenario = AwsScenario("tiny", 1, 2, 3, rate_calls=1000, vendor_calls=1000, latency=0.0)
    settings = Settings(ddb_ms=0.0, sqs_ms=0.0, s3_ms=0.0)

    # WHEN it runs as in Lambda: a sandbox process per invocation, DynamoDB on a moto server
    result = run_one(scenario, settings, str(tmp_path))

    # THEN the output equals the ground truth, and the AWS columns were measured
    assert result["exact"] and result["complete"]
    assert (result["failed"], result["stalled"]) == (0, False)
    # (Once, in CI under load, 11: what the run did is in the message, should it recur.)
    assert result["calls"] == 10, {k: v for k, v in result.items() if k != "timeline"}
    assert result["ddb_per_call"] > 0 and result["gbs_per_1k"] > 0
    assert result["cold"] >= 4  # the kickoff and each stage's drain started a sandbox
    assert line(scenario.name, result).startswith("tiny ")
    # the phases around the calls: the first call before the last, the manifest after it
    assert 0 < result["first_call"] <= result["last_call"] <= result["wall"]
    assert phases_line(result).startswith("  phases: first vendor call at ")
    assert result["vendor_nice"] is not None  # what the simulator ran at is reported
    # traced as Lambda traces them: the invocations' segments reached the X-Ray daemon
    assert result["trace_per_call"] > 0 and result["trace_kb"] > 0


@pytest.mark.integration
def test_aws_mode_with_warm_drains_leaves_only_the_kickoff_cold(tmp_path: Path) -> None:
    pytest.importorskip("moto.server", reason="moto[server] not installed")
    scenario = AwsScenario("tiny", 1, 2, 3, rate_calls=1000, vendor_calls=1000, latency=0.0)
    settings = Settings(ddb_ms=0.0, sqs_ms=0.0, s3_ms=0.0, warm=True)

    # WHEN every drain has a warm sandbox (one idle tick each) before the kickoff
    result = run_one(scenario, settings, str(tmp_path))

    # THEN the harvest is exact, and of its invocations only the kickoff started cold: the
    # warming ticks are not counted as the harvest's
    assert result["exact"] and result["complete"]
    assert result["failed"] == 0
    assert result["cold"] == 1
    assert [f for _, f, _, _ in result["invocation_log"]][0] == "kickoff"


def test_partition_queries_answered_by_the_bench_page_as_motos_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    boto3 = pytest.importorskip("boto3")
    moto = pytest.importorskip("moto")
    from moto.dynamodb.responses import DynamoHandler

    from bench.aws_moto import fast_partition_queries

    def pages(ddb: Any, **extra: Any) -> list[dict[str, Any]]:
        found = []
        for page in ddb.get_paginator("query").paginate(
            TableName="t",
            KeyConditionExpression="pk = :pk",
            ExpressionAttributeValues={":pk": {"S": "run#data"}},
            ConsistentRead=True,
            **extra,
        ):
            found.append({k: page.get(k) for k in ("Items", "Count", "LastEvaluatedKey")})
        return found

    with moto.mock_aws():
        # GIVEN a partition of 3 MB (three 1 MB pages and a bit) beside another partition
        ddb = boto3.client("dynamodb", region_name="us-east-1")
        create_state_table(ddb, "t")  # the ledger's shape
        for pk, n in (("run#data", 3100), ("run#other", 30)):
            for i in range(0, n, 25):
                ddb.batch_write_item(
                    RequestItems={
                        "t": [
                            {
                                "PutRequest": {
                                    "Item": {
                                        "pk": {"S": pk},
                                        "sk": {"S": f"k{j:05d}"},
                                        "state": {"S": "done"},
                                        "pad": {"S": "x" * 1000},
                                        "n": {"N": str(j)},
                                    }
                                }
                            }
                            for j in range(i, min(i + 25, n))
                        ]
                    }
                )
        projected = {
            "ProjectionExpression": "sk, #s",
            "ExpressionAttributeNames": {"#s": "state"},
        }
        motos = pages(ddb), pages(ddb, **projected)
        calls = []
        moto_query = DynamoHandler.query

        def counted(self: Any) -> Any:
            calls.append(1)
            return moto_query(self)

        monkeypatch.setattr(DynamoHandler, "query", counted)

        # WHEN the bench's moto answers the same queries
        fast_partition_queries()
        answered = pages(ddb), pages(ddb, **projected)

        # THEN the pages are moto's, item for item and key for key, and moto made none
        assert [len(p) for p in motos] == [4, 4]
        assert answered == motos
        assert calls == []


def test_the_note_under_a_line_says_whether_the_simulators_priority_was_raised() -> None:
    assert nice_note(VENDOR_NICE) == f"the simulator at nice {VENDOR_NICE}"
    assert "could not raise it" in nice_note(0)
    assert "could not raise it" in nice_note(None)


@pytest.mark.skipif(not CpuShare.available(), reason="no writable cgroup (cpu) here")
def test_a_sandbox_is_held_to_lambdas_cpu_share_for_its_memory() -> None:
    # GIVEN a process standing for a sandbox, and a function of 512 MB
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        # WHEN the harness confines it
        group = CpuShare(512).confine(child.pid)
        # THEN the process runs in a cgroup of its own with 512 / 1,769 of a CPU per period
        assert group.name in Path(f"/proc/{child.pid}/cgroup").read_text()
        if (group / "cpu.max").exists():
            quota, period = map(int, (group / "cpu.max").read_text().split())
        else:
            quota = int((group / "cpu.cfs_quota_us").read_text())
            period = int((group / "cpu.cfs_period_us").read_text())
        assert quota / period == pytest.approx(512 / 1769, abs=0.001)
        CpuShare.release(group)
        assert group.exists()  # not while the process is in it
    finally:
        child.kill()
        child.wait()
    # and the cgroup goes once the process has
    CpuShare.release(group)
    assert not group.exists()


@pytest.mark.skipif(not CpuShare.available(), reason="no writable cgroup (cpu) here")
def test_groups_left_by_a_harness_that_died_are_removed() -> None:
    # GIVEN an empty sandbox group named after a harness process that has ended
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    parent = _own_cgroup()
    assert parent is not None
    stale = parent / f"harvest-bench-{gone.pid}-1"
    stale.mkdir()
    # WHEN the next harness looks for cgroups
    assert CpuShare.available()
    # THEN it is gone
    assert not stale.exists()
