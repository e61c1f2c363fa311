"""`load postgres`: the load plan's target for a PostgreSQL table (dialect and bulk path only).

The connection is libpq's: `PGHOST`, `PGPORT`, `PGDATABASE`, `PGUSER`, `PGPASSWORD`,
`PGSERVICE`, `~/.pgpass`, or a connection string that holds no password. Each partition's
latest versions go to a temporary table by `COPY … (FORMAT csv)`, written by Arrow's C++
CSV writer (no Python per row); one `INSERT … ON CONFLICT (id) DO UPDATE … WHERE newer`
then merges them. An advisory lock keeps two loads of one table from interleaving.
"""

from __future__ import annotations

import io
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

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
LIST_COLUMNS = tuple(name for name, kind in COLUMNS if kind.endswith("[]"))
LEDGER_SUFFIX = "_export_loads"
MAX_IDENTIFIER = 63  # PostgreSQL silently truncates longer names
COPY_ROWS = 50_000  # rows per CSV chunk sent to COPY: bounds the client's buffer


def check_dsn(dsn: str) -> None:
    """A connection string or URI, without a password (that goes in PGPASSWORD or ~/.pgpass).

    Neither error echoes the string: it may hold the very password it must not.
    """
    conninfo = require_module("psycopg", "postgres", "load postgres").conninfo
    try:
        options = conninfo.conninfo_to_dict(dsn)
    except Exception:  # noqa: BLE001 - libpq's message quotes the string
        raise UsageError(
            "the dsn is not a libpq connection string (host=… dbname=…) or URI "
            "(postgresql://user@host/db)"
        ) from None
    if options.get("password"):
        raise UsageError(
            "the dsn holds a password: remove it and set PGPASSWORD, or use ~/.pgpass or a "
            "PGSERVICE entry (a password on the command line or in a config file leaks)"
        )


def check_identifier(name: str, what: str) -> None:
    if not name or len(name) > MAX_IDENTIFIER or "\x00" in name:
        raise UsageError(f"--{what} must be a name of 1 to {MAX_IDENTIFIER} characters")


def one_line(error: BaseException) -> str:
    """libpq's messages span lines (hints, one line per host tried)."""
    return "; ".join(line.strip() for line in str(error).splitlines() if line.strip())


def array_literals(column: pa.ChunkedArray) -> pa.Array:
    """list<string> as PostgreSQL array literals (`{"a","b\\"c"}`), for CSV."""
    lists = column.combine_chunks()
    escaped = pc.replace_substring(pc.replace_substring(lists.flatten(), "\\", "\\\\"), '"', '\\"')
    quoted = pc.fill_null(pc.binary_join_element_wise('"', escaped, '"', ""), "NULL")
    offsets = pc.subtract(lists.offsets, lists.offsets[0])
    rebuilt = pa.ListArray.from_arrays(offsets, quoted, mask=lists.is_null())
    return pc.binary_join_element_wise("{", pc.binary_join(rebuilt, ","), "}", "")


def csv_chunks(latest: pa.Table) -> list[bytes]:
    """The rows as CSV in `COPY`'s dialect: quoted strings, an empty field is NULL."""
    for name in LIST_COLUMNS:
        index = latest.schema.get_field_index(name)
        latest = latest.set_column(index, name, array_literals(latest[name]))
    options = pacsv.WriteOptions(include_header=False, quoting_style="needed")
    chunks = []
    for start in range(0, latest.num_rows, COPY_ROWS):
        buffer = io.BytesIO()
        pacsv.write_csv(latest.slice(start, COPY_ROWS), buffer, options)
        chunks.append(buffer.getvalue())
    return chunks


class PostgresTarget:
    def __init__(self, dsn: str | None, schema: str, table: str) -> None:
        self._psycopg = require_module("psycopg", "postgres", "load postgres")
        if dsn:
            check_dsn(dsn)
        check_identifier(schema, "schema")
        check_identifier(table, "table")
        if len(table) + len(LEDGER_SUFFIX) > MAX_IDENTIFIER:
            raise UsageError(
                f"--table must be at most {MAX_IDENTIFIER - len(LEDGER_SUFFIX)} characters "
                f"(its ledger is <table>{LEDGER_SUFFIX})"
            )
        sql = self._psycopg.sql
        self.dsn = dsn or ""
        self.schema = schema
        self.table = f"{schema}.{table}"
        self._sessions = sql.Identifier(schema, table)
        self._ledger = sql.Identifier(schema, table + LEDGER_SUFFIX)
        self._staging = sql.Identifier(f"{table}_incoming")
        self._names = sql.SQL(", ").join(sql.Identifier(name) for name, _ in COLUMNS)
        self._con: Any = None

    def _run(self, query: Any, params: Any = None) -> Any:
        try:
            return self._con.execute(query, params)
        except self._psycopg.Error as error:
            raise StorageError(f"cannot load into {self.table}: {one_line(error)}") from None

    def open(self) -> set[str]:
        sql = self._psycopg.sql
        try:
            # kwargs as fallbacks only: the dsn and the PG* environment win
            self._con = self._psycopg.connect(
                self.dsn, fallback_application_name="sessions-export load", autocommit=False
            )
        except self._psycopg.Error as error:
            raise StorageError(f"cannot connect to PostgreSQL: {one_line(error)}") from None
        self._run("SET client_encoding = 'UTF8'")
        self._run("SELECT pg_advisory_xact_lock(hashtext(%s))", [f"sessions-export {self.table}"])
        if not self._run(
            "SELECT 1 FROM pg_namespace WHERE nspname = %s", [self.schema]
        ).fetchone():
            raise UsageError(
                f"schema {self.schema} does not exist in this database: create it, or pass "
                "--schema"
            )
        self._check_or_create()
        self._run(
            sql.SQL(
                "CREATE TABLE IF NOT EXISTS {} (run_id text PRIMARY KEY, mode text, "
                "finished_at timestamp with time zone, loaded_at timestamp with time zone "
                "NOT NULL, files integer, rows_read bigint)"
            ).format(self._ledger)
        )
        self._run(
            sql.SQL("CREATE TEMPORARY TABLE {} (LIKE {}) ON COMMIT DROP").format(
                self._staging, self._sessions
            )
        )
        rows = self._run(sql.SQL("SELECT run_id FROM {}").format(self._ledger)).fetchall()
        return {row[0] for row in rows}

    def _check_or_create(self) -> None:
        sql = self._psycopg.sql
        relation = self._sessions.as_string(self._con)
        actual = self._run(
            "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
            "WHERE attrelid = to_regclass(%s) AND attnum > 0 AND NOT attisdropped "
            "ORDER BY attnum",
            [relation],
        ).fetchall()
        if not actual:
            columns = sql.SQL(", ").join(
                sql.SQL("{} {}{}").format(
                    sql.Identifier(name),
                    sql.SQL(kind),
                    sql.SQL(" NOT NULL" if not_null(name) else ""),
                )
                for name, kind in COLUMNS
            )
            self._run(
                sql.SQL("CREATE TABLE {} ({}, PRIMARY KEY (id))").format(self._sessions, columns)
            )
            return
        difference = table_difference(self.table, COLUMNS, [tuple(row) for row in actual])
        if difference is None and not self._run(
            "SELECT 1 FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
            "AND a.attnum = i.indkey[0] WHERE i.indrelid = to_regclass(%s) AND i.indisunique "
            "AND i.indnkeyatts = 1 AND a.attname = 'id'",
            [relation],
        ).fetchone():
            difference = (
                f"the existing table {self.table} has no primary key or unique index on id "
                "(the upsert needs one)"
            )
        if difference:
            raise UsageError(difference)

    def stage(self, latest: pa.Table) -> None:
        sql = self._psycopg.sql
        copy_sql = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT csv)").format(
            self._staging, self._names
        )
        try:
            with self._con.cursor() as cursor, cursor.copy(copy_sql) as copy:
                for chunk in csv_chunks(latest):
                    copy.write(chunk)
        except self._psycopg.Error as error:
            raise StorageError(f"cannot load into {self.table}: {one_line(error)}") from None

    def merge(self) -> tuple[int, int]:
        sql = self._psycopg.sql
        updates = sql.SQL(", ").join(
            sql.SQL("{0} = EXCLUDED.{0}").format(sql.Identifier(name))
            for name, _ in COLUMNS
            if name != "id"
        )
        # sorted by id: the primary key index is filled in order, and one row per id
        query = sql.SQL(
            "WITH upserted AS (INSERT INTO {sessions} AS s ({names}) "
            "SELECT DISTINCT ON (id) {names} FROM {staging} ORDER BY {order} "
            "ON CONFLICT (id) DO UPDATE SET {updates} WHERE {newer} "
            "RETURNING (xmax = 0) AS inserted) "
            "SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) "
            "FROM upserted"
        ).format(
            sessions=self._sessions,
            names=self._names,
            staging=self._staging,
            order=sql.SQL(LATEST_FIRST),
            updates=updates,
            newer=sql.SQL(newer("EXCLUDED", "s")),
        )
        inserted, updated = self._run(query).fetchone()
        return inserted, updated

    def record(self, runs: list[LoadedRun]) -> None:
        sql = self._psycopg.sql
        with self._con.cursor() as cursor:
            try:
                cursor.executemany(
                    sql.SQL("INSERT INTO {} VALUES (%s, %s, %s, %s, %s, %s)").format(self._ledger),
                    [
                        (r.run_id, r.mode, r.finished_at, r.loaded_at, r.files, r.rows)
                        for r in runs
                    ],
                )
            except self._psycopg.Error as error:
                raise StorageError(f"cannot load into {self.table}: {one_line(error)}") from None

    def count(self) -> int:
        sql = self._psycopg.sql
        return self._run(sql.SQL("SELECT count(*) FROM {}").format(self._sessions)).fetchone()[0]

    def commit(self) -> None:
        try:
            self._con.commit()
        except self._psycopg.Error as error:
            raise StorageError(f"cannot load into {self.table}: {one_line(error)}") from None

    def close(self) -> None:
        if self._con is not None:
            self._con.close()  # an uncommitted transaction is rolled back: nothing half-loaded
