"""`sessions-export stats` checked against the data: the real CLI on an export of the
emulator with changed sessions, the expected numbers computed with DuckDB from the files."""

from __future__ import annotations

import csv
import io
import json
from collections import Counter

import duckdb
import pytest

from pipeline.dataset.stats import render
from tests.conftest import api, emulator_sessions, run_cli

LATEST = """
SELECT * FROM (
  SELECT *, row_number() OVER (PARTITION BY id
                               ORDER BY updated_at DESC NULLS LAST, extracted_at DESC) AS rn
  FROM read_parquet('{out}/sessions/*/*.parquet', hive_partitioning = true))
WHERE rn = 1
"""


def expected(out) -> dict[str, dict]:
    con = duckdb.connect()
    versions = dict(con.execute(
        f"SELECT created_date::VARCHAR, count(*) FROM read_parquet("
        f"'{out}/sessions/*/*.parquet', hive_partitioning = true) GROUP BY 1").fetchall())
    rows = con.execute(
        f"SELECT created_date::VARCHAR, type, closed_at IS NOT NULL, "
        f"closed_at IS NULL AND expires_at <= now() FROM ({LATEST.format(out=out)})").fetchall()
    days: dict[str, dict] = {}
    for day, kind, closed, expired in rows:
        entry = days.setdefault(day, {"sessions": 0, "closed": 0, "expired": 0, "types": Counter()})
        entry["sessions"] += 1
        entry["closed"] += closed
        entry["expired"] += bool(expired)
        entry["types"][kind or "(none)"] += 1
    for day, entry in days.items():
        entry["versions"] = versions[day]
        entry["active"] = entry["sessions"] - entry["closed"] - entry["expired"]
    return days


@pytest.mark.slow
def test_stats_match_the_dataset_in_every_format(emulator, output):
    emu = emulator(sessions=1500, seed=41, days=8)
    assert run_cli("run", "--output", str(output), url=emu.url).returncode == 0
    live = [s for s in emulator_sessions(emu.url) if not s["closedAt"]][:30]
    for session in live[:15]:
        api(emu.url, "POST", f"/{session['id']}/close", {"reason": "done"})
    for session in live[15:]:
        api(emu.url, "PATCH", f"/{session['id']}", {"metadata": {"edited": True}})
    assert run_cli("run", "--output", str(output), url=emu.url).returncode == 0

    want = expected(output)
    result = run_cli("stats", "--output", str(output), "--format", "json", key=None)
    assert result.returncode == 0, result.stderr
    got = json.loads(result.stdout)
    assert [r["created_date"] for r in got] == sorted(want)
    assert sum(r["versions"] for r in got) > sum(r["sessions"] for r in got) == 1500
    for row in got:
        day = want[row["created_date"]]
        for column in ("sessions", "versions", "active", "closed", "expired"):
            assert row[column] == day[column], (row["created_date"], column)
        counts = list(row["top_types"].values())
        assert len(counts) == min(3, len(day["types"])) and counts == sorted(counts, reverse=True)
        assert all(day["types"][kind] == n for kind, n in row["top_types"].items())
        assert counts[0] == max(day["types"].values())

    middle = sorted(want)[2:5]
    ranged = run_cli("stats", "--output", str(output), "--since", middle[0], "--until",
                     middle[-1], "--format", "csv", key=None)
    assert ranged.returncode == 0, ranged.stderr
    table = list(csv.DictReader(io.StringIO(ranged.stdout)))
    assert [r["created_date"] for r in table] == middle
    assert [int(r["sessions"]) for r in table] == [want[d]["sessions"] for d in middle]

    text = run_cli("stats", "--output", str(output), key=None)
    assert text.returncode == 0
    lines = text.stdout.splitlines()
    assert lines[0].split()[:3] == ["created_date", "sessions", "versions"]
    assert lines[-1].split()[:2] == ["total", "1500"]


def test_stats_of_an_empty_output_and_bad_options(tmp_path):
    empty = run_cli("stats", "--output", str(tmp_path / "none"), "--format", "json", key=None)
    assert empty.returncode == 0 and json.loads(empty.stdout) == []
    bad = run_cli("stats", "--output", str(tmp_path), "--format", "xml", key=None)
    assert bad.returncode == 2 and "format must be table, json, csv" in bad.stderr
    backwards = run_cli("stats", "--output", str(tmp_path), "--since", "2026-11-02",
                        "--until", "2026-11-01", key=None)
    assert backwards.returncode == 2 and "Traceback" not in backwards.stderr


def test_rendered_csv_and_table_carry_the_same_rows():
    rows = [{"created_date": "2026-11-01", "sessions": 3, "versions": 4, "active": 1,
             "closed": 1, "expired": 1, "top_types": {"chat": 2, "(none)": 1}}]
    assert render(rows, "csv").splitlines()[1] == "2026-11-01,3,4,1,1,1,chat:2 (none):1"
    assert render(rows, "table").splitlines()[1].split() == [
        "2026-11-01", "3", "4", "1", "1", "1", "chat:2", "(none):1"]
