"""`load postgres`: the load plan's target for a PostgreSQL table (dialect and bulk path only).

The connection is libpq's: `PGHOST`, `PGPORT`, `PGDATABASE`, `PGUSER`, `PGPASSWORD`,
`PGSERVICE`, `~/.pgpass`, or a connection string that holds no password. The driver is
ADBC's: it streams Arrow batches by binary `COPY` (no Python per row; JSON columns typed
`arrow.json` go as jsonb) into a scratch table, over two connections of their own (clones
of the first: no second lookup of the server's types), so the server parses the JSON on two
cores. The table and its ledger change in one transaction of the first connection. Into an
existing table, the scratch table is UNLOGGED and applied with one `INSERT … ON CONFLICT
(id) DO UPDATE … WHERE newer`. A missing table is staged under the scratch name with the
table's own columns, and the transaction renames it into place and builds its primary key:
the rows are written once, and a killed load leaves no table. A session advisory lock keeps
two loads of one table from interleaving; the scratch table is dropped at the end, and a
killed load's by the next one.
"""

from __future__ import annotations

import re
import sys
import threading
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from queue import Queue
from types import ModuleType
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.dataset.load import (
    LATEST_FIRST,
    LoadedRun,
    column_types,
    newer,
    not_null,
    require_module,
    table_difference,
)
from pipeline.dataset.schema import TIMESTAMP
from pipeline.errors import StorageError, UsageError

# spelled as PostgreSQL's format_type() reports them, so a check compares like with like
COLUMNS = column_types(
    {
        pa.string(): "text",
        pa.list_(pa.string()): "text[]",
        TIMESTAMP: "timestamp with time zone",
        pa.int32(): "integer",
        pa.int64(): "bigint",
    },
    "date",
    json_type="jsonb",
)
LEDGER_SUFFIX = "_export_loads"
SCRATCH_SUFFIX = "_export_stage"  # as long as the ledger's, so one length check covers both
# marks a logged scratch table (a new table's rows) as this load's to drop
SCRATCH_COMMENT = "sessions-export scratch table: dropped by the next load"
STAGING_CONNECTIONS = 2  # the server parses jsonb on one core per connection
LEDGER_SCHEMA = pa.schema([
    ("run_id", pa.string()),
    ("mode", pa.string()),
    ("finished_at", pa.string()),
    ("loaded_at", pa.timestamp("us", tz="UTC")),
    ("files", pa.int32()),
    ("rows_read", pa.int64()),
])
MAX_IDENTIFIER = 63  # PostgreSQL silently truncates longer names
JSON_COLUMNS = tuple(name for name, kind in COLUMNS if kind == "jsonb")
JSON_TEXT = pa.json_(pa.string())  # the driver writes this type as jsonb
_KEY_VALUE = re.compile(r"\s*([A-Za-z_]+)\s*=\s*('(?:[^'\\]|\\.)*'|(?:[^\s'\\]|\\.)+)\s*")


def dsn_keys(dsn: str) -> set[str]:
    """The keywords a libpq connection string or URI sets; ValueError when it is neither."""
    if dsn.startswith(("postgresql://", "postgres://")):
        parts = urlsplit(dsn)
        keys = set(parse_qs(parts.query, keep_blank_values=True))
        userinfo = parts.netloc.rpartition("@")[0]
        if userinfo:
            keys.add("user")
            if ":" in userinfo:
                keys.add("password")
        return keys
    keys, position = set(), 0
    while position < len(dsn):
        match = _KEY_VALUE.match(dsn, position)
        if match is None:
            raise ValueError("not a connection string")
        keys.add(match.group(1))
        position = match.end()
    return keys


def check_dsn(dsn: str) -> None:
    """A connection string or URI, without a password (that goes in PGPASSWORD or ~/.pgpass).

    Neither error echoes the string: it may hold the very password it must not.
    """
    try:
        keys = dsn_keys(dsn)
    except ValueError:
        raise UsageError(
            "the dsn is not a libpq connection string (host=… dbname=…) or URI "
            "(postgresql://user@host/db)"
        ) from None
    if "password" in keys:
        raise UsageError(
            "the dsn holds a password: remove it and set PGPASSWORD, or use ~/.pgpass or a "
            "PGSERVICE entry (a password on the command line or in a config file leaks)"
        )


def with_application_name(dsn: str) -> str:
    """Name the client in pg_stat_activity unless PGAPPNAME or the dsn already does;
    libpq fills everything else the dsn lacks from PG* and ~/.pgpass."""
    fallback = "fallback_application_name"
    if dsn.startswith(("postgresql://", "postgres://")):
        joiner = "&" if "?" in dsn else "?"
        return f"{dsn}{joiner}{fallback}=sessions-export%20load"
    return f"{dsn} {fallback}='sessions-export load'"


def as_json(texts: pa.ChunkedArray) -> pa.ChunkedArray:
    """The same JSON text typed as JSON (no copy), for the driver to send as jsonb."""
    return pa.chunked_array(
        [pa.ExtensionArray.from_storage(JSON_TEXT, chunk) for chunk in texts.chunks], JSON_TEXT
    )


def import_driver() -> ModuleType:
    """ADBC's DB-API without polars, which it imports (0.15 s) only to offer polars results
    the load never asks for; polars stays importable afterwards."""
    # only while no other thread runs: one importing polars meanwhile would get an error
    absent = "polars" not in sys.modules and threading.active_count() == 1
    if absent:
        sys.modules["polars"] = None  # type: ignore[assignment]  # import fails: not offered
    try:
        return require_module(
            "adbc_driver_postgresql.dbapi", "adbc-driver-postgresql", "postgres", "load postgres"
        )
    finally:
        if absent:
            del sys.modules["polars"]


def check_identifier(name: str, what: str) -> None:
    if not name or len(name) > MAX_IDENTIFIER or "\x00" in name:
        raise UsageError(f"--{what} must be a name of 1 to {MAX_IDENTIFIER} characters")


def ident(*names: str) -> str:
    """A quoted (qualified) identifier: any name is safe inside SQL."""
    return ".".join('"' + name.replace('"', '""') + '"' for name in names)


def one_line(error: BaseException) -> str:
    """The server's message alone: libpq spans lines, ADBC appends the whole query."""
    text = str(error).split("Query was:", 1)[0]
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


class PostgresTarget:
    def __init__(self, dsn: str | None, schema: str, table: str) -> None:
        if dsn:
            check_dsn(dsn)
        check_identifier(schema, "schema")
        check_identifier(table, "table")
        if len(table) + len(LEDGER_SUFFIX) > MAX_IDENTIFIER:
            raise UsageError(
                f"--table must be at most {MAX_IDENTIFIER - len(LEDGER_SUFFIX)} characters "
                f"(its ledger is <table>{LEDGER_SUFFIX})"
            )
        self._adbc = import_driver()
        self._errors = require_module(
            "adbc_driver_manager", "adbc-driver-manager", "postgres", "load postgres"
        ).Error
        self.dsn = with_application_name(dsn or "postgresql://")
        self.schema = schema
        self.table_name = table
        self.table = f"{schema}.{table}"
        self._sessions = ident(schema, table)
        self._ledger = ident(schema, table + LEDGER_SUFFIX)
        self._scratch = ident(schema, table + SCRATCH_SUFFIX)
        self._names = ", ".join(ident(name) for name, _ in COLUMNS)
        self._con: Any = None
        self._cursor: Any = None
        self._created = False  # the table was missing: this load makes it, from the scratch
        self._made = False  # the table made in this transaction, with its key
        self._stagers: Queue[Any] = Queue()  # idle staging cursors, each COPY committed
        self._staging: list[Any] = []
        self._pool: ThreadPoolExecutor | None = None
        self._scratch_made = False
        self._pending: deque[Future] = deque()
        self._ids: list[pa.ChunkedArray] = []  # of every staged row, to see if any repeats
        self._rows = 0  # in a table this load made

    def _run(self, query: str, *params: object, cursor: Any = None) -> list[tuple]:
        cursor = cursor or self._cursor
        try:
            cursor.execute(query, parameters=params or None)
            return cursor.fetchall() if cursor.description else []
        except self._errors as error:
            raise StorageError(f"cannot load into {self.table}: {one_line(error)}") from None

    def _connect(self, clone_of: Any = None) -> Any:
        """A connection, or one more on `clone_of`'s driver database (~10x cheaper: the
        driver looks the server's types up once per database)."""
        try:
            if clone_of is not None:
                return clone_of.adbc_clone()
            return self._adbc.connect(self.dsn, autocommit=False)
        except self._errors as error:
            raise StorageError(f"cannot connect to PostgreSQL: {one_line(error)}") from None

    def _commit(self, connection: Any) -> None:
        try:
            connection.commit()
        except self._errors as error:
            raise StorageError(f"cannot load into {self.table}: {one_line(error)}") from None

    def open(self) -> set[str]:
        self._con = self._connect()
        self._cursor = self._con.cursor()
        # held by the session, not the transaction: it covers the scratch table's cleanup
        self._run("SELECT pg_advisory_lock(hashtext($1))", f"sessions-export {self.table}")
        if not self._run("SELECT 1 FROM pg_namespace WHERE nspname = $1", self.schema):
            raise UsageError(
                f"schema {self.schema} does not exist in this database: create it, or pass "
                "--schema"
            )
        self._created = not self._check_table()
        self._run(
            f"CREATE TABLE IF NOT EXISTS {self._ledger} (run_id text PRIMARY KEY, mode text, "
            "finished_at text, loaded_at timestamp with time zone NOT NULL, files integer, "
            "rows_read bigint)"
        )
        if self._created:  # a dropped table is rebuilt from every run, whatever the ledger says
            self._run(f"DELETE FROM {self._ledger}")
        self._check_scratch()
        return {row[0] for row in self._run(f"SELECT run_id FROM {self._ledger}")}

    def _check_scratch(self) -> None:
        """A table under the scratch name must be a leftover scratch table (unlogged, or
        marked as one)."""
        kind = self._run(
            "SELECT relpersistence = 'u' OR obj_description(oid, 'pg_class') IS NOT DISTINCT "
            "FROM $2 FROM pg_class WHERE oid = to_regclass($1)",
            self._scratch, SCRATCH_COMMENT,
        )
        if kind and not kind[0][0]:
            raise UsageError(
                f"{self.schema}.{self.table_name}{SCRATCH_SUFFIX} exists and is not a scratch "
                "table of this load (it would be dropped): rename it, or pass another --table"
            )

    def _start_staging(self) -> None:
        """The scratch table, committed so the staging connections share it; a killed
        load's leftover goes first. For a missing table it is that table to be: logged,
        with its columns."""
        for _ in range(STAGING_CONNECTIONS):
            connection = self._connect(clone_of=self._con)
            self._staging.append(connection)
            self._stagers.put(connection.cursor())
        self._pool = ThreadPoolExecutor(STAGING_CONNECTIONS, thread_name_prefix="load-stage")
        cursor = self._stagers.queue[0]
        self._scratch_made = True  # from here on, close() drops it
        self._run(f"DROP TABLE IF EXISTS {self._scratch}", cursor=cursor)
        # autovacuum would only analyze rows that are about to be dropped or renamed
        options = "WITH (autovacuum_enabled = off)"
        if self._created:
            self._run(f"CREATE TABLE {self._scratch} ({self._columns()}) {options}",
                      cursor=cursor)
            self._run(f"COMMENT ON TABLE {self._scratch} IS '{SCRATCH_COMMENT}'", cursor=cursor)
        else:
            staged = ", ".join(f"{ident(name)} {kind}" for name, kind in COLUMNS)
            self._run(f"CREATE UNLOGGED TABLE {self._scratch} ({staged}) {options}",
                      cursor=cursor)
        self._commit(cursor.connection)  # for the other connections to see it

    @staticmethod
    def _columns() -> str:
        return ", ".join(
            f"{ident(name)} {kind}{' NOT NULL' if not_null(name) else ''}" for name, kind in COLUMNS
        )

    def _check_table(self) -> bool:
        """True when the table exists and fits; False when it is missing."""
        actual = self._run(
            "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped "
            "ORDER BY attnum",
            self._sessions,
        )
        if not actual:
            return False
        difference = table_difference(self.table, COLUMNS, [tuple(row) for row in actual])
        if difference is None and not self._run(
            "SELECT 1 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
            "AND a.attnum = i.indkey[0] WHERE i.indrelid = to_regclass($1) AND i.indisunique "
            "AND i.indnkeyatts = 1 AND a.attname = 'id'",
            self._sessions,
        ):
            difference = (
                f"the existing table {self.table} has no primary key or unique index on id "
                "(the upsert needs one)"
            )
        if difference:
            raise UsageError(difference)
        return True

    def stage(self, latest: pa.Table) -> None:
        """Binary COPY into the scratch table on the next free staging connection; at most
        two partitions wait, so memory stays that of a few partitions."""
        if not self._scratch_made:
            self._start_staging()
        for name in JSON_COLUMNS:
            index = latest.schema.get_field_index(name)
            latest = latest.set_column(index, pa.field(name, JSON_TEXT), as_json(latest[name]))
        while len(self._pending) >= 2 * STAGING_CONNECTIONS:
            self._pending.popleft().result()
        self._ids.append(latest["id"])
        self._pending.append(self._pool.submit(self._copy, latest))  # type: ignore[union-attr]

    def _copy(self, latest: pa.Table) -> None:
        cursor = self._stagers.get()
        try:
            cursor.adbc_ingest(self.table_name + SCRATCH_SUFFIX, latest, mode="append",
                               db_schema_name=self.schema)
            self._commit(cursor.connection)
        except self._errors as error:
            raise StorageError(f"cannot load into {self.table}: {one_line(error)}") from None
        finally:
            self._stagers.put(cursor)

    def merge(self) -> tuple[int, int]:
        ids = pa.chunked_array([chunk for ids in self._ids for chunk in ids.chunks], pa.string())
        # a session in two partitions is staged twice (the key refuses a repeated id); the
        # sort costs more than the rest of the merge, so only then; counted while the last
        # partitions are copied
        repeats = len(pc.unique(ids)) < len(ids)
        while self._pending:
            self._pending.popleft().result()
        if not self._scratch_made:
            return 0, 0
        if self._created:
            return self._make_table(len(ids), repeats), 0
        latest = f"SELECT {self._names} FROM {self._scratch}"
        if repeats:
            latest = f"SELECT DISTINCT ON (id) {self._names} FROM {self._scratch} " \
                     f"ORDER BY {LATEST_FIRST}"
        updates = ", ".join(
            f"{ident(n)} = EXCLUDED.{ident(n)}" for n, _ in COLUMNS if n != "id"
        )
        rows = self._run(
            f"WITH upserted AS (INSERT INTO {self._sessions} AS s ({self._names}) {latest} "
            f"ON CONFLICT (id) DO UPDATE SET {updates} WHERE {newer('EXCLUDED', 's')} "
            "RETURNING (xmax = 0) AS inserted) "
            "SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) "
            "FROM upserted"
        )
        return rows[0][0], rows[0][1]

    def _make_table(self, staged: int = 0, repeats: bool = False) -> int:
        """The missing table, in the transaction: the scratch table, each id's older versions
        deleted, renamed into place; or an empty one when nothing was staged. Its key is
        built once over all its rows. The number of rows it holds."""
        if self._made:
            return 0
        self._made = True
        if not self._scratch_made:
            self._run(f"CREATE TABLE {self._sessions} ({self._columns()}, PRIMARY KEY (id))")
            return 0
        if repeats:
            versions = (f"SELECT ctid, row_number() OVER (PARTITION BY id ORDER BY "
                        f"{LATEST_FIRST}) AS n FROM {self._scratch} WHERE id IN "
                        f"(SELECT id FROM {self._scratch} GROUP BY id HAVING count(*) > 1)")
            self._run(f"DELETE FROM {self._scratch} WHERE ctid IN "
                      f"(SELECT ctid FROM ({versions}) AS versions WHERE n > 1)")
            staged -= self._cursor.rowcount
        self._run(f"ALTER TABLE {self._scratch} RENAME TO {ident(self.table_name)}")
        self._run(f"ALTER TABLE {self._sessions} RESET (autovacuum_enabled), "
                  "ADD PRIMARY KEY (id)")
        self._run(f"COMMENT ON TABLE {self._sessions} IS NULL")
        self._rows = staged
        return staged

    def record(self, runs: list[LoadedRun]) -> None:
        ledger = pa.Table.from_pylist(
            [
                {"run_id": r.run_id, "mode": r.mode, "finished_at": r.finished_at,
                 "loaded_at": r.loaded_at, "files": r.files, "rows_read": r.rows}
                for r in runs
            ],
            LEDGER_SCHEMA,
        )
        try:
            self._cursor.adbc_ingest(
                self.table_name + LEDGER_SUFFIX, ledger, mode="append", db_schema_name=self.schema
            )
        except self._errors as error:
            raise StorageError(f"cannot load into {self.table}: {one_line(error)}") from None

    def count(self) -> int:
        if self._created:  # a new table with nothing to load is still made
            self._make_table()
            return self._rows
        return self._run(f"SELECT count(*) FROM {self._sessions}")[0][0]

    def commit(self) -> None:
        if self._created:
            self._make_table()
        self._commit(self._con)

    def close(self) -> None:
        """Roll back what is uncommitted, drop the scratch table while the lock still keeps
        other loads out, then disconnect (which releases the lock)."""
        if self._pool is not None:
            self._pool.shutdown(cancel_futures=True)
        for connection in self._staging:
            connection.close()
        if self._con is None:
            return
        try:
            if self._scratch_made:
                self._con.rollback()  # nothing half-loaded; a no-op after commit
                self._run(f"DROP TABLE IF EXISTS {self._scratch}")
                self._con.commit()
        except (StorageError, self._errors):
            pass  # the next load drops the leftover; the first error is the one to report
        finally:
            self._cursor.close()
            self._con.close()
