"""`python -m bench.budget [--seconds S] [--only N ...] [--budget-file PATH]`: the shared budget.

How much of the vendor's rate the DynamoDB-backed budget hands out when several Lambda-like
invocations share it. Each invocation has its own `DynamoBudget` (and its own boto3 client)
and its own threads, as a drain Lambda has; all of them share one item of a state table on a
moto server (`ThreadedMotoServer`, in this process), and every DynamoDB request waits
DDB_DELAY first, about what a request to DynamoDB takes from Lambda. A thread calls
`acquire`, then sleeps the vendor latency (a busy invocation's thread, always with work), or
makes one call every SPARSE_EVERY seconds (an upstream stage with little work). Nothing calls
a vendor: the budget alone decides the pace. For reference, the same threads then share one
in-process `PacedBudget`.

Columns:

share        calls per second (after the first second) / min(L / W, what the threads can
             make: busy threads / latency + sparse invocations / SPARSE_EVERY)
max in W     most call starts (the time each thread resumed after acquire) in any rolling W
ddb/call     DynamoDB requests (every GetItem, UpdateItem, failed or not) per call
calls        calls made
paced share  the same share with one PacedBudget shared by every thread

`--budget-file` loads DynamoBudget from another copy of pipeline/aws/budget.py, e.g. the one
before a change (`git show REV:pipeline/aws/budget.py > /tmp/budget_before.py`; before the
budget moved there, REV:pipeline/budget.py).
"""

from __future__ import annotations

import argparse
import bisect
import gc
import importlib.util
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

DDB_DELAY = 0.008
SPARSE_EVERY = 0.5
WARMUP = 1.0
PERIOD = 1.0
TABLE = "harvest-state"
REGION = "us-east-1"


@dataclass(frozen=True)
class Row:
    name: str
    rate: int  # L, with W = PERIOD
    latency: float  # the vendor's, seconds
    busy: int  # invocations whose threads always have work
    sparse: int = 0  # invocations with one call every SPARSE_EVERY seconds
    threads: int = 16  # per busy invocation; a sparse one has one

    def capacity(self) -> float:
        """Calls per second the threads could make if the budget never held them back."""
        return self.busy * self.threads / self.latency + self.sparse / SPARSE_EVERY


ROWS = [
    Row("2 always busy, 100/s", 100, 0.02, busy=2),
    Row("2 always busy + 4 one call every 0.5 s, 100/s", 100, 0.02, busy=2, sparse=4),
    Row("6 always busy, 200/s", 200, 0.2, busy=6),
    Row("2 always busy, 100/s, slow vendor", 100, 0.4, busy=2),
]


@dataclass
class Result:
    calls: int
    share: float
    max_in_window: int
    ddb_per_call: float


class DynamoCounter:
    """Counts the DynamoDB requests of every client it hooks, delaying each by DDB_DELAY."""

    def __init__(self) -> None:
        self.requests = 0
        self._lock = threading.Lock()

    def hook(self, client: Any) -> Any:
        def before_send(**kwargs: Any) -> None:
            with self._lock:
                self.requests += 1
            time.sleep(DDB_DELAY)

        client.meta.events.register("before-send.dynamodb.*", before_send)
        return client


def busiest_window(times: list[float], period: float) -> int:
    """The most starts in any closed window [t, t + period]."""
    ordered = sorted(times)
    return max(
        (bisect.bisect_right(ordered, t + period) - i for i, t in enumerate(ordered)), default=0
    )


def drive(
    row: Row,
    budgets: list[Any],
    clock: Callable[[], float],
    seconds: float,
) -> list[float]:
    """Run the row's threads, each on its invocation's budget; return every call's start."""
    starts: list[float] = []
    lock = threading.Lock()
    deadline = clock() + seconds

    def busy(budget: Any) -> None:
        while clock() < deadline:
            budget.acquire()
            started = clock()
            with lock:
                starts.append(started)
            time.sleep(row.latency)

    def sparse(budget: Any) -> None:
        while clock() < deadline:
            budget.acquire()
            started = clock()
            with lock:
                starts.append(started)
            time.sleep(max(row.latency, started + SPARSE_EVERY - clock()))

    workers = [
        threading.Thread(target=busy, args=(budgets[i],), daemon=True)
        for i in range(row.busy)
        for _ in range(row.threads)
    ]
    workers += [
        threading.Thread(target=sparse, args=(budgets[row.busy + i],), daemon=True)
        for i in range(row.sparse)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=seconds + 30)
    return starts


def measure(row: Row, starts: list[float], requests: int, began: float, seconds: float) -> Result:
    counted = [t for t in starts if began + WARMUP <= t < began + seconds]
    rate = len(counted) / (seconds - WARMUP)
    return Result(
        calls=len(starts),
        share=rate / min(row.rate / PERIOD, row.capacity()),
        max_in_window=busiest_window(starts, PERIOD),
        ddb_per_call=requests / max(1, len(starts)),
    )


def run_dynamo(row: Row, endpoint: str, budget_class: Any, seconds: float) -> Result:
    import boto3

    from bench.aws import create_state_table

    counter = DynamoCounter()
    session = boto3.session.Session(
        aws_access_key_id="bench", aws_secret_access_key="bench", region_name=REGION
    )
    admin = session.client("dynamodb", endpoint_url=endpoint)
    name = f"{TABLE}-{time.monotonic_ns()}"
    create_state_table(admin, name)
    from botocore.config import Config

    budgets = []
    for _ in range(row.busy + row.sparse):
        # One client per invocation, as each Lambda has its own.
        client = counter.hook(
            session.client(
                "dynamodb",
                endpoint_url=endpoint,
                config=Config(max_pool_connections=row.threads + 4),
            )
        )
        budgets.append(budget_class(client, name, row.rate, PERIOD))
    began = time.time()
    starts = drive(row, budgets, time.time, seconds)
    return measure(row, starts, counter.requests, began, seconds)


def run_paced(row: Row, seconds: float) -> Result:
    from pipeline.local.budget import PacedBudget

    budget = PacedBudget(row.rate, PERIOD)
    began = time.monotonic()
    starts = drive(row, [budget] * (row.busy + row.sparse), time.monotonic, seconds)
    return measure(row, starts, 0, began, seconds)


def load_dynamo_budget(path: str | None) -> Any:
    if path is None:
        from pipeline.aws.budget import DynamoBudget

        return DynamoBudget
    spec = importlib.util.spec_from_file_location("bench_budget_under_test", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.DynamoBudget


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.budget", description=__doc__)
    parser.add_argument("--seconds", type=float, default=10.0, help="per row (10)")
    parser.add_argument("--only", type=int, nargs="*", help="row numbers, from 1")
    parser.add_argument("--budget-file", help="a pipeline/aws/budget.py to take DynamoBudget from")
    parser.add_argument("--no-paced", action="store_true", help="skip the PacedBudget reference")
    args = parser.parse_args()
    if args.seconds <= WARMUP:
        parser.error(f"--seconds must be over {WARMUP}")
    budget_class = load_dynamo_budget(args.budget_file)

    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    today = datetime.now(UTC).date().isoformat()
    print(
        f"bench.budget {today}: {args.seconds:g} s per row, {DDB_DELAY * 1000:g} ms per"
        f" DynamoDB request, {args.budget_file or 'pipeline/aws/budget.py'}"
    )
    print(
        "| mix of invocations | vendor latency | share | max in W | ddb/call | calls |"
        " paced share |"
    )
    print("|---|---|---|---|---|---|---|")
    try:
        for number, row in enumerate(ROWS, start=1):
            if args.only and number not in args.only:
                continue
            # Garbage a row left would be collected in the next one, in pauses that hold up
            # its threads.
            gc.collect()
            got = run_dynamo(row, endpoint, budget_class, args.seconds)
            paced = "" if args.no_paced else f"{run_paced(row, args.seconds).share:.2f}"
            print(
                f"| {row.name} | {row.latency * 1000:g} ms | {got.share:.2f}"
                f" | {got.max_in_window} (L={row.rate}) | {got.ddb_per_call:.3f}"
                f" | {got.calls} | {paced} |",
                flush=True,
            )
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
