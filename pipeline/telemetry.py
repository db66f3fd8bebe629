"""Powertools Metrics (EMF) of one invocation, from the change in its call stats."""

from __future__ import annotations

from collections.abc import Mapping

from aws_lambda_powertools import Metrics
from aws_lambda_powertools.metrics import MetricUnit

# Metric name -> (CallStats field, unit). The dashboard plots VendorCalls per minute.
METRICS: Mapping[str, tuple[str, MetricUnit]] = {
    "VendorCalls": ("calls", MetricUnit.Count),
    "VendorRateLimited": ("rate_limited", MetricUnit.Count),
    "VendorRetries": ("retries", MetricUnit.Count),
    "VendorFailures": ("failures", MetricUnit.Count),
    "MessagesDone": ("messages_done", MetricUnit.Count),
    "MessagesGone": ("messages_gone", MetricUnit.Count),
    "MessagesFailed": ("messages_failed", MetricUnit.Count),
    "MessagesDead": ("messages_dead", MetricUnit.Count),
    "MessagesSkipped": ("messages_skipped", MetricUnit.Count),
}


def publish(metrics: Metrics, before: Mapping[str, float], after: Mapping[str, float]) -> None:
    """Add the invocation's counts, and the mean vendor latency, to `metrics`."""
    delta = {k: after[k] - before[k] for k in after}
    for name, (field, unit) in METRICS.items():
        metrics.add_metric(name=name, unit=unit, value=delta.get(field, 0))
    if delta.get("calls"):
        metrics.add_metric(
            name="VendorLatency",
            unit=MetricUnit.Milliseconds,
            value=1000 * delta["latency_total"] / delta["calls"],
        )
