"""Replay Lambda: {"stage": S, "max": N, "dry_run": false} moves S's DLQ back to its queue."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger, Tracer
from aws_lambda_powertools.utilities.typing import LambdaContext

from pipeline.config import Config
from workers.backends import runtime

logger = Logger(service="harvest")
# Patched, as the kickoff (explicit: Tracer instances share their settings in a process).
tracer = Tracer(service="harvest", auto_patch=True)


@logger.inject_lambda_context
@tracer.capture_lambda_handler
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    event = event or {}
    stage = str(event.get("stage", ""))
    limit = event.get("max")
    report = runtime(Config.from_env()).run_replay(
        stage,
        max_messages=int(limit) if limit is not None else None,
        dry_run=bool(event.get("dry_run", False)),
    )
    logger.info("replay finished", extra={"stage": stage, "moved": report.moved})
    return {
        "stage": stage,
        "moved": report.moved,
        "seen": report.seen,
        "reasons": dict(report.reasons),
    }
