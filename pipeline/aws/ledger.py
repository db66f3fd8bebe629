"""The run ledger as items of the DynamoDB state table: run items, listings and entity states."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from pipeline.aws.expiry import DAY, EXPIRES_AT, expiring
from pipeline.config import STATE_RETENTION_DAYS
from pipeline.ledger import (
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
from pipeline.profile import load as load_profile

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

T = TypeVar("T")
# A listing is stored in items of at most this many bytes (DynamoDB's limit is 400 KB).
LISTING_CHUNK_BYTES = 300_000
# BatchWriteItem's limit, and how often its unprocessed items are sent again.
PUT_BATCH = 25
UNPROCESSED_ATTEMPTS = 8


def _run_pk(run_id: str) -> str:
    return f"run#{run_id}"


def _entity_pk(run_id: str, stage: str) -> str:
    """Where a stage's entity states live: one item per entity that has one."""
    return f"run#{run_id}#{stage}"


def _listed_pk(run_id: str, stage: str) -> str:
    """Where a stage's listings live: the entities one parent (or the kickoff) enqueued."""
    return f"run#{run_id}#{stage}#listed"


def _listing_id(parent: tuple[str, str] | None, keys: Iterable[str]) -> str:
    """A listing's sort key: its parent, then a digest of what it named. The same listing
    recorded twice is one item; a relisting that names other entities is another."""
    digest = hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()[:16]
    return f"{parent[1] if parent else '-'}#{digest}"


def _listing_chunks(entities: Sequence[Entity]) -> list[list[tuple[str, str]]]:
    """(key, stored path) pairs in chunks that each fit a DynamoDB item (400 KB)."""
    chunks: list[list[tuple[str, str]]] = [[]]
    size = 0
    # By key: the same listing makes the same chunks whatever order the vendor named it in.
    for key, path in sorted(entities):
        pair = (key, path_json(path))
        # As stored: the pair's JSON (ASCII, so one byte a character), and a separator.
        cost = len(json.dumps(pair)) + 2
        if size + cost > LISTING_CHUNK_BYTES and chunks[-1]:
            chunks.append([])
            size = 0
        chunks[-1].append(pair)
        size += cost
    return chunks


def _listing_items(
    run_id: str, stage: str, parent: tuple[str, str] | None, entities: Sequence[Entity]
) -> list[dict[str, Any]]:
    """The items that record one listing (none for an empty one)."""
    if not entities:
        return []
    listing = _listing_id(parent, (k for k, _ in entities))
    pk = {"S": _listed_pk(run_id, stage)}
    return [
        {"pk": pk, "sk": {"S": f"{listing}#{n}"}, "entities": {"S": json.dumps(chunk)}}
        for n, chunk in enumerate(_listing_chunks(entities))
    ]


class DynamoLedger:
    """The ledger as items of the state table, written in batches.

    - one item per run (`run#R`, `meta`) and one in the run list (`runs`, R);
    - **listings**: what a parent enqueued, as one item per listing (`run#R#stage#listed`,
      parent key and a digest of the keys; split when it would pass 400 KB), holding the
      entities' keys and paths. One request records a warrior's thousand data groups, where
      an item per entity took a thousand conditional writes;
    - **states**: one item per entity that has finished or failed (`run#R#stage`, key):
      done, gone or dead and the last error. Done and gone are final, so they are put in
      batches of 25 (BatchWriteItem has no conditions); dead never overwrites them, so it
      is a conditional write of its own (rare).

    An entity counts as enqueued once whether it was listed once or many times, and as
    queued until it has a state. A state without a listing (an entity finished by a message
    no listing recorded) still counts, so counts stay exact under any delivery order.
    """

    RUNS_PK = "runs"
    # Requests of one call go out this many at a time (chunks of a batch, conditional writes,
    # the queries of a status read).
    PARALLEL_REQUESTS = 16

    def __init__(
        self,
        client: DynamoDBClient,
        table: str,
        retention_days: float = STATE_RETENTION_DAYS,
        stages: Sequence[str] | None = None,
    ) -> None:
        # The profile's stages, in order (the default profile's if None).
        self.stages = tuple(stages) if stages is not None else load_profile().stage_names
        self._ddb = client
        self.table = table
        self.retention = retention_days * DAY
        self._pool = ThreadPoolExecutor(self.PARALLEL_REQUESTS, thread_name_prefix="ledger")

    def _update(self, **update: Any) -> Any:
        """UpdateItem, the item's expires_at set `retention` from now (pipeline.aws.expiry)."""
        return self._ddb.update_item(**expiring(update, time.time() + self.retention))

    def _each(self, write: Callable[[T], object], items: Sequence[T]) -> list[Any]:
        """`write` every item, PARALLEL_REQUESTS at a time; the first error is raised."""
        if len(items) <= 1:
            return [write(item) for item in items]
        return list(self._pool.map(write, items))

    def _put_all(self, items: Sequence[dict[str, Any]]) -> None:
        """Put `items` with BatchWriteItem, 25 a request, until none is left unprocessed.
        An item named twice (the same listing recorded by two copies of one parent) is put
        once: BatchWriteItem refuses a request that names a key twice."""
        items = list({(i["pk"]["S"], i["sk"]["S"]): i for i in items}.values())
        expires = {EXPIRES_AT: {"N": str(int(time.time() + self.retention))}}

        def put(chunk: Sequence[dict[str, Any]]) -> None:
            request: dict[str, Any] = {
                self.table: [{"PutRequest": {"Item": {**i, **expires}}} for i in chunk]
            }
            for attempt in range(UNPROCESSED_ATTEMPTS):
                left = self._ddb.batch_write_item(RequestItems=request).get("UnprocessedItems")
                if not left:
                    return
                request = dict(left)
                time.sleep(min(1.0, 0.05 * 2**attempt))  # throttled: back off, as AWS asks
            raise RuntimeError(f"DynamoDB left {len(request[self.table])} writes unprocessed")

        self._each(put, [items[i : i + PUT_BATCH] for i in range(0, len(items), PUT_BATCH)])

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
        self._put_all(_listing_items(run_id, stage, parent, entities))

    def enqueued_many(
        self, run_id: str, stage: str, listings: Sequence[tuple[tuple[str, str], Sequence[Entity]]]
    ) -> None:
        # A batch of parents' listings in one request where they fit (25 items).
        self._put_all(
            [i for parent, found in listings for i in _listing_items(run_id, stage, parent, found)]
        )

    def _listings(self, run_id: str, stage: str, parent_key: str = "") -> dict[str, str]:
        """Every entity a stage's listings named (or one parent's): key -> stored path."""
        condition = "pk = :pk"
        values: dict[str, Any] = {":pk": {"S": _listed_pk(run_id, stage)}}
        if parent_key:
            condition += " AND begins_with(sk, :parent)"
            values[":parent"] = {"S": f"{parent_key}#"}
        found: dict[str, str] = {}
        pages = self._ddb.get_paginator("query").paginate(
            TableName=self.table,
            KeyConditionExpression=condition,
            ExpressionAttributeValues=values,
            ProjectionExpression="entities",
            ConsistentRead=True,
        )
        for page in pages:
            for item in page.get("Items", []):
                found.update(json.loads(item["entities"]["S"]))
        return found

    def _states(self, run_id: str, stage: str, *, errors: bool = True) -> dict[str, dict[str, Any]]:
        """Every state item of a stage (those holding only an error included): key -> item.
        `errors=False` leaves the errors out: a third less to send and parse where only the
        states count (a run's status reads every entity: 0.6-0.8 s of client CPU for 35,000
        data groups on the bench's moto, 0.9-1.0 s with the errors)."""
        projection = "sk, #s, #e" if errors else "sk, #s"
        return {
            item["sk"]["S"]: item for item in self._query(_entity_pk(run_id, stage), projection)
        }

    def children(self, run_id: str, parent_stage: str, parent_key: str) -> set[str]:
        at = self.stages.index(parent_stage)
        if at + 1 == len(self.stages):
            return set()
        child = self.stages[at + 1]
        return set(self._listings(run_id, child, parent_key))

    def _conditional_state(
        self, run_id: str, stage: str, key: str, state: State, error: str, condition: str
    ) -> bool:
        """Set an entity's state where `condition` holds; whether it did."""
        try:
            self._update(
                TableName=self.table,
                Key={"pk": {"S": _entity_pk(run_id, stage)}, "sk": {"S": key}},
                UpdateExpression="SET #s = :s, #e = :e",
                ConditionExpression=condition,
                ExpressionAttributeNames={"#s": "state", "#e": "error"},
                ExpressionAttributeValues={
                    ":s": {"S": state},
                    ":e": {"S": storable(error)},
                    **(
                        {":d": {"S": State.DONE}, ":g": {"S": State.GONE}}
                        if ":d" in condition
                        else {}
                    ),
                },
            )
        except self._ddb.exceptions.ConditionalCheckFailedException:
            return False
        return True

    def finish_pending(self, run_id: str, stage: str, entries: Sequence[Finished]) -> int:
        changed = self._each(
            lambda e: self._conditional_state(
                run_id, stage, e[0], e[1], e[2], "attribute_not_exists(#s)"
            ),
            entries,
        )
        return sum(changed)

    def pending(self, run_id: str, stage: str) -> list[Entity]:
        states = self._states(run_id, stage, errors=False)
        return sorted(
            (key, tuple(json.loads(path)))
            for key, path in self._listings(run_id, stage).items()
            if "state" not in states.get(key, {})
        )

    def finish(self, run_id: str, stage: str, key: str, state: State, error: str = "") -> None:
        self.finish_many(run_id, stage, [(key, state, error)])

    def finish_many(self, run_id: str, stage: str, entries: Sequence[Finished]) -> None:
        # Done and gone are final whatever came before: put in batches. The last entry of a
        # key wins, as one after another would (a batch may not name a key twice).
        final = {k: (s, e) for k, s, e in entries if s != State.DEAD}
        pk = {"S": _entity_pk(run_id, stage)}
        self._put_all(
            [
                {"pk": pk, "sk": {"S": k}, "state": {"S": s}, "error": {"S": storable(e)}}
                for k, (s, e) in final.items()
            ]
        )
        # Dead never overwrites done or gone (a late duplicate's failure).
        dead = [(k, s, e) for k, s, e in entries if s == State.DEAD and k not in final]
        self._each(
            lambda e: self._conditional_state(
                run_id, stage, e[0], State.DEAD, e[2], "NOT #s IN (:d, :g)"
            ),
            dead,
        )

    def record_error(self, run_id: str, stage: str, key: str, error: str) -> None:
        # An item holding only an error has no state and counts nowhere.
        self._update(
            TableName=self.table,
            Key={"pk": {"S": _entity_pk(run_id, stage)}, "sk": {"S": key}},
            UpdateExpression="SET #e = :e",
            ExpressionAttributeNames={"#e": "error"},
            ExpressionAttributeValues={":e": {"S": storable(error)}},
        )

    def finished(self, run_id: str, stage: str, keys: Sequence[str]) -> set[str]:
        found: set[str] = set()
        pk = _entity_pk(run_id, stage)
        unique = sorted(set(keys))  # BatchGetItem refuses a key named twice
        for i in range(0, len(unique), 100):  # BatchGetItem's limit
            request: dict[str, Any] = {
                self.table: {
                    "Keys": [{"pk": {"S": pk}, "sk": {"S": k}} for k in unique[i : i + 100]],
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
        # In two rounds of requests at once, not 1 + 2 x stages one after another (a run's
        # tail waits for this read before its manifest: 0.13 s of it in the AWS-mode bench,
        # 2026-12-03). The rounds keep the order that makes a status read safe: whatever is
        # written after something else is read before it, so that seeing it means seeing
        # what came first. The kickoff records its troops' listing, then `kicked_off`; a
        # drain records an entity's children's listing, then the entity's state; every
        # state comes after its entity's listing. So the run's item and every state first,
        # every listing after them: a run is never taken for settled with a listing unseen.
        meta = self._pool.submit(
            self._ddb.get_item,
            TableName=self.table,
            Key={"pk": {"S": _run_pk(run_id)}, "sk": {"S": "meta"}},
            ConsistentRead=True,
        )
        state_reads = [
            self._pool.submit(self._states, run_id, stage, errors=False) for stage in self.stages
        ]
        item = meta.result().get("Item")
        stage_states = [read.result() for read in state_reads]
        if item is None:
            return None
        listings = list(self._pool.map(lambda stage: self._listings(run_id, stage), self.stages))
        rows: list[tuple[str, str, int]] = []
        for stage, states_read, listed in zip(self.stages, stage_states, listings, strict=True):
            states = {key: i["state"]["S"] for key, i in states_read.items() if "state" in i}
            queued = len(listed.keys() - states.keys())
            rows.append((stage, State.QUEUED, queued))
            rows.extend((stage, state, 1) for state in states.values())
        return RunStatus(
            run_id=run_id,
            window_from=item.get("window_from", {}).get("S", ""),
            window_to=item.get("window_to", {}).get("S", ""),
            kicked_off=item.get("kicked_off", {}).get("BOOL", False),
            started_at=float(item.get("started_at", {}).get("N", "0")),
            completed_at=float(item["completed_at"]["N"]) if "completed_at" in item else None,
            stages=stage_counts(rows, self.stages),
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
        for stage in self.stages:
            dead = {
                key: item.get("error", {}).get("S", "")
                for key, item in self._states(run_id, stage).items()
                if item.get("state", {}).get("S") == State.DEAD
            }
            if dead:
                paths = self._listings(run_id, stage)
                for key, error in dead.items():
                    path = tuple(json.loads(paths.get(key, "[]")))
                    found.append(DeadEntity(stage, path, error))
        return found

    def last_error(self, run_id: str, stage: str, key: str) -> str:
        item = self._ddb.get_item(
            TableName=self.table,
            Key={"pk": {"S": _entity_pk(run_id, stage)}, "sk": {"S": key}},
        ).get("Item", {})
        return str(item.get("error", {}).get("S", ""))

    def mark_completed(self, run_id: str) -> bool:
        now = {":n": {"N": str(time.time())}}
        # The run list's item too, so that open_runs() can skip the run (also repairs a
        # list item that an interrupted first call left without it); both at once.
        listed = self._pool.submit(
            self._update,
            TableName=self.table,
            Key={"pk": {"S": self.RUNS_PK}, "sk": {"S": run_id}},
            UpdateExpression="SET completed_at = if_not_exists(completed_at, :n)",
            ExpressionAttributeValues=now,
        )
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
        listed.result()
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
        return list(self.open_run_starts(since))

    def open_run_starts(self, since: float) -> dict[str, float]:
        return {
            i["sk"]["S"]: float(i.get("started_at", {}).get("N", "0"))
            for i in reversed(self._run_items())
            if "completed_at" not in i
            and "manifest_signature" not in i
            and float(i.get("started_at", {}).get("N", "0")) >= since
        }
