"""`compact`, `verify` and `scan_sessions` on a Delta output."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from pipeline.dataset.delta.commit import newest_per_id
from pipeline.dataset.delta.log import LOG_DIR, app_ids, log_versions
from pipeline.dataset.delta.tables import LATEST_DIR, VERSIONS_DIR, DeltaOutput
from pipeline.dataset.schema import PARTITION_KEY, SCHEMA
from pipeline.dataset.verify import Findings
from pipeline.errors import UsageError
from pipeline.store.storage import Storage

DEFAULT_RETENTION = timedelta(days=7)
MIN_RETENTION = timedelta(hours=1)  # below this a slow reader may lose files mid-read
_SAME_SESSION = [c for c in SCHEMA.names if c not in ("extracted_at", "run_id")]


@dataclass(frozen=True)
class CompactReport:
    table: str
    files_removed: int
    files_added: int
    vacuumed: int

    def line(self) -> str:
        return (f"compact {self.table}: {self.files_removed} files bin-packed into "
                f"{self.files_added}, checkpoint written, {self.vacuumed} old files vacuumed")


def compact_delta(
    output: DeltaOutput, retention: timedelta = DEFAULT_RETENTION, force: bool = False,
    only: list[str] | None = None,
) -> list[CompactReport]:
    """OPTIMIZE (bin-pack each partition, or only the `created_date` days in `only`), a
    checkpoint, then VACUUM of files unreferenced for longer than `retention` (rounded up
    to whole hours, as Delta counts it), on both tables; under an hour only with `force`."""
    check_retention(retention, force)
    days = None if only is None else [("created_date", "in", sorted(set(only)))]
    reports = []
    for name in (VERSIONS_DIR, LATEST_DIR):
        if not output.exists(name):
            continue
        table = output.open(name, create=False)
        metrics = table.optimize.compact(partition_filters=days) if only != [] else {}
        table.create_checkpoint()
        removed = table.vacuum(
            retention_hours=math.ceil(retention.total_seconds() / 3600), dry_run=False,
            enforce_retention_duration=False,
        )
        reports.append(CompactReport(name, metrics.get("numFilesRemoved", 0),
                                     metrics.get("numFilesAdded", 0), len(removed)))
    return reports


def check_retention(retention: timedelta, force: bool) -> None:
    """A usage error (exit 2) for a VACUUM retention under an hour, unless forced."""
    if retention < MIN_RETENTION and not force:
        raise UsageError(
            f"a VACUUM retention of {retention} is under {MIN_RETENTION}: readers still "
            "using older versions would lose files; add --force (force=True) to do it anyway"
        )


@dataclass
class DeltaVerifyReport(Findings):
    versions: int = 0  # rows in sessions_versions
    sessions: int = 0  # rows in sessions
    partitions: int = 0

    def lines(self) -> list[str]:
        return self.report_lines(
            f"{self.partitions} partitions, {self.sessions} sessions, {self.versions} versions"
        )


def verify_delta(output: DeltaOutput) -> DeltaVerifyReport:
    """The log of each table is whole and names only present files; `sessions` holds one
    row per id, equal (but for extracted_at, run_id) to the newest version per id."""
    report = DeltaVerifyReport()
    for name in (VERSIONS_DIR, LATEST_DIR):
        if not output.exists(name):
            report.problems.append(f"{output.table_uri(name)} is not a Delta table")
        else:
            _check_log(output, name, report)
    if report.ok:
        _check_latest(output, report)
    return report


def _check_log(output: DeltaOutput, name: str, report: DeltaVerifyReport) -> None:
    storage = Storage(output.table_uri(name))
    commits, checkpoints = log_versions(storage)
    table = output.open(name, create=False)
    first = max([c for c in checkpoints if c <= table.version()], default=-1) + 1
    wanted = set(range(first, table.version() + 1))
    if missing := sorted(wanted - set(commits)):
        report.problems.append(f"{name}: log commits missing: {missing[:5]}")
    if gaps := [b for a, b in zip(commits, commits[1:], strict=False) if b != a + 1]:
        report.problems.append(f"{name}: the log has a version gap before {gaps[:5]}")
    present = {f.path for f in storage.list_files() if not f.path.startswith(LOG_DIR)}
    named = table.get_add_actions(flatten=True).column("path").to_pylist()
    absent = [p for p in (unquote(p) for p in named) if p not in present]
    if absent:
        report.problems.append(
            f"{name}: {len(absent)} file(s) the log names are missing, e.g. {absent[0]}"
        )


def _check_latest(output: DeltaOutput, report: DeltaVerifyReport) -> None:
    """One partition at a time: an id never leaves its created_date partition."""
    latest = output.open(LATEST_DIR, create=False)
    versions = output.open(VERSIONS_DIR, create=False)
    days = sorted({str(p[PARTITION_KEY]) for t in (latest, versions) for p in t.partitions()})
    report.partitions = len(days)
    repeated = differing = 0
    for day in days:
        now = _partition(latest, day)
        every = _partition(versions, day)
        report.sessions += now.num_rows
        report.versions += every.num_rows
        repeated += now.num_rows - pc.count_distinct(now["id"]).as_py()
        expected = _by_id(newest_per_id(every))
        if not _by_id(now).equals(expected):
            differing += _count_differences(_by_id(now), expected)
    if repeated:
        report.problems.append(f"sessions: {repeated} id(s) have more than one row")
    if differing:
        report.problems.append(
            f"sessions: {differing} id(s) differ from the newest version in {VERSIONS_DIR}"
        )


def _partition(table: Any, day: str) -> pa.Table:
    return table.to_pyarrow_dataset(file_pruning_predicate=[(PARTITION_KEY, "=", day)]).to_table()


def _by_id(rows: pa.Table) -> pa.Table:
    return rows.select(_SAME_SESSION).sort_by("id")


def _count_differences(found: pa.Table, expected: pa.Table) -> int:
    have = {tuple(map(repr, r.values())) for r in found.to_pylist()}
    want = {tuple(map(repr, r.values())) for r in expected.to_pylist()}
    return max(len(have - want), len(want - have), 1)


def scan_delta_sessions(
    output: str | Path, *, latest: bool = True, storage_options: dict[str, str] | None = None
) -> pl.LazyFrame:
    """The latest view (`latest=False`: every version) as a polars LazyFrame; a filter on
    `created_date` reads only those partitions."""
    target = DeltaOutput.at(output, storage_options)
    name = LATEST_DIR if latest else VERSIONS_DIR
    frame = pl.scan_delta(target.table_uri(name), storage_options=target.options or None)
    return frame.select([*SCHEMA.names, PARTITION_KEY])


def delta_dataset(output: DeltaOutput, latest: bool = True) -> ds.Dataset:
    """The latest view (`latest=False`: every version) as a pyarrow dataset, read in
    batches: what `load duckdb`, `load postgres` and `stats` stream from."""
    return output.open(LATEST_DIR if latest else VERSIONS_DIR, create=False).to_pyarrow_dataset()


@dataclass(frozen=True)
class DeltaTableStatus:
    """One table as `state show` reports it."""

    table: str
    version: int | None  # None: no table yet
    flushes: tuple[tuple[str, int], ...] = ()  # (app id, newest committed generation)

    def line(self) -> str:
        if self.version is None:
            return f"{self.table}: no Delta table yet"
        done = ", ".join(f"{app} flush {generation}" for app, generation in self.flushes)
        return f"{self.table}: version {self.version}; {done or 'no flush committed'}"


def delta_status(output: DeltaOutput) -> list[DeltaTableStatus]:
    """Each table's version and, per app id, the newest flush (txn) it committed."""
    found = []
    for name in (VERSIONS_DIR, LATEST_DIR):
        if not output.exists(name):
            found.append(DeltaTableStatus(name, None))
            continue
        table = output.open(name, create=False)
        apps = sorted(app_ids(Storage(output.table_uri(name))))
        flushes = tuple((app, table.transaction_version(app) or 0) for app in apps)
        found.append(DeltaTableStatus(name, table.version(), flushes))
    return found
