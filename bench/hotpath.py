"""`python -m bench.hotpath [N]`: instructions per data-group call, counted by callgrind.

Runs N data-group messages (default 300) through `Drain.process`, one after another,
against the simulator in its own process, twice under `valgrind --tool=callgrind`
(with 50 and 50 + N messages) and prints the difference per message: the instructions
one call costs the pipeline's process: two runs agree within 0.1% whatever else the
machine does, unlike CPU seconds on this VM. Needs valgrind; takes about a minute.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

WARM = 50


def run_messages(count: int) -> None:
    """In this process: WARM messages to warm up, then `count` more."""
    from pipeline.dev.simulator import SimulatorConfig, SimulatorProcess
    from pipeline.drain import Drain
    from pipeline.envelope import Envelope
    from pipeline.local.budget import PacedBudget
    from pipeline.local.sinks import DirectorySink
    from pipeline.queues import Message
    from pipeline.stages import stage
    from pipeline.stats import CallStats
    from pipeline.vendor_api.client import VendorClient
    from pipeline.window import Window

    config = SimulatorConfig(
        troops=4, warriors_per_troop=8, data_groups_per_warrior=46, rate_calls=10**6
    )
    simulator = SimulatorProcess(config)
    url = simulator.start()
    window = Window.parse("2026-11-22T00:00:00Z", "2026-11-23T00:00:00Z")
    stats = CallStats()
    try:
        with tempfile.TemporaryDirectory(prefix="harvest-hotpath-") as out:
            client = VendorClient(url, config.token, PacedBudget(10**6, 1.0), stats)
            drain = Drain(
                stage("data_groups"),
                queue=None,  # type: ignore[arg-type]  # process() touches no queue
                dlq=None,  # type: ignore[arg-type]
                child_queue=None,
                upstream=[],
                client=client,
                sink=DirectorySink(out),
                ledger=None,  # type: ignore[arg-type]  # nor the ledger
                stats=stats,
            )
            paths = list(simulator.ground_truth(window.start, window.end))[: WARM + count]
            for i, path in enumerate(paths):
                body = Envelope(window.run_id, "data_groups", path, window).to_json()
                outcome = drain.process(Message(str(i), str(i), body, {}, 1))
                if outcome.kind != "done":
                    raise RuntimeError(f"message {i} ended {outcome.kind}: {outcome.error}")
    finally:
        simulator.stop()


def instructions(count: int) -> int:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "callgrind.out"
        done = subprocess.run(
            [
                "valgrind",
                "--tool=callgrind",
                f"--callgrind-out-file={out}",
                sys.executable,
                "-m",
                "bench.hotpath",
                "--child",
                str(count),
            ],
            capture_output=True,
            text=True,
            check=True,
            # Hash randomisation changes how much work dicts and sets do from run to run.
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )
    found = re.search(r"Collected : (\d+)", done.stderr)
    if found is None:
        raise RuntimeError(f"no instruction count in valgrind's output: {done.stderr[-500:]}")
    return int(found.group(1))


def main() -> int:
    if sys.argv[1:2] == ["--child"]:
        run_messages(int(sys.argv[2]))
        return 0
    count = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    base, more = instructions(0), instructions(count)
    print(f"instructions per data-group call: {(more - base) / count:,.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
