"""Drains start when there is work, not at their next scheduled minute.

The kickoff starts every stage's drain as it begins (their cold starts beside its listing),
and those drains wait for its messages; a drain that runs out of time with messages left
starts its successor. How they are started is the backend's (`Runtime.start_drain`: an
asynchronous Lambda invocation in AWS); here a recorder stands in for it, on the local
backend, against the simulator.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import WINDOW, local_config

from pipeline.config import Config
from pipeline.dev.simulator import Simulator
from pipeline.drain import StopReason
from pipeline.local import runtime as local
from pipeline.queues import Outgoing
from pipeline.runtime import STARTED_BY_KICKOFF, STARTED_BY_SUCCESSOR, Runtime, reset_cache
from pipeline.stages import STAGE_NAMES


def kicked_off(make: Callable[..., Any], url: str) -> tuple[Runtime, list[tuple[str, str]]]:
    """A runtime whose run was kicked off (its troops queued), with nothing started since."""
    rt, started = make(url)
    rt.run_kickoff(WINDOW)
    started.clear()
    return rt, started


@pytest.fixture
def make_runtime(tmp_path: Path) -> Iterator[Callable[..., tuple[Runtime, list[tuple[str, str]]]]]:
    def make(url: str, **overrides: Any) -> tuple[Runtime, list[tuple[str, str]]]:
        config: Config = local_config(tmp_path, url, **overrides)
        rt = local.build(config)
        started: list[tuple[str, str]] = []
        rt.start_drain = lambda stage, why: started.append((stage, why))
        return rt, started

    yield make
    reset_cache()


def test_the_kickoff_starts_every_stages_drain_before_it_lists(
    simulator: Callable[..., Simulator], make_runtime: Callable[..., Any]
) -> None:
    # GIVEN a runtime whose drains can be started, and a recorder of what was listed when
    sim = simulator()
    rt, started = make_runtime(sim.url)
    listed_with: list[int] = []
    real_items = rt.client.items

    def items(*args: Any, **kwargs: Any) -> Any:
        listed_with.append(len(started))
        return real_items(*args, **kwargs)

    rt.client.items = items  # type: ignore[method-assign]

    # WHEN a window is kicked off
    report = rt.run_kickoff(WINDOW)

    # THEN every stage's drain was started, told the kickoff started it, before the listing
    assert sorted(started) == sorted((stage, STARTED_BY_KICKOFF) for stage in STAGE_NAMES)
    assert listed_with and listed_with[0] == len(STAGE_NAMES)
    assert report.drains_started == len(STAGE_NAMES)
    assert report.troops > 0


def test_a_drain_that_cannot_be_started_leaves_the_kickoff_whole(
    simulator: Callable[..., Simulator], make_runtime: Callable[..., Any]
) -> None:
    # GIVEN a backend refusing to start the warriors' drain
    sim = simulator()
    rt, started = make_runtime(sim.url)

    def start(stage: str, why: str) -> None:
        if stage == "warriors":
            raise RuntimeError("TooManyRequestsException")
        started.append((stage, why))

    rt.start_drain = start

    # WHEN a window is kicked off
    report = rt.run_kickoff(WINDOW)

    # THEN the others started, the troops were sent all the same (the schedule starts the
    # warriors' drain within a minute)
    assert sorted(s for s, _ in started) == sorted(s for s in STAGE_NAMES if s != "warriors")
    assert report.drains_started == len(STAGE_NAMES) - 1
    assert rt.queues[STAGE_NAMES[0]].depth().visible == report.troops > 0


def test_a_drain_started_by_the_kickoff_waits_for_its_messages(
    simulator: Callable[..., Simulator], make_runtime: Callable[..., Any]
) -> None:
    # GIVEN empty queues everywhere
    sim = simulator()
    rt, _ = make_runtime(sim.url, wait_seconds=0.05)
    first = rt.queues[STAGE_NAMES[0]]

    # WHEN a drain of the first stage runs as the schedule starts it, and then as the
    # kickoff starts it, with three messages sent half a second later
    scheduled = rt.run_drain(STAGE_NAMES[0], lambda: 30.0)
    send = threading.Timer(0.5, first.send, [[Outgoing(f"not an envelope {i}") for i in range(3)]])
    send.start()
    by_kickoff = rt.run_drain(STAGE_NAMES[0], lambda: 30.0, STARTED_BY_KICKOFF)
    send.join()

    # THEN the scheduled one stopped at once, idle; the kickoff's waited and took them
    assert (scheduled.stopped, scheduled.received) == (StopReason.IDLE, 0)
    assert by_kickoff.received == 3
    assert by_kickoff.dead == 3  # not envelopes: dead-lettered with the reason


def run_out_after_first_receive(rt: Runtime, stage: str) -> Callable[[], float]:
    """A remaining-time function that drops to 0 once the stage's queue has given messages."""
    left = [30.0]
    queue = rt.queues[stage]
    real_receive = queue.receive

    def receive(max_messages: int = 10, wait_seconds: float = 0.0) -> list[Any]:
        got = real_receive(1, wait_seconds)  # one at a time: most stay queued
        if got:
            left[0] = 0.0
        return got

    queue.receive = receive  # type: ignore[method-assign]
    return lambda: left[0]


def test_a_drain_out_of_time_with_messages_left_starts_its_successor(
    simulator: Callable[..., Simulator], make_runtime: Callable[..., Any]
) -> None:
    # GIVEN a kicked-off run whose troops wait in the first stage's queue
    rt, started = kicked_off(make_runtime, simulator().url)
    first = STAGE_NAMES[0]
    assert rt.queues[first].depth().visible > 1

    # WHEN a drain of that stage runs out of time after its first message, and later one
    # drains the stage dry
    out_of_time = rt.run_drain(first, run_out_after_first_receive(rt, first))
    dry = rt.run_drain(first, lambda: 30.0)

    # THEN the first started its successor (reported), the second, idle, started none
    assert (out_of_time.stopped, out_of_time.received) == (StopReason.DEADLINE, 1)
    assert out_of_time.successor_started
    assert (dry.stopped, dry.successor_started) == (StopReason.IDLE, False)
    assert started == [(first, STARTED_BY_SUCCESSOR)]


def test_a_drain_that_received_nothing_before_its_deadline_starts_no_successor(
    simulator: Callable[..., Simulator], make_runtime: Callable[..., Any]
) -> None:
    # GIVEN troops waiting, and an invocation with no time left (a safety margin that
    # leaves none): its successor would do the same, and so on
    rt, started = kicked_off(make_runtime, simulator().url)

    # WHEN it runs
    report = rt.run_drain(STAGE_NAMES[0], lambda: 0.0)

    # THEN it stopped for its deadline having received nothing, and started nobody
    assert (report.stopped, report.received, report.successor_started) == (
        StopReason.DEADLINE,
        0,
        False,
    )
    assert started == []


def test_a_queue_depth_that_cannot_be_read_costs_only_the_successor(
    simulator: Callable[..., Simulator], make_runtime: Callable[..., Any]
) -> None:
    # GIVEN a run out of time after its first message, and a queue whose first depth read
    # after that fails (SQS throttling GetQueueAttributes)
    sim = simulator()
    rt, started = make_runtime(sim.url)
    troops = rt.run_kickoff(WINDOW).troops
    started.clear()
    first = STAGE_NAMES[0]
    remaining = run_out_after_first_receive(rt, first)
    real_depth = rt.queues[first].depth
    failed: list[bool] = []

    def depth() -> Any:
        if remaining() == 0.0 and not failed:
            failed.append(True)
            raise RuntimeError("Throttling: Rate exceeded")
        return real_depth()

    rt.queues[first].depth = depth  # type: ignore[method-assign]

    # WHEN the drain runs
    report = rt.run_drain(first, remaining)

    # THEN it reported, without a successor, and released its message (no time for it)
    assert failed == [True]
    assert (report.stopped, report.received, report.successor_started) == (
        StopReason.DEADLINE,
        1,
        False,
    )
    assert real_depth().visible == troops
    assert started == []


def test_drain_functions_must_name_the_profiles_stages_on_aws() -> None:
    from pipeline.aws import runtime as aws
    from pipeline.config import Backend, QueueUrls
    from pipeline.errors import ConfigError

    # GIVEN an AWS configuration whose drain functions miss a stage and name another
    config = Config(
        vendor_url="https://vendor.example",
        backend=Backend.AWS,
        queues={s: QueueUrls(f"https://sqs/{s}", f"https://sqs/{s}-dlq") for s in STAGE_NAMES},
        sink="s3://bucket/harvest",
        state_table="state",
        drain_functions={"troops": "h-drain-troops", "trooops": "h-drain-trooops"},
    )

    # WHEN the handlers build their runtime, THEN it is refused, naming both sets
    refused = r"names the stages \['trooops', 'troops'\]; the profile's are"
    with pytest.raises(ConfigError, match=refused):
        aws.build(config)
