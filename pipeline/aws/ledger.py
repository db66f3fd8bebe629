"""The run ledger as items of the DynamoDB state table: pk/sk items, one per run and entity."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from pipeline.aws.expiry import DAY, expiring
from pipeline.config import STATE_RETENTION_DAYS
from pipeline.ledger import (
    MAX_RECORDED_CHILDREN,
    STAT_FIELDS,
    DeadEntity,
    Entity,
    Finished,
    RunStatus,
    State,
    path_json,
    stage_counts,
    storable,
)
from pipeline.stages import STAGE_NAMES

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

T = TypeVar("T")


def _run_pk(run_id: str) -> str:
    return f"run#{run_id}"


def _entity_pk(run_id: str, stage: str) -> str:
    return f"run#{run_id}#{stage}"


class DynamoLedger:
    """The ledger as items of the state table: one per run, one per (run, stage, entity)."""

    RUNS_PK = "runs"
    # Per-entity writes go out this many at a time: a conditional UpdateItem per child
    # cannot be batched (BatchWriteItem has no conditions), and one after another a
    # warrior with 1,000 data groups held its batch for 1,000 round trips (bench --aws).
    PARALLEL_WRITES = 16

    def __init__(
        self, client: DynamoDBClient, table: str, retention_days: float = STATE_RETENTION_DAYS
    ) -> None:
        self._ddb = client
        self.table = table
        self.retention = retention_days * DAY
        self._writers = ThreadPoolExecutor(self.PARALLEL_WRITES, thread_name_prefix="ledger")

    def _update(self, **update: Any) -> Any:
        """UpdateItem, the item's expires_at set `retention` from now (pipeline.aws.expiry)."""
        return self._ddb.update_item(**expiring(update, time.time() + self.retention))

    def _each(self, write: Callable[[T], object], items: Sequence[T]) -> None:
        """`write` every item, PARALLEL_WRITES at a time; the first error is raised."""
        if len(items) <= 1:
            for item in items:
                write(item)
            return
        for _ in self._writers.map(write, items):
            pass

    def start_run(self, run_id: str, window_from: str, window_to: str) -> None:
        now = str(time.time())
        self._update(
            TableName=self.table,
            Key={"pk": {"S": _run_pk(run_id)}, "sk": {"S": "meta"}},
            UpdateExpression="SET window_from = if_not_exists(window_from, :f),"
            " window_to = if_not_exists(window_to, :t), started_at = if_not_exists(started_at, :n)",
            ExpressionAttributeValues={
                ":f": {"S": window_from},
                ":t": {"S": window_to},
                ":n": {"N": now},
            },
        )
        # if_not_exists like the meta item: a rerun must not move the run up in runs().
        self._update(
            TableName=self.table,
            Key={"pk": {"S": self.RUNS_PK}, "sk": {"S": run_id}},
            UpdateExpression="SET started_at = if_not_exists(started_at, :n)",
            ExpressionAttributeValues={":n": {"N": now}},
        )

    def kicked_off(self, run_id: str) -> None:
        self._update(
            TableName=self.table,
            Key={"pk": {"S": _run_pk(run_id)}, "sk": {"S": "meta"}},
            UpdateExpression="SET kicked_off = :y",
            ExpressionAttributeValues={":y": {"BOOL": True}},
        )

    def enqueued(
        self,
        run_id: str,
        stage: str,
        entities: Sequence[Entity],
        parent: tuple[str, str] | None = None,
    ) -> None:
        def record(entity: Entity) -> None:
            key, path = entity
            self._update(
                TableName=self.table,
                Key={"pk": {"S": _entity_pk(run_id, stage)}, "sk": {"S": key}},
                UpdateExpression="SET #s = if_not_exists(#s, :q), #p = if_not_exists(#p, :p)",
                ExpressionAttributeNames={"#s": "state", "#p": "path"},
                ExpressionAttributeValues={
                    ":q": {"S": State.QUEUED},
                    ":p": {"S": path_json(path)},
                },
            )

        self._each(record, entities)
        if parent is not None and entities and len(entities) <= MAX_RECORDED_CHILDREN:
            # On the parent's own item: read back only when the parent is redelivered.
            self._update(
                TableName=self.table,
                Key={"pk": {"S": _entity_pk(run_id, parent[0])}, "sk": {"S": parent[1]}},
                UpdateExpression="ADD children :c",
                ExpressionAttributeValues={":c": {"SS": sorted({k for k, _ in entities})}},
            )

    def children(self, run_id: str, parent_stage: str, parent_key: str) -> set[str]:
        item = self._ddb.get_item(
            TableName=self.table,
            Key={"pk": {"S": _entity_pk(run_id, parent_stage)}, "sk": {"S": parent_key}},
            ProjectionExpression="children",
            ConsistentRead=True,
        ).get("Item", {})
        return set(item.get("children", {}).get("SS", []))

    def finish_pending(self, run_id: str, stage: str, entries: Sequence[Finished]) -> int:
        changed = 0
        for key, state, error in entries:
            try:
                self._update(
                    TableName=self.table,
                    Key={"pk": {"S": _entity_pk(run_id, stage)}, "sk": {"S": key}},
                    UpdateExpression="SET #s = :s, #e = :e",
                    ConditionExpression="#s = :q",
                    ExpressionAttributeNames={"#s": "state", "#e": "error"},
                    ExpressionAttributeValues={
                        ":s": {"S": state},
                        ":e": {"S": storable(error)},
                        ":q": {"S": State.QUEUED},
                    },
                )
                changed += 1
            except self._ddb.exceptions.ConditionalCheckFailedException:
                pass  # finished meanwhile
        return changed

    def pending(self, run_id: str, stage: str) -> list[Entity]:
        return sorted(
            (e["sk"]["S"], tuple(json.loads(e.get("path", {}).get("S", "[]"))))
            for e in self._query(_entity_pk(run_id, stage), "sk, #s, #p")
            if e["state"]["S"] == State.QUEUED
        )

    def finish(self, run_id: str, stage: str, key: str, state: State, error: str = "") -> None:
        kwargs: dict[str, Any] = {}
        if state == State.DEAD:
            kwargs["ConditionExpression"] = "NOT #s IN (:d, :g)"
            kwargs["ExpressionAttributeValues"] = {":d": {"S": State.DONE}, ":g": {"S": State.GONE}}
        values = {
            ":s": {"S": state},
            ":e": {"S": storable(error)},
            **kwargs.pop("ExpressionAttributeValues", {}),
        }
        try:
            self._update(
                TableName=self.table,
                Key={"pk": {"S": _entity_pk(run_id, stage)}, "sk": {"S": key}},
                UpdateExpression="SET #s = :s, #e = :e",
                ExpressionAttributeNames={"#s": "state", "#e": "error"},
                ExpressionAttributeValues=values,
                **kwargs,
            )
        except self._ddb.exceptions.ConditionalCheckFailedException:
            pass  # already done or gone: a late duplicate must not mark it dead

    def finish_many(self, run_id: str, stage: str, entries: Sequence[Finished]) -> None:
        # BatchWriteItem cannot carry the condition that keeps dead from overwriting done.
        self._each(lambda e: self.finish(run_id, stage, *e), entries)

    def record_error(self, run_id: str, stage: str, key: str, error: str) -> None:
        try:
            self._update(
                TableName=self.table,
                Key={"pk": {"S": _entity_pk(run_id, stage)}, "sk": {"S": key}},
                UpdateExpression="SET #e = :e",
                # An item without a state would break status(); unknown entities are skipped.
                ConditionExpression="attribute_exists(#s)",
                ExpressionAttributeNames={"#e": "error", "#s": "state"},
                ExpressionAttributeValues={":e": {"S": storable(error)}},
            )
        except self._ddb.exceptions.ConditionalCheckFailedException:
            pass

    def finished(self, run_id: str, stage: str, keys: Sequence[str]) -> set[str]:
        found: set[str] = set()
        pk = _entity_pk(run_id, stage)
        for i in range(0, len(keys), 100):  # BatchGetItem's limit
            request: dict[str, Any] = {
                self.table: {
                    "Keys": [{"pk": {"S": pk}, "sk": {"S": k}} for k in keys[i : i + 100]],
                    "ProjectionExpression": "sk, #s",
                    "ExpressionAttributeNames": {"#s": "state"},
                    "ConsistentRead": True,
                }
            }
            while request:
                result = self._ddb.batch_get_item(RequestItems=request)
                for item in result.get("Responses", {}).get(self.table, []):
                    if item.get("state", {}).get("S") in (State.DONE, State.GONE):
                        found.add(item["sk"]["S"])
                request = dict(result.get("UnprocessedKeys") or {})
        return found

    def add_stats(self, run_id: str, **amounts: int) -> None:
        names = [n for n in amounts if n in STAT_FIELDS and amounts[n]]
        if not names:
            return
        self._update(
            TableName=self.table,
            Key={"pk": {"S": _run_pk(run_id)}, "sk": {"S": "meta"}},
            UpdateExpression="ADD " + ", ".join(f"{n} :{n}" for n in names),
            ExpressionAttributeValues={f":{n}": {"N": str(amounts[n])} for n in names},
        )

    def status(self, run_id: str) -> RunStatus | None:
        item = self._ddb.get_item(
            TableName=self.table,
            Key={"pk": {"S": _run_pk(run_id)}, "sk": {"S": "meta"}},
            ConsistentRead=True,
        ).get("Item")
        if item is None:
            return None
        rows: list[tuple[str, str, int]] = []
        for stage in STAGE_NAMES:
            for entity in self._query(_entity_pk(run_id, stage), "#s"):
                rows.append((stage, entity["state"]["S"], 1))
        return RunStatus(
            run_id=run_id,
            window_from=item.get("window_from", {}).get("S", ""),
            window_to=item.get("window_to", {}).get("S", ""),
            kicked_off=item.get("kicked_off", {}).get("BOOL", False),
            started_at=float(item.get("started_at", {}).get("N", "0")),
            completed_at=float(item["completed_at"]["N"]) if "completed_at" in item else None,
            stages=stage_counts(rows),
            stats={n: int(item.get(n, {}).get("N", "0")) for n in STAT_FIELDS},
            manifest_signature=item.get("manifest_signature", {}).get("S", ""),
        )

    def _query(self, pk: str, projection: str) -> Iterable[dict[str, Any]]:
        pages = self._ddb.get_paginator("query").paginate(
            TableName=self.table,
            KeyConditionExpression="pk = :pk",
            ExpressionAttributeValues={":pk": {"S": pk}},
            ProjectionExpression=projection,
            # DynamoDB refuses names the expression does not use.
            ExpressionAttributeNames={
                k: v
                for k, v in {"#s": "state", "#p": "path", "#e": "error"}.items()
                if k in projection
            },
            ConsistentRead=True,
        )
        for page in pages:
            yield from page.get("Items", [])

    def dead(self, run_id: str) -> list[DeadEntity]:
        found = []
        for stage in STAGE_NAMES:
            for e in self._query(_entity_pk(run_id, stage), "#s, #p, #e"):
                if e["state"]["S"] == State.DEAD:
                    path = tuple(json.loads(e.get("path", {}).get("S", "[]")))
                    found.append(DeadEntity(stage, path, e.get("error", {}).get("S", "")))
        return found

    def last_error(self, run_id: str, stage: str, key: str) -> str:
        item = self._ddb.get_item(
            TableName=self.table,
            Key={"pk": {"S": _entity_pk(run_id, stage)}, "sk": {"S": key}},
        ).get("Item", {})
        return str(item.get("error", {}).get("S", ""))

    def mark_completed(self, run_id: str) -> bool:
        now = {":n": {"N": str(time.time())}}
        try:
            self._update(
                TableName=self.table,
                Key={"pk": {"S": _run_pk(run_id)}, "sk": {"S": "meta"}},
                UpdateExpression="SET completed_at = :n",
                ConditionExpression="attribute_not_exists(completed_at)",
                ExpressionAttributeValues=now,
            )
            first = True
        except self._ddb.exceptions.ConditionalCheckFailedException:
            first = False
        # The run list's item too, so that open_runs() can skip the run (also repairs a
        # list item that an interrupted first call left without it).
        self._update(
            TableName=self.table,
            Key={"pk": {"S": self.RUNS_PK}, "sk": {"S": run_id}},
            UpdateExpression="SET completed_at = if_not_exists(completed_at, :n)",
            ExpressionAttributeValues=now,
        )
        return first

    def mark_manifest(self, run_id: str, signature: str) -> None:
        for key in (
            {"pk": {"S": _run_pk(run_id)}, "sk": {"S": "meta"}},
            # The run list's item too: open_runs() skips the run from then on.
            {"pk": {"S": self.RUNS_PK}, "sk": {"S": run_id}},
        ):
            self._update(
                TableName=self.table,
                Key=key,
                UpdateExpression="SET manifest_signature = :s",
                ExpressionAttributeValues={":s": {"S": signature}},
            )

    def mark_quiet(self, run_id: str, at: float | None) -> float | None:
        key = {"pk": {"S": _run_pk(run_id)}, "sk": {"S": "meta"}}
        if at is None:
            self._update(TableName=self.table, Key=key, UpdateExpression="REMOVE quiet_since")
            return None
        item = self._update(
            TableName=self.table,
            Key=key,
            UpdateExpression="SET quiet_since = if_not_exists(quiet_since, :n)",
            ExpressionAttributeValues={":n": {"N": repr(at)}},
            ReturnValues="ALL_NEW",
        ).get("Attributes", {})
        return float(item.get("quiet_since", {}).get("N", repr(at)))

    def _run_items(self) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        pages = self._ddb.get_paginator("query").paginate(
            TableName=self.table,
            KeyConditionExpression="pk = :pk",
            ExpressionAttributeValues={":pk": {"S": self.RUNS_PK}},
        )
        for page in pages:
            items.extend(page.get("Items", []))
        items.sort(key=lambda i: float(i.get("started_at", {}).get("N", "0")), reverse=True)
        return items

    def runs(self) -> list[str]:
        return [i["sk"]["S"] for i in self._run_items()]

    def open_runs(self, since: float) -> list[str]:
        return [
            i["sk"]["S"]
            for i in reversed(self._run_items())
            if "completed_at" not in i
            and "manifest_signature" not in i
            and float(i.get("started_at", {}).get("N", "0")) >= since
        ]
