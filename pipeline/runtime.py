"""The pipeline's objects for one configuration, and the operations handlers call on them.

Handlers and `harvest local` call the same `Runtime` methods, so the library code that
runs in Lambda is the code that runs on one machine. A backend builds the Runtime
(`pipeline.aws.runtime.build`: SQS, DynamoDB, S3; `pipeline.local.runtime.build`: the
embedded ones); `runtime` caches it per configuration: a warm Lambda reuses its clients,
and the three local drains share one rate budget, one queue store and one ledger.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TypeVar, cast

from aws_lambda_powertools import Logger

from pipeline.budget import Budget
from pipeline.completion import check_completion, settle_runs
from pipeline.config import Backend, Config
from pipeline.drain import Drain, DrainReport, Halt, StopReason
from pipeline.errors import AuthError
from pipeline.kickoff import KickoffReport, kickoff
from pipeline.ledger import STAT_FIELDS, Ledger
from pipeline.profile import PaginationKind, Profile
from pipeline.profile import load as load_profile
from pipeline.queues import Queue
from pipeline.replay import ReplayReport, replay
from pipeline.sinks import Sink
from pipeline.stats import CallStats
from pipeline.vendor_api.client import VendorClient
from pipeline.window import Window

logger = Logger(service="harvest", child=True)

# A drain invocation's event says who started it, when it is not the schedule.
STARTED_BY_KICKOFF = "kickoff"
STARTED_BY_SUCCESSOR = "successor"


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
    # The vendor profile: the stages, the listings and the output's record keys.
    profile: Profile = field(default_factory=load_profile)
    stats: CallStats = field(default_factory=CallStats)
    # How long every stage queue must look empty before entities still queued in the ledger
    # count as lost (completion.sweep_lost): the backend knows how far its counts lag.
    quiet_grace: float = 0.0
    # Drops a token the backend keeps cached, so that the next client reads it again.
    forget_token: Callable[[], None] = field(default=lambda: None, repr=False)
    # Starts an invocation of a stage's drain now, not waiting for its schedule (AWS: its
    # function, invoked asynchronously), with the reason as its event's `started_by`; None
    # where the drains run all the time (locally).
    start_drain: Callable[[str, str], None] | None = field(default=None, repr=False)
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
        self.forget_token()

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def drain(self, stage_name: str) -> Drain:
        s = self.profile.stage(stage_name)
        return Drain(
            s,
            queue=self.queues[s.name],
            dlq=self.dlqs[s.name],
            child_queue=self.queues[s.child] if s.child else None,
            upstream=[self.queues[u] for u in self.profile.upstream(s.name)],
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
            economical=self.config.backend == Backend.AWS,
            profile=self.profile,
        )

    def start_drains(self, stages: Sequence[str], started_by: str) -> int:
        """Start an invocation of each stage's drain now (all at once); how many were
        started. One that fails to start costs only the wait for its schedule (at most a
        minute), never the caller."""
        if self.start_drain is None or not stages:
            return 0
        start_drain = self.start_drain

        def start(stage: str) -> bool:
            try:
                start_drain(stage, started_by)
            except Exception as exc:
                logger.warning(
                    "could not start a drain now; it starts on its schedule",
                    extra={"stage": stage, "started_by": started_by, "error": repr(exc)},
                )
                return False
            return True

        if len(stages) == 1:
            return int(start(stages[0]))
        with ThreadPoolExecutor(len(stages), thread_name_prefix="start-drains") as pool:
            return sum(pool.map(start, stages))

    def _start_successor(self, stage_name: str, report: DrainReport) -> None:
        """A drain that stops for its deadline with messages still waiting starts the next
        invocation of its stage now, rather than leaving them to the next minute.

        Only after progress: an invocation that received nothing before its deadline (a
        safety margin that leaves no time) would start another like it, and so on.
        """
        if self.start_drain is None or report.received == 0:
            return
        try:
            waiting = self.queues[stage_name].depth().visible
        except Exception as exc:
            logger.warning(
                "could not read the queue's depth; no successor started",
                extra={"stage": stage_name, "error": repr(exc)},
            )
            return
        if waiting:
            report.successor_started = self.start_drains([stage_name], STARTED_BY_SUCCESSOR) == 1

    def run_kickoff(self, window: Window) -> KickoffReport:
        # The drains start now, their cold starts beside the listing below, rather than at
        # their next scheduled minute (on average half a minute of the harvest); they wait
        # for its messages (expect_work).
        started = self.start_drains(self.profile.stage_names, STARTED_BY_KICKOFF)
        report = kickoff(
            window,
            client=self.client,
            queue=self.queues[self.profile.first_stage],
            ledger=self.ledger,
            profile=self.profile,
        )
        self._attribute({report.run_id})
        if not report.sent:
            # A listing with no troops (or none left to send) may settle at once: nothing
            # else would notice. With troops sent, the drains that finish them check: a
            # status read here would only find them queued (in DynamoDB, a query of every
            # stage's states and listings: 7 of a 1,500-call run's 180 requests).
            check_completion(self.ledger, self.sink, report.run_id)
        return replace(report, drains_started=started)

    def run_drain(
        self, stage_name: str, remaining: Callable[[], float], started_by: str = ""
    ) -> DrainReport:
        """One drain invocation, then the run bookkeeping: call counts and completion.

        `started_by` is its event's: a kickoff's drains wait for the kickoff's messages. A
        drain that runs out of time with messages still waiting starts its successor now
        (at most its reserved concurrency run; the service holds the rest back), rather
        than leaving the stage to the next scheduled minute.

        After a 401 every drain of this process stops; the next invocation first makes one
        cheap call with a freshly read token, and receives nothing unless it succeeds, so a
        bad token costs the queued messages no receives (and no dead letters).
        """
        if self.auth_failed.is_set():
            self._reset_client()
            try:
                self._probe()
            except AuthError as exc:
                return DrainReport(stage_name, stopped=StopReason.AUTH, auth_error=str(exc))
            except Exception:
                # Not a 401 (a vendor refusing the one-item page, a 5xx): the token may be
                # fixed, and the messages themselves say what else is wrong.
                logger.warning("the token check after a 401 failed otherwise", exc_info=True)
            self.auth_failed.clear()
        report = self.drain(stage_name).run(
            remaining,
            self.config.safety_margin,
            expect_work=started_by == STARTED_BY_KICKOFF,
            # As it stops taking messages, not after its last ones: the successor's start
            # overlaps them where the reserved concurrency has room.
            at_deadline=lambda r: self._start_successor(stage_name, r),
        )
        self._attribute(report.runs)
        settlement = settle_runs(
            self.ledger,
            self.sink,
            list(self.queues.values()),
            quiet_grace=self.quiet_grace,
            touched=report.runs,
        )
        report.oldest_unsettled_seconds = settlement.oldest_unsettled_seconds
        return report

    def _probe(self) -> None:
        """One cheap call: the first page of the first level's listing, one item long."""
        root = self.profile.root
        paging = root.pagination
        small = paging.size_param and paging.kind != PaginationKind.NONE
        self.client.get_page(root, params={paging.size_param: "1"} if small else None)

    def run_replay(
        self,
        stage_name: str,
        *,
        max_messages: int | None = None,
        dry_run: bool = False,
        rate: float | None = None,
    ) -> ReplayReport:
        s = self.profile.stage(stage_name)
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


R = TypeVar("R", bound=Runtime)
_cache: dict[str, Runtime] = {}
_cache_lock = threading.Lock()


def runtime(config: Config, build: Callable[[Config], R]) -> R:
    """The cached Runtime of `config`, made by `build` (its backend's) the first time; the
    stage does not matter: all stages share one."""
    key = json.dumps(config.with_(stage="").to_env(), sort_keys=True) + config.token
    with _cache_lock:
        if key not in _cache:
            _cache[key] = build(config)
        return cast(R, _cache[key])


def reset_cache() -> None:
    """Forget cached runtimes (tests, and `harvest local` between runs)."""
    with _cache_lock:
        for rt in _cache.values():
            rt.close()
        _cache.clear()


def vendor_client(
    config: Config, token: str, budget: Budget, stats: CallStats, profile: Profile
) -> VendorClient:
    """The vendor client of `config`: its URL, timeouts, pool and per-message bounds, and
    the profile's auth, headers and statuses."""
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
        profile=profile,
    )
