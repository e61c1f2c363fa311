"""`sessions-export load duckdb`: the real CLI exporting from the emulator, then loading."""

from __future__ import annotations

import duckdb
import pytest

from pipeline.dataset.layout import DataFile
from pipeline.dataset.load import files_to_read
from tests.conftest import api, assert_row_matches, emulator_sessions, run_cli


def table_rows(database) -> dict[str, dict]:
    con = duckdb.connect(str(database), read_only=True)
    try:
        con.execute("SET TimeZone = 'UTC'")
        cursor = con.execute(
            "SELECT * REPLACE (CAST(created_date AS VARCHAR) AS created_date) FROM sessions")
        names = [d[0] for d in cursor.description]
        rows = [dict(zip(names, values, strict=True)) for values in cursor.fetchall()]
    finally:
        con.close()
    by_id = {row["id"]: row for row in rows}
    assert len(by_id) == len(rows), "the table holds one row per session"
    return by_id


def loaded_runs(database) -> list[str]:
    con = duckdb.connect(str(database), read_only=True)
    try:
        return [r[0] for r in con.execute(
            "SELECT run_id FROM sessions_export_loads ORDER BY run_id").fetchall()]
    finally:
        con.close()


def assert_table_equals(database, sessions: list[dict]) -> dict[str, dict]:
    rows = table_rows(database)
    assert set(rows) == {s["id"] for s in sessions}
    for session in sessions:
        assert_row_matches(rows[session["id"]], session)
    return rows


@pytest.mark.slow
def test_load_twice_changes_nothing_and_later_runs_apply_their_changes(emulator, tmp_path):
    emu = emulator(sessions=600, seed=41, days=8, list_trigger_config="include")
    output, database = tmp_path / "out", tmp_path / "warehouse.duckdb"
    assert run_cli("run", "--output", str(output), url=emu.url).returncode == 0

    first = run_cli("load", "duckdb", "--output", str(output), "--database", str(database))
    assert first.returncode == 0, first.stderr
    assert "1 new runs" in first.stdout and "holds 600 sessions" in first.stdout
    before = assert_table_equals(database, emulator_sessions(emu.url))

    again = run_cli("load", "duckdb", "--output", str(output), "--database", str(database))
    assert again.returncode == 0, again.stderr
    assert "nothing new" in again.stdout
    assert table_rows(database) == before

    sessions = emulator_sessions(emu.url)
    changed = sorted(sessions, key=lambda s: s["createdAt"])[-15:]
    for session in changed:
        api(emu.url, "PATCH", f"/{session['id']}", {"metadata": {"version": 2}})
    for n in range(10):
        api(emu.url, "POST", "", {"type": "chat.agent", "taskIdentifier": "late",
                                  "externalId": f"late-{n}"})
    assert run_cli("run", "--output", str(output), url=emu.url).returncode == 0
    third = run_cli("load", "duckdb", "--output", str(output), "--database", str(database))
    assert third.returncode == 0, third.stderr
    assert "1 new runs" in third.stdout and "10 sessions inserted, 15 updated" in third.stdout
    rows = assert_table_equals(database, emulator_sessions(emu.url))
    assert all(rows[s["id"]]["metadata"] in ('{"version":2}', '{"version": 2}') for s in changed)
    assert len(loaded_runs(database)) == 2


@pytest.mark.slow
def test_load_copes_with_files_compact_replaced(emulator, tmp_path):
    emu = emulator(sessions=300, seed=42, days=5, list_trigger_config="include")
    output, database = tmp_path / "out", tmp_path / "w.duckdb"
    assert run_cli("run", "--output", str(output), "--lookback", "30d", url=emu.url).returncode == 0
    for session in emulator_sessions(emu.url)[:30]:
        api(emu.url, "PATCH", f"/{session['id']}", {"metadata": {"compacted": "later"}})
    assert run_cli("run", "--output", str(output), "--lookback", "30d", url=emu.url).returncode == 0
    assert run_cli("compact", "--output", str(output)).returncode == 0  # deletes listed files

    result = run_cli("load", "duckdb", "--output", str(output), "--database", str(database))
    assert result.returncode == 0, result.stderr
    assert "2 new runs" in result.stdout
    assert_table_equals(database, emulator_sessions(emu.url))
    assert len(loaded_runs(database)) == 2

    con = duckdb.connect(str(database))
    con.execute("DROP TABLE sessions")
    con.close()
    rebuilt = run_cli("load", "duckdb", "--output", str(output), "--database", str(database))
    assert rebuilt.returncode == 0 and "2 new runs" in rebuilt.stdout, rebuilt.stderr
    assert_table_equals(database, emulator_sessions(emu.url))


def test_files_to_read_prefers_a_runs_own_files_until_compact_replaced_them():
    def data(path: str) -> DataFile:
        return DataFile(path, path.split("/")[1].split("=")[1], 1)

    a1 = "sessions/created_date=2026-01-01/part-r1-00000.parquet"
    a2 = "sessions/created_date=2026-01-01/part-r2-00000.parquet"
    b1 = "sessions/created_date=2026-01-02/part-r2-00000.parquet"
    bc = "sessions/created_date=2026-01-02/part-cX-00000.parquet"
    current = {"2026-01-01": [data(a1), data(a2)], "2026-01-02": [data(bc)]}
    plan = files_to_read([{"run_id": "r2", "files": [a2, b1]}], current)
    assert plan == {"2026-01-01": [a2], "2026-01-02": [bc]}
    assert files_to_read([{"run_id": "r3", "files": []}], current) == {}


def test_load_needs_a_database(tmp_path):
    result = run_cli("load", "duckdb", "--output", str(tmp_path / "out"))
    assert result.returncode == 2 and "--database" in result.stderr


def test_an_existing_table_with_other_columns_is_refused(tmp_path):
    database = tmp_path / "w.duckdb"
    con = duckdb.connect(str(database))
    con.execute("CREATE TABLE sessions (id VARCHAR, type INTEGER, note VARCHAR)")
    con.close()
    result = run_cli("load", "duckdb", "--output", str(tmp_path / "out"), "--database",
                     str(database))
    assert result.returncode == 2, result
    assert "lacks column task_identifier VARCHAR" in result.stderr
    assert "has column note VARCHAR" in result.stderr
    assert "column type is INTEGER, expected VARCHAR" in result.stderr
