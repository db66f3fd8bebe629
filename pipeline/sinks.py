"""Where harvested data lands: the sink interface and the output's keys and encoding.

Output contract: one JSON object per harvested data group per line, gzip-compressed
(`*.jsonl.gz`), under `runs/<run_id>/data/<entity key>.jsonl.gz`. The key is fixed per run
and data group, so a redelivered message overwrites its own file instead of adding one.
`pipeline.aws.sinks` writes to S3, `pipeline.local.sinks` to a directory.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, Protocol

# gzip's mtime is fixed so the same records give the same bytes.
_GZIP_MTIME = 0


def data_key(run_id: str, entity_key: str) -> str:
    return f"runs/{run_id}/data/{entity_key}.jsonl.gz"


def manifest_key(run_id: str) -> str:
    return f"runs/{run_id}/manifest.json"


def encode_lines(records: Sequence[Mapping[str, Any]]) -> bytes:
    # allow_nan=False: strict JSON; NaN and Infinity are refused where points are checked,
    # and would fail here rather than reach a reader.
    text = "".join(
        json.dumps(r, ensure_ascii=False, separators=(",", ":"), allow_nan=False) + "\n"
        for r in records
    )
    return gzip.compress(text.encode(), compresslevel=6, mtime=_GZIP_MTIME)


def decode_lines(blob: bytes) -> list[dict[str, Any]]:
    # Split on "\n" only: str.splitlines also breaks at U+2028 and friends, which
    # ensure_ascii=False leaves raw inside JSON strings (ids may contain them).
    return [json.loads(line) for line in gzip.decompress(blob).decode().split("\n") if line]


class Sink(Protocol):
    """Stores output files and the run manifest."""

    location: str

    def put(self, key: str, blob: bytes, content_type: str) -> str:
        """Write `blob` at `key` (overwriting); return where it went."""

    def get(self, key: str) -> bytes | None:
        """The bytes at `key`, or None."""

    def keys(self, prefix: str) -> Iterator[str]:
        """Every key under `prefix`."""


def write_records(
    sink: Sink, run_id: str, entity_key: str, records: Sequence[Mapping[str, Any]]
) -> str:
    return sink.put(data_key(run_id, entity_key), encode_lines(records), "application/gzip")


def write_manifest(sink: Sink, run_id: str, manifest: Mapping[str, Any]) -> str:
    blob = json.dumps(manifest, indent=2, ensure_ascii=True, allow_nan=False).encode()
    return sink.put(manifest_key(run_id), blob, "application/json")


def read_run(sink: Sink, run_id: str) -> Iterator[dict[str, Any]]:
    """Every output record of a run (for tests, benchmarks and checks)."""
    for key in sink.keys(f"runs/{run_id}/data/"):
        blob = sink.get(key)
        if blob is not None:
            yield from decode_lines(blob)
