"""`stats`: a per-day table of the dataset, computed with polars from the files alone.

Per `created_date`: sessions (distinct ids), versions (stored rows), the status of each
session's latest version (closed: `closed_at` set; expired: `expires_at` passed; else
active) and the most common types.
"""

from __future__ import annotations

import csv
import io
import json
from datetime import UTC, date, datetime
from typing import Any

import polars as pl

from pipeline.dataset.scan import scan_sessions
from pipeline.dataset.schema import PARTITION_KEY
from pipeline.errors import StorageError

TOP_TYPES = 3
COLUMNS = ("created_date", "sessions", "versions", "active", "closed", "expired", "top_types")


def daily_stats(
    output: str,
    since: date | None,
    until: date | None,
    now_ms: int,
    top: int = TOP_TYPES,
    table_format: str | None = None,
) -> list[dict[str, Any]]:
    """One row per partition between `since` and `until` (inclusive), oldest first; a Delta
    output's from its two tables (`scan_sessions`' `table_format`)."""
    day = pl.col(PARTITION_KEY)
    wanted = pl.lit(True)
    if since is not None:
        wanted &= day >= since
    if until is not None:
        wanted &= day <= until
    versions = (
        scan_sessions(output, latest=False, table_format=table_format)
        .filter(wanted)
        .group_by(PARTITION_KEY)
        .agg(versions=pl.len())
    )
    now = datetime.fromtimestamp(now_ms / 1000, tz=UTC)
    closed = pl.col("closed_at").is_not_null()
    expired = ~closed & pl.col("expires_at").is_not_null() & (pl.col("expires_at") <= now)
    latest = (
        scan_sessions(output, table_format=table_format)
        .filter(wanted)
        .select(PARTITION_KEY, "type", closed=closed, expired=expired)
    )
    per_day = latest.group_by(PARTITION_KEY).agg(
        sessions=pl.len(),
        closed=pl.col("closed").sum(),
        expired=pl.col("expired").sum(),
    )
    types = (
        latest.group_by(PARTITION_KEY, "type")
        .agg(count=pl.len())
        .sort([PARTITION_KEY, "count", "type"], descending=[False, True, False], nulls_last=True)
        .group_by(PARTITION_KEY, maintain_order=True)
        .head(top)
    )
    try:
        days, kinds = pl.collect_all(
            [per_day.join(versions, on=PARTITION_KEY), types], engine="streaming"
        )
    except (pl.exceptions.PolarsError, OSError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else error
        raise StorageError(f"cannot read the dataset at {output}: {first_line}") from None
    return _rows(days, kinds)


def _rows(days: pl.DataFrame, kinds: pl.DataFrame) -> list[dict[str, Any]]:
    """The per-day rows, oldest first, each with its top types."""
    top_of: dict[date, dict[str, int]] = {}
    for row in kinds.iter_rows(named=True):
        top_of.setdefault(row[PARTITION_KEY], {})[row["type"] or "(none)"] = row["count"]
    return [
        {
            "created_date": row[PARTITION_KEY].isoformat(),
            "sessions": row["sessions"],
            "versions": row["versions"],
            "active": row["sessions"] - row["closed"] - row["expired"],
            "closed": row["closed"],
            "expired": row["expired"],
            "top_types": top_of.get(row[PARTITION_KEY], {}),
        }
        for row in days.sort(PARTITION_KEY).iter_rows(named=True)
    ]


def _types_text(types: dict[str, int]) -> str:
    return " ".join(f"{name}:{count}" for name, count in types.items())


def render(rows: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "json":
        return json.dumps(rows, indent=2)
    flat = [{**row, "top_types": _types_text(row["top_types"])} for row in rows]
    if fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(flat)
        return buffer.getvalue().rstrip("\n")
    totals = {c: sum(r[c] for r in rows) for c in COLUMNS[1:-1]}
    table = [list(COLUMNS), *([str(r[c]) for c in COLUMNS] for r in flat)]
    table.append(["total", *(str(totals[c]) for c in COLUMNS[1:-1]), ""])
    widths = [max(len(line[i]) for line in table) for i in range(len(COLUMNS))]
    numeric = range(1, len(COLUMNS) - 1)
    return "\n".join(
        "  ".join(
            cell.rjust(widths[i]) if i in numeric else cell.ljust(widths[i])
            for i, cell in enumerate(line)
        ).rstrip()
        for line in table
    )
