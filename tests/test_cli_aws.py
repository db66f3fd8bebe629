"""`harvest status/dlq/replay --aws` against SQS, DynamoDB and S3 on moto."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import boto3
import pytest
from conftest import WINDOW
from moto import mock_aws

from pipeline.aws.ledger import DynamoLedger
from pipeline.dev import cli
from pipeline.envelope import Envelope
from pipeline.ledger import State
from pipeline.queues import DEAD_RECEIVES, DEAD_STAGE, ERROR_CLASS, ERROR_MESSAGE, RELISTED
from pipeline.stages import STAGE_NAMES

pytestmark = pytest.mark.integration

RUN = WINDOW.run_id
TABLE = "harvest-state"
BUCKET = "harvest-output"
REGION = "eu-west-1"


def group(data_group_id: str) -> Envelope:
    return Envelope(RUN, "data_groups", ("troop 1", "warrior/1", data_group_id), WINDOW)


@dataclass
class Aws:
    sqs: Any
    urls: dict[str, dict[str, str]]
    ledger: DynamoLedger

    def dead_letter(self, stage: str, body: str, **attributes: str) -> None:
        """Put a message in a stage's DLQ as the drain would (or, without attributes, SQS)."""
        kwargs: dict[str, Any] = {}
        if attributes:
            kwargs["MessageAttributes"] = {
                k: {"DataType": "String", "StringValue": v} for k, v in attributes.items()
            }
        self.sqs.send_message(QueueUrl=self.urls[stage]["dlq_url"], MessageBody=body, **kwargs)

    def messages(self, stage: str, which: str = "url") -> list[dict[str, Any]]:
        """Every message of a queue, received with its attributes and released again."""
        url = self.urls[stage][which]
        found: list[dict[str, Any]] = []
        while True:
            got = self.sqs.receive_message(
                QueueUrl=url, MaxNumberOfMessages=10, MessageAttributeNames=["All"]
            ).get("Messages", [])
            if not got:
                break
            found.extend(got)
        for m in found:
            self.sqs.change_message_visibility(
                QueueUrl=url, ReceiptHandle=m["ReceiptHandle"], VisibilityTimeout=0
            )
        return found

    def record_run(self, dead: bool) -> None:
        """A settled run of two data groups, one of them dead if `dead`."""
        ok, bad = group("d1"), group("d2")
        self.ledger.start_run(RUN, WINDOW.from_text, WINDOW.to_text)
        self.ledger.enqueued(RUN, "data_groups", [(ok.key, ok.path), (bad.key, bad.path)])
        self.ledger.kicked_off(RUN)
        self.ledger.finish(RUN, "data_groups", ok.key, State.DONE)
        if dead:
            self.ledger.finish(RUN, "data_groups", bad.key, State.DEAD, "RetryableError: 503 x4")
        else:
            self.ledger.finish(RUN, "data_groups", bad.key, State.DONE)


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[Aws]:
    for name, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": REGION,
    }.items():
        monkeypatch.setenv(name, value)
    with mock_aws():
        sqs = boto3.client("sqs", region_name=REGION)
        urls = {
            s: {
                "url": sqs.create_queue(QueueName=f"harvest-{s}")["QueueUrl"],
                "dlq_url": sqs.create_queue(QueueName=f"harvest-{s}-dlq")["QueueUrl"],
            }
            for s in STAGE_NAMES
        }
        ddb = boto3.client("dynamodb", region_name=REGION)
        ddb.create_table(
            TableName=TABLE,
            KeySchema=[
                {"AttributeName": "pk", "KeyType": "HASH"},
                {"AttributeName": "sk", "KeyType": "RANGE"},
            ],
            AttributeDefinitions=[
                {"AttributeName": "pk", "AttributeType": "S"},
                {"AttributeName": "sk", "AttributeType": "S"},
            ],
            BillingMode="PAY_PER_REQUEST",
        )
        boto3.client("s3", region_name=REGION).create_bucket(
            Bucket=BUCKET, CreateBucketConfiguration={"LocationConstraint": REGION}
        )
        for name, value in {
            "HARVEST_BACKEND": "aws",
            "HARVEST_QUEUES": json.dumps(urls),
            "HARVEST_STATE_TABLE": TABLE,
            "HARVEST_SINK": f"s3://{BUCKET}/harvest",
            "HARVEST_VENDOR_URL": "https://unused.invalid",
        }.items():
            monkeypatch.setenv(name, value)
        yield Aws(sqs, urls, DynamoLedger(ddb, TABLE))


DEAD_503 = {
    ERROR_CLASS: "RetryableError",
    ERROR_MESSAGE: "GET /v1/data-groups/d1/data: 503 after 4 attempts",
    DEAD_STAGE: "data_groups",
    DEAD_RECEIVES: "5",
}
DEAD_400 = {**DEAD_503, ERROR_CLASS: "PoisonError", ERROR_MESSAGE: "400 bad request"}


# -- status -------------------------------------------------------------------------------


def test_status_aws_exits_zero_for_a_complete_run(
    aws: Aws, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a run whose every entity is done
    aws.record_run(dead=False)

    # WHEN the operator asks for its status
    code = cli.main(["status", "--aws"])

    # THEN it shows the run as complete and succeeds
    assert code == 0
    said = capsys.readouterr().out
    assert RUN in said and "complete" in said


def test_status_aws_exits_nonzero_and_names_the_dead_for_an_incomplete_run(
    aws: Aws, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a settled run with one dead data group
    aws.record_run(dead=True)

    # WHEN the operator asks for its status by run id
    code = cli.main(["status", RUN, "--aws"])

    # THEN it fails and names the dead entity with its error
    assert code == 1
    said = capsys.readouterr().out
    assert "dead: data_groups troop 1 / warrior/1 / d2: RetryableError: 503 x4" in said


def test_status_aws_names_messages_not_visible_without_saying_why_or_until_when(
    aws: Aws, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a running run with one data group received by a drain
    aws.record_run(dead=False)
    url = aws.urls["data_groups"]["url"]
    aws.sqs.send_message(QueueUrl=url, MessageBody=group("d3").to_json())
    aws.sqs.receive_message(QueueUrl=url, VisibilityTimeout=300)

    # WHEN the operator asks for its status
    cli.main(["status", "--aws"])

    # THEN it says how many are not visible, and that SQS does not say why or until when
    said = " ".join(capsys.readouterr().out.split())
    assert "waiting: data_groups: about 1 messages not visible" in said
    assert "SQS says neither which nor until when" in said


def test_status_aws_names_a_run_waiting_on_its_dlq(
    aws: Aws, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a settled run with its dead data group in the DLQ, and nothing else queued
    aws.record_run(dead=True)
    aws.dead_letter("data_groups", group("d2").to_json(), **DEAD_503)

    # WHEN the operator asks for its status
    cli.main(["status", "--aws"])

    # THEN it says the run waits on the DLQ, and how to replay it
    said = " ".join(capsys.readouterr().out.split())
    assert (
        "waiting: 1 messages in the data_groups DLQ and nothing else queued:"
        " run `harvest replay data_groups --aws`"
    ) in said


# -- dlq ----------------------------------------------------------------------------------


def test_dlq_aws_lists_dead_letters_grouped_by_reason_and_keeps_them(
    aws: Aws, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN two data groups dead of a 503 and one of a 400
    aws.dead_letter("data_groups", group("d1").to_json(), **DEAD_503)
    aws.dead_letter("data_groups", group("d2").to_json(), **DEAD_503)
    aws.dead_letter("data_groups", group("d3").to_json(), **DEAD_400)

    # WHEN the operator lists the data_groups DLQ
    code = cli.main(["dlq", "data_groups", "--aws"])

    # THEN the reasons are counted, and the messages are still in the DLQ
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    assert any("3 dead letters" in line for line in lines)
    assert any("│     2 │ RetryableError: GET" in line for line in lines)
    assert any("│     1 │ PoisonError: 400 bad request" in line for line in lines)
    assert len(aws.messages("data_groups", "dlq_url")) == 3


def test_dlq_aws_explains_a_message_sqs_redrove_with_the_ledgers_last_error(
    aws: Aws, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a message SQS moved itself (no reason attributes) whose last error the ledger has
    aws.record_run(dead=False)
    aws.ledger.record_error(RUN, "data_groups", group("d1").key, "RetryableError: read timeout")
    aws.dead_letter("data_groups", group("d1").to_json())

    # WHEN the operator lists the data_groups DLQ
    assert cli.main(["dlq", "data_groups", "--aws"]) == 0

    # THEN the reason is the ledger's last error, marked as a redrive
    said = capsys.readouterr().out
    assert "RetryableError: read timeout" in said
    assert "redriven" in said


# -- replay -------------------------------------------------------------------------------


def test_replay_aws_moves_dead_letters_back_with_body_and_attributes(
    aws: Aws, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a dead-lettered data group
    body = group("d1").to_json()
    aws.dead_letter("data_groups", body, **DEAD_503)

    # WHEN the operator replays the data_groups DLQ
    code = cli.main(["replay", "data_groups", "--aws"])

    # THEN the DLQ is empty and the queue holds the message as it was, marked relisted (so
    # the drain reads the ledger before working on it)
    assert code == 0
    assert "moved 1 messages" in capsys.readouterr().out
    assert aws.messages("data_groups", "dlq_url") == []
    [moved] = aws.messages("data_groups")
    assert moved["Body"] == body
    attributes = {k: v["StringValue"] for k, v in moved["MessageAttributes"].items()}
    assert attributes == {**DEAD_503, **RELISTED}


def test_replay_aws_dry_run_moves_nothing(aws: Aws, capsys: pytest.CaptureFixture[str]) -> None:
    # GIVEN two dead-lettered data groups
    aws.dead_letter("data_groups", group("d1").to_json(), **DEAD_503)
    aws.dead_letter("data_groups", group("d2").to_json(), **DEAD_400)

    # WHEN the operator replays with --dry-run
    code = cli.main(["replay", "data_groups", "--aws", "--dry-run"])

    # THEN it counts them by reason and moves none
    assert code == 0
    said = capsys.readouterr().out
    assert "would move 2 messages" in said
    assert "PoisonError: 400 bad request" in said
    assert len(aws.messages("data_groups", "dlq_url")) == 2
    assert aws.messages("data_groups") == []


def test_replay_aws_max_moves_at_most_that_many(
    aws: Aws, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN three dead-lettered data groups
    for d in ("d1", "d2", "d3"):
        aws.dead_letter("data_groups", group(d).to_json(), **DEAD_503)

    # WHEN the operator replays at most one
    code = cli.main(["replay", "data_groups", "--aws", "--max", "1"])

    # THEN one moved and two stayed
    assert code == 0
    assert "moved 1 messages" in capsys.readouterr().out
    assert len(aws.messages("data_groups")) == 1
    assert len(aws.messages("data_groups", "dlq_url")) == 2


def test_replay_aws_touches_only_the_named_stage(aws: Aws) -> None:
    # GIVEN dead letters in the warriors and data_groups DLQs
    warrior = Envelope(RUN, "warriors", ("troop 1", "warrior/1"), WINDOW)
    aws.dead_letter("warriors", warrior.to_json(), **DEAD_400)
    aws.dead_letter("data_groups", group("d1").to_json(), **DEAD_503)

    # WHEN the operator replays the warriors DLQ
    assert cli.main(["replay", "warriors", "--aws"]) == 0

    # THEN only the warrior moved
    assert [m["Body"] for m in aws.messages("warriors")] == [warrior.to_json()]
    assert len(aws.messages("data_groups", "dlq_url")) == 1
    assert aws.messages("data_groups") == []


# -- compact (pipeline/compact.py) --------------------------------------------------------


def test_compact_aws_writes_parquet_to_the_bucket_once_per_complete_run(
    aws: Aws, capsys: pytest.CaptureFixture[str]
) -> None:
    pq = pytest.importorskip("pyarrow.parquet")
    import io

    from pipeline.aws.sinks import S3Sink
    from pipeline.compact import compaction_key
    from pipeline.sinks import write_manifest, write_records

    # GIVEN a complete run with two data groups of three points in the bucket
    aws.record_run(dead=False)
    sink = S3Sink(boto3.client("s3", region_name=REGION), f"s3://{BUCKET}/harvest")
    for e in (group("d1"), group("d2")):
        points = [{"ts": f"2024-03-01T0{h}:00:00Z", "value": h} for h in range(3)]
        record = dict(zip(("troop_id", "warrior_id", "data_group_id"), e.path, strict=True))
        write_records(sink, RUN, e.key, [{"run_id": RUN, **record, "points": points}])
    write_manifest(sink, RUN, {"run_id": RUN, "status": "complete"})

    # WHEN the operator compacts pending runs, twice
    assert cli.main(["compact", "--aws"]) == 0
    assert cli.main(["compact", "--aws"]) == 0

    # THEN one Parquet file of the six points under the sink's points/ prefix; the second
    # call finds nothing left to compact
    said = capsys.readouterr().out
    assert f"{RUN}: 6 points from 2 raw objects in 1 Parquet files" in said
    assert "nothing to compact" in said
    record = json.loads(sink.get(compaction_key(RUN)) or b"{}")
    assert record["status"] == "complete"
    [written] = record["files"]
    assert written["key"] == f"points/dt=2024-03-01/{RUN}.part-00000.parquet"
    blob = sink.get(written["key"])
    assert blob is not None and pq.read_table(io.BytesIO(blob)).num_rows == 6


def test_compact_aws_leaves_a_run_with_dead_letters_alone(
    aws: Aws, capsys: pytest.CaptureFixture[str]
) -> None:
    from pipeline.aws.sinks import S3Sink
    from pipeline.sinks import write_manifest

    aws.record_run(dead=True)
    sink = S3Sink(boto3.client("s3", region_name=REGION), f"s3://{BUCKET}/harvest")
    write_manifest(sink, RUN, {"run_id": RUN, "status": "incomplete"})

    assert cli.main(["compact", "--aws"]) == 0
    assert "nothing to compact" in capsys.readouterr().out
    assert list(sink.keys("points/")) == []
