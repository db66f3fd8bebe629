"""Kickoff Lambda: scheduled (the previous UTC day) or invoked with {"from": T1, "to": T2}."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.utilities.typing import LambdaContext

from pipeline.config import Config
from pipeline.telemetry import publish
from pipeline.window import Window
from workers.backends import prepare, runtime

logger = Logger(service="harvest")
metrics = Metrics(namespace="Harvest", service="harvest")
# Patched: its few AWS requests are subsegments (a drain's are not: workers/drain.py).
# Explicit, since Tracer instances share their settings within a process.
tracer = Tracer(service="harvest", auto_patch=True)

# Built during the sandbox's init, not in its first invocation (see prepare).
prepare(vendor_client=False)


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    event = event or {}
    if "from" in event or "to" in event:
        window = Window.parse(str(event.get("from", "")), str(event.get("to", "")))
    else:
        window = Window.previous_day()
    logger.set_correlation_id(window.run_id)
    rt = runtime(Config.from_env())
    before = rt.stats.snapshot()
    report = rt.run_kickoff(window)
    publish(metrics, before, rt.stats.snapshot())
    return asdict(report)
