"""Compaction: a settled, complete run's raw JSON-lines objects rewritten as Parquet.

The raw layer (`runs/<run_id>/data/*.jsonl.gz`, one object per data group) stays as it is:
it is the exactly-once output every harvest is checked against. Compaction reads it through
the Sink and writes one row per point (`SCHEMA`) to Hive-style partitions by the point's
UTC date, `points/dt=YYYY-MM-DD/<run_id>.part-NNNNN.parquet` (zstd), at most
`rows_per_file` rows a file, in the raw keys' order. So the same run and `rows_per_file`
give the same keys with the same bytes (for one pyarrow version): a rerun overwrites
its own files, never adds one. For the daily runs a kickoff starts, the point's date is
the window's date; a window over several days spans several partitions.

What was compacted is recorded in a sibling of the run's manifest,
`runs/<run_id>/compaction.json`, not in `manifest.json` itself: the completion check owns
and rewrites the manifest, and the compaction record has a single writer. It is written
first with `"status": "in_progress"`, then the files, then again with `"status":
"complete"`, the files, their rows and sha256: a compaction interrupted anywhere leaves the
raw layer and a record that says it did not finish; rerunning it finishes it.

pyarrow is imported inside the functions that need it: this module ships in the Lambda zip
with the rest of the package, but the drains never import pyarrow (nor need it installed).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from aws_lambda_powertools import Logger

from pipeline.errors import HarvestError
from pipeline.sinks import Sink, decode_lines, manifest_key

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq

logger = Logger(service="harvest", child=True)

# The table's prefix under the sink root (the Glue table's location in AWS).
POINTS_PREFIX = "points/"
DEFAULT_ROWS_PER_FILE = 1_000_000
# Rows buffered as Python objects before they go to the file as one row group.
ROW_GROUP_ROWS = 250_000
# Raw objects fetched at once (S3 GETs in flight; a directory does not mind).
READ_AHEAD = 256
READ_THREADS = 16
FORMAT_VERSION = 1

Column = tuple[str, str, str]


def columns_for(keys: Sequence[str]) -> tuple[Column, ...]:
    """(column, Arrow type name as `str(pa type)` prints it, Glue/Athena type) of the
    table: the run, one id column per profile level (its key), the point. The Glue table in
    terraform/analytics.tf declares the same columns; tests/test_compact.py holds them equal."""
    return (
        ("run_id", "string", "string"),
        *((key, "string", "string") for key in keys),
        ("ts", "timestamp[us, tz=UTC]", "timestamp"),
        ("value", "double", "double"),
    )


# The default profile's (Hermes v1: troop_id, warrior_id, data_group_id).
COLUMNS: tuple[Column, ...] = columns_for(("troop_id", "warrior_id", "data_group_id"))
PARTITION_KEY = "dt"

_EPOCH = datetime(1970, 1, 1).toordinal()
# RFC 3339 as the drain admits it (pipeline/drain.py): seconds, up to 9 fraction digits, and
# Z or an offset. Digits beyond the microsecond are dropped (timestamp[us]).
_TS = re.compile(
    r"(\d{4})-(\d\d)-(\d\d)T(\d\d):(\d\d):(\d\d)(?:\.(\d{1,9}))?(?:Z|([+-])(\d\d):(\d\d))"
)


class CompactionStatus(StrEnum):
    IN_PROGRESS = "in_progress"
    COMPLETE = "complete"


class CompactionError(HarvestError):
    """A run cannot be compacted (not complete, or compacted before with other settings)."""


def compaction_key(run_id: str) -> str:
    return f"runs/{run_id}/compaction.json"


def part_key(dt: str, run_id: str, part: int) -> str:
    return f"{POINTS_PREFIX}dt={dt}/{run_id}.part-{part:05d}.parquet"


@dataclass(frozen=True)
class CompactedFile:
    key: str
    dt: str
    rows: int
    bytes: int
    sha256: str

    def to_json(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "dt": self.dt,
            "rows": self.rows,
            "bytes": self.bytes,
            "sha256": self.sha256,
        }


@dataclass(frozen=True)
class Compaction:
    """What `compact_run` wrote: the record it leaves at `compaction_key(run_id)`."""

    run_id: str
    status: CompactionStatus
    rows_per_file: int
    raw_objects: int = 0
    rows: int = 0
    files: tuple[CompactedFile, ...] = field(default=())
    columns: tuple[Column, ...] = COLUMNS

    def to_json(self) -> dict[str, Any]:
        return {
            "version": FORMAT_VERSION,
            "run_id": self.run_id,
            "status": str(self.status),
            "format": "parquet",
            "compression": "zstd",
            "prefix": POINTS_PREFIX,
            "partition_key": PARTITION_KEY,
            "columns": [{"name": n, "type": arrow} for n, arrow, _ in self.columns],
            "rows_per_file": self.rows_per_file,
            "raw_objects": self.raw_objects,
            "rows": self.rows,
            "files": [f.to_json() for f in self.files],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Compaction:
        return cls(
            run_id=data["run_id"],
            status=CompactionStatus(data["status"]),
            rows_per_file=int(data["rows_per_file"]),
            raw_objects=int(data.get("raw_objects", 0)),
            rows=int(data.get("rows", 0)),
            files=tuple(CompactedFile(**f) for f in data.get("files", [])),
        )


def read_compaction(sink: Sink, run_id: str) -> Compaction | None:
    blob = sink.get(compaction_key(run_id))
    return Compaction.from_json(json.loads(blob)) if blob is not None else None


def _write_record(sink: Sink, compaction: Compaction) -> str:
    blob = json.dumps(compaction.to_json(), indent=2, ensure_ascii=True, allow_nan=False)
    return sink.put(compaction_key(compaction.run_id), blob.encode(), "application/json")


def run_is_complete(sink: Sink, run_id: str) -> bool:
    """The run's manifest exists and says complete (settled with nothing dead)."""
    blob = sink.get(manifest_key(run_id))
    return blob is not None and json.loads(blob).get("status") == "complete"


def ts_micros(text: str) -> int:
    """An RFC 3339 instant (as the drain admits it) as microseconds since the epoch, UTC."""
    m = _TS.fullmatch(text)
    if m is None:
        raise ValueError(f"not an RFC 3339 instant: {text!r}")
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    days = datetime(year, month, day).toordinal() - _EPOCH
    seconds = ((days * 24 + hour) * 60 + minute) * 60 + second
    if m.group(8):
        offset = (int(m.group(9)) * 60 + int(m.group(10))) * 60
        seconds -= offset if m.group(8) == "+" else -offset
    fraction = (m.group(7) or "").ljust(6, "0")[:6]
    return seconds * 1_000_000 + int(fraction)


def _date_of(micros: int) -> str:
    return (datetime(1970, 1, 1) + timedelta(microseconds=micros)).strftime("%Y-%m-%d")


def _raw_records(sink: Sink, run_id: str) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """(key, records) of every raw object of the run, in key order, fetched a few at a time."""
    keys = sink.keys(f"runs/{run_id}/data/")
    with ThreadPoolExecutor(READ_THREADS, thread_name_prefix="compact-read") as pool:
        while True:
            chunk = [k for _, k in zip(range(READ_AHEAD), keys, strict=False)]
            if not chunk:
                return
            for key, blob in zip(chunk, pool.map(sink.get, chunk), strict=True):
                if blob is not None:
                    yield key, decode_lines(blob)


class _PartitionWriter:
    """The files of one dt partition: row groups of ROW_GROUP_ROWS, files of rows_per_file."""

    def __init__(
        self, sink: Sink, run_id: str, dt: str, rows_per_file: int, columns: Sequence[Column]
    ) -> None:
        self.sink, self.run_id, self.dt = sink, run_id, dt
        self.rows_per_file = rows_per_file
        self.files: list[CompactedFile] = []
        self.schema = schema(columns)
        self._columns: list[list[Any]] = [[] for _ in columns]
        self._buffer: io.BytesIO | None = None
        self._writer: pq.ParquetWriter | None = None
        self._in_file = 0  # rows of the open file, written and buffered

    def add(self, row: Sequence[Any]) -> None:
        for column, value in zip(self._columns, row, strict=True):
            column.append(value)
        self._in_file += 1
        if self._in_file >= self.rows_per_file:
            self._close_file()
        elif len(self._columns[0]) >= ROW_GROUP_ROWS:
            self._flush_rows()

    def _flush_rows(self) -> None:
        import pyarrow.parquet as pq

        if not self._columns[0]:
            return
        table = _table(self._columns, self.schema)
        if self._writer is None:
            self._buffer = io.BytesIO()
            self._writer = pq.ParquetWriter(
                self._buffer, table.schema, compression="zstd", write_statistics=True
            )
        self._writer.write_table(table, row_group_size=ROW_GROUP_ROWS)
        self._columns = [[] for _ in self._columns]

    def _close_file(self) -> None:
        self._flush_rows()
        if self._writer is None or self._buffer is None:
            return
        self._writer.close()
        blob = self._buffer.getvalue()
        key = part_key(self.dt, self.run_id, len(self.files))
        self.sink.put(key, blob, "application/vnd.apache.parquet")
        self.files.append(
            CompactedFile(key, self.dt, self._in_file, len(blob), hashlib.sha256(blob).hexdigest())
        )
        self._writer, self._buffer, self._in_file = None, None, 0

    def close(self) -> None:
        self._close_file()


def schema(columns: Sequence[Column] = COLUMNS) -> pa.Schema:
    """The Arrow schema of the compacted files."""
    import pyarrow as pa

    types = {"string": pa.string(), "double": pa.float64()}
    types["timestamp[us, tz=UTC]"] = pa.timestamp("us", tz="UTC")
    return pa.schema([pa.field(name, types[arrow], nullable=False) for name, arrow, _ in columns])


def _table(columns: list[list[Any]], target: pa.Schema) -> pa.Table:
    import pyarrow as pa

    arrays = [pa.array(values, type=f.type) for values, f in zip(columns, target, strict=True)]
    return pa.Table.from_arrays(arrays, schema=target)


def compact_run(
    sink: Sink,
    run_id: str,
    *,
    rows_per_file: int = DEFAULT_ROWS_PER_FILE,
    require_complete: bool = True,
    keys: Sequence[str] = ("troop_id", "warrior_id", "data_group_id"),
) -> Compaction:
    """Write the run's points as Parquet under `points/` and record them; idempotent.

    Refuses a run whose manifest does not say complete (a run with dead letters is
    compacted once a replay completes it), and a run compacted before with another
    `rows_per_file` (its files would not be the same keys: the old ones would stay beside
    the new).
    """
    if rows_per_file < 1:
        raise CompactionError(f"rows_per_file must be at least 1, got {rows_per_file}")
    if require_complete and not run_is_complete(sink, run_id):
        raise CompactionError(
            f"run {run_id} is not complete (no manifest saying so): replay its DLQs and let"
            " it complete first"
        )
    earlier = read_compaction(sink, run_id)
    if earlier is not None and earlier.rows_per_file != rows_per_file:
        raise CompactionError(
            f"run {run_id} was compacted with rows_per_file={earlier.rows_per_file}: other"
            " settings would leave its earlier files beside the new ones; keep that value"
        )
    columns = columns_for(keys)
    _write_record(
        sink, Compaction(run_id, CompactionStatus.IN_PROGRESS, rows_per_file, columns=columns)
    )
    partitions: dict[str, _PartitionWriter] = {}
    raw_objects = rows = 0
    for _key, records in _raw_records(sink, run_id):
        raw_objects += 1
        for r in records:
            ids = (r["run_id"], *(r[key] for key in keys))
            for point in r["points"]:
                micros = ts_micros(point["ts"])
                dt = _date_of(micros)
                writer = partitions.get(dt)
                if writer is None:
                    writer = partitions[dt] = _PartitionWriter(
                        sink, run_id, dt, rows_per_file, columns
                    )
                writer.add((*ids, micros, float(point["value"])))
                rows += 1
    for writer in partitions.values():
        writer.close()
    files = tuple(f for dt in sorted(partitions) for f in partitions[dt].files)
    done = Compaction(
        run_id, CompactionStatus.COMPLETE, rows_per_file, raw_objects, rows, files, columns
    )
    where = _write_record(sink, done)
    logger.info(
        "run compacted",
        extra={"run_id": run_id, "rows": rows, "files": len(files), "record": where},
    )
    return done


def pending_runs(sink: Sink, run_ids: Sequence[str]) -> list[str]:
    """Those of `run_ids` that are complete and have no finished compaction."""
    pending = []
    for run_id in run_ids:
        record = read_compaction(sink, run_id)
        done = record is not None and record.status is CompactionStatus.COMPLETE
        if not done and run_is_complete(sink, run_id):
            pending.append(run_id)
    return pending
