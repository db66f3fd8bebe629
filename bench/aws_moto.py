"""The AWS-mode bench's DynamoDB: a moto server in its own process (`python -m bench.aws_moto`).

Prints its URL, then serves until stdin closes (as `pipeline.dev.simulator`'s child does), then
prints how many DynamoDB requests it answered, by action, as one JSON line. Counted here,
requests of an invocation that Lambda (the harness) killed at its timeout count too.

Two changes make it behave as DynamoDB does:

- **One request at a time.** moto checks a ConditionExpression and applies the write with no
  lock, so on a threaded server two racing conditional writes can both succeed (measured
  here: 8 threads making 800 read-then-conditional-increment writes of one counter got 800
  successes and a counter of 798), and it inserts a new item before setting its attributes,
  so a concurrent read can see an item without them (the ledger's status then failed with
  KeyError 'state'). DynamoDB does neither, and the budget's reservations are exactly such
  writes.
- **A Query reads one partition.** moto sorts every item of the table and serialises each
  result through its generic model (about 0.13 ms of CPU per item returned): the ledger's
  status, which every drain invocation reads at its end, took 0.1-0.6 s of CPU per read at
  these sizes, in bursts at every tick, and one at a time everything else would wait behind
  it. So a Query of the ledger's shape (a table with a range key, `pk = :pk`, at most a
  projection of top-level attributes, no filter, no index; paged as moto pages, by the
  items' size) is answered here from its partition, as moto would answer it
  (`tests/test_bench.py` compares the pages with moto's own); any other Query goes to moto.
  Before paging was answered here too, a run of 35,000 data groups (a query of several
  pages) could not settle: one status read took 133 s.
"""

from __future__ import annotations

import functools
import json
import logging
import re
import sys
import threading
from collections import Counter
from typing import Any

# What a Query may hold to be answered from its partition.
FAST_QUERY_KEYS = {
    "TableName",
    "KeyConditionExpression",
    "ExpressionAttributeValues",
    "ExpressionAttributeNames",
    "ProjectionExpression",
    "ConsistentRead",
    "ExclusiveStartKey",
}
KEY_CONDITION = re.compile(r"\s*(#?\w+)\s*=\s*(:\w+)\s*")
ATTRIBUTE = re.compile(r"#?\w+")
PLAIN_TYPES = {"S", "N", "B", "BOOL", "NULL", "SS", "NS", "BS"}
PAGE_SIZE = 1_000_000  # a page's items, by their size (moto's RESULT_SIZE_LIMIT)


def serialise() -> None:
    """Answer one DynamoDB request at a time."""
    from moto.dynamodb.responses import DynamoHandler

    lock = threading.Lock()
    call_action = DynamoHandler.call_action

    @functools.wraps(call_action)
    def one_at_a_time(self: Any) -> Any:
        with lock:
            return call_action(self)

    DynamoHandler.call_action = one_at_a_time  # type: ignore[method-assign]


def fast_partition_queries() -> None:
    from moto.dynamodb.models.dynamo_type import DynamoType
    from moto.dynamodb.responses import DynamoHandler

    moto_query = DynamoHandler.query

    def answer(self: Any) -> str | None:
        """The Query's JSON answer, or None if it is not of the shape answered here."""
        body = self.body
        if not set(body) <= FAST_QUERY_KEYS:
            return None
        names = body.get("ExpressionAttributeNames") or {}
        values = body.get("ExpressionAttributeValues") or {}
        match = KEY_CONDITION.fullmatch(body.get("KeyConditionExpression") or "")
        table = self.dynamodb_backend.tables.get(body["TableName"])
        if match is None or table is None or not table.range_key_attr:
            return None
        key_name = names.get(match[1], match[1])
        if key_name != table.hash_key_attr or match[2] not in values:
            return None
        projection = None
        if "ProjectionExpression" in body:
            parts = [p.strip() for p in body["ProjectionExpression"].split(",")]
            if not all(ATTRIBUTE.fullmatch(p) for p in parts):
                return None  # nested paths: moto's
            projection = [names.get(p, p) for p in parts]
        start = body.get("ExclusiveStartKey")
        if start is not None:
            if set(start) != {table.hash_key_attr, table.range_key_attr}:
                return None
            after = DynamoType(start[table.range_key_attr])
        partition = table.items.get(DynamoType(values[match[2]]), {})
        items: list[dict[str, Any]] = []
        size, last = 0, None
        if table.range_key_type == "S":
            # The order moto's DynamoType gives strings, without its per-comparison casts
            # (most of the time a 35,000-item partition took to sort, once per page).
            ordered = sorted(partition.values(), key=lambda i: i.range_key.value)
            if start is not None:
                ordered = [i for i in ordered if i.range_key.value > after.value]
        else:
            ordered = sorted(partition.values(), key=lambda i: i.range_key)
            if start is not None:
                ordered = [i for i in ordered if after < i.range_key]
        for item in ordered:
            # moto's page: items up to PAGE_SIZE of their whole size, projection aside
            size += item.size()
            if size > PAGE_SIZE:
                break
            attrs = (
                item.attrs
                if projection is None
                else {n: item.attrs[n] for n in projection if n in item.attrs}
            )
            if any(a.type not in PLAIN_TYPES for a in attrs.values()):
                return None
            items.append({n: a.to_json() for n, a in attrs.items()})
            last = item
        else:
            last = None  # the partition's end: no next page
        page: dict[str, Any] = {"Count": len(items), "ScannedCount": len(items), "Items": items}
        if last is not None:
            page["LastEvaluatedKey"] = {
                table.hash_key_attr: last.hash_key.to_json(),
                table.range_key_attr: last.range_key.to_json(),
            }
        return json.dumps(page)

    @functools.wraps(moto_query)
    def query(self: Any) -> Any:
        return answer(self) or moto_query(self)

    DynamoHandler.query = query  # type: ignore[method-assign]


def count_requests() -> Counter[str]:
    """DynamoDB requests answered, by action, from now on."""
    from moto.dynamodb.responses import DynamoHandler

    counts: Counter[str] = Counter()
    lock = threading.Lock()
    call_action = DynamoHandler.call_action

    @functools.wraps(call_action)
    def counted(self: Any) -> Any:
        with lock:
            counts[str(self._get_action())] += 1
        return call_action(self)

    DynamoHandler.call_action = counted  # type: ignore[method-assign]
    return counts


def main() -> None:
    from moto.moto_server.werkzeug_app import MotoRequestHandler
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request otherwise
    # http.server writes a response's headers and body in two sends; with Nagle's algorithm
    # the second waits for the client's delayed ACK of the first (tens of milliseconds).
    MotoRequestHandler.disable_nagle_algorithm = True
    serialise()
    fast_partition_queries()
    counts = count_requests()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    print(f"http://{host}:{port}", flush=True)
    try:
        sys.stdin.read()  # returns when the harness closes the pipe or goes away
    finally:
        server.stop()
        print(json.dumps(dict(counts)), flush=True)


if __name__ == "__main__":
    main()
