"""`load duckdb`: the load plan's target for a DuckDB file (dialect and bulk path only).

Each partition's latest versions are applied as they come, straight from Arrow: stored
rows with a newer version are deleted, then the ids the table lacks are inserted. `id` is
unique but not declared a primary key: DuckDB's index would slow the upsert down.
"""

from __future__ import annotations

from typing import Any

import pyarrow as pa

from pipeline.dataset.load import (
    LoadedRun,
    column_types,
    newer,
    not_null,
    require_module,
    table_difference,
)
from pipeline.dataset.schema import TIMESTAMP
from pipeline.errors import StorageError, UsageError

SESSIONS_TABLE = "sessions"
LOADS_TABLE = "sessions_export_loads"

# spelled as DuckDB's information_schema reports them, so a check compares like with like
COLUMNS = column_types(
    {
        pa.string(): "VARCHAR",
        pa.list_(pa.string()): "VARCHAR[]",
        TIMESTAMP: "TIMESTAMP WITH TIME ZONE",
        pa.int32(): "INTEGER",
        pa.int64(): "BIGINT",
    },
    "DATE",
)
NAMES = ", ".join(name for name, _ in COLUMNS)

SESSIONS_DDL = f"CREATE TABLE IF NOT EXISTS {SESSIONS_TABLE} (" + ", ".join(
    f"{name} {kind}{' NOT NULL' if not_null(name) else ''}" for name, kind in COLUMNS
) + ")"
LOADS_DDL = (
    f"CREATE TABLE IF NOT EXISTS {LOADS_TABLE} (run_id VARCHAR PRIMARY KEY, mode VARCHAR, "
    "finished_at VARCHAR, loaded_at TIMESTAMPTZ NOT NULL, files INTEGER, rows_read BIGINT)"
)


class DuckDBTarget:
    def __init__(self, database: str) -> None:
        self.database = database
        self.table = SESSIONS_TABLE
        self._duckdb = require_module("duckdb", "duckdb", "duckdb", "load duckdb")
        self._con: Any = None
        self._inserted = self._updated = 0

    def _run(self, query: str, params: list | None = None) -> Any:
        try:
            return self._con.execute(query, params)
        except self._duckdb.Error as error:
            raise StorageError(f"cannot load into {self.database}: {error}") from None

    def open(self) -> set[str]:
        try:
            self._con = self._duckdb.connect(self.database)
        except self._duckdb.Error as error:
            raise StorageError(
                f"cannot open the DuckDB database {self.database}: {error}"
            ) from None
        self._run("BEGIN TRANSACTION")
        actual = self._run(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_schema = current_schema() AND table_name = ? ORDER BY ordinal_position",
            [SESSIONS_TABLE],
        ).fetchall()
        if actual:
            difference = table_difference(SESSIONS_TABLE, COLUMNS, [tuple(r) for r in actual])
            if difference:
                raise UsageError(f"{self.database}: {difference}")
        self._run(SESSIONS_DDL)
        self._run(LOADS_DDL)
        if not actual:  # a dropped table is rebuilt from every run, whatever the ledger says
            self._run(f"DELETE FROM {LOADS_TABLE}")
        return {row[0] for row in self._run(f"SELECT run_id FROM {LOADS_TABLE}").fetchall()}

    def stage(self, latest: pa.Table) -> None:
        """Upsert straight from Arrow: DuckDB scans the batch in place, so a staging table
        would only add a copy (and hold every partition in memory at once)."""
        self._con.register("incoming", latest)
        try:
            replaced = self._run(
                f"DELETE FROM {SESSIONS_TABLE} s USING incoming i "
                f"WHERE s.id = i.id AND {newer('i', 's')}"
            ).fetchone()[0]
            added = self._run(
                f"INSERT INTO {SESSIONS_TABLE} ({NAMES}) SELECT {NAMES} FROM incoming i "
                f"WHERE NOT EXISTS (SELECT 1 FROM {SESSIONS_TABLE} s WHERE s.id = i.id)"
            ).fetchone()[0]
        finally:
            self._con.unregister("incoming")
        self._inserted += added - replaced
        self._updated += replaced

    def merge(self) -> tuple[int, int]:
        return self._inserted, self._updated  # applied partition by partition

    def record(self, runs: list[LoadedRun]) -> None:
        for run in runs:
            self._run(
                f"INSERT INTO {LOADS_TABLE} VALUES (?, ?, ?, ?, ?, ?)",
                [run.run_id, run.mode, run.finished_at, run.loaded_at, run.files, run.rows],
            )

    def count(self) -> int:
        return self._run(f"SELECT count(*) FROM {SESSIONS_TABLE}").fetchone()[0]

    def commit(self) -> None:
        self._run("COMMIT")

    def close(self) -> None:
        if self._con is not None:
            self._con.close()  # an open transaction is rolled back: nothing half-loaded
