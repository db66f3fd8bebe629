"""Run completion: when a run settles, write its manifest beside the output and say so once."""

from __future__ import annotations

import time
from typing import Any

from aws_lambda_powertools import Logger

from pipeline.ledger import Ledger, RunStatus
from pipeline.sinks import Sink, data_key, write_manifest

logger = Logger(service="harvest", child=True)


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
        "dead": [
            {"stage": d.stage, "path": list(d.path), "error": d.error}
            for d in ledger.dead(status.run_id)
        ],
    }


def check_completion(ledger: Ledger, sink: Sink, run_id: str) -> RunStatus | None:
    """Write the manifest if the run has settled; log completion the first time it completes."""
    status = ledger.status(run_id)
    if status is None or not status.settled:
        return status
    if status.complete:
        if status.completed_at is None:
            # Manifest first: if the invocation dies here, the next check writes it again.
            where = write_manifest(sink, run_id, manifest(status, ledger, sink))
            if ledger.mark_completed(run_id):
                logger.info("run complete", extra={"run_id": run_id, "manifest": where})
    else:
        where = write_manifest(sink, run_id, manifest(status, ledger, sink))
        logger.warning(
            "run settled with dead-lettered entities",
            extra={"run_id": run_id, "dead": status.dead, "manifest": where},
        )
    return status
