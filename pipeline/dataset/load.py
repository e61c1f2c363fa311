"""`load duckdb`: upsert the latest version of every session into a DuckDB `sessions` table.

Run manifests (`_runs/<run>.json`) say what each finished run wrote. The table
`sessions_export_loads` records which runs a database has loaded, so a load reads only the
data of runs it has not seen: loading twice changes nothing, and loading after new runs
applies only theirs. `compact` may have replaced a run's files since; then the load reads
the current files of the partitions that run touched, which hold its versions or newer ones.
A row replaces the stored one only if it is newer (greater `updated_at`, then `extracted_at`),
so reading a version twice, or an older one, is harmless. One load is one transaction.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from pipeline.dataset.layout import DataFile, files_by_partition, latest_versions
from pipeline.dataset.manifest import read_manifests
from pipeline.dataset.schema import PARTITION_KEY, SCHEMA
from pipeline.errors import StorageError, UsageError
from pipeline.store.storage import Storage

log = logging.getLogger(__name__)

SESSIONS_TABLE = "sessions"
LOADS_TABLE = "sessions_export_loads"

_DUCKDB_TYPES = {
    pa.string(): "VARCHAR",
    pa.list_(pa.string()): "VARCHAR[]",
    pa.timestamp("ms", tz="UTC"): "TIMESTAMPTZ",
    pa.int32(): "INTEGER",
    pa.int64(): "BIGINT",
}


@dataclass(frozen=True)
class LoadSummary:
    runs: int
    files: int
    rows_read: int
    inserted: int
    updated: int
    sessions: int  # rows in the table afterwards

    def line(self) -> str:
        if not self.runs:
            return f"load: nothing new; {SESSIONS_TABLE} holds {self.sessions} sessions"
        return (
            f"load: {self.runs} new runs, {self.files} files, {self.rows_read} rows read, "
            f"{self.inserted} sessions inserted, {self.updated} updated; "
            f"{SESSIONS_TABLE} holds {self.sessions} sessions"
        )


def sessions_ddl() -> str:
    """The `sessions` table: the contract's columns in order, then `created_date`."""
    columns = []
    for field in SCHEMA:
        kind = _DUCKDB_TYPES.get(field.type)
        if kind is None:  # a new column type must be mapped here, not guessed
            raise TypeError(f"no DuckDB type for {field.name}: {field.type}")
        columns.append(f"{field.name} {kind}{'' if field.nullable else ' NOT NULL'}")
    columns.append(f"{PARTITION_KEY} DATE NOT NULL")
    return f"CREATE TABLE IF NOT EXISTS {SESSIONS_TABLE} ({', '.join(columns)})"


LOADS_DDL = (
    f"CREATE TABLE IF NOT EXISTS {LOADS_TABLE} (run_id VARCHAR PRIMARY KEY, mode VARCHAR, "
    "finished_at VARCHAR, loaded_at TIMESTAMPTZ NOT NULL, files INTEGER, rows_read BIGINT)"
)

# `i` is newer than `s`: null updated_at counts as oldest, ties go to the later extraction
_NEWER = (
    "(coalesce(i.updated_at, '-infinity'::TIMESTAMPTZ) > "
    "coalesce(s.updated_at, '-infinity'::TIMESTAMPTZ) OR "
    "(i.updated_at IS NOT DISTINCT FROM s.updated_at AND i.extracted_at > s.extracted_at))"
)


def files_to_read(
    manifests: Iterable[dict[str, Any]], current: dict[str, list[DataFile]]
) -> dict[str, list[str]]:
    """Per partition, the files holding the new runs' versions.

    A run's own files where they all still exist; where `compact` replaced any of them,
    every current file of that partition (the compacted file holds the latest versions).
    """
    listed: dict[str, set[str]] = {}
    for manifest in manifests:
        for path in manifest.get("files", []):
            partition = path.split("/")[1].split("=", 1)[1]
            listed.setdefault(partition, set()).add(path)
    plan = {}
    for partition, paths in sorted(listed.items()):
        present = {f.path for f in current.get(partition, [])}
        chosen = paths if paths <= present else present
        if chosen:
            plan[partition] = sorted(chosen)
    return plan


def _connect(database: str) -> Any:
    try:
        import duckdb
    except ImportError:
        raise UsageError(
            "load duckdb needs the duckdb package: pip install 'trigger-sessions-export[duckdb]'"
        ) from None
    try:
        return duckdb.connect(database)
    except duckdb.Error as error:
        raise StorageError(f"cannot open the DuckDB database {database}: {error}") from None


def load_duckdb(output: Storage, database: str) -> LoadSummary:
    """Apply every run not yet loaded into `database`; one transaction."""
    import duckdb

    con = _connect(database)
    try:
        con.execute(sessions_ddl())
        con.execute(LOADS_DDL)
        done = {row[0] for row in con.execute(f"SELECT run_id FROM {LOADS_TABLE}").fetchall()}
        manifests = [m for m in read_manifests(output) if m.get("run_id") not in done]
        if not manifests:
            return LoadSummary(0, 0, 0, 0, 0, _count(con))
        plan = files_to_read(manifests, files_by_partition(output))
        con.execute("BEGIN TRANSACTION")
        files = rows_read = inserted = updated = 0
        for partition, paths in plan.items():
            batch = _read_partition(output, partition, paths)
            files += len(paths)
            rows_read += batch.num_rows
            added, replaced = _upsert(con, latest_versions(batch))
            inserted += added
            updated += replaced
            log.info("loaded %s: %d rows read from %d files", partition, batch.num_rows, len(paths))
        now = datetime.now(UTC)
        for manifest in manifests:
            con.execute(
                f"INSERT INTO {LOADS_TABLE} VALUES (?, ?, ?, ?, ?, ?)",
                [
                    manifest["run_id"],
                    manifest.get("mode"),
                    manifest.get("finished_at"),
                    now,
                    len(manifest.get("files", [])),
                    manifest.get("rows"),
                ],
            )
        con.execute("COMMIT")
        return LoadSummary(len(manifests), files, rows_read, inserted, updated, _count(con))
    except duckdb.Error as error:
        raise StorageError(f"cannot load into {database}: {error}") from None
    finally:
        con.close()  # an open transaction is rolled back: nothing half-loaded


def _read_partition(output: Storage, partition: str, paths: list[str]) -> pa.Table:
    table = pa.concat_tables([output.read_table(path).cast(SCHEMA) for path in paths])
    day = pa.scalar(datetime.fromisoformat(partition).date(), pa.date32())
    return table.append_column(PARTITION_KEY, pa.repeat(day, table.num_rows))


def _upsert(con: Any, latest: pa.Table) -> tuple[int, int]:
    """Insert unseen ids, replace stored rows that `latest` has newer versions of."""
    columns = ", ".join(latest.column_names)
    con.register("incoming", latest)
    try:
        replaced = con.execute(
            f"DELETE FROM {SESSIONS_TABLE} s USING incoming i WHERE s.id = i.id AND {_NEWER}"
        ).fetchone()[0]
        added = con.execute(
            f"INSERT INTO {SESSIONS_TABLE} ({columns}) SELECT {columns} FROM incoming i "
            f"WHERE NOT EXISTS (SELECT 1 FROM {SESSIONS_TABLE} s WHERE s.id = i.id)"
        ).fetchone()[0]
    finally:
        con.unregister("incoming")
    return added - replaced, replaced


def _count(con: Any) -> int:
    return con.execute(f"SELECT count(*) FROM {SESSIONS_TABLE}").fetchone()[0]
