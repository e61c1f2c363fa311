"""`load postgres`: the load plan's target for a PostgreSQL table (dialect and bulk path only).

The connection is libpq's: `PGHOST`, `PGPORT`, `PGDATABASE`, `PGUSER`, `PGPASSWORD`,
`PGSERVICE`, `~/.pgpass`, or a connection string that holds no password. The driver is
ADBC's: it streams Arrow batches by binary `COPY` (no Python per row; JSON goes as jsonb's
binary form) into an UNLOGGED scratch table, over two connections of their own so the
server parses the JSON on two cores. The table and its ledger change in one transaction of
a third connection: one `INSERT … ON CONFLICT (id) DO UPDATE … WHERE newer` from the
scratch table, or, into a table this load created, a plain `INSERT` with the primary key
built afterwards. A session advisory lock keeps two loads of one table from interleaving;
the scratch table is dropped at the end, and a killed load's by the next one.
"""

from __future__ import annotations

import re
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from queue import Queue
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
from pipeline.errors import StorageError, UsageError

# spelled as PostgreSQL's format_type() reports them, so a check compares like with like
COLUMNS = column_types(
    {
        pa.string(): "text",
        pa.list_(pa.string()): "text[]",
        pa.timestamp("ms", tz="UTC"): "timestamp with time zone",
        pa.int32(): "integer",
        pa.int64(): "bigint",
    },
    "date",
    json_type="jsonb",
)
LEDGER_SUFFIX = "_export_loads"
SCRATCH_SUFFIX = "_export_stage"  # as long as the ledger's, so one length check covers both
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
JSONB_VERSION = "\x01"
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


def as_jsonb_binary(texts: pa.ChunkedArray) -> pa.ChunkedArray:
    """JSON text in jsonb's binary COPY format: a version byte (1), then the text."""
    return pc.binary_join_element_wise(JSONB_VERSION, texts, "")


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
        self._adbc = require_module(
            "adbc_driver_postgresql.dbapi", "adbc-driver-postgresql", "postgres", "load postgres"
        )
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
        self._created = False  # the table is new in this transaction: no key until merged
        self._stagers: Queue[Any] = Queue()  # idle staging cursors, autocommit
        self._staging: list[Any] = []
        self._pool: ThreadPoolExecutor | None = None
        self._pending: deque[Future] = deque()
        self._ids: list[pa.ChunkedArray] = []  # of every staged row, to see if any repeats

    def _run(self, query: str, *params: object, cursor: Any = None) -> list[tuple]:
        cursor = cursor or self._cursor
        try:
            cursor.execute(query, parameters=params or None)
            return cursor.fetchall() if cursor.description else []
        except self._errors as error:
            raise StorageError(f"cannot load into {self.table}: {one_line(error)}") from None

    def _connect(self, autocommit: bool) -> Any:
        try:
            return self._adbc.connect(self.dsn, autocommit=autocommit)
        except self._errors as error:
            raise StorageError(f"cannot connect to PostgreSQL: {one_line(error)}") from None

    def open(self) -> set[str]:
        self._con = self._connect(autocommit=False)
        self._cursor = self._con.cursor()
        # held by the session, not the transaction: it covers the scratch table's cleanup
        self._run("SELECT pg_advisory_lock(hashtext($1))", f"sessions-export {self.table}")
        if not self._run("SELECT 1 FROM pg_namespace WHERE nspname = $1", self.schema):
            raise UsageError(
                f"schema {self.schema} does not exist in this database: create it, or pass "
                "--schema"
            )
        self._created = self._check_or_create()
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
        """A table under the scratch name must be a leftover scratch table (unlogged)."""
        kind = self._run("SELECT relpersistence::text FROM pg_class WHERE oid = to_regclass($1)",
                         self._scratch)
        if kind and kind[0][0] != "u":
            raise UsageError(
                f"{self.schema}.{self.table_name}{SCRATCH_SUFFIX} exists and is not a scratch "
                "table of this load (it would be dropped): rename it, or pass another --table"
            )

    def _start_staging(self) -> None:
        """The scratch table, committed so the staging connections share it; a killed
        load's leftover goes first."""
        for _ in range(STAGING_CONNECTIONS):
            connection = self._connect(autocommit=True)
            self._staging.append(connection)
            self._stagers.put(connection.cursor())
        cursor = self._stagers.queue[0]
        staged = ", ".join(f"{ident(name)} {kind}" for name, kind in COLUMNS)
        self._run(f"DROP TABLE IF EXISTS {self._scratch}", cursor=cursor)
        # autovacuum would only analyze rows that are about to be dropped
        self._run(f"CREATE UNLOGGED TABLE {self._scratch} ({staged}) "
                  "WITH (autovacuum_enabled = off)", cursor=cursor)
        self._pool = ThreadPoolExecutor(STAGING_CONNECTIONS, thread_name_prefix="load-stage")

    def _check_or_create(self) -> bool:
        """True when the table had to be created (without its key: `merge` adds it)."""
        actual = self._run(
            "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = to_regclass($1) AND attnum > 0 AND NOT attisdropped "
            "ORDER BY attnum",
            self._sessions,
        )
        if not actual:
            columns = ", ".join(
                f"{ident(name)} {kind}{' NOT NULL' if not_null(name) else ''}"
                for name, kind in COLUMNS
            )
            self._run(f"CREATE TABLE {self._sessions} ({columns})")
            return True
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
        return False

    def stage(self, latest: pa.Table) -> None:
        """Binary COPY into the scratch table on the next free staging connection; at most
        two partitions wait, so memory stays that of a few partitions."""
        if self._pool is None:
            self._start_staging()
        for name in JSON_COLUMNS:
            index = latest.schema.get_field_index(name)
            latest = latest.set_column(index, name, as_jsonb_binary(latest[name]))
        while len(self._pending) >= 2 * STAGING_CONNECTIONS:
            self._pending.popleft().result()
        self._ids.append(latest["id"])
        self._pending.append(self._pool.submit(self._copy, latest))  # type: ignore[union-attr]

    def _copy(self, latest: pa.Table) -> None:
        cursor = self._stagers.get()
        try:
            cursor.adbc_ingest(self.table_name + SCRATCH_SUFFIX, latest, mode="append",
                               db_schema_name=self.schema)
        except self._errors as error:
            raise StorageError(f"cannot load into {self.table}: {one_line(error)}") from None
        finally:
            self._stagers.put(cursor)

    def merge(self) -> tuple[int, int]:
        while self._pending:
            self._pending.popleft().result()
        if self._pool is None:
            return 0, 0
        latest = f"SELECT {self._names} FROM {self._scratch}"
        ids = pa.chunked_array([chunk for ids in self._ids for chunk in ids.chunks], pa.string())
        if pc.count_distinct(ids).as_py() < len(ids):
            # one row per id when a session sits in two partitions (the key refuses a
            # repeated id); the sort costs the plain insert twice its time, so only then
            latest = f"SELECT DISTINCT ON (id) {self._names} FROM {self._scratch} " \
                     f"ORDER BY {LATEST_FIRST}"
        if self._created:  # nothing to conflict with: a plain insert, then the key
            self._run(f"INSERT INTO {self._sessions} ({self._names}) {latest}")
            inserted = self._cursor.rowcount
            self._add_key()
            return inserted, 0
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

    def _add_key(self) -> None:
        """The primary key of a table this load created, built once over all its rows."""
        if self._created:
            self._run(f"ALTER TABLE {self._sessions} ADD PRIMARY KEY (id)")
            self._created = False

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
        return self._run(f"SELECT count(*) FROM {self._sessions}")[0][0]

    def commit(self) -> None:
        self._add_key()  # a new table with nothing to load still gets its key
        try:
            self._con.commit()
        except self._errors as error:
            raise StorageError(f"cannot load into {self.table}: {one_line(error)}") from None

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
            if self._pool is not None:
                self._con.rollback()  # nothing half-loaded; a no-op after commit
                self._run(f"DROP TABLE IF EXISTS {self._scratch}")
                self._con.commit()
        except (StorageError, self._errors):
            pass  # the next load drops the leftover; the first error is the one to report
        finally:
            self._cursor.close()
            self._con.close()
