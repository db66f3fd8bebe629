"""One Lambda sandbox of the AWS-mode bench: `python -m bench.aws_sandbox MODULE.FUNCTION`.

Lambda runs a function's invocations in sandboxes: one invocation at a time in each, a warm
sandbox reused for the next one with its module state kept (here the `pipeline.runtime`
cache: the botocore clients, the DynamoDB budget and its reserved slots, the vendor's
connection pool). This process is one sandbox. Its start, up to the handler imported, is
the cold start; then it reads one invocation per line on stdin and answers each with one
JSON line of what it cost (duration, DynamoDB and queue requests, peak memory).
The harness in `bench/aws.py` plays EventBridge and the Lambda service around it.

The handlers build the AWS runtime (`pipeline.aws.runtime.build`, backend "aws"), so the budget
and the ledger are `DynamoBudget` and `DynamoLedger` on real botocore clients, pointed at a
moto server by `AWS_ENDPOINT_URL`. What differs from Lambda:

- the queues: the embedded SQLite queues (`LocalQueueStore`, one file shared by every
  sandbox) behind `SqsLikeQueue`, since moto's SQS costs O(queue depth) per call;
- the sink: a local directory behind `SlowSink` (moto's S3 would cost the machine's CPU);
- the budget's item lives on a moto server of its own, reached by a client made with the
  same configuration as the ledger's: moto answers one request at a time on one core, and
  at 100 calls/s the ledger's writes alone keep it busy, so the budget's reservations would
  queue behind them (DynamoDB serves items independently). The item is the budget's only.

Every DynamoDB request takes at least the configured latency: a botocore hook tops the
round trip up to it (moto's own service time counts towards it), and counts it.
"""

from __future__ import annotations

import gc
import json
import os
import resource
import sqlite3
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3.session

import pipeline.aws.budget
import pipeline.aws.runtime
from pipeline.config import Config
from pipeline.local.queues import LocalQueue, LocalQueueStore
from pipeline.local.scheduler import LocalContext, load_handler
from pipeline.local.sinks import DirectorySink
from pipeline.queues import BATCH, Depth, Message, Outgoing, chunks
from pipeline.runtime import Runtime
from pipeline.stages import STAGE_NAMES

# What the harness hands every sandbox, in this environment variable as JSON.
SETTINGS_ENV = "BENCH_AWS_SANDBOX"
# How often a long poll looks at the shared queue file for other processes' sends.
POLL_SECONDS = 0.05
# S3 lists up to 1,000 keys per request.
LIST_PAGE = 1000


@dataclass(frozen=True)
class Settings:
    queue_db: str  # the shared SQLite file of the embedded queues
    sink_dir: str  # where the output lands (a local directory, not S3)
    ddb_latency: float  # seconds: the least a DynamoDB request takes
    sqs_latency: float  # seconds added to every queue request
    s3_latency: float  # seconds added to every sink request
    memory_mb: int  # the function's memory setting (the context reports it)
    budget_endpoint: str  # the DynamoDB that holds the budget's item


class Meter:
    """Counters of one sandbox: requests made and the time DynamoDB requests took."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ddb_requests = 0
        self.ddb_seconds = 0.0
        self.queue_requests = 0

    def add_queue(self, n: int = 1) -> None:
        with self._lock:
            self.queue_requests += n

    def add_ddb(self, seconds: float) -> None:
        with self._lock:
            self.ddb_requests += 1
            self.ddb_seconds += seconds

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return {
                "ddb": self.ddb_requests,
                "ddb_seconds": self.ddb_seconds,
                "queue": self.queue_requests,
            }


class DynamoLatency:
    """botocore hooks: every DynamoDB request takes at least `floor` seconds, and is counted.

    `before-send` and `response-received` are emitted once per HTTP attempt (retries
    included) on the thread that makes it, so a thread-local start time pairs them.
    """

    def __init__(self, floor: float, meter: Meter) -> None:
        self.floor = floor
        self.meter = meter
        self._local = threading.local()

    def register(self, events: Any) -> None:
        events.register("before-send.dynamodb", self.before_send)
        events.register("response-received.dynamodb", self.response_received)

    def before_send(self, **_: Any) -> None:
        self._local.started = time.perf_counter()

    def response_received(self, **_: Any) -> None:
        elapsed = time.perf_counter() - getattr(self._local, "started", time.perf_counter())
        if elapsed < self.floor:
            time.sleep(self.floor - elapsed)
        self.meter.add_ddb(max(elapsed, self.floor))


class SqsLikeQueue:
    """An embedded queue that answers like SQS: each request (one per batch of 10, as
    `SqsQueue` makes them) takes `latency` seconds and is counted, and a long poll sees
    messages sent by other processes (the store's own wait wakes only for its process)."""

    def __init__(self, inner: LocalQueue, latency: float, meter: Meter) -> None:
        self._inner = inner
        self.name = inner.name
        self._latency = latency
        self._meter = meter

    def _request(self) -> None:
        self._meter.add_queue()
        if self._latency:
            time.sleep(self._latency)

    def send(self, messages: Sequence[Outgoing]) -> None:
        for batch in chunks(messages):
            self._request()
            self._inner.send(batch)

    def receive(
        self,
        max_messages: int = BATCH,
        wait_seconds: float = 0.0,
        visibility_timeout: float | None = None,
    ) -> list[Message]:
        deadline = time.monotonic() + wait_seconds
        self._request()
        while True:
            got = self._inner.receive(max_messages, 0.0, visibility_timeout)
            left = deadline - time.monotonic()
            if got or left <= 0:
                return got
            time.sleep(min(POLL_SECONDS, left))

    def delete(self, receipts: Sequence[str]) -> None:
        for batch in chunks(receipts):
            self._request()
            self._inner.delete(batch)

    def change_visibility(self, receipts: Sequence[str], seconds: float) -> None:
        for batch in chunks(receipts):
            self._request()
            self._inner.change_visibility(batch, seconds)

    def depth(self) -> Depth:
        self._request()
        return self._inner.depth()


class SlowSink:
    """A directory sink whose requests take as long as S3's: one per put or get, one per
    1,000 keys listed."""

    def __init__(self, inner: DirectorySink, latency: float) -> None:
        self._inner = inner
        self.location = inner.location
        self._latency = latency

    def put(self, key: str, blob: bytes, content_type: str) -> str:
        time.sleep(self._latency)
        return self._inner.put(key, blob, content_type)

    def get(self, key: str) -> bytes | None:
        time.sleep(self._latency)
        return self._inner.get(key)

    def keys(self, prefix: str) -> Iterator[str]:
        for i, key in enumerate(self._inner.keys(prefix)):
            if i % LIST_PAGE == 0:
                time.sleep(self._latency)
            yield key


class Sandbox:
    """The runtime patches of one sandbox, and the counters its invocations report."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.meter = Meter()
        self.budgets: list[pipeline.aws.budget.DynamoBudget] = []  # (one per runtime built)
        # Full garbage collections (generation 2) and the time they stopped every thread.
        self.collections = {"gc full": 0.0, "gc ms": 0.0}
        self._collecting = 0.0

    def _collection(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._collecting = time.perf_counter()
        elif info["generation"] == 2:
            self.collections["gc full"] += 1
            self.collections["gc ms"] += 1000 * (time.perf_counter() - self._collecting)

    def install(self) -> None:
        """Count and slow DynamoDB requests; swap the queues, the sink and the budget's
        DynamoDB; time the full garbage collections."""
        gc.callbacks.append(self._collection)
        hooks = DynamoLatency(self.settings.ddb_latency, self.meter)
        base_session = boto3.session.Session

        class MeteredSession(base_session):  # type: ignore[misc, valid-type]
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                hooks.register(self.events)

        boto3.session.Session = MeteredSession  # type: ignore[misc]
        aws_build = pipeline.aws.runtime.build
        settings, meter = self.settings, self.meter

        def build(config: Config) -> Runtime:
            rt = aws_build(config)
            store = LocalQueueStore(Path(settings.queue_db))
            for name in STAGE_NAMES:
                # As pipeline.local.runtime builds the embedded queues, and as Terraform configures
                # SQS: the redrive one receive above the drain's own dead-lettering.
                dlq = store.queue(f"{name}-dlq")
                queue = store.queue(
                    name,
                    visibility_timeout=config.visibility_timeout,
                    dlq=dlq,
                    max_receive_count=config.max_receive_count + 1,
                )
                rt.queues[name] = SqsLikeQueue(queue, settings.sqs_latency, meter)
                rt.dlqs[name] = SqsLikeQueue(dlq, settings.sqs_latency, meter)
            rt.sink = SlowSink(DirectorySink(settings.sink_dir), settings.s3_latency)
            return rt

        pipeline.aws.runtime.build = build
        aws_budget = pipeline.aws.budget.DynamoBudget

        def budget(client: Any, *args: Any, **kwargs: Any) -> Any:
            # The same client, for a DynamoDB of the budget's own.
            own = boto3.session.Session().client(
                "dynamodb", endpoint_url=settings.budget_endpoint, config=client.meta.config
            )
            made = aws_budget(own, *args, **kwargs)
            self.budgets.append(made)
            return made

        pipeline.aws.runtime.DynamoBudget = budget  # type: ignore[assignment]

    def budget_slots(self) -> dict[str, int]:
        """Every counter of this sandbox's DynamoBudgets (`DynamoBudget.slots`), summed."""
        total: Counter[str] = Counter()
        for b in self.budgets:
            total.update(b.slots)
        return {f"slots {k}": n for k, n in total.items()}

    def invoke(self, handler: Callable[[Any, Any], Any], request: dict[str, Any]) -> dict[str, Any]:
        """Run one invocation; what it cost. (Vendor calls are counted by the simulator, CPU
        by the harness from /proc: both survive a sandbox killed at its timeout.)"""
        before = {**self.meter.snapshot(), **self.budget_slots(), **self.collections}
        started = time.perf_counter()
        # Lambda's runtime sets the invocation's trace header in the environment, where the
        # X-Ray SDK reads it; sampled, as the schedule's sparse invocations nearly all are
        # (X-Ray's default rule takes the first request of every second).
        os.environ["_X_AMZN_TRACE_ID"] = trace_header()
        context = LocalContext(str(request["function"]), float(request["timeout"]))
        context.memory_limit_in_mb = int(
            os.environ.get("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", self.settings.memory_mb)
        )
        error = ""
        try:
            handler(request["event"], context)
        except Exception as exc:  # the invocation fails; the sandbox lives on, as in Lambda
            error = f"{type(exc).__name__}: {exc}"[:500]
        duration = time.perf_counter() - started
        after = {**self.meter.snapshot(), **self.budget_slots(), **self.collections}
        return {
            "duration": duration,
            "error": error,
            # A budget made during this invocation has no counters in `before`.
            **{k: after[k] - before.get(k, 0) for k in after},
            "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        }


def trace_header() -> str:
    """A sampled X-Ray trace header for a new invocation, in Lambda's format."""
    return (
        f"Root=1-{int(time.time()):08x}-{os.urandom(12).hex()};"
        f"Parent={os.urandom(8).hex()};Sampled=1"
    )


def main() -> None:
    # Answers go to the original stdout; whatever the handlers print or log (Powertools
    # writes JSON logs and EMF metrics to stdout) goes to the sandbox's log file.
    # The harness opens stderr on that file.
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    settings = Settings(**json.loads(os.environ[SETTINGS_ENV]))
    sandbox = Sandbox(settings)
    sandbox.install()
    # The embedded queues stand for SQS here. Powertools' Tracer patches sqlite3 among the
    # modules X-Ray can trace; in Lambda it would trace SQS's botocore calls instead, a few
    # per batch of messages, not the several SQLite statements of each queue request here.
    connect = sqlite3.connect
    handler = load_handler(sys.argv[1])
    sqlite3.connect = connect
    answers.write(json.dumps({"ready": True}) + "\n")
    for line in sys.stdin:
        answers.write(json.dumps(sandbox.invoke(handler, json.loads(line))) + "\n")


if __name__ == "__main__":
    main()
