"""`python -m bench.compaction [--data-groups N] [--points N] [--s3]`: time and memory of
compaction.

Builds a complete synthetic run in a temporary directory (N raw objects written with the
DirectorySink, 24 hourly points each, as the simulator's daily runs have), then compacts it
in a fresh child process, so that the peak RSS is compaction's alone (the interpreter,
pyarrow and the buffers). Prints one line: raw objects, rows, files, Parquet bytes against
raw bytes, wall seconds, CPU seconds, peak RSS.

`--s3`: the run lives in a bucket of a moto server (in this process) and the child compacts
it through the S3 sink, as `harvest compact --aws` does: every raw object is a GET over
HTTP. moto's CPU is this machine's too, so the wall time is an upper bound for S3's.
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from pipeline.local.sinks import DirectorySink
from pipeline.sinks import write_manifest, write_records
from pipeline.window import Window

WINDOW = Window.parse("2026-11-22T00:00:00Z", "2026-11-23T00:00:00Z")

CHILD = """
import json, resource, sys, time
from pipeline.compact import compact_run
if sys.argv[1].startswith("s3://"):
    import boto3
    from pipeline.aws.sinks import S3Sink
    client = boto3.client("s3", endpoint_url=sys.argv[4], region_name="us-east-1",
                          aws_access_key_id="bench", aws_secret_access_key="bench")
    sink = S3Sink(client, sys.argv[1])
else:
    from pipeline.local.sinks import DirectorySink
    sink = DirectorySink(sys.argv[1])
started, cpu = time.monotonic(), time.process_time()
done = compact_run(sink, sys.argv[2], rows_per_file=int(sys.argv[3]))
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


def build_run(sink: Any, data_groups: int, points: int) -> None:
    """Write a complete run of `data_groups` raw objects through `sink`."""
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


def _local(tmp: str, args: argparse.Namespace) -> tuple[int, list[str]]:
    """The run in a directory: (raw bytes, the child's arguments)."""
    build_run(DirectorySink(tmp), args.data_groups, args.points)
    data = Path(tmp) / "runs" / WINDOW.run_id / "data"
    raw = sum(p.stat().st_size for p in data.rglob("*.jsonl.gz"))
    return raw, [tmp, WINDOW.run_id, str(args.rows_per_file)]


def _s3(url: str, args: argparse.Namespace) -> tuple[int, list[str]]:
    """The run in a bucket of the moto server at `url`: (raw bytes, the child's arguments)."""
    import boto3

    from pipeline.aws.sinks import S3Sink

    client = boto3.client(
        "s3",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
    )
    client.create_bucket(Bucket="bench")
    build_run(S3Sink(client, "s3://bench/harvest"), args.data_groups, args.points)
    raw = sum(
        o["Size"]
        for page in client.get_paginator("list_objects_v2").paginate(
            Bucket="bench", Prefix=f"harvest/runs/{WINDOW.run_id}/data/"
        )
        for o in page.get("Contents", [])
    )
    return raw, ["s3://bench/harvest", WINDOW.run_id, str(args.rows_per_file), url]


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.compaction")
    parser.add_argument("--data-groups", type=int, default=50_000)
    parser.add_argument("--points", type=int, default=24)
    parser.add_argument("--rows-per-file", type=int, default=1_000_000)
    parser.add_argument("--dir", help="where to build the run (default: a temporary directory)")
    parser.add_argument("--s3", action="store_true", help="the run in a moto server's bucket")
    args = parser.parse_args()
    with ExitStack() as stack:
        if args.s3:
            import logging

            from moto.server import ThreadedMotoServer

            logging.getLogger("werkzeug").setLevel(logging.WARNING)  # a line per request

            server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
            server.start()
            stack.callback(server.stop)
            host, port = server.get_host_and_port()
            raw_bytes, child_args = _s3(f"http://{host}:{port}", args)
        else:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(dir=args.dir))
            raw_bytes, child_args = _local(tmp, args)
        out = subprocess.run(
            [sys.executable, "-c", CHILD, *child_args],
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
