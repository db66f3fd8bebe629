"""Drain Lambda, one function per stage: HARVEST_STAGE, or the stage the event names (local)."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger, Metrics, Tracer
from aws_lambda_powertools.metrics import EphemeralMetrics, MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from pipeline.config import Config
from pipeline.drain import StopReason
from pipeline.errors import AuthError
from pipeline.telemetry import publish
from workers.backends import prepare, runtime

logger = Logger(service="harvest")
metrics = Metrics(namespace="Harvest", service="harvest")
# The invocation is traced (cold start, duration, the report), not every AWS request in it.
# Patched, each DynamoDB, SQS and S3 request became a subsegment that the X-Ray SDK builds,
# serializes and sends on the calling thread: 0.37 M instructions on top of the 0.85 M of a
# stubbed botocore PutObject (a drain makes one per data group), and an invocation's thousands of
# them pass X-Ray's trace document size anyway (docs/benchmarks.md, 2026-12-03).
tracer = Tracer(service="harvest", auto_patch=False)

# Built during the sandbox's init, not in its first invocation (see prepare).
prepare()


@logger.inject_lambda_context
@tracer.capture_lambda_handler
@metrics.log_metrics
def handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    config = Config.from_env()
    stage = str((event or {}).get("stage") or config.stage)
    logger.append_keys(stage=stage)
    metrics.add_dimension(name="stage", value=stage)
    rt = runtime(config)
    before = rt.stats.snapshot()
    report = rt.run_drain(
        stage,
        lambda: context.get_remaining_time_in_millis() / 1000,
        started_by=str((event or {}).get("started_by") or ""),
    )
    if len(report.runs) == 1:
        logger.set_correlation_id(next(iter(report.runs)))
    publish(metrics, before, rt.stats.snapshot())
    # A run-level figure, which the "run not settled in time" alarm watches: its own metric
    # set with the service dimension only (Metrics instances share one set, to which this
    # handler adds the stage dimension), made per invocation so that it reads the
    # environment (POWERTOOLS_METRICS_DISABLED) of this one.
    run_metrics = EphemeralMetrics(namespace="Harvest", service="harvest")
    run_metrics.add_metric(
        name="OldestUnsettledRunAge", unit=MetricUnit.Seconds, value=report.oldest_unsettled_seconds
    )
    run_metrics.flush_metrics()
    logger.info("drain finished", extra={"report": report.to_dict()})
    if report.stopped == StopReason.AUTH:
        # Fail the invocation so the errors alarm fires; the messages stay queued.
        raise AuthError(f"vendor rejected the token; drain stopped: {report.auth_error}")
    return report.to_dict()
