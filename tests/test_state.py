"""Job state: the checkpoint and a backfill's state keep their JSON keys, and files written
by earlier versions (with the `cursor` of before exact walks) still load."""

from __future__ import annotations

import json

import pytest

from pipeline.dataset.layout import data_file_path
from pipeline.errors import StorageError
from pipeline.jobs.core import remove_unrecorded
from pipeline.store.state import (
    STATE_VERSION,
    BackfillState,
    Checkpoint,
    Counters,
    RunProgress,
    StateStore,
    WalkProgress,
    Window,
    WindowProgress,
)
from pipeline.store.storage import Storage

OLD_CHECKPOINT = {
    "active_sessions": 3,
    "filters": {},
    "high_water_ms": 1_700_000_000_000,
    "in_progress": {
        "cursor": "cabc",
        "files": ["sessions/created_date=2023-11-14/part-r1-00000.parquet"],
        "filters": {"status": "ACTIVE"},
        "flush_seq": 1,
        "max_created_ms": 1_700_000_000_500,
        "mode": "incremental",
        "pages": 4,
        "rate_limited": 1,
        "requests": 5,
        "resumed": 0,
        "retries": 2,
        "rows": 400,
        "run_id": "r1",
        "started_at_ms": 1_700_000_001_000,
        "unchanged": 7,
        "walk": {"to_ms": 1_700_000_000_100, "seen": ["a"], "cursor": None, "pinned": False,
                 "probe": False, "done": False},
        "walk_complete": False,
        "window": {"from_ms": 1, "to_ms": 1_700_000_001_000},
    },
    "last_run_id": "r0",
    "last_success_ms": 1_699_000_000_000,
    "version": 1,
}


def test_counters_add_and_subtract():
    a = Counters(rows=3, pages=1, requests=2)
    b = Counters(rows=1, unchanged=4, single_fetches=2)
    assert a + b - b == a
    assert (a + b).only(("rows", "unchanged")) == {"rows": 4, "unchanged": 4}


def test_an_old_checkpoint_loads_and_saves_the_same_keys_without_the_cursor():
    checkpoint = Checkpoint.from_json(json.dumps(OLD_CHECKPOINT).encode())
    progress = checkpoint.in_progress
    assert progress is not None and progress.window == Window(1, 1_700_000_001_000)
    assert progress.walked.counts == Counters(400, 7, 4, 5, 2, 1)
    assert progress.walked.files == tuple(OLD_CHECKPOINT["in_progress"]["files"])
    saved = json.loads(checkpoint.to_json())
    expected = {k: v for k, v in OLD_CHECKPOINT["in_progress"].items() if k != "cursor"}
    assert saved["in_progress"] == expected
    assert {k: v for k, v in saved.items() if k != "in_progress"} == {
        k: v for k, v in OLD_CHECKPOINT.items() if k != "in_progress"
    }
    assert Checkpoint.from_json(checkpoint.to_json()) == checkpoint


def test_a_flush_folds_into_the_walk_progress():
    progress = RunProgress("r", "incremental", Window(None, 9), {}, 0)
    walked = progress.walked.after_flush(0, ("a.parquet",), Counters(rows=2), {"to_ms": 5})
    walked = walked.after_flush(1, ("b.parquet",), Counters(rows=1, pages=3), None)
    assert walked == WalkProgress(None, True, 2, ("a.parquet", "b.parquet"), Counters(3, 0, 3))


def test_an_old_backfill_state_loads_and_keeps_its_keys():
    window = {"wid": 0, "from_ms": 10, "to_ms": 99, "cursor": None, "walk": None,
              "flush_seq": 2, "done": True, "rows": 5, "pages": 2, "files": ["x.parquet"],
              "oldest_seen_ms": 12, "walked_rows": 5}
    old = {"key": "k", "run_id": "r", "since_ms": 10, "until_ms": 99, "filters": {},
           "started_at_ms": 1, "windows": [window], "next_wid": 1, "complete": False,
           "requests": 8, "retries": 1, "rate_limited": 0}
    state = BackfillState.from_json(json.dumps(old).encode())
    assert state.windows[0] == WindowProgress(
        0, 10, 99, WalkProgress(None, True, 2, ("x.parquet",), Counters(rows=5, pages=2)), 12, 5
    )
    assert state.totals() == Counters(rows=5, pages=2, requests=8, retries=1)
    saved = json.loads(state.to_json())
    assert saved["windows"][0] == {**{k: v for k, v in window.items() if k != "cursor"},
                                   "unchanged": 0}
    assert {k: v for k, v in saved.items() if k != "windows"} == {
        k: v for k, v in old.items() if k != "windows"
    }


def test_a_resume_removes_the_files_its_state_does_not_record(tmp_path):
    output = Storage(str(tmp_path))
    recorded = data_file_path("2026-01-01", "r1-w0001", 0)
    unrecorded = data_file_path("2026-01-02", "r1-w0001", 1)  # flushed after the checkpoint
    other_run = data_file_path("2026-01-02", "r0", 0)
    for path in (recorded, unrecorded, other_run):
        output.write_bytes(path, b"PAR1")
    assert remove_unrecorded(output, "r1", [recorded]) == 1
    assert output.read_bytes(unrecorded) is None
    assert output.read_bytes(recorded) and output.read_bytes(other_run)


def test_a_checkpoint_of_a_newer_state_version_is_refused(tmp_path):
    storage = Storage(str(tmp_path))
    storage.write_bytes("checkpoint.json", json.dumps({"version": STATE_VERSION + 1}).encode())
    with pytest.raises(StorageError, match="newer version"):
        StateStore(storage).load()
