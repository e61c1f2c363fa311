"""`state show` end to end: the real CLI after a finished run, while a run holds the lock,
after that run is killed with -9, beside a stopped backfill, per environment and on S3."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest

from pipeline.ops.state_view import utc
from pipeline.store.lock import LeaseTarget, lease_lock
from tests.conftest import gcs_cli, run_cli, s3_cli, spawn_cli


def show(*args: str) -> list[str]:
    result = run_cli("state", "show", *args, key=None)
    assert result.returncode == 0, result.stderr
    return result.stdout.splitlines()


def assert_json_form_unchanged(state: Path) -> None:
    """`--json` prints the checkpoint exactly as it is stored (as `state show` always did)."""
    result = run_cli("state", "show", "--json", "--output", str(state.parent), key=None)
    assert result.returncode == 0, result.stderr
    assert result.stdout == (state / "checkpoint.json").read_text() + "\n"


def wait_for(condition, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "the run never got there"
        time.sleep(0.05)


def test_finished_run(emulator, output):
    emu = emulator(sessions=400, seed=31)
    assert run_cli("run", "--output", str(output), url=emu.url).returncode == 0
    checkpoint = json.loads((output / "_state" / "checkpoint.json").read_text())
    lines = show("--output", str(output))
    assert lines[0] == f"state in {output / '_state'}"
    assert lines[1].startswith(f"  exported up to {utc(checkpoint['high_water_ms'])}, ")
    assert lines[1].endswith(" ago")
    assert lines[2].startswith(f"  last successful run {checkpoint['last_run_id']} at "
                               f"{utc(checkpoint['last_success_ms'])}, ")
    assert f"  {checkpoint['active_sessions']:,} active sessions watched" in lines
    assert "  no run in progress" in lines and lines[-1] == "  lock: free"
    assert_json_form_unchanged(output / "_state")


@pytest.mark.slow
def test_running_then_killed_run(emulator, output):
    emu = emulator(sessions=3000, seed=32, latency_ms=150)  # slow: the kill lands mid-walk
    process = spawn_cli("run", "--output", str(output), "--flush-rows", "100", url=emu.url)
    checkpoint = output / "_state" / "checkpoint.json"

    def walking() -> bool:
        if not checkpoint.exists():
            return False
        progress = json.loads(checkpoint.read_text()).get("in_progress") or {}
        return progress.get("flush_seq", 0) >= 1 and not progress.get("walk_complete")

    try:
        wait_for(walking)
        live = show("--output", str(output))
        assert any(line.startswith("  run in progress ") for line in live), live
        assert f"  lock: held by pid={process.pid} " in "\n".join(live) + " "
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    progress = json.loads(checkpoint.read_text())["in_progress"]
    lines = show("--output", str(output))
    text = "\n".join(lines)
    assert f"  interrupted run {progress['run_id']} (incremental), started " \
           f"{utc(progress['started_at_ms'])}, " in text
    assert "    listing: sessions created the beginning .. " \
           f"{utc(progress['window']['to_ms'])}" in text
    assert f"    position: walked down to {utc(progress['walk']['to_ms'])} " in text
    assert f"; {progress['rows']:,} rows so far" in text
    assert "    the next `run` resumes it there" in text
    assert lines[-1].startswith(f"  lock: free (last taken by pid={process.pid} ")
    assert "that process is gone" in lines[-1]
    assert_json_form_unchanged(output / "_state")


def test_backfill_in_progress(emulator, output):
    emu = emulator(sessions=4000, seed=33, days=20, latency_ms=100)
    process = spawn_cli("backfill", "--since", "30d", "--output", str(output), "--concurrency",
                        "3", "--flush-rows", "200", url=emu.url)
    state_dir = output / "_state"

    def flushed() -> bool:
        files = list(state_dir.glob("backfill-*.json"))
        return bool(files) and any(w["flush_seq"] for w in json.loads(
            files[0].read_text())["windows"])

    try:
        wait_for(flushed)
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait()
    state = json.loads(next(state_dir.glob("backfill-*.json")).read_text())
    left = [w for w in state["windows"] if not w["done"]]
    assert left, "killed too late to show a backfill in progress"
    text = "\n".join(show("--output", str(output)))
    assert "  nothing exported yet" in text  # a backfill never moves the checkpoint
    assert f"  backfill {utc(state['since_ms'])} .. {utc(state['until_ms'])} " \
           f"(run {state['run_id']}, started {utc(state['started_at_ms'])}, " in text
    assert "stopped; the same command resumes it" in text
    rows = sum(w["rows"] for w in state["windows"])
    assert f"    {len(left)} of {len(state['windows'])} windows left, {rows:,} rows so far" in text
    newest = max(left, key=lambda w: w["to_ms"])
    upper = newest["oldest_seen_ms"] if newest["oldest_seen_ms"] is not None else newest["to_ms"]
    assert f"    window {utc(newest['from_ms'])} .. {utc(upper)}" in text
    result = run_cli("state", "show", "--json", "--output", str(output), key=None)
    assert json.loads(result.stdout)["high_water_ms"] is None


def test_every_environment_of_a_config(emulator, tmp_path):
    emu = emulator(sessions=100, seed=34)
    config = tmp_path / "envs.toml"
    config.write_text(f'api_url = "{emu.url}"\n'
                      f'[environments.dev]\noutput = "{tmp_path / "dev"}"\n'
                      f'[environments.prod]\noutput = "{tmp_path / "prod"}"\n')
    assert run_cli("run", "--config", str(config), "--environment", "prod").returncode == 0
    lines = show("--config", str(config), "--all-environments")
    headers = [line for line in lines if not line.startswith(" ")]
    assert headers == [f"[dev] state in {tmp_path / 'dev' / '_state'}",
                       f"[prod] state in {tmp_path / 'prod' / '_state'}"]
    dev, prod = "\n".join(lines[:lines.index(headers[1])]), "\n".join(lines[lines.index(headers[1]):])
    assert "nothing exported yet" in dev and "exported up to" in prod


@pytest.mark.slow
def test_on_s3(emulator, s3):
    emu = emulator(sessions=200, seed=35)
    bucket = s3.new_bucket()
    output = f"s3://{bucket}/out"
    assert s3_cli("run", "--output", output, url=emu.url, aws=s3.env).returncode == 0
    result = s3_cli("state", "show", "--output", output, url=None, aws=s3.env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"state in {output}/_state"
    assert lines[1].startswith("  exported up to ") and lines[-1] == "  lock: free"
    target = LeaseTarget(bucket, "out/_state/lock", "us-east-1", s3.endpoint,
                         f"{output}/_state/lock")
    with lease_lock(target, "pid=1 host=orchestrator since=then"):
        held = s3_cli("state", "show", "--output", output, url=None, aws=s3.env)
    assert held.stdout.splitlines()[-1].startswith(
        "  lock: held by pid=1 host=orchestrator since=then; lease renewed ")
    raw = s3_cli("state", "show", "--json", "--output", output, url=None, aws=s3.env)
    stored = s3.client().get_object(Bucket=bucket, Key="out/_state/checkpoint.json")
    assert raw.stdout == stored["Body"].read().decode() + "\n"


def test_on_gcs(emulator, gcs):
    emu = emulator(sessions=150, seed=36)
    bucket = gcs.new_bucket()
    output = f"gs://{bucket}/out"
    assert gcs_cli("run", "--output", output, url=emu.url, gcs=gcs).returncode == 0
    with lease_lock(gcs.target(bucket, "out/_state/lock"), "pid=2 host=airflow-worker"):
        result = gcs_cli("state", "show", "--output", output, url=None, gcs=gcs)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"state in {output}/_state" and lines[1].startswith("  exported up to ")
    assert lines[-1].startswith("  lock: held by pid=2 host=airflow-worker; lease renewed ")
    free = gcs_cli("state", "show", "--output", output, url=None, gcs=gcs)
    assert free.stdout.splitlines()[-1] == "  lock: free"
