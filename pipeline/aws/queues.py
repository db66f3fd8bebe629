"""The queue interface on SQS, by queue URL."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pipeline.queues import BATCH, Depth, Message, Outgoing, QueueError, chunks

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient
    from mypy_boto3_sqs.type_defs import SendMessageBatchRequestEntryTypeDef


class SqsQueue:
    """An SQS queue by URL. Retries entries a batch call reports as failed, a few times."""

    def __init__(self, client: SQSClient, url: str, name: str = "") -> None:
        self._sqs = client
        self.url = url
        self.name = name or url.rsplit("/", 1)[-1]

    def send(self, messages: Sequence[Outgoing]) -> None:
        for batch in chunks(messages):
            pending = {str(i): m for i, m in enumerate(batch)}
            for _ in range(3):
                result = self._sqs.send_message_batch(
                    QueueUrl=self.url,
                    Entries=[_entry(i, m) for i, m in pending.items()],
                )
                pending = {f["Id"]: pending[f["Id"]] for f in result.get("Failed", [])}
                if not pending:
                    break
            if pending:
                raise QueueError(f"{self.name}: {len(pending)} messages not accepted by SQS")

    def receive(
        self,
        max_messages: int = BATCH,
        wait_seconds: float = 0.0,
        visibility_timeout: float | None = None,
    ) -> list[Message]:
        extra: dict[str, Any] = {}
        if visibility_timeout is not None:
            extra["VisibilityTimeout"] = int(visibility_timeout)
        result = self._sqs.receive_message(
            QueueUrl=self.url,
            MaxNumberOfMessages=min(max_messages, BATCH),
            WaitTimeSeconds=int(min(wait_seconds, 20)),
            MessageAttributeNames=["All"],
            # AttributeNames, not its newer twin: the Lambda runtime's boto3 may predate that.
            AttributeNames=["ApproximateReceiveCount"],
            **extra,
        )
        return [
            Message(
                id=m["MessageId"],
                receipt=m["ReceiptHandle"],
                body=m["Body"],
                attributes={
                    k: v.get("StringValue", "") for k, v in m.get("MessageAttributes", {}).items()
                },
                receive_count=int(m.get("Attributes", {}).get("ApproximateReceiveCount", "1")),
            )
            for m in result.get("Messages", [])
        ]

    def delete(self, receipts: Sequence[str]) -> None:
        for batch in chunks(receipts):
            # A failed delete only means a redelivery later, which processing tolerates.
            self._sqs.delete_message_batch(
                QueueUrl=self.url,
                Entries=[{"Id": str(i), "ReceiptHandle": r} for i, r in enumerate(batch)],
            )

    def change_visibility(self, receipts: Sequence[str], seconds: float) -> None:
        for batch in chunks(receipts):
            self._sqs.change_message_visibility_batch(
                QueueUrl=self.url,
                Entries=[
                    {"Id": str(i), "ReceiptHandle": r, "VisibilityTimeout": int(seconds)}
                    for i, r in enumerate(batch)
                ],
            )

    def depth(self) -> Depth:
        attrs = self._sqs.get_queue_attributes(
            QueueUrl=self.url,
            AttributeNames=[
                "ApproximateNumberOfMessages",
                "ApproximateNumberOfMessagesNotVisible",
                "ApproximateNumberOfMessagesDelayed",
            ],
        )["Attributes"]
        return Depth(
            visible=int(attrs.get("ApproximateNumberOfMessages", 0))
            + int(attrs.get("ApproximateNumberOfMessagesDelayed", 0)),
            in_flight=int(attrs.get("ApproximateNumberOfMessagesNotVisible", 0)),
        )


def _entry(entry_id: str, message: Outgoing) -> SendMessageBatchRequestEntryTypeDef:
    entry: SendMessageBatchRequestEntryTypeDef = {"Id": entry_id, "MessageBody": message.body}
    if message.attributes:
        entry["MessageAttributes"] = {
            k: {"DataType": "String", "StringValue": v} for k, v in message.attributes.items()
        }
    return entry
