"""Object storage end to end: the real CLI writing to a real S3-compatible server (moto's
standalone server on 127.0.0.1, conftest's `s3` fixture), read back with pyarrow and DuckDB."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from pipeline.dataset.schema import SCHEMA
from pipeline.errors import LockHeld, StorageError
from pipeline.store.lock import LeaseTarget, S3Lease, lease_lock
from tests.conftest import (
    KEY,
    ROOT,
    S3Server,
    api,
    assert_row_matches,
    emulator_sessions,
    free_port,
    keys,
    latest_rows,
    s3_cli,
)

DEDUPE = """
SELECT * EXCLUDE (rn) FROM (
  SELECT *, row_number() OVER (PARTITION BY id
                               ORDER BY updated_at DESC NULLS LAST, extracted_at DESC) AS rn
  FROM sessions_ds)
WHERE rn = 1
"""


def read_s3_dataset(s3: S3Server, prefix: str) -> ds.Dataset:
    partitioning = ds.partitioning(pa.schema([("created_date", pa.string())]), flavor="hive")
    return ds.dataset(f"{prefix}/sessions", filesystem=s3.filesystem(), format="parquet",
                      partitioning=partitioning, schema=SCHEMA.append(
                          pa.field("created_date", pa.string())))


@pytest.mark.slow
def test_full_and_incremental_export_to_s3_read_back_with_pyarrow_and_duckdb(emulator, s3,
                                                                             tmp_path):
    emu = emulator(sessions=1200, seed=31, days=12, list_trigger_config="include")
    bucket = s3.new_bucket()
    output = f"s3://{bucket}/exports/sessions-v1"
    first = s3_cli("run", "--output", output, "--flush-rows", "500", url=emu.url, aws=s3.env)
    assert first.returncode == 0, first.stderr
    assert "1200 sessions" in first.stdout

    names = keys(s3, bucket, "exports/sessions-v1/")
    assert "exports/sessions-v1/_state/checkpoint.json" in names  # state beside the data
    assert "exports/sessions-v1/_state/lock" not in names  # the lease is released
    assert len([n for n in names if n.startswith("exports/sessions-v1/_runs/")]) == 1
    assert not [n for n in names if n.rsplit("/", 1)[-1].startswith((".", "_"))
                and "/sessions/" in n]  # no temp objects: nothing is renamed on S3

    table = read_s3_dataset(s3, f"{bucket}/exports/sessions-v1").to_table()
    assert table.num_rows == 1200
    sessions = emulator_sessions(emu.url)
    latest = latest_rows(table)
    for session in sessions:
        assert_row_matches(latest[session["id"]], session)

    # incremental: new sessions and changed ones arrive with the next run
    for n in range(20):
        api(emu.url, "POST", "", {"type": "chat.agent", "taskIdentifier": "late",
                                  "externalId": f"late-{n}"})
    newest = sorted(sessions, key=lambda s: s["createdAt"])[-5:]
    for session in newest:
        api(emu.url, "PATCH", f"/{session['id']}", {"metadata": {"v": 2}})
    second = s3_cli("run", "--output", output, url=emu.url, aws=s3.env)
    assert second.returncode == 0, second.stderr
    assert len([n for n in keys(s3, bucket, "exports/sessions-v1/_runs/")]) == 2

    dataset = read_s3_dataset(s3, f"{bucket}/exports/sessions-v1")
    sessions = emulator_sessions(emu.url)
    latest = latest_rows(dataset.to_table())
    assert set(latest) == {s["id"] for s in sessions}
    for session in sessions:
        assert_row_matches(latest[session["id"]], session)
    assert json.loads(latest[newest[0]["id"]]["metadata"]) == {"v": 2}

    # DuckDB cannot load httpfs offline, so it scans the same pyarrow dataset
    con = duckdb.connect()
    con.register("sessions_ds", dataset)
    rows, ids, changed = con.execute(
        f"SELECT count(*), count(DISTINCT id), count(*) FILTER (WHERE metadata = '{{\"v\":2}}'"
        f" OR metadata = '{{\"v\": 2}}') FROM ({DEDUPE})"
    ).fetchone()
    assert (rows, ids, changed) == (1220, 1220, 5)

    database = tmp_path / "warehouse.duckdb"
    loaded = s3_cli("load", "duckdb", "--output", output, "--database", str(database), url=None,
                 aws=s3.env)
    assert loaded.returncode == 0, loaded.stderr
    assert "2 new runs" in loaded.stdout and "holds 1220 sessions" in loaded.stdout


@pytest.mark.slow
def test_verify_and_compact_work_on_s3(emulator, s3):
    emu = emulator(sessions=400, seed=32, days=6, list_trigger_config="include")
    bucket = s3.new_bucket()
    output = f"s3://{bucket}/out"
    assert s3_cli("run", "--output", output, "--lookback", "30d", url=emu.url,
               aws=s3.env).returncode == 0
    for session in emulator_sessions(emu.url)[:25]:
        api(emu.url, "PATCH", f"/{session['id']}", {"metadata": {"changed": True}})
    assert s3_cli("run", "--output", output, "--lookback", "30d", url=emu.url,
               aws=s3.env).returncode == 0
    assert read_s3_dataset(s3, f"{bucket}/out").count_rows() == 425

    verify = s3_cli("verify", "--output", output, url=None, aws=s3.env)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "425 rows, 400 sessions: OK" in verify.stdout
    assert s3_cli("verify", "--strict", "--output", output, url=None, aws=s3.env).returncode == 6

    compact = s3_cli("compact", "--output", output, url=None, aws=s3.env)
    assert compact.returncode == 0, compact.stderr
    assert read_s3_dataset(s3, f"{bucket}/out").count_rows() == 400
    strict = s3_cli("verify", "--strict", "--output", output, url=None, aws=s3.env)
    assert strict.returncode == 0, strict.stdout
    latest = latest_rows(read_s3_dataset(s3, f"{bucket}/out").to_table())
    for session in emulator_sessions(emu.url):
        assert_row_matches(latest[session["id"]], session)


def _spawn(*args: str, url: str, aws: dict[str, str]) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRIGGER_", "AWS_"))}
    env.update(aws, TRIGGER_SECRET_KEY=KEY, TRIGGER_API_URL=url)
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)


@pytest.mark.slow
def test_second_run_exits_75_while_the_first_holds_the_s3_lease(emulator, gate, s3):
    emu = emulator(sessions=1500, list_trigger_config="include")
    held = gate(emu.url, 3)  # the first run stops at its fourth request, holding the lease
    bucket = s3.new_bucket()
    output = f"s3://{bucket}/out"
    first = _spawn("run", "--output", output, "--flush-rows", "200", url=held.url, aws=s3.env)
    deadline = time.monotonic() + 30
    while "out/_state/lock" not in keys(s3, bucket, "out/_state/") or not held.waiting:
        assert time.monotonic() < deadline and first.poll() is None, "first run never locked"
        time.sleep(0.05)
    second = s3_cli("run", "--output", output, url=emu.url, aws=s3.env)
    assert second.returncode == 75, second.stderr
    assert "another export holds the lock" in second.stderr and "pid=" in second.stderr
    assert "Traceback" not in second.stderr
    held.open()
    out, err = first.communicate(timeout=60)
    assert first.returncode == 0, err
    assert "out/_state/lock" not in keys(s3, bucket, "out/_state/")


@pytest.mark.slow
def test_an_expired_lease_is_taken_over_and_a_live_one_is_not(emulator, s3):
    emu = emulator(sessions=50, list_trigger_config="include")
    bucket = s3.new_bucket()
    output = f"s3://{bucket}/out"
    stale = {"holder": "pid=4242 host=gone", "token": "x", "seconds": 1, "renewed": "then"}
    s3.client().put_object(Bucket=bucket, Key="out/_state/lock", Body=json.dumps(stale))
    time.sleep(2.2)  # the store's clock counts in whole seconds
    result = s3_cli("run", "--output", output, "--log-format", "json", url=emu.url, aws=s3.env)
    assert result.returncode == 0, result.stderr
    assert "took over the lock" in result.stderr and "pid=4242 host=gone" in result.stderr

    live = {**stale, "seconds": 600}
    s3.client().put_object(Bucket=bucket, Key="out/_state/lock", Body=json.dumps(live))
    blocked = s3_cli("run", "--output", output, url=emu.url, aws=s3.env)
    assert blocked.returncode == 75 and "lapses in" in blocked.stderr


def _target(bucket: str, s3: S3Server) -> LeaseTarget:
    return LeaseTarget(bucket, "state/lock", "us-east-1", s3.endpoint, f"s3://{bucket}/state/lock")


@pytest.mark.slow
def test_the_heartbeat_keeps_a_lease_alive_past_its_duration(s3):
    bucket = s3.new_bucket()
    target = _target(bucket, s3)
    with lease_lock(target, "first", seconds=1.2):
        time.sleep(3.2)  # well past 1.2s: only renewals keep it
        with pytest.raises(LockHeld, match="first"):
            S3Lease(target, "second", 1.2).acquire()
    assert keys(s3, bucket, "state/") == []
    with lease_lock(target, "second", seconds=1.2):  # free again once released
        pass


def test_a_lease_taken_over_behind_our_back_fails_the_run(s3):
    bucket = s3.new_bucket()
    target = _target(bucket, s3)
    with pytest.raises(StorageError, match="lost the lock"), \
            lease_lock(target, "slow", seconds=0.9):
        s3.client().put_object(Bucket=bucket, Key="state/lock", Body=b'{"holder": "thief"}')
        time.sleep(1.0)
    assert keys(s3, bucket, "state/") == ["state/lock"]  # the new holder's lease stays


@pytest.mark.slow
def test_storage_failures_are_one_line_exit_5(emulator, s3):
    emu = emulator(sessions=20, list_trigger_config="include")
    missing = s3_cli("run", "--output", "s3://no-such-bucket-here/out", url=emu.url, aws=s3.env)
    assert missing.returncode == 5
    assert "bucket does not exist" in missing.stderr and "Traceback" not in missing.stderr
    listing = s3_cli("verify", "--output", "s3://no-such-bucket-here/out", url=None, aws=s3.env)
    assert listing.returncode == 5 and "does not exist" in listing.stderr

    closed = {**s3.env, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{free_port()}"}
    unreachable = s3_cli("run", "--output", "s3://bucket/out", url=emu.url, aws=closed)
    assert unreachable.returncode == 5, unreachable.stderr
    assert "cannot reach the storage endpoint" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr
    state = s3_cli("state", "show", "--output", "s3://bucket/out", url=None, aws=closed)
    assert state.returncode == 5 and "cannot reach" in state.stderr

    # a bucket policy that denies writes: to the data (pyarrow), then to the lock (boto3)
    for denied_prefix, failing in (("out/sessions/", "cannot write"), ("out/", "cannot take")):
        bucket = s3.new_bucket()
        s3.client().put_bucket_policy(Bucket=bucket, Policy=json.dumps({
            "Version": "2012-10-17",
            "Statement": [{"Effect": "Deny", "Principal": "*", "Action": "s3:PutObject",
                           "Resource": f"arn:aws:s3:::{bucket}/{denied_prefix}*"}]}))
        denied = s3_cli("run", "--output", f"s3://{bucket}/out", url=emu.url, aws=s3.env)
        assert denied.returncode == 5, denied.stderr
        assert failing in denied.stderr and "access denied" in denied.stderr, denied.stderr
        assert "Traceback" not in denied.stderr
