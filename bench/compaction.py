"""`python -m bench.compaction [--data-groups N] [--points N]`: time and memory of compaction.

Builds a complete synthetic run in a temporary directory (N raw objects written with the
DirectorySink, 24 hourly points each, as the simulator's daily runs have), then compacts it
in a fresh child process, so that the peak RSS is compaction's alone (the interpreter,
pyarrow and the buffers). Prints one line: raw objects, rows, files, Parquet bytes against
raw bytes, wall seconds, CPU seconds, peak RSS.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from pathlib import Path

from pipeline.local.sinks import DirectorySink
from pipeline.sinks import write_manifest, write_records
from pipeline.window import Window

WINDOW = Window.parse("2026-11-22T00:00:00Z", "2026-11-23T00:00:00Z")

CHILD = """
import json, resource, sys, time
from pipeline.compact import compact_run
from pipeline.local.sinks import DirectorySink
started, cpu = time.monotonic(), time.process_time()
done = compact_run(DirectorySink(sys.argv[1]), sys.argv[2], rows_per_file=int(sys.argv[3]))
print(json.dumps({
    "wall": time.monotonic() - started,
    "cpu": time.process_time() - cpu,
    "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    "rows": done.rows,
    "files": len(done.files),
    "objects": done.raw_objects,
    "parquet_bytes": sum(f.bytes for f in done.files),
}))
"""


def build_run(root: Path, data_groups: int, points: int) -> int:
    """Write a complete run of `data_groups` raw objects; return the raw bytes written."""
    sink = DirectorySink(root)
    run_id = WINDOW.run_id
    # Values as a vendor might send them (three decimals, no pattern): constant or cyclic
    # values would make the Parquet look smaller than it will be.
    rng = random.Random(7)
    for i in range(data_groups):
        troop, warrior = f"troop-{i // 500:03d}", f"warrior-{i // 50:05d}"
        record = {
            "run_id": run_id,
            "troop_id": troop,
            "warrior_id": warrior,
            "data_group_id": f"dg-{i:06d}",
            "from": WINDOW.from_text,
            "to": WINDOW.to_text,
            "points": [
                {"ts": f"2026-11-22T{h % 24:02d}:00:00Z", "value": round(rng.uniform(0, 1000), 3)}
                for h in range(points)
            ],
        }
        write_records(sink, run_id, f"{troop}/{warrior}/dg-{i:06d}", [record])
    write_manifest(sink, run_id, {"run_id": run_id, "status": "complete"})
    return sum(p.stat().st_size for p in (root / "runs" / run_id / "data").rglob("*.jsonl.gz"))


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.compaction")
    parser.add_argument("--data-groups", type=int, default=50_000)
    parser.add_argument("--points", type=int, default=24)
    parser.add_argument("--rows-per-file", type=int, default=1_000_000)
    parser.add_argument("--dir", help="where to build the run (default: a temporary directory)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        raw_bytes = build_run(Path(tmp), args.data_groups, args.points)
        out = subprocess.run(
            [sys.executable, "-c", CHILD, tmp, WINDOW.run_id, str(args.rows_per_file)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    m = json.loads(out.strip().splitlines()[-1])
    print(
        f"{m['objects']} raw objects ({raw_bytes / 1e6:.1f} MB) -> {m['rows']} rows in"
        f" {m['files']} Parquet files ({m['parquet_bytes'] / 1e6:.1f} MB):"
        f" {m['wall']:.1f} s wall, {m['cpu']:.1f} s CPU, peak RSS {m['rss_mb']:.0f} MB"
    )


if __name__ == "__main__":
    main()
