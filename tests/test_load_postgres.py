"""`sessions-export load postgres`: the real CLI against a real PostgreSQL server the tests
start themselves (initdb + pg_ctl on 127.0.0.1), data exported from the emulator."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, date, datetime

import psycopg
import pyarrow as pa
import pytest

from pipeline.dataset.load import LoadedRun
from pipeline.dataset.load_postgres import PostgresTarget, dsn_keys
from pipeline.dataset.schema import SCHEMA
from pipeline.errors import StorageError
from tests.conftest import KEY, ROOT, api, emulator_sessions, latest_rows, read_dataset, run_cli

JSON_COLUMNS = ("metadata", "trigger_config_base_payload", "extra")
# the contract's columns with their native PostgreSQL types, as format_type() spells them
NATIVE_TYPES = {
    "id": "text", "type": "text", "task_identifier": "text", "tags": "text[]",
    "external_id": "text", "current_run_id": "text", "metadata": "jsonb",
    "created_at": "timestamp with time zone", "updated_at": "timestamp with time zone",
    "closed_at": "timestamp with time zone", "closed_reason": "text",
    "expires_at": "timestamp with time zone", "trigger_config_base_payload": "jsonb",
    "trigger_config_machine": "text", "trigger_config_queue": "text",
    "trigger_config_tags": "text[]", "trigger_config_max_attempts": "integer",
    "trigger_config_max_duration": "bigint", "trigger_config_lock_to_version": "text",
    "trigger_config_region": "text", "trigger_config_idle_timeout_in_seconds": "integer",
    "extra": "jsonb", "extracted_at": "timestamp with time zone", "run_id": "text",
    "created_date": "date",
}
_databases = itertools.count()


@pytest.fixture
def database(postgres) -> str:
    """A fresh database per test."""
    name = f"t{next(_databases)}"
    with psycopg.connect(postgres.conninfo("postgres"), autocommit=True) as con:
        con.execute(f"CREATE DATABASE {name}")
    return name


def load_pg(postgres, database, output, *args: str, password: str | None = None):
    return run_cli("load", "postgres", "--output", str(output), *args,
                   env_extra=postgres.env(database, password))


def query(postgres, database, sql: str, params=None) -> list[tuple]:
    with psycopg.connect(postgres.conninfo(database)) as con:
        return con.execute(sql, params).fetchall()


def table_rows(postgres, database, table: str = "public.sessions") -> dict[str, dict]:
    with psycopg.connect(postgres.conninfo(database)) as con:
        cursor = con.execute(f"SELECT * FROM {table}")
        names = [d.name for d in cursor.description]
        rows = [dict(zip(names, values, strict=True)) for values in cursor.fetchall()]
    return {row["id"]: row for row in rows}


def assert_table_matches_parquet(rows: dict[str, dict], output, but: str = "") -> None:
    """Every column of every session, read back with psycopg, equals the latest Parquet row."""
    latest = latest_rows(read_dataset(output))
    assert set(rows) == set(latest)
    for sid, want in latest.items():
        if sid == but:
            continue
        got = rows[sid]
        assert set(got) == set(want)
        for name, value in want.items():
            if name in JSON_COLUMNS:
                value = None if value is None else json.loads(value)
            elif name == "created_date":
                value = date.fromisoformat(value)
            assert got[name] == value, (sid, name, got[name], value)


LOADING_DOC = ROOT / "docs" / "loading.md"  # its PostgreSQL query is run below


def assert_documented_query_works(postgres, database, rows: dict[str, dict]) -> None:
    page = LOADING_DOC.read_text()
    section = page[page.index("## Load into PostgreSQL"):]
    start = section.index("```sql") + len("```sql")
    sql = section[start:section.index("```", start)]
    found = query(postgres, database, sql)
    now = datetime.now(UTC)
    since = now.date().toordinal() - 30
    expected = {sid for sid, row in rows.items() if row["closed_at"] is None
                and (row["expires_at"] is None or row["expires_at"] > now)
                and row["created_date"].toordinal() >= since}
    assert expected and {row[0] for row in found} == expected


@pytest.mark.slow
def test_first_load_reload_and_changes_keep_one_latest_row_per_session(
        emulator, tmp_path, postgres, database):
    emu = emulator(sessions=500, seed=51, days=8, list_trigger_config="include")
    output = tmp_path / "out"
    assert run_cli("run", "--output", str(output), url=emu.url).returncode == 0

    first = load_pg(postgres, database, output)
    assert first.returncode == 0, first.stderr
    assert "1 new runs" in first.stdout and "public.sessions holds 500 sessions" in first.stdout
    types = query(postgres, database,
                  "SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute "
                  "WHERE attrelid = 'public.sessions'::regclass AND attnum > 0 ORDER BY attnum")
    assert dict(types) == NATIVE_TYPES
    assert query(postgres, database, "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON "
                 "a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
                 "WHERE i.indrelid = 'public.sessions'::regclass AND i.indisprimary") == [("id",)]
    before = table_rows(postgres, database)
    assert_table_matches_parquet(before, output)

    assert_documented_query_works(postgres, database, before)

    again = load_pg(postgres, database, output)
    assert again.returncode == 0, again.stderr
    assert "nothing new" in again.stdout
    assert table_rows(postgres, database) == before

    sessions = sorted(emulator_sessions(emu.url), key=lambda s: s["createdAt"])
    changed = sessions[-15:]
    for session in changed:
        api(emu.url, "PATCH", f"/{session['id']}", {"metadata": {"version": 2}})
    for n in range(10):
        api(emu.url, "POST", "", {"type": "chat.agent", "taskIdentifier": "late",
                                  "externalId": f"late-{n}"})
    # a stored row newer than anything the export holds must survive the next load
    pinned = changed[0]["id"]
    future = datetime(2100, 1, 1, tzinfo=UTC)
    with psycopg.connect(postgres.conninfo(database)) as con:
        con.execute("UPDATE sessions SET updated_at = %s WHERE id = %s", [future, pinned])
    assert run_cli("run", "--output", str(output), url=emu.url).returncode == 0

    third = load_pg(postgres, database, output)
    assert third.returncode == 0, third.stderr
    assert "1 new runs" in third.stdout and "10 sessions inserted, 14 updated" in third.stdout
    rows = table_rows(postgres, database)
    assert rows[pinned]["updated_at"] == future and rows[pinned]["metadata"] == before[pinned][
        "metadata"]
    assert all(rows[s["id"]]["metadata"] == {"version": 2} for s in changed[1:])
    assert_table_matches_parquet(rows, output, but=pinned)
    assert query(postgres, database, "SELECT count(*) FROM sessions_export_loads") == [(2,)]


@pytest.mark.slow
def test_load_after_compact_with_a_dsn_schema_and_table(emulator, tmp_path, postgres, database):
    emu = emulator(sessions=300, seed=52, days=5, list_trigger_config="include")
    output = tmp_path / "out"
    assert run_cli("run", "--output", str(output), "--lookback", "30d", url=emu.url).returncode == 0
    for session in emulator_sessions(emu.url)[:30]:
        api(emu.url, "PATCH", f"/{session['id']}", {"metadata": {"compacted": "later"}})
    assert run_cli("run", "--output", str(output), "--lookback", "30d", url=emu.url).returncode == 0
    assert run_cli("compact", "--output", str(output)).returncode == 0  # deletes listed files
    query_ok = psycopg.connect(postgres.conninfo(database), autocommit=True)
    query_ok.execute("CREATE SCHEMA analytics")
    query_ok.close()

    dsn = f"postgresql://{postgres.user}@127.0.0.1:{postgres.port}/{database}?connect_timeout=10"
    # the password only in the environment; a table dropped after the first load is rebuilt
    for step in ("load", "rebuild"):
        if step == "rebuild":
            with psycopg.connect(postgres.conninfo(database)) as con:
                con.execute("DROP TABLE analytics.sessions_prod")
        result = run_cli("load", "postgres", "--output", str(output), "--dsn", dsn,
                         "--schema", "analytics", "--table", "sessions_prod",
                         env_extra={"PGPASSWORD": postgres.password})
        assert result.returncode == 0, result.stderr
        assert "2 new runs" in result.stdout
        assert "analytics.sessions_prod holds 300" in result.stdout
        rows = table_rows(postgres, database, "analytics.sessions_prod")
        assert_table_matches_parquet(rows, output)
        assert query(postgres, database,
                     "SELECT count(*) FROM analytics.sessions_prod_export_loads") == [(2,)]
        assert query(postgres, database, "SELECT to_regclass('public.sessions'), "
                     "to_regclass('analytics.sessions_prod_export_stage')") == [(None, None)]


@pytest.mark.slow
def test_a_killed_load_leaves_the_table_as_it_was(emulator, tmp_path, postgres, database):
    emu = emulator(sessions=400, seed=53, days=6, list_trigger_config="include")
    output = tmp_path / "out"
    assert run_cli("run", "--output", str(output), url=emu.url).returncode == 0
    assert load_pg(postgres, database, output).returncode == 0
    before = table_rows(postgres, database)
    for session in sorted(emulator_sessions(emu.url), key=lambda s: s["createdAt"])[-20:]:
        api(emu.url, "PATCH", f"/{session['id']}", {"metadata": {"killed": True}})
    assert run_cli("run", "--output", str(output), url=emu.url).returncode == 0

    # hold a lock the merge needs: the load stages everything, then waits at the merge
    blocker = psycopg.connect(postgres.conninfo(database))
    blocker.execute("LOCK TABLE sessions IN SHARE MODE")
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIGGER_")}
    env.update(postgres.env(database), TRIGGER_SECRET_KEY=KEY)
    loader = subprocess.Popen([sys.executable, "-m", "pipeline", "load", "postgres", "--output",
                               str(output)], env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    watch = psycopg.connect(postgres.conninfo(database), autocommit=True)
    waiting = "SELECT query FROM pg_stat_activity WHERE application_name = 'sessions-export load'"
    for _ in range(600):
        rows = watch.execute(waiting + " AND wait_event_type = 'Lock'").fetchall()
        if rows:
            break
        assert loader.poll() is None, "the load ended before it reached the merge"
        time.sleep(0.1)
    assert rows and "INSERT INTO" in rows[0][0], rows
    loader.send_signal(signal.SIGKILL)
    loader.wait(timeout=30)
    blocker.rollback()
    blocker.close()
    for _ in range(600):  # the server notices the dead client and rolls its transaction back
        if not watch.execute(waiting).fetchall():
            break
        time.sleep(0.1)
    watch.close()
    assert table_rows(postgres, database) == before
    assert query(postgres, database, "SELECT count(*) FROM sessions_export_loads") == [(1,)]
    # the staged rows outlive the killed load in its unlogged scratch table…
    assert query(postgres, database, "SELECT relpersistence::text FROM pg_class "
                 "WHERE oid = to_regclass('sessions_export_stage')") == [("u",)]

    resumed = load_pg(postgres, database, output)
    assert resumed.returncode == 0, resumed.stderr
    assert "1 new runs" in resumed.stdout and "20 updated" in resumed.stdout
    assert_table_matches_parquet(table_rows(postgres, database), output)
    # …until the next load drops it
    assert query(postgres, database, "SELECT to_regclass('sessions_export_stage')") == [(None,)]


def test_a_password_never_shows(tmp_path, postgres, database):
    wrong = "wrong-pw-9d1c4e"
    result = load_pg(postgres, database, tmp_path / "out", password=wrong)
    assert result.returncode in (2, 5), result
    text = result.stdout + result.stderr
    assert wrong not in text
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "password authentication failed" in result.stderr

    for dsn in (f"postgresql://{postgres.user}:{wrong}@127.0.0.1:{postgres.port}/{database}",
                f"host=127.0.0.1 port={postgres.port} user={postgres.user} password={wrong}",
                f"host=127.0.0.1 password='{wrong}"):  # not even parseable
        result = run_cli("load", "postgres", "--output", str(tmp_path / "out"), "--dsn", dsn)
        assert result.returncode == 2, result
        assert wrong not in result.stdout + result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert "dsn" in result.stderr


def test_an_existing_table_with_other_columns_is_refused(tmp_path, postgres, database):
    with psycopg.connect(postgres.conninfo(database)) as con:
        con.execute("CREATE TABLE sessions (id text PRIMARY KEY, type integer, note text)")
    result = load_pg(postgres, database, tmp_path / "out")
    assert result.returncode == 2, result
    assert "lacks column task_identifier text" in result.stderr
    assert "has column note text" in result.stderr
    assert "column type is integer, expected text" in result.stderr
    assert query(postgres, database, "SELECT to_regclass('sessions_export_loads')") == [(None,)]

    missing = load_pg(postgres, database, tmp_path / "out", "--schema", "nowhere")
    assert missing.returncode == 2 and "schema nowhere does not exist" in missing.stderr


def test_a_new_table_gets_its_key_even_with_nothing_to_load(tmp_path, postgres, database):
    result = load_pg(postgres, database, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert "nothing new" in result.stdout
    assert query(postgres, database, "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON "
                 "a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey) "
                 "WHERE i.indrelid = 'sessions'::regclass AND i.indisprimary") == [("id",)]


def test_a_table_of_the_scratch_name_that_is_not_scratch_is_kept(tmp_path, postgres, database):
    with psycopg.connect(postgres.conninfo(database)) as con:
        con.execute("CREATE TABLE sessions_export_stage (note text)")
        con.execute("INSERT INTO sessions_export_stage VALUES ('keep me')")
    result = load_pg(postgres, database, tmp_path / "out")
    assert result.returncode == 2, result
    assert "sessions_export_stage exists and is not a scratch table" in result.stderr
    assert query(postgres, database, "SELECT note FROM sessions_export_stage") == [("keep me",)]


def test_copy_round_trips_awkward_values(postgres, database, monkeypatch):
    for name, value in postgres.env(database).items():
        monkeypatch.setenv(name, value)
    at = datetime(2026, 3, 4, 5, 6, 7, 891000, tzinfo=UTC)
    awkward = ['a"b', "back\\slash", "comma,brace{}", "NULL", "", "new\nline", "ünï 🎉", None]
    base = {f.name: None for f in SCHEMA}
    rows = [
        base | {"id": "s1", "type": 'quote " and , comma', "tags": awkward,
                "metadata": json.dumps({"k": 'v"\\', "n": [1, None]}), "created_at": at,
                "updated_at": at, "trigger_config_tags": [], "trigger_config_max_attempts":
                2**31 - 1, "trigger_config_max_duration": 2**63 - 1, "extra": "[]",
                "extracted_at": at, "run_id": "r", "closed_reason": ""},
        base | {"id": "s2", "created_at": at, "extracted_at": at, "run_id": "r",
                "trigger_config_base_payload": '"just a string"'},
    ]
    table = pa.Table.from_pylist(rows, SCHEMA).append_column(
        "created_date", pa.array([at.date()] * 2, pa.date32()))
    # s1 again in another partition, older: both partitions in one upsert, the newest wins
    older = pa.Table.from_pylist([rows[0] | {"updated_at": at.replace(year=2025),
                                             "type": "older"}], SCHEMA)
    older = older.append_column("created_date", pa.array([at.date()], pa.date32()))
    target = PostgresTarget(None, "public", "sessions")
    assert target.open() == set()
    target.stage(older)
    target.stage(table)
    assert target.merge() == (2, 0)
    target.record([LoadedRun("r", "run", None, 1, 2, at)])
    assert target.count() == 2
    target.commit()
    target.close()
    stored = table_rows(postgres, database)
    for row in rows:
        want = row | {"created_date": at.date()}
        for name in JSON_COLUMNS:
            want[name] = None if want[name] is None else json.loads(want[name])
        assert stored[row["id"]] == want


def session_row(sid: str, updated_at: datetime | None, extracted_at: datetime, note: str,
                day: date) -> pa.Table:
    row = {f.name: None for f in SCHEMA} | {
        "id": sid, "type": note, "created_at": datetime(2026, 1, 1, tzinfo=UTC),
        "updated_at": updated_at, "extracted_at": extracted_at, "run_id": "r"}
    return pa.Table.from_pylist([row], SCHEMA).append_column(
        "created_date", pa.array([day], pa.date32()))


@pytest.mark.parametrize("existing", [False, True], ids=["new table", "existing table"])
def test_a_session_staged_from_several_partitions_keeps_only_its_newest_version(
        postgres, database, monkeypatch, existing):
    for name, value in postgres.env(database).items():
        monkeypatch.setenv(name, value)
    at = datetime(2026, 3, 1, tzinfo=UTC)
    later, latest = at.replace(day=2), at.replace(day=3)
    # (id, updated_at, extracted_at, which version it is), spread over three partitions;
    # the newest comes first, last or in the middle, so staging order cannot decide
    partitions = [
        [("a", latest, at, "newest"), ("b", at, at, "old"), ("c", None, latest, "old"),
         ("e", at, at, "old"), ("f", at, at, "only")],
        [("a", at, at, "old"), ("b", at, later, "newest"), ("c", at, at, "newest"),
         ("e", latest, at, "newest"), ("g", None, at, "only")],
        [("a", later, latest, "old"), ("b", at, at, "old"), ("e", later, latest, "old")],
    ]
    if existing:  # stored: a version older than every staged one, one newer, one alone
        target = PostgresTarget(None, "public", "sessions")
        target.open()
        for sid, updated, note in (("a", at.replace(year=2025), "old"),
                                   ("e", at.replace(year=2027), "newest"),
                                   ("h", at, "only")):
            target.stage(session_row(sid, updated, at, note, date(2026, 2, 1)))
        target.merge()
        target.count()
        target.commit()
        target.close()
    target = PostgresTarget(None, "public", "sessions")
    target.open()
    for day, versions in enumerate(partitions, start=1):
        target.stage(pa.concat_tables(
            [session_row(*version, date(2026, 3, day)) for version in versions]))
    inserted, updated = target.merge()
    target.count()
    target.commit()
    target.close()
    stored = {sid: note for sid, note in query(postgres, database,
                                               "SELECT id, type FROM sessions")}
    expected = dict.fromkeys("abcefg", "only") | dict.fromkeys("abce", "newest")
    if existing:
        expected["h"] = "only"
        assert (inserted, updated) == (4, 1)  # b c f g new; e stored newer than any staged
    else:
        assert (inserted, updated) == (6, 0)
    assert stored == expected
    assert query(postgres, database, "SELECT count(*), count(DISTINCT id) FROM sessions") == [
        (len(expected), len(expected))]


def test_a_killed_first_load_leaves_no_table(emulator, tmp_path, postgres, database):
    emu = emulator(sessions=300, seed=54, days=5, list_trigger_config="include")
    output = tmp_path / "out"
    assert run_cli("run", "--output", str(output), url=emu.url).returncode == 0
    # the real load, paused where everything is applied and nothing committed yet
    paused = (
        "import sys\n"
        "from pipeline.dataset.load import load\n"
        "from pipeline.dataset.load_postgres import PostgresTarget\n"
        "from pipeline.store.storage import Storage\n"
        "class Paused(PostgresTarget):\n"
        "    def commit(self):\n"
        "        print('applied', flush=True)\n"
        "        sys.stdin.read()\n"
        f"load(Storage({str(output)!r}), Paused(None, 'public', 'sessions'))\n"
    )
    env = {**os.environ, **postgres.env(database)}
    loader = subprocess.Popen([sys.executable, "-c", paused], env=env, cwd=ROOT, text=True,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert loader.stdout.readline() == "applied\n"
    watch = psycopg.connect(postgres.conninfo(database), autocommit=True)
    # inside its transaction the table exists, renamed from the scratch table, with its key
    loader.send_signal(signal.SIGKILL)
    loader.wait(timeout=30)
    waiting = "SELECT 1 FROM pg_stat_activity WHERE application_name = 'sessions-export load'"
    for _ in range(600):  # the server notices the dead client and rolls its transaction back
        if not watch.execute(waiting).fetchall():
            break
        time.sleep(0.1)
    watch.close()
    assert query(postgres, database, "SELECT to_regclass('sessions'), "
                 "to_regclass('sessions_export_loads')") == [(None, None)]
    # the staged rows outlive the killed load in the scratch table, marked as such…
    assert query(postgres, database, "SELECT count(*) FROM sessions_export_stage") == [(300,)]

    resumed = load_pg(postgres, database, output)
    assert resumed.returncode == 0, resumed.stderr
    assert "1 new runs" in resumed.stdout and "300 sessions inserted" in resumed.stdout
    assert_table_matches_parquet(table_rows(postgres, database), output)
    # …until the next load drops it
    assert query(postgres, database, "SELECT to_regclass('sessions_export_stage')") == [(None,)]


def test_a_failed_staging_copy_is_one_error_and_leaves_nothing(postgres, database, monkeypatch):
    for name, value in postgres.env(database).items():
        monkeypatch.setenv(name, value)
    at = datetime(2026, 3, 4, tzinfo=UTC)
    row = {f.name: None for f in SCHEMA} | {"created_at": at, "extracted_at": at, "run_id": "r"}
    good, bad = (pa.Table.from_pylist([row | {"id": sid, "metadata": text}], SCHEMA)
                 .append_column("created_date", pa.array([at.date()], pa.date32()))
                 for sid, text in (("s1", "{}"), ("s2", "{not json")))
    target = PostgresTarget(None, "public", "sessions")
    target.open()
    with pytest.raises(StorageError, match="invalid input syntax for type json") as error:
        for partition in (good, bad, good, good, good, good):
            target.stage(partition)
        target.merge()
    assert "\n" not in str(error.value)
    target.close()
    assert query(postgres, database, "SELECT to_regclass('sessions'), "
                 "to_regclass('sessions_export_stage')") == [(None, None)]


@pytest.mark.parametrize(("command", "module", "package", "extra"), [
    (("load", "duckdb", "--database", "w.duckdb"), "duckdb", "duckdb", "duckdb"),
    (("load", "postgres"), "adbc_driver_postgresql", "adbc-driver-postgresql", "postgres"),
])
def test_a_missing_driver_says_which_install_brings_it(tmp_path, command, module, package,
                                                       extra):
    # the real CLI, in a Python where importing the driver fails as if it were not installed
    shim = (f"import sys; sys.modules[{module!r}] = None; "
            "from pipeline.cli import main; main()")
    result = subprocess.run(
        [sys.executable, "-c", shim, *command, "--output", str(tmp_path / "out")],
        cwd=ROOT, text=True, capture_output=True, timeout=120)
    assert result.returncode == 2, result
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and "unexpected error" not in line
    assert f"needs the {package} package" in line
    assert f"pip install -e '{ROOT}[{extra}]'" in line  # this checkout is installed editable


@pytest.mark.parametrize(("dsn", "keys"), [
    ("postgresql://loader@db.internal:5432/analytics?sslmode=require",
     {"user", "sslmode"}),
    ("postgres://loader:secret@db/analytics", {"user", "password"}),
    ("postgresql://db/analytics?password=secret&user=loader", {"password", "user"}),
    ("postgresql://", set()),
    ("host=db dbname=analytics user=loader", {"host", "dbname", "user"}),
    ("host = db  application_name='a b \\' c'", {"host", "application_name"}),
    ("service=warehouse password='p w'", {"service", "password"}),
])
def test_dsn_keys_finds_a_password_in_either_form(dsn, keys):
    assert dsn_keys(dsn) == keys


@pytest.mark.parametrize("dsn", ["host=db password='unterminated", "just-a-word", "=x"])
def test_dsn_keys_refuses_what_libpq_would_not_parse(dsn):
    with pytest.raises(ValueError):
        dsn_keys(dsn)
