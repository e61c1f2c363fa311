"""`--table-format delta` end to end: the real CLI against the real emulator over HTTP, the
two Delta tables read back and compared with the emulator's truth, field by field."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from deltalake import DeltaTable

from pipeline.dataset.delta import LATEST_DIR, VERSIONS_DIR, DeltaOutput, DeltaSink, recover
from pipeline.dataset.flatten import flatten_sessions
from pipeline.timestamps import parse_timestamp_ms
from tests.conftest import (
    KEY,
    ROOT,
    api,
    assert_row_matches,
    emulator_sessions,
    keys,
    run_cli,
    s3_cli,
    spawn_cli,
)

DELTA = ("--table-format", "delta")
SKEWED = {"seed": 3, "id_skew_ms": 25}  # ids out of createdAt order


def table_rows(uri: str, options: dict[str, str] | None = None) -> list[dict]:
    """A Delta table's rows as dicts, `created_date` as an ISO date (as the Parquet reader)."""
    rows = DeltaTable(uri, storage_options=options).to_pyarrow_table().to_pylist()
    for row in rows:
        row["created_date"] = row["created_date"].isoformat()
    return rows


def assert_tables_exact(output: str, snapshots: list[list[dict]],
                        options: dict[str, str] | None = None) -> None:
    """`sessions` equals the last snapshot; `sessions_versions` holds exactly the versions of
    every snapshot (the emulator's state after each run), each once, field by field."""
    latest = table_rows(f"{output}/{LATEST_DIR}", options)
    truth = {s["id"]: s for s in snapshots[-1]}
    assert len(latest) == len(truth) == len({r["id"] for r in latest})
    for row in latest:
        assert_row_matches(row, truth[row["id"]])
    seen = {(s["id"], s["updatedAt"]): s for snapshot in snapshots for s in snapshot}
    history = table_rows(f"{output}/{VERSIONS_DIR}", options)
    found = [(r["id"], None if r["updated_at"] is None else _iso(r["updated_at"])) for r in history]
    assert len(found) == len(set(found)), "a version stored twice"
    assert set(found) == set(seen)
    for row, key in zip(history, found, strict=True):
        assert_row_matches(row, seen[key])


def _iso(value) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def change_some(url: str, sessions: list[dict], seed: int, count: int = 30) -> None:
    """Upserts, closes and updates through the API, as test_changes_e2e does."""
    soon = int(time.time() * 1000) + 3_600_000  # still ACTIVE a moment from now
    live = [s for s in sessions if s["closedAt"] is None
            and (s["expiresAt"] is None or parse_timestamp_ms(s["expiresAt"]) > soon)]
    chosen = random.Random(seed).sample(live, min(count, len(live)))
    for session in chosen[: count // 3]:
        api(url, "POST", f"/{session['id']}/close", {"reason": "test closed it"})
    for session in chosen[count // 3 :]:
        api(url, "PATCH", f"/{session['id']}", {"metadata": {"edited": seed}})
    for n in range(count // 3):
        api(url, "POST", "", {"type": "chat.agent", "taskIdentifier": "fresh",
                              "externalId": f"fresh-{seed}-{n}", "tags": ["new"]})


@pytest.mark.slow
def test_runs_and_backfill_are_exact_through_skew_enrichment_and_changes(emulator, tmp_path):
    emu = emulator(sessions=2500, days=3, **SKEWED)  # lists omit triggerConfig: enrichment
    output = str(tmp_path / "run")
    snapshots = []
    for round_ in range(3):
        if snapshots:
            change_some(emu.url, snapshots[-1], seed=round_)
        result = run_cli("run", "--output", output, *DELTA, "--flush-rows", "400", url=emu.url)
        assert result.returncode == 0, result.stderr
        snapshots.append(emulator_sessions(emu.url))
        assert_tables_exact(output, snapshots)
    manifest = Path(output, "_runs").glob("*.json")
    assert all("/_delta_log/" in p.read_text() for p in manifest)

    truth = snapshots[-1]
    back = str(tmp_path / "backfill")
    since = min(s["createdAt"] for s in truth)
    until = max(s["createdAt"] for s in truth)
    result = run_cli("backfill", "--output", back, *DELTA, "--since", since, "--until", until,
                     "--concurrency", "4", "--flush-rows", "400", url=emu.url)
    assert result.returncode == 0, result.stderr
    assert_tables_exact(back, [truth])


def test_export_from_python_writes_delta(emulator, tmp_path, monkeypatch):
    from pipeline import export

    emu = emulator(sessions=600, days=2, list_trigger_config="include")
    monkeypatch.setenv("TRIGGER_SECRET_KEY", KEY)
    output = str(tmp_path / "out")
    summary = export(output=output, api_url=emu.url, table_format="delta", flush_rows=200)
    assert summary.rows == 600
    assert_tables_exact(output, [emulator_sessions(emu.url)])


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_is_exact(emulator, tmp_path):
    emu = emulator(sessions=4000, days=6, **SKEWED)
    output = str(tmp_path / "out")
    chance = random.Random(19)
    snapshots: list[list[dict]] = []
    resumes = []
    for kill in range(22):
        command = "run" if kill < 15 else "backfill"
        extra = () if command == "run" else ("--since", "30d", "--concurrency", "3")
        if command == "backfill" and kill % 2:
            extra += ("--restart",)  # the interrupted backfill's half-done flush is finished
        process = spawn_cli(command, "--output", output, *DELTA, "--flush-rows", "300", *extra,
                            url=emu.url)
        time.sleep(chance.uniform(0.3, 1.8) if command == "run" else chance.uniform(0.4, 1.2))
        process.send_signal(signal.SIGKILL)
        resumes.append("resuming" in process.communicate()[1])
        if kill in (5, 10):  # a run may have finished: the emulator changes between runs
            assert run_cli("run", "--output", output, *DELTA, url=emu.url).returncode == 0
            snapshots.append(emulator_sessions(emu.url))
            change_some(emu.url, snapshots[-1], seed=kill)
    finish = run_cli("backfill", "--output", output, *DELTA, "--since", "30d", url=emu.url)
    assert finish.returncode == 0 or "already completed" in finish.stderr, finish.stderr
    result = run_cli("run", "--output", output, *DELTA, url=emu.url)
    assert result.returncode == 0, result.stderr
    snapshots.append(emulator_sessions(emu.url))
    assert_tables_exact(output, snapshots)
    assert sum(resumes[:15]) >= 3  # runs were killed inside their walk and resumed


def test_all_environments_write_their_own_delta_tables(emulator, tmp_path):
    emu = emulator(sessions=500, days=2, list_trigger_config="include")
    lines = [f'api_url = "{emu.url}"', 'table_format = "delta"', "flush_rows = 150", ""]
    for name in ("alpha", "beta"):
        lines += [f"[environments.{name}]", f'output = "{tmp_path / name}"']
    config = tmp_path / "environments.toml"
    config.write_text("\n".join(lines) + "\n")
    result = run_cli("run", "--config", str(config), "--all-environments", "--parallel", "2")
    assert result.returncode == 0, result.stderr
    truth = emulator_sessions(emu.url)
    for name in ("alpha", "beta"):
        assert_tables_exact(str(tmp_path / name), [truth])
        assert not list(Path(tmp_path, name, "sessions").glob("*/part-2*.parquet"))


def files_per_day(output: str) -> dict[str, int]:
    """How many data files `sessions` holds in each `created_date` partition."""
    days = DeltaTable(f"{output}/{LATEST_DIR}").get_add_actions(flatten=True)
    counts: dict[str, int] = {}
    for day in days.column("partition.created_date").to_pylist():
        counts[str(day)] = counts.get(str(day), 0) + 1
    return counts


def test_run_compact_bin_packs_only_the_days_the_run_touched(emulator, tmp_path):
    emu = emulator(sessions=900, days=4, list_trigger_config="include")
    output = str(tmp_path / "out")
    first = run_cli("run", "--output", output, *DELTA, "--flush-rows", "60", url=emu.url)
    assert first.returncode == 0, first.stderr
    before = files_per_day(output)
    assert min(before.values()) > 1  # small flushes: several files in every partition
    for n in range(5):  # created now: only today's partition changes
        api(emu.url, "POST", "", {"type": "chat.agent", "taskIdentifier": "fresh",
                                  "externalId": f"fresh-{n}"})
    second = run_cli("run", "--output", output, *DELTA, "--compact", url=emu.url)
    assert second.returncode == 0, second.stderr
    assert "compact sessions: " in second.stdout, second.stdout
    manifest = max(Path(output, "_runs").glob("*.json"), key=lambda p: p.stat().st_mtime)
    touched = set(json.loads(manifest.read_text())["partitions"])
    after = files_per_day(output)
    assert touched and set(after) - touched, (touched, after)
    assert all(after[day] == 1 for day in touched), after
    assert all(after[day] == before[day] for day in set(after) - touched), (before, after)
    assert_tables_exact(output, [emulator_sessions(emu.url)])


def run_commit_days(output: str, run_id: str) -> set[str]:
    """The partitions every commit of `run_id` (its app transactions) added files to."""
    days: set[str] = set()
    for name in (LATEST_DIR, VERSIONS_DIR):
        for entry in sorted(Path(output, name, "_delta_log").glob("*.json")):
            actions = [json.loads(line) for line in entry.read_text().splitlines() if line]
            if any(a.get("txn", {}).get("appId") == run_id for a in actions):
                days |= {a["add"]["partitionValues"]["created_date"] for a in actions if "add" in a}
    return days


def test_a_resume_reports_the_flushes_committed_after_its_last_checkpoint(emulator, gate,
                                                                         tmp_path):
    """A kill between a flush's commits and the job's checkpoint (made here by putting back
    an older checkpoint after a kill -9): the resumed run's manifest still names the
    partitions of those commits, which `run --compact` bin-packs, and counts their rows."""
    emu = emulator(sessions=3000, days=6, list_trigger_config="include")
    held = gate(emu.url, 14)
    output = str(tmp_path / "out")
    state = Path(output, "_state", "checkpoint.json")
    first = spawn_cli("run", "--output", output, *DELTA, "--flush-rows", "100", url=held.url)
    kept: list[str] = []
    deadline = time.monotonic() + 60
    while not held.waiting:
        assert time.monotonic() < deadline and first.poll() is None, "the run never waited"
        text = state.read_text() if state.exists() else ""
        if '"flush_seq"' in text and (not kept or kept[-1] != text):
            kept.append(text)
        time.sleep(0.005)
    time.sleep(0.5)  # the walk's last pages reach the tables
    first.send_signal(signal.SIGKILL)
    first.communicate()
    last = state.read_text()
    older = [t for t in kept if t != last
             and (json.loads(t)["in_progress"] or {}).get("flush_seq", 0) >= 1]
    assert older, "no checkpoint older than the last was seen"
    state.write_text(older[0])  # the flushes after it: committed, not checkpointed
    run_id = json.loads(older[0])["in_progress"]["run_id"]
    resumed = run_cli("run", "--output", output, *DELTA, "--compact", url=emu.url)
    assert resumed.returncode == 0 and "resuming" in resumed.stderr, resumed.stderr
    manifest = json.loads(Path(output, "_runs", f"{run_id}.json").read_text())
    assert run_commit_days(output, run_id) <= set(manifest["partitions"]), manifest
    # its count: every version the run wrote, on either attempt, and no more
    history = DeltaTable(f"{output}/{VERSIONS_DIR}").to_pyarrow_table(columns=["run_id"])
    assert manifest["rows"] == history["run_id"].to_pylist().count(run_id), manifest
    assert_tables_exact(output, [emulator_sessions(emu.url)])


@pytest.mark.slow
def test_a_second_run_exits_75_and_nothing_is_lost(emulator, gate, tmp_path):
    emu = emulator(sessions=1500, days=2, list_trigger_config="include")
    held = gate(emu.url, 4)
    output = str(tmp_path / "out")
    first = spawn_cli("run", "--output", output, *DELTA, "--flush-rows", "200", url=held.url)
    deadline = time.monotonic() + 30
    while not held.waiting:
        assert time.monotonic() < deadline and first.poll() is None, "first run never waited"
        time.sleep(0.05)
    second = run_cli("run", "--output", output, *DELTA, url=emu.url)
    assert second.returncode == 75, second.stderr
    held.open()
    _, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert_tables_exact(output, [emulator_sessions(emu.url)])


@pytest.mark.slow
def test_two_writers_racing_on_the_tables_lose_nothing(emulator, tmp_path):
    emu = emulator(sessions=1200, days=2, list_trigger_config="include")
    output = str(tmp_path / "out")
    # separate state stores: the run lock is bypassed, only Delta's concurrency control fences
    racers = [spawn_cli("run", "--output", output, *DELTA, "--state", str(tmp_path / f"s{n}"),
                        "--flush-rows", "100", url=emu.url) for n in range(2)]
    codes = [(p.wait(timeout=120), p.stderr.read() if p.stderr else "") for p in racers]
    for code, err in codes:
        assert code in (0, 5), err  # done, or a clean conflict error (exit 5, one line)
        assert "Traceback" not in err
    for n, (code, _) in enumerate(codes):
        if code != 0:  # the failed one finishes on its own state
            again = run_cli("run", "--output", output, *DELTA, "--state", str(tmp_path / f"s{n}"),
                            url=emu.url)
            assert again.returncode == 0, again.stderr
    assert_tables_exact(output, [emulator_sessions(emu.url)])


def test_in_process_writers_racing_on_one_partition_lose_nothing(tmp_path):
    from tests.delta_worker import batch, extracted

    out = DeltaOutput.at(tmp_path / "out")
    errors: list[BaseException] = []

    def write(app: str, seed: int) -> None:
        try:
            sink = DeltaSink(out, app, recover(out, app).generation, 1, 1 << 30)
            for index in range(6):
                sink.add(flatten_sessions(batch(seed, index), extracted(index), app))
                sink.flush(index)
        except BaseException as error:  # reported by the test
            errors.append(error)

    threads = [threading.Thread(target=write, args=(f"app-{n}", 7)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors, errors
    history = table_rows(out.table_uri(VERSIONS_DIR))
    found = [(r["id"], r["updated_at"]) for r in history]
    assert len(found) == len(set(found))  # the same versions from two writers, stored once
    latest = table_rows(out.table_uri(LATEST_DIR))
    assert len(latest) == len({r["id"] for r in latest})


@pytest.mark.slow
def test_the_run_flow_on_s3(emulator, s3):
    emu = emulator(sessions=900, days=2, **SKEWED)
    bucket = s3.new_bucket()
    output = f"s3://{bucket}/out"
    options = {"aws_endpoint_url": s3.endpoint, "aws_allow_http": "true",
               "aws_access_key_id": s3.env["AWS_ACCESS_KEY_ID"],
               "aws_secret_access_key": s3.env["AWS_SECRET_ACCESS_KEY"],
               "aws_region": s3.env.get("AWS_DEFAULT_REGION", "us-east-1")}
    snapshots: list[list[dict]] = []
    for round_ in range(2):
        if snapshots:
            change_some(emu.url, snapshots[-1], seed=round_)
        result = s3_cli("run", "--output", output, *DELTA, "--flush-rows", "300", url=emu.url,
                        aws=s3.env)
        assert result.returncode == 0, result.stderr
        snapshots.append(emulator_sessions(emu.url))
    assert_tables_exact(output, snapshots, options)
    assert any(k.startswith("out/_runs/") for k in keys(s3, bucket, "out/"))


def test_without_deltalake_the_run_exits_2_with_the_pip_command(tmp_path):
    blocker = tmp_path / "deltalake.py"
    blocker.write_text("raise ImportError('not installed')\n")
    env_path = str(tmp_path)
    result = subprocess.run(
        [sys.executable, "-c", f"import sys; sys.path.insert(0, {env_path!r}); "
         "from pipeline.cli import main; main(['run', '--output', "
         f"{str(tmp_path / 'o')!r}, '--table-format', 'delta'])"],
        capture_output=True, text=True, cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "TRIGGER_SECRET_KEY": KEY},
    )
    assert result.returncode == 2, result.stderr
    assert "pip install" in result.stderr and "[delta]" in result.stderr
