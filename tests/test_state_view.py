"""`state show`'s readable form: `render` over plain values, and the lock probe on local disk."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from pipeline.ops.state_view import (
    WINDOWS_LISTED,
    BackfillView,
    LockView,
    StateView,
    age,
    backfill_view,
    read_lock,
    read_state,
    render,
    utc,
)
from pipeline.store.lock import lock_holder
from pipeline.store.state import (
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

NOW = 1_796_489_775_967  # 2026-12-05 16:56:15.967 UTC
MINUTE = 60_000


def test_utc_and_age_read_as_a_person_says_them():
    assert utc(1_796_489_535_967) == "2026-12-05 16:52:15 UTC"
    assert age(NOW - 4 * MINUTE, NOW) == "4 minutes ago"
    assert age(NOW - 1000, NOW) == "1 second ago"
    assert age(NOW - 400, NOW) == "just now"
    assert age(NOW - 90 * MINUTE, NOW) == "90 minutes ago"
    assert age(NOW - 30 * 60 * MINUTE, NOW) == "30 hours ago"
    assert age(NOW - 3 * 24 * 60 * MINUTE, NOW) == "3 days ago"
    assert age(NOW + 2 * MINUTE, NOW).startswith("in 2 minutes")


def test_a_finished_run_reads_as_the_issue_asks():
    checkpoint = Checkpoint(high_water_ms=NOW - 4 * MINUTE, last_run_id="20261205T165215Z-abc123",
                            last_success_ms=NOW - 3 * MINUTE, active_sessions=11_508)
    text = render(StateView("s3://bucket/out/_state", checkpoint, NOW, "prod", LockView(False)))
    assert text.splitlines() == [
        "[prod] state in s3://bucket/out/_state",
        "  exported up to 2026-12-05 16:52:15 UTC, 4 minutes ago",
        "  last successful run 20261205T165215Z-abc123 at 2026-12-05 16:53:15 UTC, 3 minutes ago",
        "  no run in progress",
        "  11,508 active sessions watched",
        "  no backfill in progress",
        "  lock: free",
    ]


def test_an_empty_state_says_the_next_run_exports_everything():
    text = render(StateView("/data/_state", Checkpoint(), NOW))
    assert text.splitlines()[0] == "state in /data/_state"
    assert "nothing exported yet" in text and "last successful run" not in text
    assert "active session" not in text


def _progress(walk: dict | None = None, walk_complete: bool = False) -> RunProgress:
    if walk is None and not walk_complete:
        walk = {"to_ms": NOW - 20 * MINUTE}
    return RunProgress(run_id="20261205T165000Z-def456", mode="incremental",
                       window=Window(NOW - 60 * MINUTE, None), filters={"type": "chat.agent"},
                       started_at_ms=NOW - 6 * MINUTE,
                       walked=WalkProgress(walk, walk_complete, counts=Counters(rows=1200)))


def test_an_interrupted_run_shows_its_listing_bound_and_rows():
    checkpoint = Checkpoint(high_water_ms=NOW - 60 * MINUTE, in_progress=_progress())
    holder = "pid=4242 host=box since=2026-12-05T16:50:15.967Z"
    text = render(StateView("/d/_state", checkpoint, NOW, lock=LockView(False, holder, "gone")))
    assert "  interrupted run 20261205T165000Z-def456 (incremental), started " \
           "2026-12-05 16:50:15 UTC, 6 minutes ago" in text
    assert "    listing: sessions created 2026-12-05 15:56:15 UTC .. now with type=chat.agent" in text
    assert "    position: walked down to 2026-12-05 16:36:15 UTC" in text
    assert "1,200 rows so far" in text
    assert "the next `run` resumes it there" in text
    assert f"  lock: free (last taken by {holder}; gone)" in text


def test_a_run_holding_the_lock_is_in_progress_not_interrupted():
    checkpoint = Checkpoint(in_progress=_progress(walk_complete=True, walk=None))
    text = render(StateView("/d/_state", checkpoint, NOW, lock=LockView(True, "pid=1 host=h")))
    assert "  run in progress 20261205T165000Z-def456" in text
    assert "the listing is walked" in text and "resumes" not in text
    assert "  lock: held by pid=1 host=h" in text


def test_a_backfill_shows_its_range_and_the_windows_left():
    windows = [BackfillView("run-b", NOW - 10 * 24 * 60 * MINUTE, NOW, NOW - MINUTE, False, 20,
                            tuple((NOW - (i + 1) * MINUTE, NOW - i * MINUTE - 1)
                                  for i in range(WINDOWS_LISTED + 2)), 5400)]
    done = BackfillView("run-a", 0, 1, 0, True, 2, (), 10)
    text = render(StateView("/d/_state", Checkpoint(), NOW, backfills=(*windows, done)))
    assert "  backfill 2026-11-25 16:56:15 UTC .. 2026-12-05 16:56:15 UTC (run run-b, started " \
           "2026-12-05 16:55:15 UTC, 1 minute ago): stopped; the same command resumes it" in text
    assert f"    {WINDOWS_LISTED + 2} of 20 windows left, 5,400 rows so far" in text
    assert sum(line.startswith("    window ") for line in text.splitlines()) == WINDOWS_LISTED
    assert "    … and 2 more" in text
    assert "  1 finished backfill" in text and "no backfill in progress" not in text


def test_backfill_view_keeps_the_unwalked_part_of_each_open_window():
    state = BackfillState(
        key="k", run_id="r", since_ms=0, until_ms=3999, filters={}, started_at_ms=5,
        windows=[WindowProgress(0, 0, 1999, WalkProgress(counts=Counters(rows=7)), oldest_seen_ms=1500),
                 WindowProgress(1, 2000, 3999, WalkProgress(complete=True, counts=Counters(rows=9)))],
        next_wid=2)
    view = backfill_view(state)
    assert view.windows_left == ((0, 1500),) and view.rows == 16 and view.windows == 2


def test_lock_probe_sees_a_held_flock_and_a_dead_holder(tmp_path: Path):
    storage = Storage(str(tmp_path))
    assert read_lock(storage, "lock") == LockView(False)
    with storage.exclusive_lock("lock", lock_holder()):
        held = read_lock(storage, "lock")
        assert held.held is True and f"pid={os.getpid()}" in held.holder
    assert read_lock(storage, "lock") == LockView(False)  # released: emptied
    # a holder killed with -9 leaves its text behind, but the kernel dropped its flock
    (tmp_path / "lock").write_text("pid=999999999 host=elsewhere since=x")
    with open(tmp_path / "lock") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        assert read_lock(storage, "lock").held is True
    gone = read_lock(storage, "lock")
    assert gone.held is False and gone.holder.startswith("pid=999999999")


def test_read_state_finds_the_backfills_beside_the_checkpoint(tmp_path: Path):
    store = StateStore(Storage(str(tmp_path)))
    store.save(Checkpoint(high_water_ms=NOW, last_run_id="r1", last_success_ms=NOW))
    state = BackfillState(key="abc", run_id="r2", since_ms=0, until_ms=99, filters={},
                          started_at_ms=1, windows=[WindowProgress(0, 0, 99)], next_wid=1)
    (tmp_path / "backfill-abc.json").write_bytes(state.to_json())
    (tmp_path / "backfill-notes.json").write_text("{")  # not a backfill key: not ours, ignored
    (tmp_path / "backfill-0f.json").write_text("{")
    view = read_state(store, NOW, "dev")
    assert view.environment == "dev" and view.checkpoint.last_run_id == "r1"
    assert [b.run_id for b in view.backfills] == ["r2"]
    assert view.backfills[0].lock == LockView(False)
    assert len(view.problems) == 1 and "backfill-0f.json is unreadable" in view.problems[0]
    assert "  problem: " in render(view)


def test_a_lock_that_cannot_be_checked_says_so():
    def line(lock: LockView) -> str:
        return render(StateView("/d", Checkpoint(), NOW, lock=lock)).splitlines()[-1]

    assert line(LockView(None, note="cannot read it: timed out")) == \
        "  lock: unknown (cannot read it: timed out)"
    assert line(LockView(None, "pid=7 host=other")) == \
        "  lock: taken by pid=7 host=other (cannot tell from here whether it still runs)"
