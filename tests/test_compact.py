"""Compaction to Parquet, the Glue table over it, and `harvest query`.

One local harvest of the simulator (module-scoped) gives the ground truth: its raw layer is
exact (`harvest local` checks it), and its Parquet must hold exactly the raw layer's points.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import WINDOW
from terraform_support import unquote

from pipeline.compact import (
    COLUMNS,
    POINTS_PREFIX,
    CompactionError,
    CompactionStatus,
    compact_run,
    compaction_key,
    read_compaction,
    ts_micros,
)
from pipeline.dev import cli
from pipeline.dev.simulator import SimulatorConfig, SimulatorProcess
from pipeline.local.scheduler import LocalOptions, run_local
from pipeline.local.sinks import DirectorySink
from pipeline.sinks import read_run, write_manifest, write_records

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

ROOT = Path(__file__).resolve().parent.parent
RUN = WINDOW.run_id
TREE = SimulatorConfig(
    seed=3, troops=2, warriors_per_troop=3, data_groups_per_warrior=4, nasty_ids=True
)
Row = tuple[str, str, str, str, int, float]


@pytest.fixture(scope="module")
def harvested(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The output directory of a complete local harvest of TREE (compacted at its end)."""
    out = tmp_path_factory.mktemp("harvest") / "out"
    result = run_local(
        LocalOptions(
            window=WINDOW,
            out=out,
            tick=0.2,
            invocation_timeout=10.0,
            safety_margin=2.0,
            simulator=SimulatorProcess(TREE),
        )
    )
    assert result.exit_code == 0 and result.comparison is not None and result.comparison.exact
    assert "Parquet files" in result.compaction
    return out


def raw_rows(sink: DirectorySink, run_id: str) -> list[Row]:
    return sorted(
        (
            r["run_id"],
            r["troop_id"],
            r["warrior_id"],
            r["data_group_id"],
            ts_micros(p["ts"]),
            float(p["value"]),
        )
        for r in read_run(sink, run_id)
        for p in r["points"]
    )


def parquet_rows(out: Path) -> list[Row]:
    table = pq.read_table(out / POINTS_PREFIX, partitioning="hive")
    ts = table.column("ts").cast(pa.int64()).to_pylist()
    ids = [table.column(name).to_pylist() for name, _, _ in COLUMNS[:4]]
    values = table.column("value").to_pylist()
    return sorted(zip(*ids, ts, values, strict=True))


def digest(rows: list[Row]) -> str:
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def parquet_files(out: Path) -> dict[str, bytes]:
    return {
        p.relative_to(out).as_posix(): p.read_bytes()
        for p in sorted((out / POINTS_PREFIX).rglob("*.parquet"))
    }


def synthetic_run(root: Path, data_groups: int = 30, points: int = 7) -> DirectorySink:
    """A complete run of `data_groups` raw objects (hourly points from WINDOW's start)."""
    sink = DirectorySink(root)
    for i in range(data_groups):
        record = {
            "run_id": RUN,
            "troop_id": f"troop {i % 3}",
            "warrior_id": f"warrior/{i % 5}",
            "data_group_id": f"dg-{i:04d}",
            "from": WINDOW.from_text,
            "to": WINDOW.to_text,
            "points": [
                {"ts": f"2024-03-01T{h:02d}:00:00Z", "value": i * 100 + h + 0.5}
                for h in range(points)
            ],
        }
        write_records(sink, RUN, f"dg-{i:04d}", [record])
    write_manifest(sink, RUN, {"run_id": RUN, "status": "complete"})
    return sink


class FailingSink(DirectorySink):
    """A directory that fails every Parquet put after the first: a compaction killed midway."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.parquet_puts = 0

    def put(self, key: str, blob: bytes, content_type: str) -> str:
        if key.endswith(".parquet"):
            self.parquet_puts += 1
            if self.parquet_puts > 1:
                raise OSError("killed after the first file")
        return super().put(key, blob, content_type)


# -- the compacted layer equals the raw layer ----------------------------------------------


def test_parquet_rows_equal_the_raw_points_of_a_local_harvest(harvested: Path) -> None:
    # GIVEN a complete local harvest, exact against the simulator's ground truth
    raw = raw_rows(DirectorySink(harvested), RUN)

    # WHEN its Parquet is read back
    rows = parquet_rows(harvested)

    # THEN the rows are the raw points, one for one
    assert len(rows) == len(raw) > 0
    assert digest(rows) == digest(raw)


def test_compaction_record_lists_every_file_with_rows_and_checksum(harvested: Path) -> None:
    record = read_compaction(DirectorySink(harvested), RUN)
    assert record is not None and record.status is CompactionStatus.COMPLETE
    on_disk = parquet_files(harvested)
    assert sorted(f.key for f in record.files) == sorted(on_disk)
    for f in record.files:
        assert f.sha256 == hashlib.sha256(on_disk[f.key]).hexdigest()
        assert f.rows == pq.read_metadata(harvested / f.key).num_rows
        assert f.key.startswith(f"{POINTS_PREFIX}dt={f.dt}/{RUN}.part-")
    assert record.rows == sum(f.rows for f in record.files)
    assert record.raw_objects == len(list(DirectorySink(harvested).keys(f"runs/{RUN}/data/")))


def test_files_are_zstd_with_the_declared_schema(harvested: Path) -> None:
    for key in parquet_files(harvested):
        metadata = pq.read_metadata(harvested / key)
        assert metadata.row_group(0).column(0).compression == "ZSTD"
        schema = pq.read_schema(harvested / key)
        assert [(f.name, str(f.type)) for f in schema] == [(n, t) for n, t, _ in COLUMNS]


def test_rows_per_file_bounds_every_file(tmp_path: Path) -> None:
    # GIVEN 30 data groups of 7 points (210 rows)
    sink = synthetic_run(tmp_path)

    # WHEN compacted at most 50 rows a file
    done = compact_run(sink, RUN, rows_per_file=50)

    # THEN 5 files, none over 50 rows, together every row
    assert [f.rows for f in done.files] == [50, 50, 50, 50, 10]
    assert done.rows == 210


def test_points_land_in_the_partition_of_their_utc_date(tmp_path: Path) -> None:
    sink = DirectorySink(tmp_path)
    record = {
        "run_id": RUN,
        "troop_id": "t",
        "warrior_id": "w",
        "data_group_id": "d",
        "points": [
            {"ts": "2024-03-01T23:30:00-01:00", "value": 1},
            {"ts": "2024-03-01T00:30:00+01:00", "value": 2},
        ],
    }
    write_records(sink, RUN, "d", [record])
    write_manifest(sink, RUN, {"status": "complete"})
    done = compact_run(sink, RUN)
    assert [(f.dt, f.rows) for f in done.files] == [("2024-02-29", 1), ("2024-03-02", 1)]


def test_ts_keeps_microseconds_and_applies_the_offset() -> None:
    assert ts_micros("1970-01-01T00:00:01.5Z") == 1_500_000
    assert ts_micros("1970-01-01T01:00:00.1234567+01:00") == 123_456
    assert ts_micros("2024-03-01T00:00:00Z") == 1_709_251_200_000_000


# -- idempotence and interruption ----------------------------------------------------------


def test_compacting_again_writes_the_same_keys_and_bytes(tmp_path: Path) -> None:
    sink = synthetic_run(tmp_path)
    first = compact_run(sink, RUN, rows_per_file=64)
    files = parquet_files(tmp_path)

    again = compact_run(sink, RUN, rows_per_file=64)

    assert again == first
    assert parquet_files(tmp_path) == files


def test_compaction_killed_midway_then_rerun_gives_the_same_files(tmp_path: Path) -> None:
    # GIVEN a clean compaction of a run, as the reference
    clean = synthetic_run(tmp_path / "clean")
    reference = compact_run(clean, RUN, rows_per_file=64)
    # ... and the same run compacted by a process that dies after its first file
    dying = FailingSink(tmp_path / "dying")
    synthetic_run(tmp_path / "dying")
    raw_before = raw_rows(dying, RUN)
    with pytest.raises(OSError, match="killed"):
        compact_run(dying, RUN, rows_per_file=64)

    # THEN the raw layer is untouched and the record says the compaction did not finish
    assert raw_rows(dying, RUN) == raw_before
    interrupted = read_compaction(dying, RUN)
    assert interrupted is not None and interrupted.status is CompactionStatus.IN_PROGRESS
    assert interrupted.files == ()

    # WHEN it is run again
    rerun = compact_run(DirectorySink(tmp_path / "dying"), RUN, rows_per_file=64)

    # THEN the same files with the same bytes as the clean one, and a complete record
    assert rerun == reference
    assert parquet_files(tmp_path / "dying") == parquet_files(tmp_path / "clean")
    assert (tmp_path / "dying" / compaction_key(RUN)).read_bytes() == (
        tmp_path / "clean" / compaction_key(RUN)
    ).read_bytes()


def test_a_run_not_complete_is_not_compacted(tmp_path: Path) -> None:
    sink = synthetic_run(tmp_path)
    write_manifest(sink, RUN, {"run_id": RUN, "status": "incomplete"})

    with pytest.raises(CompactionError, match="not complete"):
        compact_run(sink, RUN)

    assert sink.get(compaction_key(RUN)) is None
    assert not (tmp_path / POINTS_PREFIX).exists()


def test_other_rows_per_file_than_before_is_refused(tmp_path: Path) -> None:
    sink = synthetic_run(tmp_path)
    compact_run(sink, RUN, rows_per_file=64)
    with pytest.raises(CompactionError, match="rows_per_file=64"):
        compact_run(sink, RUN, rows_per_file=100)


# -- the CLI -------------------------------------------------------------------------------


def test_harvest_compact_skips_runs_compacted_already(
    harvested: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["compact", "--out", str(harvested)]) == 0
    assert "nothing to compact" in capsys.readouterr().out


def test_harvest_compact_run_compacts_again_to_the_same_files(
    harvested: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = parquet_files(harvested)
    assert cli.main(["compact", "--out", str(harvested), "--run", RUN]) == 0
    assert f"{RUN}: " in capsys.readouterr().out
    assert parquet_files(harvested) == before


def test_harvest_query_counts_the_points(
    harvested: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("duckdb")
    expected = len(raw_rows(DirectorySink(harvested), RUN))
    sql = "SELECT count(*) AS points, count(DISTINCT dt) AS days FROM points"
    assert cli.main(["query", sql, "--out", str(harvested)]) == 0
    lines = capsys.readouterr().out.split("\n")
    assert lines[0].split() == ["points", "days"]
    assert lines[1].split() == [str(expected), "1"]


def test_harvest_query_points_per_troop_per_hour_adds_up(harvested: Path) -> None:
    pytest.importorskip("duckdb")
    from pipeline.dev.query import query

    result = query(
        harvested,
        "SELECT troop_id, date_trunc('hour', ts) AS hour, count(*) AS points FROM points"
        " WHERE dt = '2024-03-01' GROUP BY 1, 2 ORDER BY 1, 2",
    )
    assert result.columns == ("troop_id", "hour", "points")
    assert sum(r[2] for r in result.rows) == len(raw_rows(DirectorySink(harvested), RUN))
    assert {r[0] for r in result.rows} == {r[1] for r in raw_rows(DirectorySink(harvested), RUN)}


def test_harvest_query_without_parquet_says_to_compact(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli.main(["query", "SELECT 1", "--out", str(tmp_path)]) == 2
    assert "harvest compact" in capsys.readouterr().err


def test_the_drains_never_import_pyarrow() -> None:
    probe = "import sys, workers.drain, pipeline.compact; print('pyarrow' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == "False"


# -- the Glue table ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def analytics_tf() -> dict[str, Any]:
    hcl2 = pytest.importorskip("hcl2")
    with (ROOT / "terraform" / "analytics.tf").open() as f:
        parsed: dict[str, Any] = unquote(hcl2.load(f))
    return parsed


@pytest.fixture(scope="module")
def points_table(analytics_tf: dict[str, Any]) -> dict[str, Any]:
    parsed = analytics_tf
    tables = [
        b["aws_glue_catalog_table"] for b in parsed["resource"] if "aws_glue_catalog_table" in b
    ]
    table: dict[str, Any] = tables[0]["points"]
    return table


# What Athena's Parquet reader maps each Arrow type of the files to.
GLUE_TYPE = {"string": "string", "double": "double", "timestamp[us, tz=UTC]": "timestamp"}


def test_glue_table_columns_match_the_parquet_files(
    points_table: dict[str, Any], harvested: Path
) -> None:
    # GIVEN the schema of a file compaction wrote, and the table Terraform declares (its
    # columns follow the profile: tests/test_terraform_config.py holds them, as planned, to
    # columns_for(the profile's keys))
    key = next(iter(parquet_files(harvested)))
    schema = pq.read_schema(harvested / key)
    descriptor = points_table["storage_descriptor"][0]

    # THEN the files' columns, in order, are the ones the table is declared with
    assert [(f.name, GLUE_TYPE[str(f.type)]) for f in schema] == [
        (n, glue) for n, _, glue in COLUMNS
    ]
    assert descriptor["location"] == "${local.points_location}"
    assert "ParquetHiveSerDe" in descriptor["ser_de_info"][0]["serialization_library"]


def test_glue_table_projects_dt_partitions_onto_the_compacted_keys(
    points_table: dict[str, Any], analytics_tf: dict[str, Any]
) -> None:
    # The table's location: the sink's root (s3://bucket/<output_prefix>/) plus POINTS_PREFIX.
    locals_ = {k: v for block in analytics_tf["locals"] for k, v in block.items()}
    assert locals_["points_location"].endswith(
        "${aws_s3_bucket.output.id}/${var.output_prefix}/" + POINTS_PREFIX
    )
    assert [(k["name"], k["type"]) for k in points_table["partition_keys"]] == [("dt", "string")]
    params = points_table["parameters"]
    assert params["projection.enabled"] == "true"
    assert params["projection.dt.type"] == "date"
    assert params["projection.dt.format"] == "yyyy-MM-dd"  # compaction's dt=YYYY-MM-DD
    # `$${dt}` is HCL for a literal `${dt}`, which Athena fills in.
    assert params["storage.location.template"] == "${local.points_location}dt=$${dt}/"


def test_athena_workgroup_enforces_encrypted_results(analytics_tf: dict[str, Any]) -> None:
    resources = analytics_tf["resource"]
    groups = [b["aws_athena_workgroup"] for b in resources if "aws_athena_workgroup" in b]
    configuration = groups[0]["analytics"]["configuration"][0]
    assert configuration["enforce_workgroup_configuration"] is True
    result = configuration["result_configuration"][0]
    assert result["encryption_configuration"][0]["encryption_option"] in {"SSE_S3", "SSE_KMS"}
