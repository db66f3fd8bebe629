"""Say what it waits for: the live view and `harvest status` name each kind of wait.

Every wait is set up directly (messages received or given back, a paused budget, a call
registered in flight, dead letters) on fake or injected clocks; nothing here waits for time.
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests
import responses
from conftest import TOKEN, WINDOW, local_config
from fake_clock import FakeClock
from rich.console import Console

from pipeline.dev import cli
from pipeline.dev.display import progress_table
from pipeline.dev.simulator import Simulator
from pipeline.envelope import Envelope
from pipeline.local.budget import PacedBudget
from pipeline.local.ledger import SqliteLedger
from pipeline.local.queues import LocalQueueStore
from pipeline.local.runtime import STATE_DB
from pipeline.local.samples import SAMPLES_FILE, Sample, SampleLog
from pipeline.local.scheduler import (
    LOCK_FILE,
    STATE_DIR,
    LocalOptions,
    Progress,
    StageProgress,
    _Scheduler,
)
from pipeline.local.waits import (
    Wait,
    WaitKind,
    dlq_waits,
    live_run,
    local_waits,
    pause_wait,
    sqs_waits,
    stalled_wait,
    tick_wait,
)
from pipeline.queues import Depth, Outgoing
from pipeline.runtime import Runtime
from pipeline.stages import STAGE_NAMES
from pipeline.stats import CallStats
from pipeline.vendor_api.client import VendorClient
from pipeline.vendor_api.inflight import STALL_SECONDS, CallsInFlight

RUN = WINDOW.run_id
NOW = 1_800_000_000.0
NO_MESSAGES = dict.fromkeys(STAGE_NAMES, 0)


def group(data_group_id: str) -> Envelope:
    return Envelope(RUN, "data_groups", ("t1", "w1", data_group_id), WINDOW)


@pytest.fixture
def state(tmp_path: Path) -> Iterator[tuple[LocalQueueStore, SqliteLedger, FakeClock]]:
    clock = FakeClock(NOW)
    store = LocalQueueStore(tmp_path / STATE_DB, clock=clock)
    ledger = SqliteLedger(tmp_path / STATE_DB)
    ledger.start_run(RUN, WINDOW.from_text, WINDOW.to_text)
    yield store, ledger, clock
    store.close()


def waits_of(
    store: LocalQueueStore, ledger: SqliteLedger, *, running: bool, dead: int = 0
) -> list[Wait]:
    queued = {s: store.queue(s).depth().total for s in STAGE_NAMES}
    return local_waits(
        store,
        ledger,
        queued,
        {**NO_MESSAGES, "data_groups": dead},
        now=NOW,
        running=running,
        where="--out o",
    )


def give_back(store: LocalQueueStore, ledger: SqliteLedger, error: str, seconds: float) -> Envelope:
    """One data group received, its error recorded, and given back for `seconds`."""
    envelope = group("g1")
    ledger.enqueued(RUN, "data_groups", [(envelope.key, envelope.path)])
    queue = store.queue("data_groups")
    queue.send([Outgoing(envelope.to_json())])
    (message,) = queue.receive()
    ledger.record_error(RUN, "data_groups", envelope.key, error)
    queue.change_visibility([message.receipt], seconds)
    return envelope


# -- messages invisible until T, and why -----------------------------------------------------


def test_messages_held_by_the_running_drains_are_named_in_flight_until_their_timeout(
    state: tuple[LocalQueueStore, SqliteLedger, FakeClock],
) -> None:
    # GIVEN two messages received by a drain of the running process (visibility 180 s)
    store, ledger, _ = state
    queue = store.queue("warriors", visibility_timeout=180)
    queue.send([Outgoing("a"), Outgoing("b")])
    queue.receive()

    # WHEN the waits are named
    (wait,) = waits_of(store, ledger, running=True)

    # THEN they are in flight, held by the drains, until the visibility timeout
    assert (wait.kind, wait.stage, wait.count, wait.until) == (
        WaitKind.IN_FLIGHT,
        "warriors",
        2,
        NOW + 180,
    )
    assert "held by the drains" in wait.text and "(in 180 s)" in wait.text


def test_messages_held_by_a_stopped_run_say_the_next_run_releases_them(
    state: tuple[LocalQueueStore, SqliteLedger, FakeClock],
) -> None:
    # GIVEN a message a killed process received, and no process running now
    store, ledger, _ = state
    queue = store.queue("troops", visibility_timeout=180)
    queue.send([Outgoing("a")])
    queue.receive()

    # WHEN the waits are named
    (wait,) = waits_of(store, ledger, running=False)

    # THEN the wait says who held it and that the next run releases it at once
    assert wait.kind == WaitKind.IN_FLIGHT
    assert "no longer running" in wait.text and "releases them at once" in wait.text


def test_message_given_back_after_an_error_names_the_retry_delay_and_the_error(
    state: tuple[LocalQueueStore, SqliteLedger, FakeClock],
) -> None:
    # GIVEN a data group given back for 4 s after a 503
    store, ledger, _ = state
    give_back(store, ledger, "RetryableError: GET /v1/data-groups/g1: 503", 4)

    # WHEN the waits are named
    (wait,) = waits_of(store, ledger, running=True)

    # THEN it waits out a retry delay until T, after the recorded error
    assert (wait.kind, wait.count, wait.until) == (WaitKind.RETRY_DELAY, 1, NOW + 4)
    assert "retry delay" in wait.text and "503" in wait.text


def test_message_given_back_for_a_retry_after_names_the_vendors_wait(
    state: tuple[LocalQueueStore, SqliteLedger, FakeClock],
) -> None:
    # GIVEN a data group given back for the vendor's 120 s Retry-After
    store, ledger, _ = state
    error = (
        "RateLimitedError: GET /v1/data-groups/g1: 429 rate limited with Retry-After 120 s,"
        " over max_retry_after (60 s)"
    )
    give_back(store, ledger, error, 120)

    # WHEN the waits are named
    (wait,) = waits_of(store, ledger, running=True)

    # THEN it is the vendor's Retry-After, until T
    assert (wait.kind, wait.until) == (WaitKind.RETRY_AFTER, NOW + 120)
    assert "Retry-After" in wait.text


def test_recorded_error_with_control_characters_is_shown_on_one_clean_line(
    state: tuple[LocalQueueStore, SqliteLedger, FakeClock],
) -> None:
    store, ledger, _ = state
    give_back(store, ledger, "RetryableError: bad\n\x1b[31mred" + "x" * 500, 4)

    (wait,) = waits_of(store, ledger, running=True)

    assert "\n" not in wait.text and "\x1b" not in wait.text
    assert len(wait.text) < 400


# -- a pause, a stalled call, the next tick ----------------------------------------------------


def test_paused_budget_is_named_with_how_long_and_why() -> None:
    # GIVEN a budget the vendor paused for 30 s
    clock = FakeClock(100.0)
    budget = PacedBudget(10, 1.0, clock=clock, sleep=clock.sleep)
    budget.pause(30)
    clock.advance(5)

    # WHEN the wait is named
    wait = pause_wait(budget.paused_for(), "the vendor asked to wait (Retry-After)", NOW)

    # THEN it says every call is held back 25 s more, until T, and why
    assert wait is not None
    assert (wait.kind, wait.until) == (WaitKind.PAUSED, NOW + 25)
    assert "25.0 s more" in wait.text and "Retry-After" in wait.text


def test_no_pause_names_no_wait() -> None:
    assert pause_wait(0.0, "", NOW) is None


def test_call_in_flight_longer_than_the_stall_limit_is_named_with_its_path() -> None:
    # GIVEN two calls in flight on two threads' behalf, one for 12 s and one for 1 s
    clock = FakeClock(50.0)
    calls = CallsInFlight(prefix="https://vendor.example", clock=clock)
    calls.start("https://vendor.example/v1/troops/t1/warriors")
    clock.advance(11)
    other = threading.Thread(target=calls.start, args=("https://vendor.example/v1/troops",))
    other.start()
    other.join()
    clock.advance(1)

    # WHEN the stalled calls are named
    stalled = calls.longer_than(STALL_SECONDS)
    wait = stalled_wait(stalled)

    # THEN only the 12 s one is stalled, named by its path without the base URL
    assert stalled == [("/v1/troops/t1/warriors", 12.0)]
    assert wait is not None and wait.kind == WaitKind.STALLED
    assert wait.text == "a vendor call in flight for 12 s: GET /v1/troops/t1/warriors"

    # WHEN the call ends THEN nothing is stalled
    calls.end()
    assert calls.longer_than(STALL_SECONDS) == []


def test_vendor_client_registers_each_call_while_it_is_in_flight() -> None:
    # GIVEN a client whose vendor looks at the registry while it answers
    base = "https://vendor.example"
    client = VendorClient(base, TOKEN, PacedBudget(100, 1.0), CallStats())
    seen: list[list[tuple[str, float]]] = []

    def answer(request: requests.PreparedRequest) -> tuple[int, dict[str, str], str]:
        seen.append(client.in_flight.longer_than(-1.0))
        return 200, {}, json.dumps({"items": [], "next_cursor": None})

    # WHEN a call is made
    with responses.RequestsMock() as rsps:
        rsps.add_callback(responses.GET, f"{base}/v1/troops", callback=answer)
        client.get_page("/v1/troops")

    # THEN it was registered during the call, and is gone after it
    assert [[path for path, _ in calls] for calls in seen] == [["/v1/troops?limit=100"]]
    assert client.in_flight.longer_than(-1.0) == []
    client.close()


def test_messages_ready_with_no_drain_running_name_the_next_tick() -> None:
    wait = tick_wait(visible=7, drains_running=0, next_tick_in=3.2)

    assert wait is not None and wait.kind == WaitKind.NEXT_TICK
    assert wait.text == "7 messages ready; the next drain invocations start in 3 s"
    assert tick_wait(visible=7, drains_running=1, next_tick_in=3.2) is None


# -- a run waiting on its DLQ ------------------------------------------------------------------


def test_dead_letters_with_nothing_else_queued_say_to_replay_them() -> None:
    (wait,) = dlq_waits(NO_MESSAGES, {**NO_MESSAGES, "data_groups": 3}, "--out o")

    assert (wait.kind, wait.stage, wait.count) == (WaitKind.DLQ, "data_groups", 3)
    assert wait.text.startswith("3 messages in the data_groups DLQ and nothing else queued")
    assert "`harvest replay data_groups --out o`" in wait.text


def test_dead_letters_beside_queued_work_are_not_a_wait() -> None:
    queued = {**NO_MESSAGES, "warriors": 1}

    assert dlq_waits(queued, {**NO_MESSAGES, "data_groups": 3}, "--out o") == []


# -- what SQS attributes can say -------------------------------------------------------------


class FixedDepth:
    def __init__(self, visible: int, in_flight: int) -> None:
        self.d = Depth(visible, in_flight)

    def depth(self) -> Depth:
        return self.d


def test_sqs_waits_name_messages_not_visible_without_claiming_why_or_until_when() -> None:
    # GIVEN deployed queues: 5 data groups not visible, nothing else
    queues = {s: FixedDepth(0, 5 if s == "data_groups" else 0) for s in STAGE_NAMES}
    dlqs = {s: FixedDepth(0, 0) for s in STAGE_NAMES}

    # WHEN the waits are named
    (wait,) = sqs_waits(queues, dlqs, "--aws")  # type: ignore[arg-type]

    # THEN how many is said, and that SQS does not say why or until when
    assert (wait.kind, wait.stage, wait.count, wait.until) == (
        WaitKind.NOT_VISIBLE,
        "data_groups",
        5,
        None,
    )
    assert "SQS says neither which nor until when" in wait.text


def test_sqs_waits_name_a_dlq_when_the_stage_queues_are_empty() -> None:
    queues = {s: FixedDepth(0, 0) for s in STAGE_NAMES}
    dlqs = {s: FixedDepth(2 if s == "troops" else 0, 0) for s in STAGE_NAMES}

    (wait,) = sqs_waits(queues, dlqs, "--aws")  # type: ignore[arg-type]

    assert wait.kind == WaitKind.DLQ and "`harvest replay troops --aws`" in wait.text


# -- the live view -----------------------------------------------------------------------------


def test_live_view_names_the_pause_the_stalled_call_and_the_next_tick(
    tmp_path: Path, local_runtime: Callable[..., Runtime]
) -> None:
    # GIVEN a local run's scheduler whose budget is paused, with a call out for 9 s and
    # messages ready but no drain running
    rt = local_runtime(local_config(tmp_path, "http://127.0.0.1:9"))
    options = LocalOptions(window=WINDOW, out=tmp_path / "out", tick=5.0)
    samples = SampleLog(tmp_path / SAMPLES_FILE)
    scheduler = _Scheduler(rt, options, lambda event, context: None, samples)
    scheduler.next_tick = time.monotonic() + 4
    rt.budget.pause(30)
    clock = FakeClock(0.0)
    rt.client.in_flight = CallsInFlight(prefix=rt.config.vendor_url, clock=clock)
    rt.client.in_flight.start(f"{rt.config.vendor_url}/v1/troops")
    clock.advance(9)
    depths = {s: Depth(3 if s == "troops" else 0, 0) for s in STAGE_NAMES}

    # WHEN the live view asks what the run waits for
    waits = scheduler.waits(depths)
    table = progress_table(progress_with(waits))

    # THEN it names all three, and the table shows them
    assert [w.kind for w in waits] == [WaitKind.PAUSED, WaitKind.STALLED, WaitKind.NEXT_TICK]
    assert "Retry-After" in waits[0].text
    assert "in flight for 9 s: GET /v1/troops" in waits[1].text
    assert "next drain invocations start in 4 s" in waits[2].text
    console = Console(record=True, width=400)
    console.print(table)
    shown = console.export_text()
    assert shown.count("waiting: ") == 3
    samples.close()


def progress_with(waits: tuple[Wait, ...]) -> Progress:
    stage = StageProgress(queued=0, in_flight=0, done=0, gone=0, dead=0, enqueued=0)
    return Progress(
        elapsed=1.0,
        stages=dict.fromkeys(STAGE_NAMES, stage),
        calls=0,
        calls_per_second=0.0,
        limit_per_second=10.0,
        rate_limited=0,
        retries=0,
        drains_running=0,
        waits=waits,
    )


# -- `harvest status` ----------------------------------------------------------------------


def sample(at: float, calls: int, **changes: object) -> Sample:
    fields: dict[str, object] = {
        "run_id": RUN,
        "at": at,
        "started": NOW,
        "visible": NO_MESSAGES,
        "in_flight": NO_MESSAGES,
        "dead": NO_MESSAGES,
        "calls": calls,
        "rate_limited": 0,
        "limit": 50.0,
    }
    fields.update(changes)
    return Sample(**fields)  # type: ignore[arg-type]


def test_live_run_from_samples_is_moving_paused_or_gone() -> None:
    now = NOW + 10
    moving = live_run([sample(now - 2, 10), sample(now - 1, 60)], now, owner_alive=True)
    paused = live_run(
        [sample(now - 2, 60), sample(now - 1, 60, paused_for=20.0, pause_why="Retry-After")],
        now,
        owner_alive=True,
    )
    stale = live_run([sample(now - 60, 60)], now, owner_alive=True)
    dead = live_run([sample(now - 1, 60)], now, owner_alive=False)

    assert moving.moving and moving.calls_per_second == 50 and not moving.waits
    assert paused.running and not paused.moving
    assert [w.kind for w in paused.waits] == [WaitKind.PAUSED]
    assert "19.0 s more" in paused.waits[0].text  # as of now, not as of the sample
    assert not stale.running and not dead.running


@pytest.fixture
def kicked_off(tmp_path: Path, simulator: Callable[..., Simulator]) -> Iterator[Runtime]:
    """A local state directory whose run is kicked off (troops queued), nothing running."""
    from pipeline.local.runtime import build

    sim = simulator()
    rt = build(local_config(tmp_path, sim.url))
    rt.run_kickoff(WINDOW)
    yield rt
    rt.close()


def status_output(out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    cli.main(["status", "--out", str(out)])
    return re.sub(r"\s+", " ", capsys.readouterr().out)


def test_status_names_messages_a_killed_run_held(
    tmp_path: Path, kicked_off: Runtime, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN troops received by a process that is gone (its pid no longer runs)
    kicked_off.queues["troops"].receive(visibility_timeout=170)
    (tmp_path / "out" / STATE_DIR / LOCK_FILE).write_text("pid 999999999\n")

    # WHEN `harvest status` runs
    shown = status_output(tmp_path / "out", capsys)

    # THEN it names them in flight until T, and says the next run releases them at once
    assert "waiting: troops: 2 messages in flight until" in shown
    assert "(in 170 s)" in shown and "releases them at once" in shown


def test_status_names_the_pause_and_stalled_call_a_running_harvest_sampled(
    tmp_path: Path, kicked_off: Runtime, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a running `harvest local` (this process holds the lock) whose last sample says
    # its budget is paused and one call has been out for 8 s
    state = tmp_path / "out" / STATE_DIR
    (state / LOCK_FILE).write_text(f"pid {os.getpid()}\n")
    log = SampleLog(state / SAMPLES_FILE)
    now = time.time()
    log.append(sample(now - 1.5, 40))
    log.append(
        sample(
            now - 0.5,
            40,
            paused_for=30.0,
            pause_why="the vendor asked to wait (Retry-After or X-RateLimit-Reset)",
            stalled=(("/v1/troops/t1/warriors", 8.0),),
        )
    )
    log.close()

    # WHEN `harvest status` runs
    shown = status_output(tmp_path / "out", capsys)

    # THEN it says a run is going, names the pause and the stalled call
    assert "a `harvest local` is running" in shown
    assert "waiting: every vendor call held back 29" in shown and "Retry-After" in shown
    # (8 s when sampled, plus the sample's age)
    assert re.search(
        r"waiting: a vendor call in flight for (8|9) s: GET /v1/troops/t1/warriors", shown
    )


def test_status_names_a_run_waiting_on_its_dlq(
    tmp_path: Path, kicked_off: Runtime, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN every troop in the troops DLQ and nothing else queued
    queue, dlq = kicked_off.queues["troops"], kicked_off.dlqs["troops"]
    messages = queue.receive()
    dlq.send([Outgoing(m.body) for m in messages])
    queue.delete([m.receipt for m in messages])

    # WHEN `harvest status` runs
    shown = status_output(tmp_path / "out", capsys)

    # THEN it names the DLQ and the replay command
    assert (
        f"waiting: 2 messages in the troops DLQ and nothing else queued: run"
        f" `harvest replay troops --out {tmp_path / 'out'}`"
    ) in shown
