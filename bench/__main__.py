"""`python -m bench [--quick] [--repeat N] [--only NAME ...] [--aws]`: one line per scenario.

With `--aws` the handlers run as Lambda runs them instead: a process per sandbox, the
budget and ledger in DynamoDB (a moto server), EventBridge ticks, reserved concurrency;
see `bench/aws.py` for how and for its columns (`make bench ARGS=--aws`). Without it:

Each scenario runs `harvest local` (the real handlers, embedded queues, the simulator in
its own process) in a fresh child process, so that CPU time and peak RSS are the
pipeline's alone. State and output go to /dev/shm when it exists (see `scratch_dir`).
With `--repeat N` every number is the median of N runs, but 429s: the most any run drew.
Columns:

calls        vendor calls made (retries and 429s included)
wall s       kickoff to settled
ideal s      calls × W / L: the least time the vendor's limit allows
util         ideal / wall
429s         rate-limited responses
q req/ent    queue requests (send, receive, delete, visibility, depth) per harvested entity
cpu ms/call  the pipeline process's CPU time per call, kickoff to settled
rss MB       the pipeline process's peak resident memory when the run settled (all six
             drains, the scheduler and the embedded queues; before the output check)
exact        output equals the simulator's ground truth
peak queued  most messages waiting in all three queues at once (the scheduler looks every 0.5 s)
1st out s    until the first data group was written
cpu range    lowest and highest cpu ms/call of the N runs (this VM's CPU time per call
             varies by up to a quarter from run to run)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from bench import VENDOR_NICE, aws, nice_note, vendor_tree


@dataclass(frozen=True)
class Scenario:
    name: str
    troops: int
    warriors: int
    data_groups: int
    rate_calls: int  # configured
    vendor_calls: int  # the simulator's real limit
    latency: float
    concurrency: int = 64  # HARVEST_CONCURRENCY's default: a ceiling, rate × latency decides
    reserved_concurrency: int = 2
    rate_period: float = 1.0
    # Faults (SimulatorConfig): 5xx, stalls of stall_seconds, and the lag of a request's
    # arrival stamp in the vendor's sliding log (a loaded network, as a strict vendor sees it).
    error_rate: float = 0.0
    stall_rate: float = 0.0
    stall_seconds: float = 20.0
    arrival_jitter: float = 0.0

    def scaled(self, factor: float) -> Scenario:
        return Scenario(**{**asdict(self), "data_groups": max(1, round(self.data_groups * factor))})


SCENARIOS = [
    Scenario("1.5k@50/s 200ms", 4, 8, 46, 50, 50, 0.2),
    Scenario("50k@200/s 20ms", 20, 25, 100, 200, 200, 0.02),
    Scenario("vendor limit = half", 4, 8, 46, 100, 50, 0.02),
    # The talk's design: one call at a time per drain, one drain per stage.
    Scenario("baseline 1-at-a-time", 4, 8, 46, 50, 50, 0.2, concurrency=1, reserved_concurrency=1),
    Scenario("10k FIFO", 10, 10, 100, 200, 200, 0.02),
    # A slow vendor: 40 calls must be in flight to keep 100/s (Little's law). Three listing
    # levels of 400 ms come before the first data call: 1.2 s of a 2k-call run (21 s) that
    # no pace wins back; at 8k calls (81 s) they weigh a quarter as much.
    Scenario("2k@100/s 400ms", 10, 10, 20, 100, 100, 0.4),
    Scenario("8k@100/s 400ms", 10, 10, 80, 100, 100, 0.4),
    # 5xx bursts and 20 s stalls on 1% of first attempts at 30 ms typical latency: the
    # read timeout, not the stall, bounds what a stalled call holds.
    Scenario(
        "stalls 1% @100/s 30ms",
        4,
        6,
        25,
        100,
        100,
        0.03,
        error_rate=0.02,
        stall_rate=0.01,
    ),
    # A strict sliding-window vendor whose arrival stamps lag by up to 5 ms.
    Scenario("jitter 5ms @200/s", 10, 10, 30, 200, 200, 0.02, arrival_jitter=0.005),
]

HEADER = (
    f"{'scenario':<22} {'calls':>6} {'wall s':>7} {'ideal s':>7} {'util':>5} {'429s':>5} "
    f"{'q req/ent':>9} {'cpu ms/call':>11} {'rss MB':>6} {'exact':>5} {'peak queued':>11} "
    f"{'1st out s':>9} {'cpu range':>13}"
)


def scratch_dir() -> str | None:
    """Where runs keep their state and output: memory (tmpfs) when the machine has it.

    On an ext4 disk, creating a file where many were just deleted makes the kernel scan
    for a free inode (`recently_deleted`): measured here at up to 0.7 ms CPU per file
    right after an earlier scenario's clean-up, against 0.03 ms on a quiet disk. That
    charged the disk's history to the pipeline, so scenarios write to /dev/shm if present
    (`BENCH_DIR` overrides).
    """
    chosen = os.environ.get("BENCH_DIR") or "/dev/shm"
    return chosen if os.path.isdir(chosen) and os.access(chosen, os.W_OK) else None


def run_one(scenario: Scenario) -> dict[str, object]:
    """Run in this process: a child of the bench driver."""
    import tempfile
    from pathlib import Path

    from pipeline.dev.simulator import SimulatorConfig, SimulatorProcess
    from pipeline.local.scheduler import LocalOptions, run_local
    from pipeline.window import Window

    simulator = SimulatorProcess(
        SimulatorConfig(
            **vendor_tree(scenario),
            error_rate=scenario.error_rate,
            stall_rate=scenario.stall_rate,
            stall_seconds=scenario.stall_seconds,
            arrival_jitter=scenario.arrival_jitter,
        ),
        nice=VENDOR_NICE,
    )
    with tempfile.TemporaryDirectory(prefix="harvest-bench-", dir=scratch_dir()) as out:
        result = run_local(
            LocalOptions(
                window=Window.parse("2026-11-22T00:00:00Z", "2026-11-23T00:00:00Z"),
                out=Path(out),
                rate_calls=scenario.rate_calls,
                rate_period=scenario.rate_period,
                tick=5.0,  # the CLI default
                concurrency=scenario.concurrency,
                reserved_concurrency=scenario.reserved_concurrency,
                simulator=simulator,
            )
        )
    status = result.status
    entities = sum(c.enqueued for c in status.stages.values()) if status else 0
    ideal = result.calls * scenario.rate_period / scenario.vendor_calls
    return {
        "calls": result.calls,
        "wall": result.wall_seconds,
        "ideal": ideal,
        "util": ideal / result.wall_seconds,
        "rate_limited": result.rate_limited,
        "queue_per_entity": result.queue_requests / max(1, entities),
        "cpu_ms_per_call": 1000 * result.cpu_seconds / max(1, result.calls),
        "rss_mb": result.peak_rss_mb,
        "exact": bool(result.comparison and result.comparison.exact),
        "peak_queued": result.peak_queued,
        "first_output": result.first_output_seconds,
        "complete": bool(status and status.complete),
        "vendor_nice": simulator.nice,
    }


def line(name: str, r: dict[str, float]) -> str:
    return (
        f"{name:<22} {r['calls']:>6.0f} {r['wall']:>7.1f} {r['ideal']:>7.1f} {r['util']:>5.2f} "
        f"{r['rate_limited']:>5.0f} {r['queue_per_entity']:>9.3f} {r['cpu_ms_per_call']:>11.2f} "
        f"{r['rss_mb']:>6.0f} {'yes' if r['exact'] else 'NO':>5} {r['peak_queued']:>11.0f} "
        f"{r['first_output']:>9.1f} {r['cpu_min']:>6.2f}-{r['cpu_max']:<6.2f}"
    )


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a tenth of the data groups")
    parser.add_argument("--only", nargs="*", help="run scenarios whose name starts with these")
    parser.add_argument(
        "--repeat",
        type=_at_least_one,
        default=1,
        metavar="N",
        help=(
            "run each scenario N times and print medians (429s: the most of any run),"
            " with the CPU range (default 1)"
        ),
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    aws.add_arguments(parser)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_one(Scenario(**json.loads(args.child)))))
        return 0
    if args.aws:
        return aws.main(args, scratch_dir())
    print(f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, python {sys.version.split()[0]}")
    print(HEADER)
    failed = False
    nices: set[float] = set()
    for scenario in SCENARIOS:
        if args.only and not any(scenario.name.startswith(o) for o in args.only):
            continue
        if args.quick:
            scenario = scenario.scaled(0.1)
        runs = []
        for _ in range(args.repeat):
            child = subprocess.run(
                [sys.executable, "-m", "bench", "--child", json.dumps(asdict(scenario))],
                capture_output=True,
                text=True,
                check=False,
            )
            if child.returncode != 0:
                print(f"{scenario.name:<22} FAILED: {child.stderr.strip().splitlines()[-1:]}")
                failed = True
                break
            runs.append(json.loads(child.stdout.strip().splitlines()[-1]))
        else:
            result = combine(runs)
            print(line(scenario.name, result), flush=True)
            nices.update(r["vendor_nice"] for r in runs)
            failed |= not result["exact"]
    for nice in sorted(nices):
        print(f"# {nice_note(nice)}")
    return 1 if failed else 0


def _at_least_one(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def combine(runs: list[dict[str, float]]) -> dict[str, float]:
    """One line from repeated runs: the median of each number, but the most 429s any run
    drew (a median would hide one run's); exact only if every run was."""
    result = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
    result["rate_limited"] = max(r["rate_limited"] for r in runs)
    result["exact"] = all(r["exact"] for r in runs)
    result["complete"] = all(r["complete"] for r in runs)
    result["cpu_min"] = min(r["cpu_ms_per_call"] for r in runs)
    result["cpu_max"] = max(r["cpu_ms_per_call"] for r in runs)
    return result


if __name__ == "__main__":
    sys.exit(main())
