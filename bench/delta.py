"""`make bench-delta`: a flush of 10,000 changes spread over the last 7 days into a
10,000,000-row Delta latest table with 365 daily partitions, then OPTIMIZE of that table.

`python -m bench.delta build OUT --rows N --days D` lays out both tables quickly without
the API (`bench.dataset`'s rows, four `write_deltalake` per 30 days so that each partition
holds four files, each session at one version); `merge OUT` and `optimize OUT` are the
measured steps, each in its own process (time and peak RSS via wait4);
`python -m bench.delta [--rows N]` runs all three.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import date, timedelta

import polars as pl
import pyarrow as pa

from bench.common import measure, write_results
from bench.dataset import session_rows
from pipeline.dataset.delta import LATEST_DIR, VERSIONS_DIR, DeltaOutput
from pipeline.dataset.delta.commit import apply_latest, apply_versions
from pipeline.dataset.delta.tables import to_delta_rows
from pipeline.dataset.schema import SCHEMA

_CHUNK_DAYS = 30
_FILES_PER_DAY = 4
APP = "bench"


def _days(days: int) -> list[date]:
    today = date.today()
    return [today - timedelta(days=days - 1 - offset) for offset in range(days)]


def build(out: str, rows: int, days: int) -> None:
    """Both tables: `rows` sessions over `days` partitions ending today."""
    from deltalake import write_deltalake

    target = DeltaOutput.at(out)
    per_day = rows // days
    uris = [target.open(name).table_uri for name in (VERSIONS_DIR, LATEST_DIR)]
    all_days = _days(days)
    quarter = -(-per_day // _FILES_PER_DAY)
    for start in range(0, days, _CHUNK_DAYS):
        frames = [session_rows(i * per_day, per_day, day, seed=1)
                  for i, day in enumerate(all_days) if start <= i < start + _CHUNK_DAYS]
        for part in range(_FILES_PER_DAY):  # several files a partition, as flushes leave them
            sliced = pl.concat([f.slice(part * quarter, quarter) for f in frames])
            table = to_delta_rows(sliced.to_arrow().cast(SCHEMA))
            for uri in uris:
                write_deltalake(uri, table, mode="append",
                                storage_options=target.options or None)


def changes(rows: int, days: int, count: int, recent: int = 7) -> pa.Table:
    """`count` newer versions of sessions created in the last `recent` days."""
    per_day = rows // days
    every = max(1, per_day * recent // count)
    frames = []
    for i, day in enumerate(_days(days)):
        if i >= days - recent:
            frames.append(session_rows(i * per_day, per_day, day, seed=1).gather_every(every))
    frame = pl.concat(frames).head(count).with_columns(
        updated_at=pl.col("updated_at") + pl.duration(hours=1),
        extracted_at=pl.col("extracted_at") + pl.duration(days=1),
        metadata=pl.lit('{"changed":true}'),
        run_id=pl.lit("r-bench"),
    )
    return frame.to_arrow().cast(SCHEMA)


def merge(out: str, rows: int, days: int, count: int) -> dict[str, object]:
    """One flush of `count` changes, step by step; prints where the time went."""
    target = DeltaOutput.at(out)
    started = time.perf_counter()
    table = changes(rows, days, count)
    delta_rows = to_delta_rows(table)
    prepared = time.perf_counter()
    apply_versions(target, delta_rows, APP, 1, {"bench": 1})
    versions_done = time.perf_counter()
    apply_latest(target, delta_rows, APP, 1, {"bench": 1})
    done = time.perf_counter()
    metrics = target.open(LATEST_DIR).history(1)[0].get("operationMetrics", {})
    return {
        "changes": table.num_rows,
        "prepare_s": round(prepared - started, 2),
        "versions_merge_s": round(versions_done - prepared, 2),
        "latest_merge_s": round(done - versions_done, 2),
        "latest_scan_ms": metrics.get("scan_time_ms"),
        "latest_rewrite_ms": metrics.get("rewrite_time_ms"),
        "latest_files_rewritten": metrics.get("num_target_files_removed"),
        "latest_rows_copied": metrics.get("num_target_rows_copied"),
        "latest_rows_updated": metrics.get("num_target_rows_updated"),
    }


def optimize(out: str) -> dict[str, object]:
    table = DeltaOutput.at(out).open(LATEST_DIR, create=False)
    metrics = table.optimize.compact()
    return {"files_removed": metrics.get("numFilesRemoved"),
            "files_added": metrics.get("numFilesAdded")}


def _step(step: str, out: str, rows: int, days: int, count: int) -> dict[str, object]:
    result = measure([sys.executable, "-m", "bench.delta", step, out, "--rows", str(rows),
                      "--days", str(days), "--changes", str(count)])
    assert result.returncode == 0, result
    detail = json.loads(result.stdout.strip().splitlines()[-1]) if step != "build" else {}
    return {"step": step, "rows": rows, "seconds": round(result.seconds, 1),
            "peak_rss_mb": round(result.peak_rss_mb), **detail}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("step", nargs="?", choices=["build", "merge", "optimize"])
    parser.add_argument("out", nargs="?")
    parser.add_argument("--rows", type=int, default=10_000_000)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--changes", type=int, default=10_000)
    parser.add_argument("--out-dir", default=None, help="where the throwaway tables go")
    args = parser.parse_args()
    if args.step == "build":
        build(args.out, args.rows, args.days)
    elif args.step == "merge":
        print(json.dumps(merge(args.out, args.rows, args.days, args.changes)))
    elif args.step == "optimize":
        print(json.dumps(optimize(args.out)))
    else:
        with tempfile.TemporaryDirectory(dir=args.out_dir) as out:
            rows = [_step(s, out, args.rows, args.days, args.changes)
                    for s in ("build", "merge", "optimize")]
        write_results("delta", rows)


if __name__ == "__main__":
    main()
