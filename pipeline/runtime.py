"""Builds the pipeline's objects from a Config: AWS ones in Lambda, embedded ones locally.

Handlers and `harvest local` call the same `Runtime` methods, so the library code that
runs in Lambda is the code that runs on one machine. A Runtime is cached per
configuration: a warm Lambda reuses its clients, and the three local drains share one
rate budget, one queue store and one ledger.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aws_lambda_powertools import Logger

from pipeline.budget import Budget, DynamoBudget, PacedBudget
from pipeline.completion import check_completion, settle_runs
from pipeline.config import Config
from pipeline.drain import Drain, DrainReport, Halt
from pipeline.errors import AuthError, ConfigError
from pipeline.kickoff import KickoffReport, kickoff
from pipeline.ledger import STAT_FIELDS, DynamoLedger, Ledger, SqliteLedger
from pipeline.queues import LocalQueueStore, Queue, SqsQueue
from pipeline.replay import ReplayReport, replay
from pipeline.sinks import DirectorySink, S3Sink, Sink
from pipeline.stages import ROOT_PATH, STAGE_NAMES, stage, upstream
from pipeline.stats import CallStats
from pipeline.vendor.client import VendorClient
from pipeline.window import Window

logger = Logger(service="harvest", child=True)

STATE_DB = "state.sqlite"
# How long every stage queue must look empty before entities still queued in the ledger
# count as lost (completion.sweep_lost). SQS's approximate counts lag by up to a minute;
# the embedded queues' are exact, and one process drives a local run (kickoff first).
QUIET_GRACE = {"aws": 180.0, "local": 0.0}


@dataclass
class Runtime:
    """The queues, sink, ledger, budget and vendor client of one configuration."""

    config: Config
    queues: dict[str, Queue]
    dlqs: dict[str, Queue]
    sink: Sink
    ledger: Ledger
    budget: Budget
    make_client: Callable[[], VendorClient]
    stats: CallStats = field(default_factory=CallStats)
    store: LocalQueueStore | None = None
    _client: VendorClient | None = field(default=None, init=False, repr=False)
    _client_lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)
    _attributed: dict[str, float] = field(default_factory=dict, init=False, repr=False)
    auth_failed: Halt = field(default_factory=Halt, init=False)

    @property
    def client(self) -> VendorClient:
        """The vendor client, built on first use (status, dlq and replay never need a token)."""
        with self._client_lock:
            if self._client is None:
                self._client = self.make_client()
            return self._client

    def _reset_client(self) -> None:
        """Build the vendor client again, with the token read again (it may have been fixed)."""
        with self._client_lock:
            if self._client is not None:
                self._client.close()
            self._client = None
        if self.config.backend == "aws":
            from aws_lambda_powertools.utilities import parameters

            parameters.clear_caches()  # type: ignore[no-untyped-call]

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
        if self.store is not None:
            self.store.close()

    def drain(self, stage_name: str) -> Drain:
        s = stage(stage_name)
        return Drain(
            s,
            queue=self.queues[s.name],
            dlq=self.dlqs[s.name],
            child_queue=self.queues[s.child] if s.child else None,
            upstream=[self.queues[u] for u in upstream(s.name)],
            client=self.client,
            sink=self.sink,
            ledger=self.ledger,
            stats=self.stats,
            concurrency=self.config.concurrency,
            rate=self.config.rate_calls / self.config.rate_period,
            max_receive_count=self.config.max_receive_count,
            retry_delay=self.config.retry_delay,
            wait_seconds=self.config.wait_seconds,
            halt=self.auth_failed,
            deeper_first=self.config.deeper_first,
        )

    def run_kickoff(self, window: Window) -> KickoffReport:
        report = kickoff(
            window, client=self.client, queue=self.queues[STAGE_NAMES[0]], ledger=self.ledger
        )
        self._attribute({report.run_id})
        # A listing with no troops settles at once: nothing else would notice.
        check_completion(self.ledger, self.sink, report.run_id)
        return report

    def run_drain(self, stage_name: str, remaining: Callable[[], float]) -> DrainReport:
        """One drain invocation, then the run bookkeeping: call counts and completion.

        After a 401 every drain of this process stops; the next invocation first makes one
        cheap call with a freshly read token, and receives nothing unless it succeeds, so a
        bad token costs the queued messages no receives (and no dead letters).
        """
        if self.auth_failed.is_set():
            self._reset_client()
            try:
                self.client.get_page(ROOT_PATH, params={"limit": "1"})
            except AuthError as exc:
                return DrainReport(stage_name, stopped="auth", auth_error=str(exc))
            self.auth_failed.clear()
        report = self.drain(stage_name).run(remaining, self.config.safety_margin)
        self._attribute(report.runs)
        settlement = settle_runs(
            self.ledger,
            self.sink,
            list(self.queues.values()),
            quiet_grace=QUIET_GRACE[self.config.backend],
            touched=report.runs,
        )
        report.oldest_unsettled_seconds = settlement.oldest_unsettled_seconds
        return report

    def run_replay(
        self,
        stage_name: str,
        *,
        max_messages: int | None = None,
        dry_run: bool = False,
        rate: float | None = None,
    ) -> ReplayReport:
        s = stage(stage_name)
        return replay(
            self.dlqs[s.name],
            self.queues[s.name],
            max_messages=max_messages,
            dry_run=dry_run,
            rate=rate,
        )

    def _attribute(self, runs: set[str]) -> None:
        """Add the calls made since the last attribution to a run (the first, if several).

        Invocations sharing this Runtime run concurrently locally, so each takes the change
        since the last attribution, not since its own start: every call is counted once.
        """
        if not runs:
            return
        with self._client_lock:
            after = self.stats.snapshot()
            delta = {k: int(after[k] - self._attributed.get(k, 0)) for k in STAT_FIELDS}
            self._attributed = after
        self.ledger.add_stats(sorted(runs)[0], **delta)


_cache: dict[str, Runtime] = {}
_cache_lock = threading.Lock()


def runtime(config: Config) -> Runtime:
    """The cached Runtime of `config` (the stage does not matter: all stages share one)."""
    key = json.dumps(config.with_(stage="").to_env(), sort_keys=True) + config.token
    with _cache_lock:
        if key not in _cache:
            _cache[key] = build(config)
        return _cache[key]


def reset_cache() -> None:
    """Forget cached runtimes (tests, and `harvest local` between runs)."""
    with _cache_lock:
        for rt in _cache.values():
            rt.close()
        _cache.clear()


def build(config: Config) -> Runtime:
    stats = CallStats()
    if config.backend == "local":
        return _build_local(config, stats)
    return _build_aws(config, stats)


def _client(config: Config, token: str, budget: Budget, stats: CallStats) -> VendorClient:
    return VendorClient(
        config.vendor_url,
        token,
        budget,
        stats,
        connect_timeout=config.connect_timeout,
        read_timeout=config.read_timeout,
        pool_size=max(32, config.concurrency * 4),
        max_pages=config.max_pages,
        max_retry_after=config.max_retry_after,
        max_page_bytes=config.max_page_bytes,
    )


def _build_local(config: Config, stats: CallStats) -> Runtime:
    if not config.state_dir or not config.sink:
        raise ConfigError("a local run needs HARVEST_STATE_DIR and HARVEST_SINK (directories)")
    store = LocalQueueStore(Path(config.state_dir) / STATE_DB)
    queues: dict[str, Queue] = {}
    dlqs: dict[str, Queue] = {}
    for name in STAGE_NAMES:
        dlq = store.queue(f"{name}-dlq")
        dlqs[name] = dlq
        # SQS's redrive sits one receive above the drain's own dead-lettering, so that it
        # only catches messages whose drain crashed (as Terraform configures it).
        queues[name] = store.queue(
            name,
            visibility_timeout=config.visibility_timeout,
            dlq=dlq,
            max_receive_count=config.max_receive_count + 1,
        )
    budget = PacedBudget(config.rate_calls, config.rate_period)
    return Runtime(
        config=config,
        queues=queues,
        dlqs=dlqs,
        sink=DirectorySink(config.sink),
        ledger=SqliteLedger(Path(config.state_dir) / STATE_DB),
        budget=budget,
        make_client=lambda: _client(config, _local_token(config), budget, stats),
        stats=stats,
        store=store,
    )


def _build_aws(config: Config, stats: CallStats) -> Runtime:
    import boto3
    from botocore.config import Config as BotoConfig

    missing = [
        name
        for name, value in (
            ("HARVEST_QUEUES", all(s in config.queues for s in STAGE_NAMES)),
            ("HARVEST_SINK", config.sink.startswith("s3://")),
            ("HARVEST_STATE_TABLE", config.state_table),
        )
        if not value
    ]
    if missing:
        raise ConfigError(f"AWS backend needs {', '.join(missing)}")
    session = boto3.session.Session()
    # Throttles and 5xx of DynamoDB, SQS and S3 are retried where they happen: adaptive
    # mode backs off and slows this client's own request rate on throttling; 8 attempts
    # ride out about half a minute of trouble before a message is charged a receive (the
    # drain then retries the step a few times more, see Drain._store).
    boto_config = BotoConfig(
        max_pool_connections=max(10, config.concurrency * 2),
        retries={"mode": "adaptive", "max_attempts": 8},
    )
    sqs = session.client("sqs", config=boto_config)
    ddb = session.client("dynamodb", config=boto_config)
    s3 = session.client("s3", config=boto_config)
    budget = DynamoBudget(ddb, config.state_table, config.rate_calls, config.rate_period)
    return Runtime(
        config=config,
        queues={s: SqsQueue(sqs, config.queues[s].url, s) for s in STAGE_NAMES},
        dlqs={s: SqsQueue(sqs, config.queues[s].dlq_url, f"{s}-dlq") for s in STAGE_NAMES},
        sink=S3Sink(s3, config.sink),
        ledger=DynamoLedger(ddb, config.state_table),
        budget=budget,
        make_client=lambda: _client(
            config, config.token or _token_from_parameter(config.token_parameter), budget, stats
        ),
        stats=stats,
    )


def _local_token(config: Config) -> str:
    if not config.token:
        raise ConfigError("no vendor token: pass --token or set HARVEST_VENDOR_TOKEN")
    return config.token


def _token_from_parameter(name: str) -> str:
    if not name:
        raise ConfigError(
            "no vendor token: set HARVEST_VENDOR_TOKEN_PARAMETER (an SSM SecureString)"
        )
    from aws_lambda_powertools.utilities import parameters

    value: Any = parameters.get_parameter(name, decrypt=True, max_age=300)
    if not isinstance(value, str) or not value:
        raise ConfigError(f"SSM parameter {name} holds no token")
    return value
