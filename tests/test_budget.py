"""The rate budget: never more than L call starts in any rolling window of W seconds.

Most tests drive a fake clock, so they are exact and instant. Two run real threads on the
real clock for about a second: they record when calls were let through and check every
rolling window afterwards; nothing asserts how long anything took.
"""

from __future__ import annotations

import bisect
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import boto3
import pytest
from aws_fakes import REGION, state_table
from fake_clock import FakeClock
from moto import mock_aws
from ratelimit import limits

from pipeline.aws.budget import DynamoBudget
from pipeline.budget import MARGIN_FRACTION, MARGIN_MIN_SECONDS
from pipeline.errors import RateLimitedError
from pipeline.local.budget import PacedBudget

if TYPE_CHECKING:
    from mypy_boto3_dynamodb import DynamoDBClient

JOIN_TIMEOUT = 30.0  # a hung thread fails the test instead of hanging the suite


def busiest_window(times: Sequence[float], period: float) -> int:
    """The most call starts in any closed window [t, t + period]."""
    ordered = sorted(times)
    return max(
        (bisect.bisect_right(ordered, t + period) - i for i, t in enumerate(ordered)), default=0
    )


def acquire_times(budget: PacedBudget | DynamoBudget, clock: FakeClock, n: int) -> list[float]:
    times = []
    for _ in range(n):
        budget.acquire()
        times.append(clock())
    return times


# -- PacedBudget on a fake clock -----------------------------------------------------------


def test_paced_budget_keeps_every_rolling_window_within_limit_when_saturated() -> None:
    clock = FakeClock()
    budget = PacedBudget(50, 1.0, clock=clock, sleep=clock.sleep)

    times = acquire_times(budget, clock, 1_000)

    assert busiest_window(times, 1.0) == 50


def test_paced_budget_keeps_every_rolling_window_within_limit_when_calls_are_irregular() -> None:
    # GIVEN callers that work a random while between calls, sometimes idling for seconds
    clock = FakeClock()
    budget = PacedBudget(20, 2.0, clock=clock, sleep=clock.sleep)
    rng = random.Random(7)
    times = []

    # WHEN they acquire many times
    for _ in range(2_000):
        budget.acquire()
        times.append(clock())
        clock.advance(rng.choice([0.0, 0.0, rng.uniform(0, 0.2), rng.uniform(0, 3.0)]))

    # THEN no rolling window holds more than the limit
    assert busiest_window(times, 2.0) <= 20


def test_paced_budget_lets_calls_through_near_the_limit_when_saturated() -> None:
    # Not safe by being slow: saturated, it lets nearly L calls through per W (less margin).
    clock = FakeClock()
    budget = PacedBudget(100, 1.0, clock=clock, sleep=clock.sleep)

    times = acquire_times(budget, clock, 1_000)

    assert busiest_window(times, 1.0) == 100
    assert times[-1] - times[0] <= 1_000 / 100 * 1.05


def test_paced_budget_blocks_every_acquisition_when_paused() -> None:
    clock = FakeClock()
    budget = PacedBudget(50, 1.0, clock=clock, sleep=clock.sleep)
    acquire_times(budget, clock, 10)
    paused_at = clock()

    budget.pause(2.5)
    after = acquire_times(budget, clock, 5)

    assert min(after) >= paused_at + 2.5


def test_paced_budget_voids_a_waiting_slot_when_paused_during_the_wait() -> None:
    # GIVEN callers that will soon have to wait for a slot
    clock = FakeClock()
    paused_until: list[float] = []

    def sleep_while_another_thread_hits_a_429(seconds: float) -> None:
        if not paused_until:
            paused_until.append(clock() + 1.0)
            budget.pause(1.0)
        clock.sleep(seconds)

    budget = PacedBudget(5, 1.0, clock=clock, sleep=sleep_while_another_thread_hits_a_429)

    # WHEN a pause starts while one of them sleeps until its slot
    for _ in range(100):
        budget.acquire()
        if paused_until:
            break

    # THEN that caller does not start at its old slot but after the pause
    assert paused_until
    assert clock() >= paused_until[0]


def test_paced_budget_keeps_the_longer_pause_when_pauses_overlap() -> None:
    clock = FakeClock()
    budget = PacedBudget(50, 1.0, clock=clock, sleep=clock.sleep)

    budget.pause(3.0)
    budget.pause(1.0)
    budget.acquire()

    assert clock() >= 3.0


def test_paced_budget_paused_for_counts_down_the_pause() -> None:
    clock = FakeClock()
    budget = PacedBudget(50, 1.0, clock=clock, sleep=clock.sleep)
    assert budget.paused_for() == 0.0

    budget.pause(90.0)
    clock.advance(30.0)

    assert budget.paused_for() == pytest.approx(60.0)
    clock.advance(61.0)
    assert budget.paused_for() == 0.0


def test_paced_budget_raises_instead_of_waiting_out_a_pause_over_max_pause() -> None:
    # GIVEN a budget paused for an hour by a 429
    clock = FakeClock()
    budget = PacedBudget(50, 1.0, clock=clock, sleep=clock.sleep)
    budget.pause(3_600.0)

    # WHEN a caller that may wait a minute at most asks for a slot
    with pytest.raises(RateLimitedError) as raised:
        budget.acquire(max_pause=60.0)

    # THEN it is told how long the pause lasts, at once
    assert raised.value.retry_after == pytest.approx(3_600.0)
    assert clock.sleeps == []
    # AND a caller without a limit still waits it out
    budget.acquire()
    assert clock() >= 3_600.0


def test_paced_budget_waits_out_a_pause_within_max_pause() -> None:
    clock = FakeClock()
    budget = PacedBudget(50, 1.0, clock=clock, sleep=clock.sleep)
    budget.pause(30.0)

    budget.acquire(max_pause=60.0)

    assert clock() >= 30.0


def test_paced_budget_raises_when_a_long_pause_starts_while_a_caller_waits() -> None:
    # GIVEN callers that will soon have to wait for a slot
    clock = FakeClock()
    paused: list[float] = []

    def sleep_while_another_thread_hits_a_long_429(seconds: float) -> None:
        if not paused:
            paused.append(clock())
            budget.pause(3_600.0)
        clock.sleep(seconds)

    budget = PacedBudget(5, 1.0, clock=clock, sleep=sleep_while_another_thread_hits_a_long_429)

    # WHEN an hour's pause starts while one of them sleeps until its slot
    with pytest.raises(RateLimitedError) as raised:
        for _ in range(100):
            budget.acquire(max_pause=60.0)

    # THEN that caller wakes and gives up instead of sleeping on for the hour
    assert paused
    assert clock() < paused[0] + 60.0
    assert raised.value.retry_after > 3_500.0


def test_paced_budget_lowers_the_pace_when_vendor_reports_a_lower_limit() -> None:
    # GIVEN a budget configured for 100/s
    clock = FakeClock()
    budget = PacedBudget(100, 1.0, clock=clock, sleep=clock.sleep)
    acquire_times(budget, clock, 50)

    # WHEN the vendor's X-RateLimit-Limit says 20
    budget.observe(20, None, None)
    times = acquire_times(budget, clock, 200)

    # THEN calls from then on fit 20 per rolling second
    assert busiest_window(times, 1.0) <= 20


def test_paced_budget_keeps_its_pace_when_vendor_reports_a_higher_limit() -> None:
    clock = FakeClock()
    budget = PacedBudget(20, 1.0, clock=clock, sleep=clock.sleep)

    budget.observe(500, 400, 0.5)
    times = acquire_times(budget, clock, 200)

    assert busiest_window(times, 1.0) <= 20


def test_paced_budget_pauses_when_vendor_reports_nothing_remaining() -> None:
    clock = FakeClock()
    budget = PacedBudget(50, 1.0, clock=clock, sleep=clock.sleep)
    budget.acquire()
    observed_at = clock()

    budget.observe(50, 0, 0.75)
    budget.acquire()

    assert clock() >= observed_at + 0.75


def test_paced_budget_does_not_pause_when_vendor_reports_calls_remaining() -> None:
    clock = FakeClock()
    budget = PacedBudget(50, 1.0, clock=clock, sleep=clock.sleep)
    budget.acquire()
    observed_at = clock()

    budget.observe(50, 3, 0.75)
    budget.acquire()

    assert clock() < observed_at + 0.75


# -- PacedBudget with real threads on the real clock ---------------------------------------


class GrantLog:
    """The real monotonic clock and sleep, remembering per thread the time last granted.

    A budget's acquire reads the clock and sleeps until its slot (or reads the clock again
    as it lets the call go), so the time it granted is the last reading plus any sleep
    since. Unlike a timestamp taken after acquire returns, it leaves out the time the
    thread then waited to be scheduled. It also records how late sleeping threads woke.
    """

    def __init__(self) -> None:
        self._local = threading.local()
        self._lock = threading.Lock()
        self.latest_wake = 0.0  # the longest a sleep overran its target, in seconds

    def clock(self) -> float:
        now = time.monotonic()
        self._local.slot = now
        return now

    def sleep(self, seconds: float) -> None:
        self._local.slot += seconds
        time.sleep(seconds)
        late = time.monotonic() - self._local.slot
        with self._lock:
            self.latest_wake = max(self.latest_wake, late)

    @property
    def slot(self) -> float:
        return float(self._local.slot)


@dataclass(frozen=True)
class Pause:
    called: float  # time.monotonic() before pause() was called
    returned: float  # ... and after it returned
    seconds: float


@dataclass
class Harvest:
    granted: list[float]  # the time the budget granted each call
    started: list[float]  # time.monotonic() as each acquire returned
    pauses: list[Pause]


def assert_within_limit(harvest: Harvest, grants: GrantLog, calls: int, period: float) -> None:
    """No rolling window holds more than `calls` starts, granted or as the threads saw them,
    provided the threads ran on time to within the budget's margin."""
    # Threads start their calls a little after their slots: waking from the sleep, then
    # getting a core back after acquire returns. The margin the budget adds to the window
    # absorbs delays up to its size; a starved CPU (a loaded CI box) can add more, and
    # then any budget's calls bunch. That is the machine's doing, so it is not asserted.
    margin = max(period * MARGIN_FRACTION, MARGIN_MIN_SECONDS)
    delays = [s - g for s, g in zip(harvest.started, harvest.granted, strict=True)]
    if grants.latest_wake + max(delays) < margin:
        assert busiest_window(harvest.granted, period) <= calls
        assert busiest_window(harvest.started, period) <= calls


def run_threads(
    budget: PacedBudget,
    grants: GrantLog,
    *,
    threads: int,
    calls: int,
    pause_after: Callable[[int], float] = lambda n: 0.0,
) -> Harvest:
    """`threads` callers acquire until `calls` calls have started; after call n, the caller
    pauses the budget for `pause_after(n)` seconds if that is positive (a 429)."""
    out = Harvest([], [], [])
    lock = threading.Lock()

    def caller() -> None:
        while True:
            budget.acquire()
            started = time.monotonic()
            with lock:
                n = len(out.started)
                if n >= calls:
                    return
                out.started.append(started)
                out.granted.append(grants.slot)
            seconds = pause_after(n + 1)
            if seconds > 0:
                called = time.monotonic()
                budget.pause(seconds)
                with lock:
                    out.pauses.append(Pause(called, time.monotonic(), seconds))

    workers = [threading.Thread(target=caller) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join(timeout=JOIN_TIMEOUT)
    assert not any(w.is_alive() for w in workers), "a caller hung"
    return out


def test_paced_budget_keeps_every_rolling_window_within_limit_across_threads() -> None:
    # GIVEN 8 threads sharing a budget of 50 calls per rolling half second
    grants = GrantLog()
    budget = PacedBudget(50, 0.5, clock=grants.clock, sleep=grants.sleep)

    # WHEN they make 100 calls as fast as it lets them (about a second)
    harvest = run_threads(budget, grants, threads=8, calls=100)

    # THEN no rolling half second holds more than 50 call starts
    assert len(harvest.started) == 100
    assert_within_limit(harvest, grants, 50, 0.5)


def test_paced_budget_honours_pauses_when_429s_arrive_while_threads_wait() -> None:
    # GIVEN 8 threads calling through one budget, and three calls that draw a 429
    grants = GrantLog()
    budget = PacedBudget(50, 0.5, clock=grants.clock, sleep=grants.sleep)
    burst = {20: 0.1, 21: 0.15, 60: 0.1}

    # WHEN each 429 pauses the budget while the other threads hold or wait for slots
    harvest = run_threads(
        budget, grants, threads=8, calls=100, pause_after=lambda n: burst.get(n, 0.0)
    )

    # THEN the rolling limit still holds
    assert len(harvest.pauses) == 3
    assert_within_limit(harvest, grants, 50, 0.5)
    # AND no call was granted a slot inside a pause. A slot granted after pause() returned
    # was checked against that pause, so it must lie beyond its end.
    for p in harvest.pauses:
        inside = [t for t in harvest.granted if p.returned < t < p.called + p.seconds]
        assert inside == [], f"calls inside the pause {p}"


# -- DynamoBudget on moto, two invocations sharing one table -------------------------------


@pytest.fixture(scope="module")
def dynamodb() -> Iterator[DynamoDBClient]:
    with mock_aws():
        yield boto3.client("dynamodb", region_name=REGION)


@pytest.fixture
def table(dynamodb: DynamoDBClient) -> str:
    return state_table(dynamodb, f"state-{uuid.uuid4().hex[:12]}")


def two_invocations(
    dynamodb: DynamoDBClient, table: str, clock: FakeClock, calls: int, period: float
) -> tuple[DynamoBudget, DynamoBudget]:
    return (
        DynamoBudget(dynamodb, table, calls, period, clock=clock, sleep=clock.sleep),
        DynamoBudget(dynamodb, table, calls, period, clock=clock, sleep=clock.sleep),
    )


def test_dynamo_budgets_keep_every_rolling_window_within_limit_when_interleaved(
    dynamodb: DynamoDBClient, table: str
) -> None:
    # GIVEN two invocations drawing from one schedule in the table
    clock = FakeClock(1_700_000_000.0)
    a, b = two_invocations(dynamodb, table, clock, 20, 1.0)

    # WHEN their calls interleave, one caller each, one at a time
    times = []
    for _ in range(60):
        for budget in (a, b):
            budget.acquire()
            times.append(clock())

    # THEN together they never exceed the limit in any rolling window
    assert busiest_window(times, 1.0) <= 20


def test_dynamo_budget_does_not_use_stale_slots_when_its_callers_were_busy(
    dynamodb: DynamoDBClient, table: str
) -> None:
    # GIVEN invocation a reserved a batch of slots, used one, and its callers then spent
    # half a second in slow vendor calls while the batch's slots went by
    clock = FakeClock(1_700_000_000.0)
    a, b = two_invocations(dynamodb, table, clock, 20, 1.0)
    times = []
    a.acquire()
    times.append(clock())
    clock.advance(0.5)

    # WHEN b calls flat out and a's callers come back for their next calls
    for i in range(40):
        b.acquire()
        times.append(clock())
        if i == 0:
            for _ in range(4):
                a.acquire()
                times.append(clock())

    # THEN a's missed slots are lost, not spent late on top of b's
    assert busiest_window(times, 1.0) <= 20


def test_dynamo_budgets_keep_every_rolling_window_within_limit_when_callers_are_slow(
    dynamodb: DynamoDBClient, table: str
) -> None:
    # GIVEN two invocations whose callers sometimes work longer than their reserved slots last
    clock = FakeClock(1_700_000_000.0)
    a, b = two_invocations(dynamodb, table, clock, 20, 1.0)
    rng = random.Random(11)
    times = []

    # WHEN they call in a random order with random work in between
    for _ in range(200):
        budget = rng.choice((a, b))
        budget.acquire()
        times.append(clock())
        clock.advance(rng.choice([0.0, 0.0, rng.uniform(0, 0.5)]))

    # THEN the shared limit holds
    assert busiest_window(times, 1.0) <= 20


def test_dynamo_budget_honours_a_pause_from_another_invocation_on_its_next_reservation(
    dynamodb: DynamoDBClient, table: str
) -> None:
    # GIVEN invocation a drew a 429
    clock = FakeClock(1_700_000_000.0)
    a, b = two_invocations(dynamodb, table, clock, 20, 1.0)
    a.acquire()
    paused_at = clock()

    # WHEN a pauses for the Retry-After
    a.pause(2.0)

    # THEN b's next reservation starts after the pause
    b.acquire()
    assert clock() >= paused_at + 2.0


def test_dynamo_budget_shares_a_lower_limit_learned_by_another_invocation(
    dynamodb: DynamoDBClient, table: str
) -> None:
    # GIVEN invocation a learned from the vendor's headers that the limit is 5, not 20
    clock = FakeClock(1_700_000_000.0)
    a, b = two_invocations(dynamodb, table, clock, 20, 1.0)
    a.observe(5, None, None)

    # WHEN both call
    times = []
    for _ in range(40):
        for budget in (a, b):
            budget.acquire()
            times.append(clock())

    # THEN they keep to 5 per rolling second, though b was configured for 20
    assert busiest_window(times, 1.0) <= 5


def test_dynamo_budget_pauses_when_vendor_reports_nothing_remaining(
    dynamodb: DynamoDBClient, table: str
) -> None:
    clock = FakeClock(1_700_000_000.0)
    a, b = two_invocations(dynamodb, table, clock, 20, 1.0)
    a.acquire()
    observed_at = clock()

    a.observe(20, 0, 1.5)
    a.acquire()
    b.acquire()

    assert clock() >= observed_at + 1.5


def test_dynamo_budget_paused_for_counts_down_its_own_pause(
    dynamodb: DynamoDBClient, table: str
) -> None:
    clock = FakeClock(1_700_000_000.0)
    a, _ = two_invocations(dynamodb, table, clock, 20, 1.0)
    assert a.paused_for() == 0.0

    a.pause(120.0)
    clock.advance(20.0)

    assert a.paused_for() == pytest.approx(100.0)


def test_dynamo_budget_learns_a_long_pause_from_the_shared_item_and_raises_over_max_pause(
    dynamodb: DynamoDBClient, table: str
) -> None:
    # GIVEN invocation a drew a 429 asking for an hour
    clock = FakeClock(1_700_000_000.0)
    a, b = two_invocations(dynamodb, table, clock, 20, 1.0)
    a.pause(3_600.0)
    clock.advance(10.0)

    # WHEN invocation b, which may wait a minute at most, takes a slot
    with pytest.raises(RateLimitedError) as raised:
        b.acquire(max_pause=60.0)

    # THEN it learns the pause from the shared item and gives up at once, and from then
    # on says how long the pause lasts without another call
    assert raised.value.retry_after == pytest.approx(3_590.0)
    assert clock.sleeps == []
    assert b.paused_for() == pytest.approx(3_590.0)


def test_dynamo_budget_waits_out_a_shared_pause_within_max_pause(
    dynamodb: DynamoDBClient, table: str
) -> None:
    clock = FakeClock(1_700_000_000.0)
    a, b = two_invocations(dynamodb, table, clock, 20, 1.0)
    a.pause(30.0)

    b.acquire(max_pause=60.0)

    assert clock() >= 1_700_000_030.0


def test_dynamo_budget_leaves_a_busy_invocation_the_slots_a_sparse_one_does_not_use(
    dynamodb: DynamoDBClient, table: str
) -> None:
    # GIVEN an upstream invocation with one call to make
    clock = FakeClock(1_700_000_000.0)
    sparse, busy = two_invocations(dynamodb, table, clock, 20, 1.0)
    sparse.acquire()
    called = clock()

    # WHEN a busy invocation then calls flat out for a second
    times = acquire_times(busy, clock, 20)

    # THEN its calls follow at once, at the even spacing: the sparse one claimed one slot,
    # not a quarter second of them
    assert times[0] - called < 2 * 1.025 / 20
    assert busiest_window([called, *times], 1.0) <= 20


def test_dynamo_budget_asks_only_update_item_of_its_item_in_the_state_table(
    dynamodb: DynamoDBClient, table: str
) -> None:
    # GIVEN the requests two invocations make, watched on the client
    seen: list[tuple[str, object]] = []

    def watch(params: dict[str, object], model: Any, **_: object) -> None:
        seen.append((model.name, params.get("Key")))

    event = "before-parameter-build.dynamodb.*"
    dynamodb.meta.events.register(event, watch)
    clock = FakeClock(1_700_000_000.0)
    a, b = two_invocations(dynamodb, table, clock, 20, 1.0)

    # WHEN they call, draw a 429, learn a lower limit and hear that nothing remains
    try:
        for _ in range(10):
            a.acquire()
            b.acquire()
        a.pause(1.0)
        b.observe(10, 0, 0.5)
        a.acquire()
        b.acquire()
    finally:
        dynamodb.meta.events.unregister(event, watch)

    # THEN every request was an UpdateItem of the one schedule item: what the IAM policy grants
    key = {"pk": {"S": "budget#vendor"}, "sk": {"S": "schedule"}}
    assert seen
    assert {name for name, _ in seen} == {"UpdateItem"}
    assert all(k == key for _, k in seen)


# -- why not the `ratelimit` package -------------------------------------------------------


def test_ratelimit_package_lets_twice_the_limit_into_one_rolling_window_at_a_boundary() -> None:
    # GIVEN ratelimit's decorator allowing 10 calls per 1 s period, on a clock we drive.
    # It counts calls in fixed windows that restart at the first call after a period ends.
    now = [0.0]
    admitted: list[float] = []

    limiter = limits(calls=10, period=1.0, clock=lambda: now[0], raise_on_limit=False)
    call: Callable[[], None] = limiter(lambda: admitted.append(now[0]))

    # WHEN 20 callers arrive just before a window ends and 20 more just after
    now[0] = 0.999
    for _ in range(20):
        call()
    now[0] = 1.0
    for _ in range(20):
        call()

    # THEN it refuses the 11th in each fixed window...
    assert len(admitted) == 20
    # ...yet 20 calls, twice the limit, start within one millisecond: a sliding-log vendor
    # would answer the second ten with 429s.
    assert busiest_window(admitted, 1.0) == 20
    assert max(admitted) - min(admitted) == pytest.approx(0.001)

    # AND the project's budget, given the same burst, lets 10 through in any rolling second
    clock = FakeClock(0.999)
    budget = PacedBudget(10, 1.0, clock=clock, sleep=clock.sleep)
    assert busiest_window(acquire_times(budget, clock, 40), 1.0) == 10


def test_dynamo_budget_winding_down_claims_only_for_the_threads_waiting(
    dynamodb: DynamoDBClient, table: str
) -> None:
    # GIVEN an invocation with one thread waiting for a slot and two away on vendor calls,
    # due back within its usual 50 ms (the budget has learned that)
    clock = FakeClock(1_700_000_000.0)
    budget = DynamoBudget(dynamodb, table, 20, 1.0, clock=clock, sleep=clock.sleep)
    budget._time_away.add(0.05)
    budget._waiting = 1
    budget._away = {1: clock() - 0.01, 2: clock() - 0.02}
    now, start, interval = clock(), clock(), 1.025 / 20

    # WHEN it sizes a claim as usual, and after its drain has passed its deadline
    usual = budget._fill(*budget._ready(now), start, interval)
    budget.winding_down(True)
    last = budget._fill(*budget._ready(now), start, interval)
    budget.winding_down(False)

    # THEN as usual it claims for the waiting thread and those coming back, again and again
    # (half a second of slots); winding down, for the waiting thread's one call: slots for
    # threads with no more messages would be lost to every invocation
    assert usual == 10
    assert last == 1
    assert budget._fill(*budget._ready(now), start, interval) == usual


def test_dynamo_budget_says_when_a_slot_is_too_late_to_send_and_counts_it_not_sent(
    dynamodb: DynamoDBClient, table: str
) -> None:
    # GIVEN a thread handed a slot
    clock = FakeClock(1_700_000_000.0)
    budget = DynamoBudget(dynamodb, table, 20, 1.0, clock=clock, sleep=clock.sleep)
    stamp = budget.acquire()
    on_time = budget.send_by()

    # WHEN it is held past LATE after its slot before writing its request
    clock.advance(budget._late + 0.01)
    held = budget.send_by()

    # THEN its last moment was LATE after the slot (in perf_counter's terms), so it has
    # passed; the slot given up counts as not sent, not used, and the thread is not counted
    # away on a call
    now = time.perf_counter()
    assert on_time is not None and held is not None
    assert on_time > now and held < now
    assert held == pytest.approx(on_time - budget._late - 0.01, abs=0.005)
    budget.missed(stamp)
    assert (budget.slots["used"], budget.slots["not sent"]) == (0, 1)
    assert budget._away == {}
    budget.missed(stamp)  # a second word about the same slot changes nothing
    assert budget.slots["not sent"] == 1


def test_dynamo_budget_holds_the_usable_slots_it_claimed(
    dynamodb: DynamoDBClient, table: str
) -> None:
    # GIVEN an invocation that claimed slots ahead for its threads
    clock = FakeClock(1_700_000_000.0)
    budget = DynamoBudget(dynamodb, table, 20, 1.0, clock=clock, sleep=clock.sleep)
    budget._held.extend([clock() - 1.0, clock() + 0.05, clock() + 0.1])

    # WHEN it is asked what it holds, THEN the slots still ahead count, a stale one not
    assert budget.held() == 2
    clock.advance(0.2)
    assert budget.held() == 0


def busy_invocation(budget: DynamoBudget, clock: FakeClock) -> None:
    """Make `budget` size its claims for three threads of its own, each back every 50 ms."""
    budget._time_away.add(0.05)
    budget._away = {1: clock() - 0.01, 2: clock() - 0.02}


def test_dynamo_budget_gives_back_the_slots_it_will_not_use_while_they_end_the_schedule(
    dynamodb: DynamoDBClient, table: str
) -> None:
    # GIVEN an invocation that claimed for threads it expected back, then ran out of work
    clock = FakeClock(1_700_000_000.0)
    done, other = two_invocations(dynamodb, table, clock, 20, 1.0)
    busy_invocation(done, clock)
    used = done.acquire()
    held = done.held()
    assert held >= 5

    # WHEN it gives back all but one, and another invocation then calls
    assert done.give_back(keep=1) == held - 1
    kept = done.acquire()
    times = acquire_times(other, clock, 20)

    # THEN the other's calls follow right after the kept slot, not after the whole claim,
    # and the limit still holds over all of them
    interval = 1.025 / 20
    assert done.held() == 0
    assert times[0] - kept < 2 * interval
    assert busiest_window([used, kept, *times], 1.0) <= 20
    # AND the slots are given back once: a second attempt asks nothing
    assert done.give_back(keep=0) == 0


def test_dynamo_budget_keeps_its_slots_when_another_invocation_has_claimed_behind_them(
    dynamodb: DynamoDBClient, table: str
) -> None:
    # GIVEN an invocation holding claimed slots, and another that claimed after it (its
    # caller does not sleep until its slot, so the first's slots are still ahead)
    clock = FakeClock(1_700_000_000.0)
    first = DynamoBudget(dynamodb, table, 20, 1.0, clock=clock, sleep=clock.sleep)
    second = DynamoBudget(dynamodb, table, 20, 1.0, clock=clock, sleep=lambda _: None)
    busy_invocation(first, clock)
    times = [first.acquire()]
    held = first.held()
    assert held >= 5
    times.append(second.acquire())

    # WHEN the first tries to give its slots back
    given = first.give_back(keep=0)

    # THEN it cannot (they no longer end the schedule): it still holds them and uses them,
    # and no rolling window is over the limit
    assert given == 0
    assert first.held() == held
    times += acquire_times(first, clock, held)
    assert busiest_window(times, 1.0) <= 20
    assert times[1] > max(times[:1] + times[2:])  # the second's slot comes after them all


# -- a call that leaves late ---------------------------------------------------------------

# 20 calls a second: slots 1.025 / 20 apart (W, the 10 ms margin and 15 ms LATE); a thread
# held 75 ms between its slot and its send is 60 ms past LATE, more than one slot's spacing.
FROZEN = 0.075
VENDOR_WINDOW = 1.0 + 0.01 - 1e-6  # W plus the margin the network may take


def busy_budget(dynamodb: DynamoDBClient, table: str) -> tuple[DynamoBudget, FakeClock]:
    """A budget of 20 calls a second sizing its claims for three busy threads, and its clock."""
    clock = FakeClock(1_700_000_000.0)
    budget = DynamoBudget(dynamodb, table, 20, 1.0, clock=clock, sleep=clock.sleep)
    busy_invocation(budget, clock)
    return budget, clock


@pytest.fixture
def sent(dynamodb: DynamoDBClient) -> Iterator[list[str]]:
    """The requests the client sends during the test, by operation."""
    seen: list[str] = []

    def watch(model: Any, **_: object) -> None:
        seen.append(model.name)

    event = "before-parameter-build.dynamodb.*"
    dynamodb.meta.events.register(event, watch)
    try:
        yield seen
    finally:
        dynamodb.meta.events.unregister(event, watch)


@pytest.mark.parametrize("measured", [True, False])
def test_dynamo_budget_leaves_its_own_slots_unused_a_window_after_a_call_that_left_late(
    dynamodb: DynamoDBClient, table: str, sent: list[str], measured: bool
) -> None:
    # GIVEN a busy invocation holding slots ahead, whose call left 75 ms after its slot
    budget, clock = busy_budget(dynamodb, table)
    late = budget.acquire()
    held = budget.held()
    asked = len(sent)

    # WHEN it hears when the request left (or, unmeasured, does not) and calls on
    budget.arrived(late, late + FROZEN, FROZEN if measured else None)
    dropped, asked = held - budget.held(), len(sent) - asked
    sends = [late + FROZEN, *acquire_times(budget, clock, 25)]

    # THEN, measured, it left two of its own held slots unused, asking DynamoDB nothing, and
    # the vendor's window from the late call holds no more than the limit; unmeasured, the
    # call 20 slots on came within W of it (the 429 the AWS-mode bench drew)
    if measured:
        assert dropped == 2 == budget.slots["made room"]
        assert budget.slots["late"] == 1
        assert asked == 0
        assert busiest_window(sends, VENDOR_WINDOW) <= 20
    else:
        assert dropped == 0
        assert busiest_window(sends, VENDOR_WINDOW) == 21


def test_dynamo_budget_pushes_the_schedule_on_for_a_late_call_when_it_holds_no_slots(
    dynamodb: DynamoDBClient, table: str, sent: list[str]
) -> None:
    # GIVEN an invocation with one call to make, which left 75 ms late
    clock = FakeClock(1_700_000_000.0)
    sparse, busy = two_invocations(dynamodb, table, clock, 20, 1.0)
    late = sparse.acquire()
    assert sparse.held() == 0
    asked = len(sent)

    # WHEN it hears so, and a busy invocation then calls flat out
    sparse.arrived(late, late + FROZEN, FROZEN)
    pushed = sent[asked:]
    sends = [late + FROZEN, *acquire_times(busy, clock, 25)]

    # THEN the late one pushed the schedule's end on by two slots in one request, and the
    # busy one's calls leave the vendor's window from the late call within the limit
    assert pushed == ["UpdateItem"]
    assert sparse.slots["made room"] == 2
    assert busiest_window(sends, VENDOR_WINDOW) <= 20


def test_dynamo_budget_makes_room_once_for_the_calls_of_one_held_sandbox(
    dynamodb: DynamoDBClient, table: str
) -> None:
    # GIVEN a busy invocation whose two threads were held together until 75 ms after the
    # first one's slot
    budget, clock = busy_budget(dynamodb, table)
    first = budget.acquire()
    budget.arrived(first, first + FROZEN, FROZEN)
    second = budget.acquire()
    after = first + FROZEN - second

    # WHEN the second hears it left late too
    budget.arrived(second, second + after, after)

    # THEN the room made for the first covers it: two slots in all
    assert budget.slots["late"] == 2
    assert budget.slots["made room"] == 2


def test_dynamo_budget_makes_no_room_for_calls_that_left_within_late(
    dynamodb: DynamoDBClient, table: str, sent: list[str]
) -> None:
    # GIVEN a busy invocation's call that left 10 ms after its slot (LATE is 15 ms)
    budget, clock = busy_budget(dynamodb, table)
    stamp = budget.acquire()
    held = budget.held()
    asked = len(sent)

    # WHEN it hears so
    budget.arrived(stamp, stamp + 0.2, 0.01)

    # THEN nothing changes, and nothing is asked (`at`, which bounds the vendor's latency
    # too, is not a reason)
    assert budget.held() == held
    assert budget.slots["late"] == budget.slots["made room"] == 0
    assert len(sent) == asked


def test_dynamo_budget_does_not_give_back_slots_it_left_unused_for_a_late_call(
    dynamodb: DynamoDBClient, table: str
) -> None:
    # GIVEN a busy invocation that left the last slots of its claim unused for a late call
    budget, clock = busy_budget(dynamodb, table)
    late = budget.acquire()
    budget.arrived(late, late + FROZEN, FROZEN)
    assert budget.slots["made room"] == 2

    # WHEN its queue runs dry and it gives back what it holds, and another invocation calls
    given = budget.give_back(keep=0)
    other = DynamoBudget(dynamodb, table, 20, 1.0, clock=clock, sleep=clock.sleep)
    sends = [late + FROZEN, *acquire_times(other, clock, 25)]

    # THEN nothing was given back (that would hand the unused slots out again), and the
    # vendor's window from the late call holds no more than the limit
    assert given == 0
    assert busiest_window(sends, VENDOR_WINDOW) <= 20
