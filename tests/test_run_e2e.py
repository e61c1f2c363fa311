"""`sessions-export run` end to end: the real CLI against the emulator over HTTP."""

from __future__ import annotations

import fcntl
import json
import os
import time

import duckdb
import pyarrow.parquet as pq
import pytest

from pipeline.dataset.schema import SCHEMA
from tests.conftest import (
    ROOT,
    api,
    assert_dataset_equals,
    data_files,
    emulator_sessions,
    emulator_stats,
    read_dataset,
    reset_stats,
    run_cli,
    spawn_cli,
)


def test_first_run_exports_every_session_exactly(emulator, output):
    emu = emulator(sessions=2500, seed=3, days=20, list_trigger_config="include")
    result = run_cli("run", "--output", str(output), "--flush-rows", "700", url=emu.url)
    assert result.returncode == 0, result.stderr
    assert "2500 sessions" in result.stdout
    sessions = emulator_sessions(emu.url)
    assert len(sessions) == 2500
    assert_dataset_equals(output, sessions)
    # exactly one row per session after a single run: nothing lost, nothing invented
    assert read_dataset(output).num_rows == 2500
    for path in data_files(output):
        assert pq.read_schema(path).equals(SCHEMA)
        assert pq.ParquetFile(path).metadata.row_group(0).column(0).compression == "ZSTD"


def test_partitions_follow_created_date_and_duckdb_reads_them(emulator, output):
    emu = emulator(sessions=800, seed=5, days=10, list_trigger_config="include")
    assert run_cli("run", "--output", str(output), url=emu.url).returncode == 0
    glob = str(output / "sessions" / "*" / "*.parquet")
    wrong, total = duckdb.connect().execute(
        f"SELECT count(*) FILTER (WHERE created_date <> CAST(created_at AT TIME ZONE 'UTC' AS DATE)),"
        f" count(*) FROM read_parquet('{glob}', hive_partitioning = true)"
    ).fetchone()
    assert (wrong, total) == (0, 800)
    names = {p.name for p in data_files(output)}
    assert all(n.startswith("part-") and n.endswith("-00000.parquet") for n in names)


def test_trigger_config_omitted_from_lists_is_fetched_once_per_session(emulator, output):
    emu = emulator(sessions=300, seed=11, list_trigger_config="omit")
    result = run_cli("run", "--output", str(output), "--rescan", "60d", url=emu.url)
    assert result.returncode == 0, result.stderr
    assert_dataset_equals(output, emulator_sessions(emu.url))
    stats = emulator_stats(emu.url)
    assert stats["by_kind"]["get"] == 300  # one GET per session, no more
    manifest = json.loads(next((output / "_runs").glob("*.json")).read_text())
    assert manifest["extra"]["trigger_config"]["single_fetches"] == 300

    reset_stats(emu.url)
    second = run_cli("run", "--output", str(output), "--rescan", "60d", url=emu.url)
    assert second.returncode == 0, second.stderr
    assert emulator_stats(emu.url)["by_kind"].get("get", 0) == 0  # known from the dataset


def test_enrichment_can_be_turned_off(emulator, output):
    emu = emulator(sessions=300, seed=11, list_trigger_config="omit")
    result = run_cli("run", "--output", str(output), "--no-enrich-trigger-config", url=emu.url)
    assert result.returncode == 0, result.stderr
    assert_dataset_equals(output, emulator_sessions(emu.url), with_config=False)
    assert emulator_stats(emu.url)["by_kind"].get("get", 0) == 0


def test_manifest_and_checkpoint_after_a_run(emulator, output):
    emu = emulator(sessions=500, seed=2)
    assert run_cli("run", "--output", str(output), "--flush-rows", "200", url=emu.url).returncode == 0
    manifests = list((output / "_runs").glob("*.json"))
    assert len(manifests) == 1
    manifest = json.loads(manifests[0].read_text())
    parts = manifest["extra"]["parts"]
    # the keyset walk re-reads the row(s) at each page's oldest millisecond: 6 pages, not 5
    assert manifest["rows"] == 500 and parts["window"]["pages"] == 6
    # a walk of the whole history meets every live session: no ACTIVE listing needed
    assert parts["active"]["pages"] == 0 and manifest["extra"]["active_sessions"] > 0
    assert manifest["pages"] == 6
    fetches = manifest["extra"]["trigger_config"]["single_fetches"]
    assert fetches == 500  # list rows omit triggerConfig: one GET per session
    assert manifest["requests"] == manifest["pages"] + fetches + manifest["retries"]
    assert sorted(manifest["files"]) == sorted(
        str(p.relative_to(output)) for p in data_files(output))
    state = run_cli("state", "show", "--json", "--output", str(output))
    checkpoint = json.loads(state.stdout)
    assert checkpoint["in_progress"] is None
    newest = max(s["createdAt"] for s in emulator_sessions(emu.url))
    assert manifest["high_water"] == newest


@pytest.mark.slow
def test_second_run_with_nothing_new_is_cheap(emulator, output):
    emu = emulator(sessions=3000, seed=4)
    assert run_cli("run", "--output", str(output), url=emu.url).returncode == 0
    reset_stats(emu.url)
    second = run_cli("run", "--output", str(output), url=emu.url)
    assert second.returncode == 0, second.stderr
    manifest = json.loads((output / "_runs" / f"{second.stdout.split()[1]}.json").read_text())
    # the re-read window, plus one listing of the ACTIVE sessions (change capture), plus
    # the final state of sessions that expired in between
    parts = manifest["extra"]["parts"]
    assert parts["window"]["pages"] <= 2
    assert emulator_stats(emu.url)["requests"] == manifest["requests"] == (
        parts["window"]["pages"] + parts["active"]["pages"] + parts["departed"]["pages"]
        + parts["departed"]["single_fetches"])
    assert "0 sessions" in second.stdout  # versions already stored are not written again
    assert read_dataset(output).num_rows == 3000
    assert_dataset_equals(output, emulator_sessions(emu.url))

    reset_stats(emu.url)
    lean = run_cli("run", "--output", str(output), "--no-track-active", url=emu.url)
    assert lean.returncode == 0, lean.stderr
    assert emulator_stats(emu.url)["requests"] <= 3  # the window alone: a handful


@pytest.mark.slow
def test_new_sessions_are_picked_up_by_the_next_run(emulator, output):
    emu = emulator(sessions=400, seed=8)
    assert run_cli("run", "--output", str(output), url=emu.url).returncode == 0
    for n in range(30):
        api(emu.url, "POST", "", {"type": "chat.agent", "taskIdentifier": "late",
                                  "externalId": f"late-{n}"})
    second = run_cli("run", "--output", str(output), url=emu.url)
    assert second.returncode == 0, second.stderr
    assert_dataset_equals(output, emulator_sessions(emu.url))


@pytest.mark.slow
def test_interrupted_run_resumes_from_its_checkpoint(emulator, output):
    emu = emulator(sessions=3000, seed=9, latency_ms=15)
    process = spawn_cli("run", "--output", str(output), "--flush-rows", "300", url=emu.url)
    checkpoint = output / "_state" / "checkpoint.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if checkpoint.exists():
            progress = json.loads(checkpoint.read_text()).get("in_progress") or {}
            if progress.get("flush_seq", 0) >= 2:
                break
        time.sleep(0.02)
    process.kill()
    process.wait()
    progress = json.loads(checkpoint.read_text())["in_progress"]
    assert progress is not None and progress["walk"], "killed too late to test a resume"

    resumed = run_cli("run", "--output", str(output), "--flush-rows", "300", url=emu.url)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout and progress["run_id"] in resumed.stdout
    sessions = emulator_sessions(emu.url)
    assert_dataset_equals(output, sessions)
    assert read_dataset(output).num_rows == len(sessions)  # overwritten, not duplicated


def test_filters_are_sent_one_value_each(emulator, output):
    emu = emulator(sessions=600, seed=12)
    sessions = emulator_sessions(emu.url)
    kind = sessions[0]["type"]
    result = run_cli("run", "--output", str(output), "--type", kind, url=emu.url)
    assert result.returncode == 0, result.stderr
    assert_dataset_equals(output, [s for s in sessions if s["type"] == kind])


def test_comma_joined_filter_is_refused_before_any_request(emulator, output):
    emu = emulator(sessions=10)
    result = run_cli("run", "--output", str(output), "--tags", "a,b", url=emu.url)
    assert result.returncode == 2
    assert "one value per filter" in result.stderr
    assert "Traceback" not in result.stderr
    assert emulator_stats(emu.url)["requests"] == 0
    assert not output.exists()


def test_second_concurrent_run_exits_75(emulator, output):
    emu = emulator(sessions=10)
    lock = output / "_state" / "lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        result = run_cli("run", "--output", str(output), url=emu.url)
    assert result.returncode == 75
    assert "another export holds the lock" in result.stderr
    assert run_cli("run", "--output", str(output), url=emu.url).returncode == 0


@pytest.mark.slow
def test_lock_of_a_killed_run_does_not_block(emulator, output):
    emu = emulator(sessions=2000, latency_ms=20)
    process = spawn_cli("run", "--output", str(output), "--flush-rows", "100", url=emu.url)
    deadline = time.monotonic() + 30
    while not (output / "_state" / "checkpoint.json").exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    process.kill()
    process.wait()
    result = run_cli("run", "--output", str(output), url=emu.url)
    assert result.returncode == 0, result.stderr


@pytest.mark.slow
def test_compact_keeps_the_latest_version_of_each_session(emulator, output):
    emu = emulator(sessions=500, seed=21, list_trigger_config="include")
    assert run_cli("run", "--output", str(output), "--lookback", "60d", url=emu.url).returncode == 0
    sessions = emulator_sessions(emu.url)
    for session in sessions[:40]:
        api(emu.url, "PATCH", f"/{session['id']}", {"metadata": {"changed": True, "by": "test"}})
    assert run_cli("run", "--output", str(output), "--lookback", "60d", url=emu.url).returncode == 0
    before = read_dataset(output).num_rows
    assert before == 540  # the 60-day lookback re-read all 500; only the 40 changed were written

    result = run_cli("compact", "--output", str(output))
    assert result.returncode == 0, result.stderr
    table = read_dataset(output)
    assert table.num_rows == 500
    latest = assert_dataset_equals(output, emulator_sessions(emu.url))
    assert json.loads(latest[sessions[0]["id"]]["metadata"]) == {"changed": True, "by": "test"}
    assert run_cli("verify", "--strict", "--output", str(output)).returncode == 0
    again = run_cli("compact", "--output", str(output))
    assert "0 of" in again.stdout  # nothing changed since: nothing rewritten


def test_verify_passes_a_good_dataset_and_flags_bad_files(emulator, output):
    emu = emulator(sessions=300, seed=13)
    assert run_cli("run", "--output", str(output), url=emu.url).returncode == 0
    good = run_cli("verify", "--output", str(output))
    assert good.returncode == 0, good.stdout + good.stderr
    assert "OK" in good.stdout

    partition = data_files(output)[0].parent
    (partition / "part-garbage-00000.parquet").write_bytes(b"not parquet at all")
    (output / "sessions" / "notes.txt").write_text("stray")
    bad = run_cli("verify", "--output", str(output))
    assert bad.returncode == 6
    assert "unreadable file" in bad.stdout and "stray file" in bad.stdout


def test_missing_or_rejected_key_exits_3_without_traceback(emulator, output):
    emu = emulator(sessions=10, api_keys=("tr_dev_the_only_good_key",))
    missing = run_cli("run", "--output", str(output), url=emu.url, key=None)
    assert missing.returncode == 3 and "TRIGGER_SECRET_KEY" in missing.stderr
    rejected = run_cli("run", "--output", str(output), url=emu.url, key="tr_dev_wrong_key_123")
    assert rejected.returncode == 3
    assert "tr_dev_wrong_key_123" not in rejected.stderr + rejected.stdout
    assert "Traceback" not in rejected.stderr
    state = output / "_state" / "checkpoint.json"
    assert not state.exists() or json.loads(state.read_text())["high_water_ms"] is None
    assert not data_files(output) if (output / "sessions").exists() else True
    assert os.environ.get("TRIGGER_SECRET_KEY") != "tr_dev_wrong_key_123"


QUERYING_DOC = ROOT / "docs" / "querying.md"  # its DuckDB recipe is run below


@pytest.mark.slow
def test_documented_duckdb_query_returns_the_latest_version_of_each_session(emulator, output):
    page = QUERYING_DOC.read_text()
    section = page[page.index("### DuckDB"):]
    sql = section[section.index("```sql") + len("```sql"):section.index("```", section.index("```sql") + 6)]
    emu = emulator(sessions=400, seed=14, list_trigger_config="include")
    assert run_cli("run", "--output", str(output), "--rescan", "60d", url=emu.url).returncode == 0
    for session in emulator_sessions(emu.url)[:20]:
        api(emu.url, "PATCH", f"/{session['id']}", {"tags": ["readme"]})
    assert run_cli("run", "--output", str(output), "--rescan", "60d", url=emu.url).returncode == 0
    assert read_dataset(output).num_rows == 420  # two versions of 20 sessions
    query = sql.replace("output/sessions", str(output / "sessions")).rstrip().rstrip(";")
    connection = duckdb.connect()
    rows = connection.execute(f"SELECT id, tags FROM ({query})").fetchall()
    truth = {s["id"]: s["tags"] for s in emulator_sessions(emu.url)}
    assert dict(rows) == truth
