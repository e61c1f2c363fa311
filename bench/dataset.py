"""Build a synthetic sessions dataset quickly, without the API (polars expressions, no loop
per row): realistic columns, several versions of some sessions, files as runs write them.

`python -m bench.dataset OUT --versions 10000000 --days 30` lays out a whole dataset;
`write_partition` builds one partition (the compaction benchmark uses it).
"""

from __future__ import annotations

import argparse
import time
from datetime import date, timedelta
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from pipeline.dataset.layout import partition_dir
from pipeline.dataset.schema import SCHEMA
from pipeline.dataset.sink import ROW_GROUP_ROWS
from pipeline.timestamps import MS_PER_DAY

_EPOCH = date(1970, 1, 1)
TYPES = ("chat", "agent", "workflow", "support", "batch")


def _pick(values: tuple[str, ...], index: pl.Expr) -> pl.Expr:
    return pl.lit(pl.Series(values)).get(index % len(values))


def session_rows(first: int, count: int, day: date, seed: int) -> pl.DataFrame:
    """`count` sessions (numbered from `first`) created on `day`, each at its first version."""
    n = pl.int_range(first, first + count, dtype=pl.Int64)
    noise = n.hash(seed)
    day_ms = (day - _EPOCH).days * MS_PER_DAY
    created = pl.lit(day_ms) + (noise % MS_PER_DAY).cast(pl.Int64)
    closed = noise % 3 == 0
    frame = pl.select(
        id=pl.format("sess_{}{}", (noise % 1_000_000_007).cast(pl.String), n.cast(pl.String)),
        type=_pick(TYPES, noise % 7),
        task_identifier=pl.format("task-{}", noise % 40),
        tags=pl.concat_list(pl.format("team:{}", noise % 9), pl.format("plan:{}", noise % 3)),
        external_id=pl.format("ext-{}", n),
        current_run_id=pl.format("run_{}", noise % 10_000_000_019),
        metadata=pl.concat_str(
            pl.lit('{"customer":"cus_'),
            (noise % 100_000).cast(pl.String),
            pl.lit('","locale":"en-US","notes":"ordinary metadata of a session","score":'),
            (noise % 1000).cast(pl.String),
            pl.lit("}"),
        ),
        created_at=created,
        updated_at=created + (noise % 60_000),
        closed_at=pl.when(closed).then(created + 3_600_000),
        closed_reason=pl.when(closed).then(pl.lit("completed")),
        expires_at=created + 7 * MS_PER_DAY,
        trigger_config_base_payload=pl.concat_str(
            pl.lit('{"plan":"p'), (noise % 11).cast(pl.String), pl.lit('","region":"eu"}')
        ),
        trigger_config_machine=pl.lit("small-1x"),
        trigger_config_queue=pl.format("queue-{}", noise % 4),
        trigger_config_tags=pl.concat_list(pl.lit("managed")),
        trigger_config_max_attempts=(noise % 5 + 1).cast(pl.Int32),
        trigger_config_max_duration=(noise % 3600).cast(pl.Int64),
        trigger_config_lock_to_version=pl.lit("20261101.1"),
        trigger_config_region=pl.lit("eu-central-1"),
        trigger_config_idle_timeout_in_seconds=pl.lit(300, pl.Int32),
        extra=pl.lit(None, pl.String),
        extracted_at=created + 120_000,
        run_id=pl.lit("r-first"),
    )
    return frame.with_columns(
        pl.col(c).cast(pl.Datetime("ms", "UTC"))
        for c in ("created_at", "updated_at", "closed_at", "expires_at", "extracted_at")
    )


def later_versions(rows: pl.DataFrame, every: int, step: int) -> pl.DataFrame:
    """A newer version of every `every`-th session; every 10th of them ties on `updated_at`
    and differs only by a later `extracted_at` (so the tie-break is exercised)."""
    chosen = rows.gather_every(every, offset=step % every)
    tie = pl.int_range(pl.len()) % 10 == 0
    bump = pl.duration(milliseconds=1000 * (step + 1))
    return chosen.with_columns(
        updated_at=pl.when(tie).then(pl.col("updated_at")).otherwise(pl.col("updated_at") + bump),
        extracted_at=pl.col("extracted_at") + bump + pl.duration(hours=1),
        metadata=pl.lit(f'{{"version":{step + 1}}}'),
        run_id=pl.lit(f"r-later-{step}"),
    )


def _write(frame: pl.DataFrame, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    table = frame.to_arrow().cast(SCHEMA)
    pq.write_table(table, path, compression="zstd", row_group_size=ROW_GROUP_ROWS)


def write_partition(
    out: Path, day: date, sessions: int, extra_ratio: float, seed: int = 1, first: int = 0,
    files: int = 10,
) -> int:
    """One partition: `sessions` first versions in `files` files, then `extra_ratio` more
    rows of newer versions in files of later runs; returns the rows written."""
    rows = session_rows(first, sessions, day, seed)
    folder = out / partition_dir(day.isoformat())
    size = -(-sessions // files)
    for seq in range(files):
        _write(rows.slice(seq * size, size), folder / f"part-r{seed}first-{seq:05d}.parquet")
    written = sessions
    extra = int(sessions * extra_ratio)
    step = 0
    while extra > 0:
        every = max(1, sessions // extra) if extra < sessions else 1
        newer = later_versions(rows, every, step).head(extra)
        _write(newer, folder / f"part-r{seed}later{step}-00000.parquet")
        written += newer.height
        extra -= newer.height
        step += 1
    return written


def write_dataset(out: Path, versions: int, days: int, extra_ratio: float = 0.25) -> int:
    """`versions` rows over `days` partitions ending today."""
    per_day = int(versions / (1 + extra_ratio) / days)
    today = date.today()
    total = 0
    for offset in range(days):
        day = today - timedelta(days=days - 1 - offset)
        total += write_partition(out, day, per_day, extra_ratio, first=offset * per_day)
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--versions", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=30)
    args = parser.parse_args()
    started = time.perf_counter()
    total = write_dataset(args.out, args.versions, args.days)
    print(f"{total} versions in {args.days} partitions under {args.out} "
          f"in {time.perf_counter() - started:.1f}s")


if __name__ == "__main__":
    main()
