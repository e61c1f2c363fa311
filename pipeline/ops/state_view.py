"""`state show` for people: where one state location stands, as a few readable lines.

`read_state` gathers plain data through the storage layer (the checkpoint, the backfill
states beside it, who holds the locks), so local disk, `s3://` and `gs://` read alike;
`render` turns it into text and does nothing else, so it is tested over plain values.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from pipeline.store.lock import LeaseStore
from pipeline.store.state import LOCK_FILE, BackfillState, Checkpoint, StateStore
from pipeline.store.storage import Storage

_BACKFILL_STATE = re.compile(r"^backfill-([0-9a-f]+)\.json$")
_HOLDER = re.compile(r"pid=(\d+) host=(\S+)")
WINDOWS_LISTED = 6  # a backfill's windows left beyond this are counted, not listed


@dataclass(frozen=True)
class LockView:
    """A lock as found: `held` is None when this machine cannot tell (another host's flock)."""

    held: bool | None
    holder: str = ""  # as written by `lock_holder()`; empty when nobody took it
    note: str = ""  # what else a person should know (a lease's age, a holder gone)


@dataclass(frozen=True)
class BackfillView:
    """One backfill's state file, reduced to what a person asks about."""

    run_id: str
    since_ms: int
    until_ms: int
    started_at_ms: int
    complete: bool
    windows: int
    windows_left: tuple[tuple[int, int], ...]  # the createdAt ranges not walked yet
    rows: int
    lock: LockView | None = None


@dataclass(frozen=True)
class StateView:
    """Everything `render` shows about one state location."""

    location: str
    checkpoint: Checkpoint
    now_ms: int
    environment: str | None = None
    lock: LockView | None = None
    backfills: tuple[BackfillView, ...] = ()
    problems: tuple[str, ...] = ()  # state files that could not be read, one line each


# -- reading -----------------------------------------------------------------------------


def read_state(store: StateStore, now_ms: int, environment: str | None = None) -> StateView:
    """The checkpoint, the backfills and the locks under `store`, through its storage."""
    storage = store.storage
    checkpoint = store.load()
    backfills, problems = [], []
    for stored in storage.list_files():
        match = _BACKFILL_STATE.match(stored.path)
        if match is None:
            continue
        try:
            state = BackfillState.from_json(storage.read_bytes(stored.path) or b"")
        except (ValueError, TypeError, KeyError) as error:
            problems.append(f"{storage.display(stored.path)} is unreadable ({error})")
            continue
        lock = None if state.complete else read_lock(storage, f"backfill-{match[1]}.lock")
        backfills.append(backfill_view(state, lock))
    backfills.sort(key=lambda b: b.started_at_ms)
    return StateView(
        location=storage.uri,
        checkpoint=checkpoint,
        now_ms=now_ms,
        environment=environment,
        lock=read_lock(storage, LOCK_FILE),
        backfills=tuple(backfills),
        problems=tuple(problems),
    )


def backfill_view(state: BackfillState, lock: LockView | None = None) -> BackfillView:
    left = tuple(w.remaining() for w in sorted(state.windows, key=lambda w: -w.to_ms) if not w.done)
    return BackfillView(
        run_id=state.run_id,
        since_ms=state.since_ms,
        until_ms=state.until_ms,
        started_at_ms=state.started_at_ms,
        complete=state.complete,
        windows=len(state.windows),
        windows_left=left,
        rows=sum(w.walked.counts.rows for w in state.windows),
        lock=lock,
    )


def read_lock(storage: Storage, path: str) -> LockView:
    """Who holds the lock at `path` now, without taking it (a probe could make a run starting
    at that moment fail with "lock busy")."""
    if storage.is_local:
        return _local_lock(Path(storage.full_path(path)))
    try:
        store = _lease_store(storage, path)
        try:
            record = store.read()
        finally:
            store.close()
    except Exception as error:  # the store's own failure: shown, not fatal
        return LockView(None, note=f"cannot read it: {error}")
    if record is None:
        return LockView(False)
    if record.expired:
        lapsed = round(record.age_seconds - record.seconds)
        return LockView(False, record.holder, f"its lease lapsed {lapsed}s ago")
    return LockView(True, record.holder, f"lease renewed {round(record.age_seconds)}s ago")


def _lease_store(storage: Storage, path: str) -> LeaseStore:
    from pipeline.store import lock
    from pipeline.store.storage import gcs_emulator, storage_endpoint

    bucket, _, key = storage.full_path(path).partition("/")
    if storage.is_gcs:
        return lock.store_for(
            lock.GcsLeaseTarget(bucket, key, gcs_emulator(), storage.display(path))
        )
    region = getattr(storage.fs, "region", None)
    return lock.store_for(
        lock.LeaseTarget(bucket, key, region, storage_endpoint(), storage.display(path))
    )


def _local_lock(path: Path) -> LockView:
    try:
        holder = path.read_text(errors="replace").strip()
        found = path.stat()
    except FileNotFoundError:
        return LockView(False)
    except OSError as error:
        return LockView(None, note=f"cannot read it: {error.strerror}")
    held = _flock_held(found)
    if held is None:
        held = _holder_alive(holder)
    if held is False and holder:
        return LockView(False, holder, "that process is gone; the next run takes the lock")
    return LockView(held, holder)


def _flock_held(found: os.stat_result) -> bool | None:
    """Whether the kernel lists an flock on this file (Linux's /proc/locks); None elsewhere."""
    try:
        lines = Path("/proc/locks").read_text().splitlines()
    except OSError:
        return None
    wanted = (os.major(found.st_dev), os.minor(found.st_dev), found.st_ino)
    for line in lines:
        fields = line.split()
        if "FLOCK" not in fields or "->" in fields:  # "->": a waiter, not a holder
            continue
        for field in fields:
            parts = field.split(":")
            if len(parts) == 3 and all(parts):
                try:
                    if (int(parts[0], 16), int(parts[1], 16), int(parts[2])) == wanted:
                        return True
                except ValueError:
                    pass
    return False


def _holder_alive(holder: str) -> bool | None:
    """Whether the process a lock names still runs; None when it ran on another host."""
    match = _HOLDER.search(holder)
    if match is None:
        return None if holder else False
    if match[2] != os.uname().nodename:
        return None
    try:
        os.kill(int(match[1]), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# -- rendering ---------------------------------------------------------------------------


def utc(epoch_ms: int) -> str:
    """Epoch milliseconds as `2026-12-05 16:52:15 UTC`."""
    return datetime.fromtimestamp(epoch_ms / 1000, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def age(epoch_ms: int, now_ms: int) -> str:
    """How long before `now_ms`, in one unit: "4 minutes ago", "30 hours ago"."""
    seconds = (now_ms - epoch_ms) // 1000
    span = abs(seconds)
    if span < 1:
        return "just now"
    # minutes up to two hours and hours up to two days read better than "1 hour", "1 day"
    size, unit = (1, "second")
    if span >= 172_800:
        size, unit = (86_400, "day")
    elif span >= 7_200:
        size, unit = (3_600, "hour")
    elif span >= 60:
        size, unit = (60, "minute")
    count = span // size
    text = f"{count} {unit}{'' if count == 1 else 's'}"
    return f"{text} ago" if seconds > 0 else f"in {text} (this machine's clock is behind)"


def _when(epoch_ms: int, now_ms: int) -> str:
    return f"{utc(epoch_ms)}, {age(epoch_ms, now_ms)}"


def _range(from_ms: int | None, to_ms: int | None) -> str:
    start = "the beginning" if from_ms is None else utc(from_ms)
    return f"{start} .. {'now' if to_ms is None else utc(to_ms)}"


def render(view: StateView) -> str:
    """The readable block for one state location (no trailing newline)."""
    name = f"[{view.environment}] " if view.environment else ""
    lines = [f"{name}state in {view.location}"]
    checkpoint, now = view.checkpoint, view.now_ms
    if checkpoint.high_water_ms is None:
        lines.append("  nothing exported yet: the next run exports the whole history")
    else:
        lines.append(f"  exported up to {_when(checkpoint.high_water_ms, now)}")
    if checkpoint.last_run_id and checkpoint.last_success_ms is not None:
        lines.append(
            f"  last successful run {checkpoint.last_run_id} at "
            f"{_when(checkpoint.last_success_ms, now)}"
        )
    if checkpoint.filters:
        lines.append(f"  filters: {_filters(checkpoint.filters)}")
    lines.extend(_run_lines(view))
    if checkpoint.high_water_ms is not None:
        watched = checkpoint.active_sessions
        lines.append(f"  {watched:,} active session{'' if watched == 1 else 's'} watched")
    lines.extend(_backfill_lines(view))
    lines.append(f"  lock: {_lock_text(view.lock)}")
    lines.extend(f"  problem: {problem}" for problem in view.problems)
    return "\n".join(lines)


def _filters(filters: dict[str, str]) -> str:
    return ", ".join(f"{key}={value}" for key, value in sorted(filters.items()))


def _run_lines(view: StateView) -> list[str]:
    progress, now = view.checkpoint.in_progress, view.now_ms
    if progress is None:
        return ["  no run in progress"]
    running = view.lock is not None and view.lock.held
    what = "run in progress" if running else "interrupted run"
    started = _when(progress.started_at_ms, now)
    lines = [f"  {what} {progress.run_id} ({progress.mode}), started {started}"]
    listing = f"sessions created {_range(progress.window.from_ms, progress.window.to_ms)}"
    if progress.filters:
        listing += f" with {_filters(progress.filters)}"
    lines.append(f"    listing: {listing}")
    bound = (progress.walked.walk or {}).get("to_ms")
    if progress.walked.complete:
        position = "the listing is walked; change capture is redone whole on resume"
    elif bound is None:
        position = "walk not started"
    else:
        position = f"walked down to {utc(bound)} (createdAt; older ones are next)"
    lines.append(f"    position: {position}; {progress.walked.counts.rows:,} rows so far")
    if not running:
        lines.append("    the next `run` resumes it there")
    return lines


def _backfill_lines(view: StateView) -> list[str]:
    open_ = [b for b in view.backfills if not b.complete]
    done = len(view.backfills) - len(open_)
    lines = [] if open_ else ["  no backfill in progress"]
    for backfill in open_:
        running = backfill.lock is not None and backfill.lock.held
        lines.append(
            f"  backfill {_range(backfill.since_ms, backfill.until_ms)} (run {backfill.run_id}, "
            f"started {_when(backfill.started_at_ms, view.now_ms)}): "
            f"{'running now' if running else 'stopped; the same command resumes it'}"
        )
        left = backfill.windows_left
        lines.append(
            f"    {len(left)} of {backfill.windows} windows left, {backfill.rows:,} rows so far"
        )
        lines.extend(f"    window {_range(low, high)}" for low, high in left[:WINDOWS_LISTED])
        if len(left) > WINDOWS_LISTED:
            lines.append(f"    … and {len(left) - WINDOWS_LISTED} more")
    if done:
        lines.append(f"  {done} finished backfill{'' if done == 1 else 's'}")
    return lines


def _lock_text(lock: LockView | None) -> str:
    if lock is None or (lock.held is False and not lock.holder):
        return "free" + (f" ({lock.note})" if lock is not None and lock.note else "")
    note = f"; {lock.note}" if lock.note else ""
    if lock.held:
        return f"held by {lock.holder or 'another process'}{note}"
    if lock.held is None and not lock.holder:
        return f"unknown ({lock.note})" if lock.note else "unknown"
    if lock.held is None:
        return f"taken by {lock.holder} (cannot tell from here whether it still runs{note})"
    return f"free (last taken by {lock.holder}{note})"
