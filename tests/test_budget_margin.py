"""The budgets' margin for arrival jitter: wider after a 429, narrowing back slowly.

A strict vendor whose arrival stamps lag our send times by a random few milliseconds sees
L + 1 calls in a window once the lag outgrows the margin. Here such a vendor (a sliding log
of jittered stamps) runs on the virtual clock of test_budget_properties, so every run is
exact and instant.
"""

from __future__ import annotations

import bisect
import random
import uuid
from collections.abc import Iterator

import boto3
import pytest
from aws_fakes import REGION, state_table
from fake_clock import FakeClock
from moto import mock_aws
from test_budget_properties import START, FakeTable, VirtualTime, busiest

from pipeline.aws.budget import DynamoBudget
from pipeline.budget import MARGIN_HALF_LIFE, margin_for
from pipeline.local.budget import PacedBudget

PERIOD = 1.0
BASE = margin_for(PERIOD)


class JitteryVendor:
    """A strict sliding-log rate limit whose arrival stamps lag by up to `jitter` (seeded)."""

    def __init__(self, calls: int, period: float, jitter: float, seed: int = 1) -> None:
        self.calls, self.period, self.jitter = calls, period, jitter
        self._random = random.Random(seed)
        self.stamps: list[float] = []
        self.rejected: list[float] = []

    def call(self, now: float) -> bool:
        """True if accepted; a rejected call leaves no stamp."""
        stamp = now + self._random.uniform(0.0, self.jitter)
        at = bisect.bisect_right(self.stamps, stamp)
        stamps = [*self.stamps[:at], stamp, *self.stamps[at:]]
        for first in range(max(0, at - self.calls), at + 1):
            if first + self.calls < len(stamps):
                if stamps[first + self.calls] - stamps[first] < self.period:
                    self.rejected.append(now)
                    return False
        self.stamps = stamps
        return True


def harvest(
    budgets: list[object], time: VirtualTime, vendor: JitteryVendor, seconds: float
) -> None:
    """8 threads per budget, each call 20 ms; a 429 pauses that budget for 1 s."""
    end = time.now + seconds

    def caller(budget: object) -> None:
        while time.now < end:
            budget.acquire()  # type: ignore[attr-defined]
            if not vendor.call(time.now):
                budget.pause(1.0)  # type: ignore[attr-defined]
            time.sleep(0.02)

    time.run([lambda b=b: caller(b) for b in budgets for _ in range(8)])


# -- against a vendor whose arrivals jitter ---------------------------------------------------


def test_paced_budget_stops_drawing_429s_once_its_margin_outgrows_the_jitter() -> None:
    # GIVEN a vendor whose arrival stamps lag by up to 15 ms, more than the 10 ms margin
    time = VirtualTime()
    vendor = JitteryVendor(100, PERIOD, jitter=0.015)
    budget = PacedBudget(100, PERIOD, clock=time, sleep=time.sleep)

    # WHEN busy threads call through the budget for a minute
    harvest([budget], time, vendor, 60.0)

    # THEN the first overflow draws a 429 or two, the margin doubles, and no more come
    assert 1 <= len(vendor.rejected) <= 3
    assert max(vendor.rejected) < START + 5.0
    assert len(vendor.stamps) > 0.95 * 59 * 100 / (PERIOD + 2 * BASE)


def test_dynamo_budgets_stop_drawing_429s_once_one_of_them_widened_the_margin() -> None:
    # GIVEN two invocations on one table, and a vendor whose arrivals lag by up to 35 ms:
    # more than DynamoBudget's base margin and lateness allowance together (25 ms)
    time = VirtualTime()
    table = FakeTable(time.sleep, 0.008)
    budgets: list[object] = [
        DynamoBudget(table, "state", 100, PERIOD, clock=time, sleep=time.sleep) for _ in range(2)
    ]
    vendor = JitteryVendor(100, PERIOD, jitter=0.035)

    # WHEN both call for a minute
    harvest(budgets, time, vendor, 60.0)

    # THEN 429s stop within seconds, the margin having widened for both
    assert 1 <= len(vendor.rejected) <= 6
    assert max(vendor.rejected) < START + 10.0


# -- how the margin moves ------------------------------------------------------------------------


def saturate(budget: PacedBudget | DynamoBudget, clock: FakeClock, n: int) -> list[float]:
    times = []
    for _ in range(n):
        budget.acquire()
        times.append(clock())
    return times


def test_paced_budget_doubles_its_margin_after_a_429_and_halves_the_widening_in_ten_minutes() -> (
    None
):
    clock = FakeClock()
    budget = PacedBudget(50, PERIOD, clock=clock, sleep=clock.sleep)

    budget.pause(1.0)
    widened = saturate(budget, clock, 300)
    clock.advance(MARGIN_HALF_LIFE)
    narrowed = saturate(budget, clock, 300)

    # 50 calls never fit in W plus about twice the margin (it narrows from the start); ten
    # minutes on, the widening is half gone: in W plus about 1.5 times it, but in no less
    assert busiest(widened, PERIOD + 1.99 * BASE) == 50
    least = BASE + BASE * 0.5 ** (narrowed[-1] / MARGIN_HALF_LIFE)
    most = BASE + BASE * 0.5 ** (narrowed[0] / MARGIN_HALF_LIFE)
    assert 1.49 * BASE < least < most < 1.51 * BASE
    assert busiest(narrowed, PERIOD + least - 1e-6) == 50
    assert busiest(narrowed, PERIOD + most + 1e-3) > 50


def test_paced_budget_widens_its_margin_once_for_the_429s_of_one_pause() -> None:
    clock = FakeClock()
    budget = PacedBudget(50, PERIOD, clock=clock, sleep=clock.sleep)

    for _ in range(5):  # five threads' calls answered 429 together
        budget.pause(1.0)
    times = saturate(budget, clock, 300)

    assert busiest(times, PERIOD + 2 * BASE + 1e-3) > 50


def test_paced_budget_keeps_its_margin_when_the_vendor_only_reports_nothing_remaining() -> None:
    clock = FakeClock()
    budget = PacedBudget(50, PERIOD, clock=clock, sleep=clock.sleep)

    budget.observe(50, 0, 0.2)
    times = saturate(budget, clock, 300)

    assert busiest(times, PERIOD + BASE + 1e-3) > 50


def test_paced_budget_holds_for_a_reason_of_ours_without_widening_its_margin() -> None:
    # A resumed run waits out the rate window of the process before it: not a 429
    clock = FakeClock()
    budget = PacedBudget(50, PERIOD, clock=clock, sleep=clock.sleep)

    budget.hold(0.5)
    assert budget.paused_for() == pytest.approx(0.5)
    times = saturate(budget, clock, 300)

    assert times[0] >= 0.5
    assert busiest(times, PERIOD + BASE + 1e-3) > 50


@pytest.fixture(scope="module")
def dynamodb() -> Iterator[object]:
    with mock_aws():
        yield boto3.client("dynamodb", region_name=REGION)


def test_dynamo_budget_spaces_calls_by_a_margin_another_invocation_widened(
    dynamodb: object,
) -> None:
    # GIVEN two invocations on the same item (moto), one of which draws a 429
    table = state_table(dynamodb, f"state-{uuid.uuid4().hex[:12]}")  # type: ignore[arg-type]
    clock = FakeClock(START)
    a, b = (
        DynamoBudget(dynamodb, table, 50, PERIOD, clock=clock, sleep=clock.sleep) for _ in range(2)
    )
    saturate(b, clock, 10)
    a.pause(1.0)

    # WHEN the other one calls flat out
    times = saturate(b, clock, 300)

    # THEN its calls keep the doubled margin (and the lateness allowance) too
    late = max(PERIOD * 0.015, 0.015)
    assert busiest(times, PERIOD + 2 * BASE + late - 1e-4) <= 50


def test_dynamo_budget_holds_every_invocation_without_widening_the_margin(
    dynamodb: object,
) -> None:
    table = state_table(dynamodb, f"state-{uuid.uuid4().hex[:12]}")  # type: ignore[arg-type]
    clock = FakeClock(START)
    a, b = (
        DynamoBudget(dynamodb, table, 50, PERIOD, clock=clock, sleep=clock.sleep) for _ in range(2)
    )
    saturate(b, clock, 10)
    a.hold(1.0)
    held_from = clock()

    times = saturate(b, clock, 300)

    # the other invocation uses up the slots it claimed before (a fraction of a second),
    # learns the hold at its next claim, and keeps the base margin
    assert not [t for t in times if held_from + 0.5 < t < held_from + 1.0]
    assert min(t for t in times if t > held_from + 0.5) >= held_from + 1.0
    late = max(PERIOD * 0.015, 0.015)
    assert busiest(times, PERIOD + BASE + late + 1e-3) > 50
