"""The vendor's recent latency: the read timeout it earned, and calls in flight (Little's law)."""

from __future__ import annotations

import pytest

from pipeline.vendor_api.latency import (
    MIN_SAMPLES,
    RECOMPUTE_EVERY,
    TAIL_FACTOR,
    TAIL_FLOOR,
    Latency,
)


def test_read_timeout_is_the_configured_one_until_enough_is_known() -> None:
    latency = Latency(read_timeout=10.0)
    for _ in range(MIN_SAMPLES - 1):
        latency.observe(0.03)

    assert latency.read_timeout == 10.0
    assert latency.mean == pytest.approx(0.03)


def test_read_timeout_follows_a_fast_vendor_down_to_the_floor() -> None:
    # GIVEN a vendor answering in 30 ms
    latency = Latency(read_timeout=10.0)

    # WHEN enough calls are seen
    for _ in range(2 * RECOMPUTE_EVERY):
        latency.observe(0.03)

    # THEN a stall costs the floor, not the configured 10 s
    assert latency.read_timeout == TAIL_FLOOR


def test_read_timeout_is_learned_from_a_runs_first_calls() -> None:
    # GIVEN the upstream listings of a run, answered in 30 ms: fewer calls than a recompute
    # period, but enough to know
    latency = Latency(read_timeout=10.0)
    for _ in range(MIN_SAMPLES):
        latency.observe(0.03)

    # THEN the first data calls already get the earned timeout: a stall among them costs
    # the floor, not the configured 10 s (a stall at a run's start held it that long)
    assert MIN_SAMPLES < RECOMPUTE_EVERY
    assert latency.read_timeout == TAIL_FLOOR


def test_read_timeout_is_a_multiple_of_the_95th_percentile_capped_by_the_configured() -> None:
    slow = Latency(read_timeout=10.0)
    slower = Latency(read_timeout=10.0)
    for _ in range(2 * RECOMPUTE_EVERY):
        slow.observe(0.4)
        slower.observe(2.0)

    assert slow.read_timeout == pytest.approx(TAIL_FACTOR * 0.4)
    assert slower.read_timeout == 10.0


def test_rare_stalls_do_not_raise_the_read_timeout() -> None:
    # GIVEN 1 call in 100 stalling (timed out) and the rest at 30 ms
    latency = Latency(read_timeout=10.0)
    for i in range(512):
        if i % 100 == 99:
            latency.timed_out()
        else:
            latency.observe(0.03)

    assert latency.read_timeout == TAIL_FLOOR


def test_read_timeout_recovers_when_the_vendor_really_slows_down() -> None:
    # GIVEN a timeout earned at 30 ms, then a vendor that now takes 3 s for every call
    latency = Latency(read_timeout=10.0)
    for _ in range(2 * RECOMPUTE_EVERY):
        latency.observe(0.03)
    assert latency.read_timeout == TAIL_FLOOR

    # WHEN its calls time out for a while
    for _ in range(8 * RECOMPUTE_EVERY):
        latency.timed_out()

    # THEN the timeout climbs back to the configured ceiling instead of failing every call
    assert latency.read_timeout == 10.0
