"""The Sink contract, run against DirectorySink and S3Sink (moto), with and without a prefix.

Output is one gzip'd JSON-lines file per data group at a key fixed by run and entity, so a
redelivered message overwrites its own file: same records, same bytes.
"""

from __future__ import annotations

import gzip
import json
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import boto3
import pytest
from aws_fakes import REGION, bucket
from moto import mock_aws

from pipeline.aws.sinks import S3Sink
from pipeline.envelope import Envelope
from pipeline.local.sinks import DirectorySink
from pipeline.sinks import (
    Sink,
    data_key,
    decode_lines,
    encode_lines,
    manifest_key,
    read_run,
    write_manifest,
    write_records,
)
from pipeline.window import Window

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

WINDOW = Window.parse("2024-01-01T00:00:00Z", "2024-01-02T00:00:00Z")
RUN = WINDOW.run_id
NASTY_IDS = [
    "a/b",
    "../../etc/passwd",
    "q?x=1&y=2#frag",
    "100% + more",
    "  spaced  ",
    "漢字",
    "🚀🔥",
    "עברית",
    "e\u0301",  # e + combining accent
    "zero\u200bwidth",
    "line\u2028separator",
    "x" * 128,
]


def group(i: int, data_group_id: str) -> Envelope:
    return Envelope(RUN, "data_groups", ("troop", f"warrior-{i}", data_group_id), WINDOW)


def record(data_group_id: str, n: int = 2) -> dict[str, Any]:
    return {
        "data_group_id": data_group_id,
        "from": WINDOW.from_text,
        "to": WINDOW.to_text,
        "points": [{"ts": f"2024-01-01T00:0{i}:00Z", "value": i * 1.5} for i in range(n)],
    }


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Client]:
    with mock_aws():
        yield boto3.client("s3", region_name=REGION)


@pytest.fixture(params=["directory", "s3", "s3-no-prefix"])
def sink(request: pytest.FixtureRequest, tmp_path: Path) -> Sink:
    if request.param == "directory":
        return DirectorySink(tmp_path / "out")
    client: S3Client = request.getfixturevalue("s3")
    name = bucket(client, f"out-{uuid.uuid4().hex[:12]}")
    prefix = "/harvest/prod/" if request.param == "s3" else ""
    return S3Sink(client, f"s3://{name}{prefix}")


# -- put / get / keys ----------------------------------------------------------------------


def test_get_returns_what_put_wrote(sink: Sink) -> None:
    blob = bytes(range(256))

    sink.put("runs/r/data/k.bin", blob, "application/octet-stream")

    assert sink.get("runs/r/data/k.bin") == blob


def test_get_returns_none_when_key_is_missing(sink: Sink) -> None:
    assert sink.get("runs/r/data/nothing.jsonl.gz") is None


def test_put_overwrites_when_key_exists(sink: Sink) -> None:
    sink.put("runs/r/data/k", b"first", "text/plain")

    sink.put("runs/r/data/k", b"second", "text/plain")

    assert sink.get("runs/r/data/k") == b"second"
    assert list(sink.keys("runs/r/data/")) == ["runs/r/data/k"]


def test_put_returns_a_location_naming_the_key(sink: Sink) -> None:
    where = sink.put("runs/r/data/k", b"x", "text/plain")

    assert where.startswith(sink.location.rstrip("/"))
    assert where.endswith("runs/r/data/k")


def test_keys_lists_only_keys_under_the_prefix(sink: Sink) -> None:
    for key in ("runs/a/data/1", "runs/a/data/2", "runs/a/manifest.json", "runs/b/data/1"):
        sink.put(key, b"x", "text/plain")

    assert sorted(sink.keys("runs/a/data/")) == ["runs/a/data/1", "runs/a/data/2"]
    assert list(sink.keys("runs/c/data/")) == []


def test_keys_come_in_s3s_order_with_deeper_keys_included(sink: Sink) -> None:
    # S3 lists by the key's characters: "-" sorts before "/", so "a-1" comes before "a/1".
    for key in ("runs/a/data/b", "runs/a/data/a/2", "runs/a/data/a-1", "runs/a/data/a/1"):
        sink.put(key, b"x", "text/plain")

    assert list(sink.keys("runs/a/data/")) == [
        "runs/a/data/a-1",
        "runs/a/data/a/1",
        "runs/a/data/a/2",
        "runs/a/data/b",
    ]


# -- records -------------------------------------------------------------------------------


def test_read_run_returns_every_written_record_when_ids_are_nasty(sink: Sink) -> None:
    # GIVEN one file per data group, ids full of reserved and non-ASCII characters
    written = []
    for i, dg in enumerate(NASTY_IDS):
        records = [record(dg)]
        write_records(sink, RUN, group(i, dg).key, records)
        written.extend(records)

    # WHEN the run is read back
    got = list(read_run(sink, RUN))

    # THEN every record comes back intact, and nothing else
    def order(r: dict[str, Any]) -> str:
        return str(r["data_group_id"])

    assert sorted(got, key=order) == sorted(written, key=order)


def test_write_records_lands_at_the_run_and_entity_key(sink: Sink) -> None:
    key = group(0, "dg/1?").key

    write_records(sink, RUN, key, [record("dg/1?")])

    assert list(sink.keys(f"runs/{RUN}/data/")) == [data_key(RUN, key)]
    assert data_key(RUN, key) == f"runs/{RUN}/data/{key}.jsonl.gz"


def test_write_records_overwrites_when_a_message_is_redelivered(sink: Sink) -> None:
    # GIVEN a data group's file already written
    key = group(0, "dg").key
    write_records(sink, RUN, key, [record("dg", n=2)])

    # WHEN a redelivery writes it again
    write_records(sink, RUN, key, [record("dg", n=3)])

    # THEN one file holds the latest records; nothing is doubled
    assert list(read_run(sink, RUN)) == [record("dg", n=3)]


def test_write_records_is_byte_identical_when_records_are_the_same(sink: Sink) -> None:
    key = group(0, "dg").key
    write_records(sink, RUN, key, [record("漢字 🚀")])
    first = sink.get(data_key(RUN, key))

    write_records(sink, RUN, key, [record("漢字 🚀")])

    assert first is not None
    assert sink.get(data_key(RUN, key)) == first


def test_read_run_does_not_mix_runs(sink: Sink) -> None:
    other = "20240102T000000Z-20240103T000000Z"
    write_records(sink, RUN, "k1", [record("mine")])
    write_records(sink, other, "k1", [record("theirs")])

    assert list(read_run(sink, RUN)) == [record("mine")]


def test_read_run_is_empty_when_nothing_was_written(sink: Sink) -> None:
    assert list(read_run(sink, RUN)) == []


def test_empty_data_group_round_trips_as_no_records(sink: Sink) -> None:
    write_records(sink, RUN, "empty", [])

    assert list(read_run(sink, RUN)) == []
    assert list(sink.keys(f"runs/{RUN}/data/")) == [data_key(RUN, "empty")]


# -- manifest ------------------------------------------------------------------------------


def test_write_manifest_is_readable_json_outside_the_data(sink: Sink) -> None:
    manifest = {"run_id": RUN, "stages": {"troops": {"done": 2}}, "note": "ok ✓ 漢字"}

    write_manifest(sink, RUN, manifest)

    blob = sink.get(manifest_key(RUN))
    assert blob is not None
    assert json.loads(blob) == manifest
    assert list(read_run(sink, RUN)) == []


def test_write_manifest_overwrites_when_written_again(sink: Sink) -> None:
    write_manifest(sink, RUN, {"complete": False})

    write_manifest(sink, RUN, {"complete": True})

    blob = sink.get(manifest_key(RUN))
    assert blob is not None
    assert json.loads(blob) == {"complete": True}


# -- encoding (no sink needed) -------------------------------------------------------------


def test_encode_lines_is_deterministic_for_the_same_records() -> None:
    records = [record(dg) for dg in NASTY_IDS]

    assert encode_lines(records) == encode_lines([dict(r) for r in records])


def test_encode_lines_writes_gzip_json_lines() -> None:
    records = [record("a"), record("漢字")]

    text = gzip.decompress(encode_lines(records)).decode("utf-8")

    assert [json.loads(line) for line in text.splitlines()] == records
    assert text.endswith("\n")
    assert "漢字" in text  # UTF-8, not \\u escapes


def test_decode_lines_reverses_encode_lines_when_values_hold_line_separators() -> None:
    # U+2028 is a line break to str.splitlines but not to JSON: it must not split a record.
    records = [{"id": "a\u2028b", "v": "c\u2029d\x85e"}, {"id": "next"}]

    assert decode_lines(encode_lines(records)) == records


# -- construction --------------------------------------------------------------------------


@pytest.mark.parametrize("url", ["s3:///no-bucket", "https://bucket/prefix", "bucket/prefix"])
def test_s3_sink_rejects_url_when_not_s3_bucket_form(s3: S3Client, url: str) -> None:
    with pytest.raises(ValueError, match="s3://bucket/prefix"):
        S3Sink(s3, url)


def test_directory_sink_puts_of_one_key_from_many_threads_leave_one_whole_object(
    tmp_path: Path,
) -> None:
    # GIVEN drains finishing a run at once, each writing the manifest with other lengths
    sink = DirectorySink(tmp_path)
    blobs = [json.dumps({"n": "x" * n}).encode() for n in range(1, 200)]
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda b: sink.put("runs/r/manifest.json", b, "application/json"), blobs))
    # THEN the file is one of them, whole (not a longer one's tail after a shorter one)
    assert sink.get("runs/r/manifest.json") in blobs
