"""`load postgres`: the load plan's target for a PostgreSQL table (dialect and bulk path only).

The connection is libpq's: `PGHOST`, `PGPORT`, `PGDATABASE`, `PGUSER`, `PGPASSWORD`,
`PGSERVICE`, `~/.pgpass`, or a connection string that holds no password. The driver is
ADBC's: it streams Arrow batches into a temporary table by binary `COPY` (no Python per
row; JSON goes as jsonb's binary form, so the server parses it while the next partition is
read); one `INSERT … ON CONFLICT (id) DO UPDATE … WHERE newer` then merges them. An
advisory lock keeps two loads of one table from interleaving.
"""

from __future__ import annotations

import re
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
        self._staging = f"{table}_incoming"
        self._names = ", ".join(ident(name) for name, _ in COLUMNS)
        self._con: Any = None
        self._cursor: Any = None

    def _run(self, query: str, *params: object) -> list[tuple]:
        try:
            self._cursor.execute(query, parameters=params or None)
            return self._cursor.fetchall() if self._cursor.description else []
        except self._errors as error:
            raise StorageError(f"cannot load into {self.table}: {one_line(error)}") from None

    def open(self) -> set[str]:
        try:
            self._con = self._adbc.connect(self.dsn, autocommit=False)
        except self._errors as error:
            raise StorageError(f"cannot connect to PostgreSQL: {one_line(error)}") from None
        self._cursor = self._con.cursor()
        self._run("SELECT pg_advisory_xact_lock(hashtext($1))", f"sessions-export {self.table}")
        if not self._run("SELECT 1 FROM pg_namespace WHERE nspname = $1", self.schema):
            raise UsageError(
                f"schema {self.schema} does not exist in this database: create it, or pass "
                "--schema"
            )
        created = self._check_or_create()
        self._run(
            f"CREATE TABLE IF NOT EXISTS {self._ledger} (run_id text PRIMARY KEY, mode text, "
            "finished_at text, loaded_at timestamp with time zone NOT NULL, files integer, "
            "rows_read bigint)"
        )
        if created:  # a dropped table is rebuilt from every run, whatever the ledger says
            self._run(f"DELETE FROM {self._ledger}")
        staged = ", ".join(f"{ident(name)} {kind}" for name, kind in COLUMNS)
        self._run(f"CREATE TEMPORARY TABLE {ident(self._staging)} ({staged}) ON COMMIT DROP")
        return {row[0] for row in self._run(f"SELECT run_id FROM {self._ledger}")}

    def _check_or_create(self) -> bool:
        """True when the table had to be created."""
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
            self._run(f"CREATE TABLE {self._sessions} ({columns}, PRIMARY KEY (id))")
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
        """Binary COPY; the server parses each partition's JSON while the next is read."""
        for name in JSON_COLUMNS:
            index = latest.schema.get_field_index(name)
            latest = latest.set_column(index, name, as_jsonb_binary(latest[name]))
        try:
            self._cursor.adbc_ingest(self._staging, latest, mode="append", temporary=True)
        except self._errors as error:
            raise StorageError(f"cannot load into {self.table}: {one_line(error)}") from None

    def merge(self) -> tuple[int, int]:
        names = [name for name, _ in COLUMNS]
        values = self._names
        updates = ", ".join(f"{ident(n)} = EXCLUDED.{ident(n)}" for n in names if n != "id")
        # one row per id even if a session sits in two partitions (an upsert refuses a
        # repeated id); skipping the sort when none repeats measured no faster
        rows = self._run(
            f"WITH upserted AS (INSERT INTO {self._sessions} AS s ({self._names}) "
            f"SELECT DISTINCT ON (id) {values} FROM {ident(self._staging)} "
            f"ORDER BY {LATEST_FIRST} "
            f"ON CONFLICT (id) DO UPDATE SET {updates} WHERE {newer('EXCLUDED', 's')} "
            "RETURNING (xmax = 0) AS inserted) "
            "SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) "
            "FROM upserted"
        )
        return rows[0][0], rows[0][1]

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
        try:
            self._con.commit()
        except self._errors as error:
            raise StorageError(f"cannot load into {self.table}: {one_line(error)}") from None

    def close(self) -> None:
        if self._cursor is not None:
            self._cursor.close()
        if self._con is not None:
            self._con.close()  # an uncommitted transaction is rolled back: nothing half-loaded
