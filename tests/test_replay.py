"""DLQ inspection and replay against the queue contract: each dead letter counted once."""

from __future__ import annotations

from pathlib import Path

import boto3
from aws_fakes import REGION
from moto import mock_aws

from pipeline.aws.queues import SqsQueue
from pipeline.local.queues import LocalQueueStore
from pipeline.queues import Outgoing, Queue
from pipeline.replay import inspect, replay


def fill(queue: Queue, n: int) -> None:
    queue.send([Outgoing(f'{{"n": {i}}}') for i in range(n)])


def test_dry_run_counts_each_letter_once_when_the_dlq_hides_messages_briefly(
    tmp_path: Path,
) -> None:
    # GIVEN a DLQ of 45 letters whose own visibility timeout is 0: with it, every message
    # listed comes round again at once, and a listing that relies on it never ends
    store = LocalQueueStore(tmp_path / "q.sqlite")
    dlq = store.queue("troops-dlq", visibility_timeout=0.0)
    fill(dlq, 45)

    # WHEN the operator asks for a dry run
    report = replay(dlq, store.queue("troops"), dry_run=True)

    # THEN 45 are counted, none moved, and they are all visible again
    assert (report.seen, report.moved) == (45, 0)
    assert dlq.depth().visible == 45


def test_inspect_stops_when_a_letter_comes_round_again(tmp_path: Path) -> None:
    # GIVEN a DLQ of 3 letters
    store = LocalQueueStore(tmp_path / "q.sqlite")
    dlq = store.queue("troops-dlq")
    fill(dlq, 3)

    # WHEN they are listed with a limit far above their number
    letters = inspect(dlq, limit=10**6)

    # THEN each appears once
    assert sorted(letter.body for letter in letters) == [f'{{"n": {i}}}' for i in range(3)]


def test_dry_run_on_sqs_hides_what_it_lists_and_releases_it() -> None:
    # GIVEN an SQS DLQ whose default visibility is 0 (moto)
    with mock_aws():
        sqs = boto3.client("sqs", region_name=REGION)
        url = sqs.create_queue(QueueName="dlq", Attributes={"VisibilityTimeout": "0"})["QueueUrl"]
        dlq = SqsQueue(sqs, url, "dlq")
        fill(dlq, 25)

        # WHEN a dry run lists it
        letters = inspect(dlq)

        # THEN each letter once, all visible again afterwards
        assert len(letters) == 25
        assert dlq.depth().visible == 25
