"""Every item the ledger and the budget write to the state table expires (its TTL attribute).

terraform/storage.tf turns DynamoDB's TTL on for `expires_at`; the items must carry it, as
epoch seconds, the retention after their last write, or they would never expire.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import boto3
import pytest
from aws_fakes import REGION, state_table
from fake_clock import FakeClock
from moto import mock_aws

import pipeline.aws.ledger
from pipeline.aws.budget import DynamoBudget
from pipeline.aws.expiry import expiring
from pipeline.aws.ledger import DynamoLedger
from pipeline.config import STATE_RETENTION_DAYS, Config
from pipeline.errors import ConfigError
from pipeline.ledger import State

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

RUN = "20240101T000000Z-20240102T000000Z"
NOW = 1_700_000_000.0
DAY = 86400


@pytest.fixture
def dynamodb() -> Iterator[DynamoDBClient]:
    with mock_aws():
        yield boto3.client("dynamodb", region_name=REGION)


def items(ddb: DynamoDBClient, table: str) -> list[dict[str, Any]]:
    return ddb.scan(TableName=table)["Items"]


def expires(item: dict[str, Any]) -> int:
    return int(item["expires_at"]["N"])


def test_every_ledger_item_expires_the_retention_after_its_last_write(
    dynamodb: DynamoDBClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # GIVEN a ledger whose clock stands still, retention 20 days
    clock = FakeClock(NOW)
    monkeypatch.setattr(pipeline.aws.ledger, "time", types.SimpleNamespace(time=clock.time))
    table = state_table(dynamodb)
    ledger = DynamoLedger(dynamodb, table, retention_days=20)

    # WHEN a run is recorded with every kind of write
    ledger.start_run(RUN, "2024-01-01T00:00:00Z", "2024-01-02T00:00:00Z")
    ledger.enqueued(RUN, "troops", [("t1", ("t1",)), ("t2", ("t2",))])
    ledger.enqueued(RUN, "warriors", [("w1", ("t1", "w1"))], parent=("troops", "t1"))
    ledger.kicked_off(RUN)
    ledger.add_stats(RUN, calls=3)
    ledger.mark_quiet(RUN, NOW)
    ledger.record_error(RUN, "troops", "t2", "RetryableError: 503")
    clock.advance(DAY)
    ledger.finish(RUN, "troops", "t1", State.DONE)
    ledger.mark_completed(RUN)
    ledger.mark_manifest(RUN, "{}")

    # THEN every item (run, run list, listings, entity states) expires 20 days after its
    # last write
    found = {(i["pk"]["S"], i["sk"]["S"]): expires(i) for i in items(dynamodb, table)}
    listings = {k: v for k, v in found.items() if k[0].endswith("#listed")}
    assert len(found) == 6
    assert found[(f"run#{RUN}#troops", "t1")] == NOW + DAY + 20 * DAY
    assert found[(f"run#{RUN}#troops", "t2")] == NOW + 20 * DAY
    assert found[(f"run#{RUN}", "meta")] == NOW + DAY + 20 * DAY
    assert found[("runs", RUN)] == NOW + DAY + 20 * DAY
    assert sorted(pk for pk, _ in listings) == [
        f"run#{RUN}#troops#listed",
        f"run#{RUN}#warriors#listed",
    ]
    assert set(listings.values()) == {NOW + 20 * DAY}


def test_the_budget_item_expires_the_retention_after_its_last_write(
    dynamodb: DynamoDBClient,
) -> None:
    # GIVEN a budget with the default retention
    clock = FakeClock(NOW)
    table = state_table(dynamodb)
    budget = DynamoBudget(dynamodb, table, 10, 1.0, clock=clock.time, sleep=clock.sleep)

    # WHEN it claims a slot, and later learns a pause, a lower limit and a wider margin
    budget.acquire()
    clock.advance(DAY)
    budget.pause(2.0)
    budget.observe(5, None, None)

    # THEN its one item expires the retention after the last of those writes
    [item] = items(dynamodb, table)
    assert expires(item) == NOW + DAY + STATE_RETENTION_DAYS * DAY


def test_expiring_adds_expires_at_to_an_update_without_a_set_clause() -> None:
    update = {"UpdateExpression": "ADD children :c", "ExpressionAttributeValues": {":c": 1}}

    result = expiring(update, 12.7)

    assert result["UpdateExpression"] == "SET #expires_at = :expires_at ADD children :c"
    assert result["ExpressionAttributeNames"] == {"#expires_at": "expires_at"}
    assert result["ExpressionAttributeValues"] == {":c": 1, ":expires_at": {"N": "12"}}


def test_state_retention_comes_from_the_environment_and_must_be_a_day_or_more() -> None:
    env = {"HARVEST_VENDOR_URL": "https://vendor.test", "HARVEST_STATE_RETENTION_DAYS": "40"}

    assert Config.from_env(env).state_retention_days == 40
    assert Config(vendor_url="https://vendor.test").state_retention_days == STATE_RETENTION_DAYS
    with pytest.raises(ConfigError, match="HARVEST_STATE_RETENTION_DAYS"):
        Config.from_env({**env, "HARVEST_STATE_RETENTION_DAYS": "0"})
