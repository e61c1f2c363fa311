"""A synthetic partition written straight to Parquet, without the API: compaction's input."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.dataset.schema import SCHEMA

DAY_MS = 86_400_000


def write_partition(out: Path, day: date, sessions: int, extra_ratio: float, seed: int = 1,
                    files: int = 10) -> int:
    """`sessions` first versions in `files` files of one run, then a newer version of
    `extra_ratio` of them in one file of a later run (every 10th ties on `updated_at` and
    is newer by `extracted_at` only); returns the rows written."""
    n = pl.int_range(0, sessions, dtype=pl.Int64)
    noise = n.hash(seed)
    created = (day - date(1970, 1, 1)).days * DAY_MS + (noise % DAY_MS).cast(pl.Int64)
    first = pl.select(
        id=pl.format("session_{}_{}", pl.lit(seed), n),
        type=pl.lit("chat.agent"),
        tags=pl.concat_list(pl.format("team:{}", noise % 9)),
        metadata=pl.concat_str(pl.lit('{"customer":"cus_'), noise.cast(pl.String),
                               pl.lit('","notes":"a session like any other"}')),
        created_at=created,
        updated_at=created + (noise % 60_000).cast(pl.Int64),
        extracted_at=created + 120_000,
        run_id=pl.lit("r-first"),
    )
    folder = out / "sessions" / f"created_date={day.isoformat()}"
    folder.mkdir(parents=True, exist_ok=True)
    size = -(-sessions // files)
    for seq in range(files):
        _write(first.slice(seq * size, size), folder / f"part-r{seed}first-{seq:05d}.parquet")
    extra = int(sessions * extra_ratio)
    if not extra:
        return sessions
    every = max(1, sessions // extra)
    tie = pl.int_range(pl.len()) % 10 == 0
    later = first.gather_every(every).head(extra).with_columns(
        updated_at=pl.when(tie).then(pl.col("updated_at")).otherwise(pl.col("updated_at") + 1000),
        extracted_at=pl.col("extracted_at") + 3_600_000,
        metadata=pl.lit('{"version":2}'),
        run_id=pl.lit("r-later"),
    )
    _write(later, folder / f"part-r{seed}later-00000.parquet")
    return sessions + later.height


def _write(frame: pl.DataFrame, path: Path) -> None:
    """The frame's columns under the contract's schema, every other column null."""
    given = frame.to_arrow()
    columns = [
        given[field.name].cast(field.type) if field.name in given.column_names
        else pa.nulls(given.num_rows, field.type)
        for field in SCHEMA
    ]
    pq.write_table(pa.table(columns, schema=SCHEMA), path, compression="zstd",
                   row_group_size=8192)
