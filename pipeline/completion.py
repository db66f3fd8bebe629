"""Run completion: every open run settles, writes its manifest and says so once.

A run settles when every entity it enqueued is done, gone or dead. Two things could keep
one from ever settling, and both are resolved here:

- An entity whose message is in no stage queue any more (SQS moved it to the DLQ itself
  after a drain crashed at its last receive, or it expired) stays "queued" in the ledger.
  When no stage queue has held a message for `quiet_grace` seconds (SQS's counts are
  approximate and lag), such entities are recorded dead with that reason: the run settles
  incomplete, the manifest names them, and a replay of the DLQ (or a new kickoff) finishes
  them (done overwrites dead).
- Completion was checked only for runs an invocation touched: a run with nothing left to
  touch (an empty troop listing, the sweep above) never wrote its manifest. Every open run
  is checked now (`settle_runs`), and every run an invocation touched. A run that settled
  incomplete is left alone once its manifest is written, until a replay touches it again:
  a full status read of a large run at every invocation for two weeks would cost more
  than the harvest.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from aws_lambda_powertools import Logger

from pipeline.ledger import Ledger, RunStatus, State
from pipeline.queues import Queue, any_waiting
from pipeline.sinks import Sink, data_key, write_manifest

logger = Logger(service="harvest", child=True)

# Runs older than this are left alone: their messages are gone from SQS (14 days' retention).
OPEN_RUN_DAYS = 14
LOST = (
    "its message is in no stage queue: moved to the DLQ by SQS after a drain died at its"
    " last receive, or expired; replay the DLQ or kick the run off again"
)


@dataclass(frozen=True)
class Settlement:
    """What `settle_runs` found: runs still open, and the age of the oldest unsettled one."""

    open_runs: int
    unsettled: int
    oldest_unsettled_seconds: float
    lost: int


def manifest(status: RunStatus, ledger: Ledger, sink: Sink) -> dict[str, Any]:
    """The manifest of a settled run: counts, output files, duration, calls, 429s, the dead."""
    prefix = data_key(status.run_id, "")[: -len(".jsonl.gz")]
    files = sum(1 for _ in sink.keys(prefix))
    finished = status.completed_at or time.time()
    return {
        "run_id": status.run_id,
        "status": "complete" if status.complete else "incomplete",
        "window": {"from": status.window_from, "to": status.window_to},
        "stages": {
            name: {"enqueued": c.enqueued, "done": c.done, "gone": c.gone, "dead": c.dead}
            for name, c in status.stages.items()
        },
        "output": {"location": sink.location, "prefix": prefix, "files": files},
        "started_at": status.started_at,
        "finished_at": finished,
        "duration_seconds": round(finished - status.started_at, 3),
        "calls": status.stats.get("calls", 0),
        "rate_limited": status.stats.get("rate_limited", 0),
        "retries": status.stats.get("retries", 0),
        # Read only when there are some: in DynamoDB it is another query over every entity.
        "dead": [
            {"stage": d.stage, "path": list(d.path), "error": d.error}
            for d in (ledger.dead(status.run_id) if status.dead else ())
        ],
    }


def check_completion(
    ledger: Ledger, sink: Sink, run_id: str, status: RunStatus | None = None
) -> RunStatus | None:
    """Write the manifest if the run has settled; log completion the first time it completes.

    A run settled with dead entities gets a manifest each time its counts change (a replay
    finishing some), not at every check. `status`: the run's, if the caller just read it
    (a status read of a large run in DynamoDB is a query over every entity).
    """
    if status is None:
        status = ledger.status(run_id)
    if status is None or not status.settled:
        return status
    if status.complete:
        if status.completed_at is None:
            # Manifest first: if the invocation dies here, the next check writes it again.
            where = write_manifest(sink, run_id, manifest(status, ledger, sink))
            if ledger.mark_completed(run_id):
                logger.info("run complete", extra={"run_id": run_id, "manifest": where})
    elif status.manifest_signature != status.signature:
        where = write_manifest(sink, run_id, manifest(status, ledger, sink))
        ledger.mark_manifest(run_id, status.signature)
        logger.warning(
            "run settled with dead-lettered entities",
            extra={"run_id": run_id, "dead": status.dead, "manifest": where},
        )
    return status


def sweep_lost(
    ledger: Ledger,
    queues: Sequence[Queue],
    status: RunStatus,
    *,
    quiet_grace: float,
    now: float | None = None,
) -> int:
    """Record dead the entities of an unsettled run that no stage queue holds a message for.

    Acts only once every stage queue has been empty (nothing visible, delayed or in flight)
    for `quiet_grace` seconds: while any message is in flight, a drain may still be between
    recording children and sending them. Returns how many entities it recorded dead.
    """
    if not status.kicked_off or status.settled:
        return 0
    now = time.time() if now is None else now
    if any_waiting(queues):
        ledger.mark_quiet(status.run_id, None)
        return 0
    since = ledger.mark_quiet(status.run_id, now)
    if since is None or now - since < quiet_grace:
        return 0
    lost = 0
    for stage, counts in status.stages.items():
        if counts.pending == 0:
            continue
        entries = [(key, State.DEAD, LOST) for key, _ in ledger.pending(status.run_id, stage)]
        lost += ledger.finish_pending(status.run_id, stage, entries)
    if lost:
        logger.warning(
            "entities with no message left recorded dead",
            extra={"run_id": status.run_id, "lost": lost},
        )
    return lost


def settle_runs(
    ledger: Ledger,
    sink: Sink,
    queues: Sequence[Queue],
    *,
    quiet_grace: float,
    touched: Iterable[str] = (),
    now: float | None = None,
) -> Settlement:
    """Check every open run and those `touched`: sweep lost entities, write manifests,
    measure the oldest one still unsettled (the "run not settled in time" alarm).

    While any stage queue holds a message, no run is read in full: a run's status is a
    read of every entity it has (a query over tens of thousands of items in DynamoDB, at
    the end of every drain invocation), and nothing can be swept meanwhile. Every open run
    counts as unsettled then, aged from the run list; a run that has settled is found when
    the queues are empty (SQS's counts lag by up to a minute).
    """
    now = time.time() if now is None else now
    starts = ledger.open_run_starts(since=now - OPEN_RUN_DAYS * 86400)
    if any_waiting(queues):
        oldest = max((now - started for started in starts.values()), default=0.0)
        return Settlement(len(starts), len(starts), oldest, 0)
    runs = list(starts)
    runs += sorted(set(touched) - set(runs))
    unsettled, oldest, lost = 0, 0.0, 0
    for run_id in runs:
        status = ledger.status(run_id)
        if status is None:
            continue
        if not status.settled:
            swept = sweep_lost(ledger, queues, status, quiet_grace=quiet_grace, now=now)
            lost += swept
            if swept:
                status = ledger.status(run_id)
        status = check_completion(ledger, sink, run_id, status)
        if status is not None and not status.settled:
            unsettled += 1
            oldest = max(oldest, now - status.started_at)
    return Settlement(len(runs), unsettled, oldest, lost)
