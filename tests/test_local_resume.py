"""Stop and resume `harvest local`: Ctrl-C and kills lose nothing, wait for nothing, draw no 429.

Each test runs `harvest local` as a child process against a simulator in this process (so
the vendor's strict window sees every process's calls), stops it mid-run, and runs it
again on the same directory.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from conftest import WINDOW

from pipeline.dev import cli
from pipeline.dev.simulator import Simulator, SimulatorConfig
from pipeline.dev.verify import compare
from pipeline.local.ledger import SqliteLedger
from pipeline.local.queues import LocalQueueStore
from pipeline.local.runtime import STATE_DB
from pipeline.local.scheduler import LOCK_FILE, STATE_DIR, own
from pipeline.local.sinks import DirectorySink

# 4 + 20 + 400 + 1 = 425 calls: about 8.5 s at 50/s, long enough to stop in the middle.
TREE = SimulatorConfig(troops=4, warriors_per_troop=5, data_groups_per_warrior=20, rate_calls=50)
RUN = WINDOW.run_id


def harvest(out: Path, url: str) -> subprocess.Popen[str]:
    args = ["local", "--vendor-url", url, "--allow-http", "--out", str(out)]
    args += ["--from", WINDOW.from_text, "--to", WINDOW.to_text, "--rate-calls", "50"]
    args += ["--tick", "1"]
    env = {**os.environ, "HARVEST_VENDOR_TOKEN": TREE.token}
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline.dev.cli", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def data_groups_done(out: Path) -> int:
    db = out / STATE_DIR / STATE_DB
    if not db.exists():
        return 0
    status = SqliteLedger(db).status(RUN)
    return 0 if status is None else status.stages["data_groups"].done


def wait_for_progress(out: Path, at_least: int, proc: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 60
    while data_groups_done(out) < at_least:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "the run made no progress"
        time.sleep(0.1)


def in_flight(out: Path) -> int:
    store = LocalQueueStore(out / STATE_DIR / STATE_DB)
    try:
        return sum(store.queue(s).depth().in_flight for s in ("troops", "warriors", "data_groups"))
    finally:
        store.close()


def assert_exact(out: Path, sim: Simulator) -> None:
    comparison = compare(DirectorySink(out), RUN, sim.ground_truth(WINDOW.start, WINDOW.end))
    assert comparison.exact, comparison.describe()


@pytest.fixture
def vendor(simulator: Callable[..., Simulator]) -> Simulator:
    return simulator(TREE)


def test_ctrl_c_gives_back_what_it_held_and_the_rerun_finishes_exactly(
    tmp_path: Path, vendor: Simulator
) -> None:
    # GIVEN a run in progress
    out = tmp_path / "out"
    proc = harvest(out, vendor.url)
    wait_for_progress(out, 50, proc)

    # WHEN it gets SIGINT (Ctrl-C)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)

    # THEN it exits 130 with one clear line, and no message is left hidden in flight
    assert proc.returncode == 130
    assert "stopped" in err and "rerun the same command" in err
    assert "Traceback" not in err
    assert in_flight(out) == 0

    # WHEN the same command runs again
    rerun = harvest(out, vendor.url)
    _, err = rerun.communicate(timeout=120)

    # THEN it finishes the run exactly, with no 429 from the vendor's strict window
    assert rerun.returncode == 0, err
    assert_exact(out, vendor)
    assert vendor.stats.rate_limited == 0


def test_kill_then_rerun_releases_what_the_dead_process_held_and_draws_no_429(
    tmp_path: Path, vendor: Simulator
) -> None:
    # GIVEN a run killed outright (SIGKILL) mid-way, holding messages in flight
    out = tmp_path / "out"
    proc = harvest(out, vendor.url)
    wait_for_progress(out, 50, proc)
    proc.kill()
    proc.communicate(timeout=30)
    assert in_flight(out) > 0

    # WHEN the same command runs again at once
    rerun = harvest(out, vendor.url)
    _, err = rerun.communicate(timeout=120)

    # THEN it released them at once, waited out the dead process's window, and finished
    # exactly with no 429
    assert rerun.returncode == 0, err
    assert "resumed:" in err and "released at once" in err
    assert_exact(out, vendor)
    assert vendor.stats.rate_limited == 0


# 4 + 20 + 800 + 1 = 825 calls, about 16.5 s at 50/s: room for several kills mid-harvest.
BIGGER = replace(TREE, data_groups_per_warrior=40)
KILLS = 5


def test_random_kills_then_a_final_run_lose_nothing_and_draw_no_429(
    tmp_path: Path, simulator: Callable[..., Simulator]
) -> None:
    seed = int(os.environ.get("HARVEST_KILL_SEED") or random.SystemRandom().randrange(2**32))
    print(f"random kills: seed {seed} (HARVEST_KILL_SEED={seed} repeats the kill moments)")
    rng = random.Random(seed)
    vendor = simulator(BIGGER)
    out = tmp_path / "out"

    # GIVEN a run killed (SIGKILL) KILLS times at random moments, each time resumed at once:
    # a quarter of the kills land while the process starts up, the rest after it has
    # harvested something
    held_at_kills = []
    for kill in range(KILLS):
        before = data_groups_done(out)
        proc = harvest(out, vendor.url)
        if kill and rng.random() < 0.25:
            delay, after = rng.uniform(0.0, 1.5), "start"
        else:
            wait_for_progress(out, before + 1, proc)
            delay, after = rng.uniform(0.0, 1.0), "its first data group"
        time.sleep(delay)  # the random moment of the kill, not a wait for something
        proc.kill()
        proc.communicate(timeout=30)
        held_at_kills.append(in_flight(out))
        print(f"kill {kill + 1}: {delay:.2f} s after {after}, {held_at_kills[-1]} in flight")

    # WHEN the same command runs once more, to the end
    final = harvest(out, vendor.url)
    _, err = final.communicate(timeout=120)

    # THEN the output is exact, the vendor's strict window saw no 429 across all the runs,
    # and no call was made again but those of messages in flight at a kill
    assert final.returncode == 0, f"seed {seed}: {err}"
    assert_exact(out, vendor)
    assert vendor.stats.rate_limited == 0, f"seed {seed}"
    minimum = vendor.expected_calls(WINDOW.start, WINDOW.end)
    print(f"calls {vendor.stats.requests}: minimum {minimum} + in flight at kills")
    assert vendor.stats.requests <= minimum + sum(held_at_kills), f"seed {seed}"


def test_second_harvest_on_the_same_directory_exits_2_and_changes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # GIVEN a directory whose state another `harvest local` holds
    out = tmp_path / "out"
    holder = own(out / STATE_DIR)
    try:
        # WHEN a second one starts on it
        code = cli.main(["local", "--out", str(out), "--sim-troops", "1", "--tick", "1"])

        # THEN it exits 2 with a clear line, and wrote no state
        assert code == 2
        err = capsys.readouterr().err
        assert "another `harvest local`" in err and f"pid {os.getpid()}" in err
        assert sorted(p.name for p in (out / STATE_DIR).iterdir()) == [LOCK_FILE]
    finally:
        holder.close()
