"""Other vendors, harvested exactly: `harvest local` and the Lambda handlers on moto, each
against the simulator serving the profile (4 levels with Link paging and basic auth; 2
levels with offset paging, an API key header and other field names)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import boto3
import pytest
from aws_fakes import REGION, bucket, queue_with_dlq, state_table
from conftest import WINDOW
from moto import mock_aws

from pipeline import profile
from pipeline.aws.sinks import S3Sink
from pipeline.dev.simulator import Simulator, SimulatorConfig, SimulatorProcess
from pipeline.drain import _checked_epoch
from pipeline.errors import ConfigError, PoisonError
from pipeline.local.scheduler import (
    LocalContext,
    LocalOptions,
    claim_profile,
    recorded_profile,
    run_local,
)
from pipeline.local.sinks import DirectorySink
from pipeline.profile import TimeFormat
from pipeline.runtime import reset_cache
from pipeline.sinks import read_run

ROOT = Path(__file__).resolve().parent
RUN = WINDOW.run_id
# (profile file, entities per level): small trees that still page (Link pages of 50 and
# readings pages of 40; offset pages of 25), with gone entities, 5xx faults and awkward ids.
PROFILES = {
    "fleet-4-levels": (ROOT / "profiles" / "fleet-4-levels.toml", (2, 2, 3, 2)),
    "orbit-offset-apikey": (ROOT / "profiles" / "orbit-offset-apikey.toml", (3, 30)),
}


def tree(name: str) -> SimulatorConfig:
    path, fanout = PROFILES[name]
    return SimulatorConfig(
        profile=profile.load(str(path)),
        fanout=fanout,
        seed=3,
        gone_rate=0.1,
        error_rate=0.05,
        nasty_ids=True,
        point_interval=600.0,
    )


@pytest.mark.parametrize("name", sorted(PROFILES))
def test_harvest_local_harvests_another_vendor_exactly(tmp_path: Path, name: str) -> None:
    # GIVEN the simulator serving the profile, with gone entities, 5xx faults, awkward ids
    path, _ = PROFILES[name]
    config = tree(name)

    # WHEN `harvest local --profile` runs
    result = run_local(
        LocalOptions(
            window=WINDOW,
            out=tmp_path / "out",
            tick=0.2,
            invocation_timeout=10.0,
            safety_margin=2.0,
            profile=str(path),
            simulator=SimulatorProcess(config),
        )
    )

    # THEN complete and equal to the ground truth, its records keyed by the profile's levels
    assert result.exit_code == 0
    assert result.comparison is not None and result.comparison.exact
    assert result.comparison.found > 0
    assert result.status is not None and result.status.complete
    assert list(result.status.stages) == list(config.profile.stage_names)
    assert sum(c.gone for c in result.status.stages.values()) > 0
    record = next(iter(read_run(DirectorySink(tmp_path / "out"), RUN)))
    assert list(record) == ["run_id", *config.profile.keys, "from", "to", "points"]
    assert result.rate_limited == 0


@pytest.fixture
def aws_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": REGION,
        "POWERTOOLS_TRACE_DISABLED": "true",
        "POWERTOOLS_METRICS_DISABLED": "true",
    }.items():
        monkeypatch.setenv(key, value)
    reset_cache()
    yield
    reset_cache()


@pytest.mark.integration
@pytest.mark.parametrize("name", sorted(PROFILES))
def test_the_handlers_on_moto_harvest_another_vendor_exactly(
    aws_env: None, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    from workers import drain as drain_worker
    from workers import kickoff as kickoff_worker

    path, _ = PROFILES[name]
    # 5xx faults are the local test's; here the paging, auth and keys on AWS's stores
    config = replace(tree(name), error_rate=0.0)
    stages = config.profile.stage_names
    with Simulator(config) as sim, mock_aws():
        # GIVEN the stack's queues (one per level of the profile), table and bucket on moto
        sqs = boto3.client("sqs", region_name=REGION)
        queues = {}
        for s in stages:
            url, dlq_url = queue_with_dlq(
                sqs, f"harvest-{s}", visibility_timeout=60, max_receive_count=6
            )
            queues[s] = {"url": url, "dlq_url": dlq_url}
        table = state_table(boto3.client("dynamodb", region_name=REGION))
        s3 = boto3.client("s3", region_name=REGION)
        out = bucket(s3)
        for key, value in {
            "HARVEST_BACKEND": "aws",
            "HARVEST_PROFILE": str(path),
            "HARVEST_QUEUES": json.dumps(queues),
            "HARVEST_STATE_TABLE": table,
            "HARVEST_SINK": f"s3://{out}/harvest",
            "HARVEST_VENDOR_URL": sim.url,
            "HARVEST_ALLOW_HTTP": "true",
            "HARVEST_VENDOR_TOKEN": sim.token,
            "HARVEST_RETRY_DELAY": "0",
            "HARVEST_WAIT_SECONDS": "0",
            "HARVEST_SAFETY_MARGIN": "2",
        }.items():
            monkeypatch.setenv(key, value)

        # WHEN the kickoff handler runs, then each stage's drain handler until all settle
        kickoff_worker.handler(
            {"from": WINDOW.from_text, "to": WINDOW.to_text}, LocalContext("kickoff", 30)
        )
        for _ in range(12):
            for s in stages:
                drain_worker.handler({"stage": s}, LocalContext(f"drain-{s}", 20))
            depth = sum(
                int(
                    sqs.get_queue_attributes(
                        QueueUrl=q["url"],
                        AttributeNames=[
                            "ApproximateNumberOfMessages",
                            "ApproximateNumberOfMessagesNotVisible",
                        ],
                    )["Attributes"][a]
                )
                for q in queues.values()
                for a in ("ApproximateNumberOfMessages", "ApproximateNumberOfMessagesNotVisible")
            )
            if depth == 0:
                break

        # THEN the S3 output equals the ground truth, keyed by the profile's levels
        sink = S3Sink(s3, f"s3://{out}/harvest")
        comparison = sim.check(sink, RUN, WINDOW)
        assert comparison.exact, comparison.describe()
        assert comparison.found > 0
        assert sim.stats.rate_limited == 0
        record = next(iter(read_run(sink, RUN)))
        assert list(record) == ["run_id", *config.profile.keys, "from", "to", "points"]


def test_a_local_state_directory_keeps_the_profile_its_runs_use(tmp_path: Path) -> None:
    # GIVEN an --out whose runs are of the 4-level profile
    out = tmp_path / "out"
    claim_profile(out / ".harvest", str(PROFILES["fleet-4-levels"][0]))

    # WHEN `harvest local` is asked to run another profile there
    with pytest.raises(ConfigError, match="holds runs of the profile .*fleet-4-levels"):
        run_local(
            LocalOptions(window=WINDOW, out=out, profile="hermes-v1", simulator=SimulatorProcess())
        )

    # THEN nothing started: no queue, no ledger, and the record is unchanged
    assert sorted(p.name for p in (out / ".harvest").iterdir()) == ["profile"]
    assert recorded_profile(out / ".harvest").endswith("fleet-4-levels.toml")


def test_unix_times_are_cut_to_the_microsecond_downwards_and_kept_in_the_window() -> None:
    start, end = WINDOW.start, WINDOW.end
    last = end.timestamp() - 0.0000004  # 0.4 microseconds before the end
    assert _checked_epoch(last, {}, start, end, TimeFormat.UNIX).endswith("T23:59:59.999999Z")
    assert _checked_epoch(
        int(start.timestamp() * 1000) + 300, {}, start, end, TimeFormat.UNIX_MS
    ) == ("2024-03-01T00:00:00.300000Z")
    for bad in (10**400, end.timestamp(), float("inf"), True):
        with pytest.raises(PoisonError):
            _checked_epoch(bad, {"ts": bad}, start, end, TimeFormat.UNIX)
