"""AWS resources on moto, shaped the way the Terraform stack creates them.

Call these inside `moto.mock_aws()`, after the mock has started and before any code
under test builds a client (moto's getting-started rule).
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_sqs import SQSClient

REGION = "us-east-1"


def queue_with_dlq(
    sqs: SQSClient, name: str, *, visibility_timeout: int, max_receive_count: int
) -> tuple[str, str]:
    """A queue whose redrive policy moves a message to `<name>-dlq`; returns both URLs."""
    dlq_url = sqs.create_queue(QueueName=f"{name}-dlq")["QueueUrl"]
    attributes = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])
    dlq_arn = attributes["Attributes"]["QueueArn"]
    url = sqs.create_queue(
        QueueName=name,
        Attributes={
            "VisibilityTimeout": str(visibility_timeout),
            "RedrivePolicy": json.dumps(
                {"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(max_receive_count)}
            ),
        },
    )["QueueUrl"]
    return url, dlq_url


def state_table(ddb: DynamoDBClient, name: str = "harvest-state") -> str:
    """The state table: hash key `pk`, range key `sk`, both strings, on demand."""
    ddb.create_table(
        TableName=name,
        AttributeDefinitions=[
            {"AttributeName": "pk", "AttributeType": "S"},
            {"AttributeName": "sk", "AttributeType": "S"},
        ],
        KeySchema=[
            {"AttributeName": "pk", "KeyType": "HASH"},
            {"AttributeName": "sk", "KeyType": "RANGE"},
        ],
        BillingMode="PAY_PER_REQUEST",
    )
    return name


def bucket(s3: S3Client, name: str = "harvest-output") -> str:
    s3.create_bucket(Bucket=name)
    return name
