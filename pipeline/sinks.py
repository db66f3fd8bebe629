"""Where harvested data lands: S3 in AWS, a local directory for embedded runs.

Output contract: one JSON object per harvested data group per line, gzip-compressed
(`*.jsonl.gz`), under `runs/<run_id>/data/<entity key>.jsonl.gz`. The key is fixed per run
and data group, so a redelivered message overwrites its own file instead of adding one.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import urlparse

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

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


class DirectorySink:
    """A local directory.

    Files are written in place, not through a temporary file and a rename (which costs six
    times as much per file): a drain that dies mid-write has not deleted its message, so
    the file is written again, whole, on redelivery; the manifest marks a finished run.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.location = str(self.root)
        self._made: set[str] = set()

    def put(self, key: str, blob: bytes, content_type: str) -> str:
        path = os.path.join(self.location, key)
        parent = os.path.dirname(path)
        if parent not in self._made:
            os.makedirs(parent, exist_ok=True)
            self._made.add(parent)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(fd, blob)
        finally:
            os.close(fd)
        return path

    def get(self, key: str) -> bytes | None:
        path = self.root / key
        return path.read_bytes() if path.exists() else None

    def keys(self, prefix: str) -> Iterator[str]:
        base = self.root / prefix
        if base.is_dir():
            for path in sorted(base.rglob("*")):
                if path.is_file():
                    yield path.relative_to(self.root).as_posix()


class S3Sink:
    """An S3 bucket and key prefix, given as `s3://bucket/prefix`."""

    def __init__(self, client: S3Client, url: str) -> None:
        parsed = urlparse(url)
        if parsed.scheme != "s3" or not parsed.netloc:
            raise ValueError(f"S3 sink must look like s3://bucket/prefix, not {url!r}")
        self._s3 = client
        self.bucket = parsed.netloc
        self.prefix = parsed.path.strip("/")
        self.location = url

    def _full(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def put(self, key: str, blob: bytes, content_type: str) -> str:
        self._s3.put_object(
            Bucket=self.bucket, Key=self._full(key), Body=blob, ContentType=content_type
        )
        return f"s3://{self.bucket}/{self._full(key)}"

    def get(self, key: str) -> bytes | None:
        try:
            return self._s3.get_object(Bucket=self.bucket, Key=self._full(key))["Body"].read()
        except self._s3.exceptions.NoSuchKey:
            return None

    def keys(self, prefix: str) -> Iterator[str]:
        strip = len(self._full(""))
        pages = self._s3.get_paginator("list_objects_v2").paginate(
            Bucket=self.bucket, Prefix=self._full(prefix)
        )
        for page in pages:
            for obj in page.get("Contents", []):
                yield obj["Key"][strip:]


def sink_for(url: str, s3_client: S3Client | None = None) -> Sink:
    """An S3Sink for s3:// URLs (needs `s3_client`), else a DirectorySink."""
    if url.startswith("s3://"):
        if s3_client is None:
            raise ValueError("an s3:// sink needs an S3 client")
        return S3Sink(s3_client, url)
    return DirectorySink(url)
