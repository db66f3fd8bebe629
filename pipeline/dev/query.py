"""`harvest query`: SQL (DuckDB) over a local output directory's compacted Parquet.

The view `points` reads `<out>/points/dt=*/*.parquet` with Hive partitioning, so it has the
files' columns plus `dt`. `dt` is a string, as in the Glue table (DuckDB would otherwise
guess a DATE), and the session's time zone is UTC, so the same SQL gives the same answer
here and in Athena.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.compact import PARTITION_KEY, POINTS_PREFIX
from pipeline.errors import ConfigError

VIEW = "points"


@dataclass(frozen=True)
class QueryResult:
    columns: tuple[str, ...]
    rows: tuple[tuple[Any, ...], ...]

    def text(self) -> str:
        """Aligned columns with a header, for people."""
        cells = [list(self.columns)] + [[_cell(v) for v in row] for row in self.rows]
        widths = [max(len(r[i]) for r in cells) for i in range(len(self.columns))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
        return "\n".join(line.rstrip() for line in lines)


def _cell(value: Any) -> str:
    return "NULL" if value is None else str(value)


def query(out: Path, sql: str, parameters: Sequence[Any] = ()) -> QueryResult:
    """Run `sql` with a view `points` over `out`'s Parquet; ConfigError if there is none."""
    import duckdb

    files = sorted((out / POINTS_PREFIX).glob(f"{PARTITION_KEY}=*/*.parquet"))
    if not files:
        raise ConfigError(
            f"no Parquet under {out / POINTS_PREFIX}: run `harvest compact --out {out}` first"
        )
    pattern = (out / POINTS_PREFIX).resolve().as_posix() + f"/{PARTITION_KEY}=*/*.parquet"
    with duckdb.connect(":memory:") as db:
        db.execute("SET TimeZone = 'UTC'")
        # A view's definition takes no parameters: the path goes in as a quoted literal.
        literal = "'" + pattern.replace("'", "''") + "'"
        db.execute(
            f"CREATE VIEW {VIEW} AS SELECT * FROM read_parquet({literal},"
            f" hive_partitioning = true, hive_types = {{'{PARTITION_KEY}': 'VARCHAR'}})"
        )
        try:
            cursor = db.execute(sql, list(parameters) or None)
        except duckdb.Error as exc:
            raise ConfigError(f"query failed: {exc}") from None
        columns = tuple(d[0] for d in cursor.description or ())
        rows = tuple(tuple(r) for r in cursor.fetchall()) if columns else ()
    return QueryResult(columns, rows)
