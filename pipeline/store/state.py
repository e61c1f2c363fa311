"""Job state: the incremental checkpoint and a backfill's state, saved after every flush.

Plain dataclasses, (de)serialised as JSON; `StateStore` and `BackfillStateStore` are the only
places that read or write them. Both jobs record a walk the same way (`WalkProgress`) and count
with one value (`Counters`). The secret key is never part of the state.

Loading ignores keys it does not know, so files written by earlier versions load (version 1
files written before exact walks carry a `cursor`, which is dropped: that window restarts);
a checkpoint of a newer state version is refused.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import StorageError, UsageError
from pipeline.store.storage import Storage

CHECKPOINT_FILE = "checkpoint.json"
ACTIVE_FILE = "active.parquet"  # the sessions ACTIVE at the last run (change capture)
ACTIVE_SCHEMA = pa.schema(
    [("id", pa.string()), ("created_ms", pa.int64()), ("updated_ms", pa.int64())]
)
LOCK_FILE = "lock"
STATE_VERSION = 1


@dataclass(frozen=True)
class Counters:
    """What a job did: rows written, versions skipped as held already, pages walked, API
    requests, retries, 429 answers and sessions read one by one."""

    rows: int = 0
    unchanged: int = 0  # versions listed but held already, so not written
    pages: int = 0
    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    single_fetches: int = 0

    def __add__(self, other: Counters) -> Counters:
        return Counters(*(getattr(self, n) + getattr(other, n) for n in COUNTER_NAMES))

    def __sub__(self, other: Counters) -> Counters:
        return Counters(*(getattr(self, n) - getattr(other, n) for n in COUNTER_NAMES))

    def only(self, names: tuple[str, ...]) -> dict[str, int]:
        """The counters `names` as a dict, in that order (how the state files store them)."""
        return {name: getattr(self, name) for name in names}

    @staticmethod
    def read(raw: dict[str, Any], names: tuple[str, ...]) -> Counters:
        """The counters `names` from a stored dict (missing ones are 0)."""
        return Counters(**{name: int(raw.get(name) or 0) for name in names})


COUNTER_NAMES = tuple(f.name for f in fields(Counters))
REQUEST_COUNTERS = ("requests", "retries", "rate_limited")


def known_fields(cls: type, raw: dict[str, Any]) -> dict[str, Any]:
    """The entries of `raw` that name a field of the dataclass `cls` (others are ignored)."""
    names = {f.name for f in fields(cls)}
    return {key: value for key, value in raw.items() if key in names}


@dataclass(frozen=True)
class Window:
    """A createdAt range in epoch milliseconds, both ends inclusive; None = unbounded."""

    from_ms: int | None
    to_ms: int | None


@dataclass(frozen=True)
class WalkProgress:
    """Where a checkpointed walk stands after its last flush: the walk's state
    (`pipeline.api.walker.WalkState` as a dict; None before the first flush), whether the
    walk is complete, the next flush number, and what the flushes wrote and cost."""

    walk: dict[str, Any] | None = None
    complete: bool = False
    flush_seq: int = 0
    files: tuple[str, ...] = ()
    counts: Counters = Counters()

    def after_flush(
        self, seq: int, files: tuple[str, ...], counts: Counters, walk: dict[str, Any] | None
    ) -> WalkProgress:
        """The progress once flush `seq` wrote `files`; `walk` None: nothing is left."""
        return WalkProgress(walk, walk is None, seq + 1, self.files + files, self.counts + counts)

    def to_dict(self, complete_key: str, counted: tuple[str, ...]) -> dict[str, Any]:
        """Flat, as the state files store it (`complete_key` names the completion flag)."""
        return {
            "walk": self.walk,
            complete_key: self.complete,
            "flush_seq": self.flush_seq,
            "files": list(self.files),
            **self.counts.only(counted),
        }

    @staticmethod
    def from_dict(raw: dict[str, Any], complete_key: str, counted: tuple[str, ...]) -> WalkProgress:
        return WalkProgress(
            walk=raw.get("walk"),
            complete=bool(raw.get(complete_key, False)),
            flush_seq=int(raw.get("flush_seq", 0)),
            files=tuple(raw.get("files", ())),
            counts=Counters.read(raw, counted),
        )


# -- the incremental checkpoint ---------------------------------------------------------------

RUN_COUNTERS = ("rows", "unchanged", "pages", *REQUEST_COUNTERS)  # single fetches: not saved


@dataclass(frozen=True)
class RunProgress:
    """An unfinished run: enough to resume it exactly where its last flush left it."""

    run_id: str
    mode: str
    window: Window
    filters: dict[str, str]
    started_at_ms: int
    walked: WalkProgress = WalkProgress()
    max_created_ms: int | None = None
    resumed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "mode": self.mode,
            "window": asdict(self.window),
            "filters": self.filters,
            "started_at_ms": self.started_at_ms,
            **self.walked.to_dict("walk_complete", RUN_COUNTERS),
            "max_created_ms": self.max_created_ms,
            "resumed": self.resumed,
        }

    @staticmethod
    def from_dict(raw: dict[str, Any]) -> RunProgress:
        return RunProgress(
            run_id=raw["run_id"],
            mode=raw["mode"],
            window=Window(**raw["window"]),
            filters=dict(raw["filters"]),
            started_at_ms=raw["started_at_ms"],
            walked=WalkProgress.from_dict(raw, "walk_complete", RUN_COUNTERS),
            max_created_ms=raw.get("max_created_ms"),
            resumed=int(raw.get("resumed", 0)),
        )


@dataclass(frozen=True)
class Checkpoint:
    """What the next run starts from."""

    high_water_ms: int | None = None
    last_run_id: str | None = None
    last_success_ms: int | None = None
    filters: dict[str, str] = field(default_factory=dict)
    in_progress: RunProgress | None = None
    active_sessions: int = 0  # how many are in active.parquet beside the checkpoint
    version: int = STATE_VERSION

    def to_json(self) -> bytes:
        raw = asdict(replace(self, in_progress=None))
        raw["in_progress"] = None if self.in_progress is None else self.in_progress.to_dict()
        return json.dumps(raw, indent=2, sort_keys=True).encode()

    @staticmethod
    def from_json(data: bytes) -> Checkpoint:
        raw = json.loads(data)
        if raw.get("version", 1) > STATE_VERSION:
            raise ValueError(f"state version {raw['version']}: written by a newer version")
        progress = raw.get("in_progress")
        known = known_fields(Checkpoint, raw)
        known["in_progress"] = None if progress is None else RunProgress.from_dict(progress)
        known.setdefault("version", 1)
        return Checkpoint(**known)


class StateStore:
    """Loads and saves the checkpoint under a state location (`<output>/_state/` by default)."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def load(self) -> Checkpoint:
        data = self.storage.read_bytes(CHECKPOINT_FILE)
        if data is None:
            return Checkpoint()
        try:
            return Checkpoint.from_json(data)
        except (ValueError, TypeError, KeyError) as error:
            raise StorageError(
                f"checkpoint {self.storage.display(CHECKPOINT_FILE)} is unreadable ({error}); "
                "fix it or run `sessions-export state reset`"
            ) from None

    def save(self, checkpoint: Checkpoint) -> None:
        self.storage.write_bytes(CHECKPOINT_FILE, checkpoint.to_json())

    def load_active(self) -> pa.Table:
        """Sessions ACTIVE at the last run: id, createdAt and updatedAt in epoch ms."""
        data = self.storage.read_bytes(ACTIVE_FILE)
        if data is None:
            return ACTIVE_SCHEMA.empty_table()
        try:
            return pq.read_table(pa.BufferReader(data)).cast(ACTIVE_SCHEMA)
        except (pa.ArrowInvalid, ValueError) as error:
            raise StorageError(
                f"{self.storage.display(ACTIVE_FILE)} is unreadable ({error}); delete it "
                "(the next run then treats no session as previously active)"
            ) from None

    def save_active(self, parquet_file: Path) -> None:
        """Store the active set from a local Parquet file (`ActiveSetBuilder.finish`)."""
        self.storage.write_file(ACTIVE_FILE, parquet_file)

    def reset(self) -> None:
        self.storage.delete(CHECKPOINT_FILE)
        self.storage.delete(ACTIVE_FILE)

    def lock(self, holder: str) -> AbstractContextManager[None]:
        return self.storage.exclusive_lock(LOCK_FILE, holder)


# -- a backfill's state -----------------------------------------------------------------------

WINDOW_COUNTERS = ("rows", "unchanged", "pages")  # requests are counted for the whole run


@dataclass
class WindowProgress:
    """One window of a backfill's range: its bounds (the lower one rises when it is split),
    its walk, and how far its walker has read (flushed or not: gives the window's density)."""

    wid: int
    from_ms: int
    to_ms: int
    walked: WalkProgress = WalkProgress()
    oldest_seen_ms: int | None = None  # createdAt of the last row walked so far
    walked_rows: int = 0

    @property
    def done(self) -> bool:
        return self.walked.complete

    def remaining(self) -> tuple[int, int]:
        """The createdAt range not walked yet (inclusive)."""
        upper = self.to_ms if self.oldest_seen_ms is None else self.oldest_seen_ms
        return self.from_ms, upper

    def expected_remaining_rows(self) -> float | None:
        """Rows still to walk, guessed from the density so far; None before the first page."""
        if self.oldest_seen_ms is None or self.walked_rows == 0:
            return None
        walked_span = max(1, self.to_ms - self.oldest_seen_ms)
        return self.walked_rows * (self.oldest_seen_ms - self.from_ms) / walked_span

    def to_dict(self) -> dict[str, Any]:
        return {
            "wid": self.wid,
            "from_ms": self.from_ms,
            "to_ms": self.to_ms,
            **self.walked.to_dict("done", WINDOW_COUNTERS),
            "oldest_seen_ms": self.oldest_seen_ms,
            "walked_rows": self.walked_rows,
        }

    @staticmethod
    def from_dict(raw: dict[str, Any]) -> WindowProgress:
        return WindowProgress(
            wid=raw["wid"],
            from_ms=raw["from_ms"],
            to_ms=raw["to_ms"],
            walked=WalkProgress.from_dict(raw, "done", WINDOW_COUNTERS),
            oldest_seen_ms=raw.get("oldest_seen_ms"),
            walked_rows=int(raw.get("walked_rows", 0)),
        )


@dataclass
class BackfillState:
    """A backfill: its range, filters and windows; `requests` holds the request counters of
    every attempt so far (the windows count rows and pages)."""

    key: str
    run_id: str
    since_ms: int
    until_ms: int
    filters: dict[str, str]
    started_at_ms: int
    windows: list[WindowProgress]
    next_wid: int
    complete: bool = False
    requests: Counters = Counters()

    def totals(self) -> Counters:
        """The whole backfill's counters so far."""
        total = self.requests
        for window in self.windows:
            total = total + window.walked.counts
        return total

    def files(self) -> list[str]:
        return [path for window in self.windows for path in window.walked.files]

    def to_json(self) -> bytes:
        raw = {
            "key": self.key,
            "run_id": self.run_id,
            "since_ms": self.since_ms,
            "until_ms": self.until_ms,
            "filters": self.filters,
            "started_at_ms": self.started_at_ms,
            "windows": [window.to_dict() for window in self.windows],
            "next_wid": self.next_wid,
            "complete": self.complete,
            **self.requests.only(REQUEST_COUNTERS),
        }
        return json.dumps(raw, indent=1, sort_keys=True).encode()

    @staticmethod
    def from_json(data: bytes) -> BackfillState:
        raw = json.loads(data)
        return BackfillState(
            key=raw["key"],
            run_id=raw["run_id"],
            since_ms=raw["since_ms"],
            until_ms=raw["until_ms"],
            filters=dict(raw["filters"]),
            started_at_ms=raw["started_at_ms"],
            windows=[WindowProgress.from_dict(w) for w in raw["windows"]],
            next_wid=raw["next_wid"],
            complete=bool(raw.get("complete", False)),
            requests=Counters.read(raw, REQUEST_COUNTERS),
        )


class BackfillStateStore:
    """Loads and saves one backfill's state (`backfill-<key>.json` beside the checkpoint)."""

    def __init__(self, storage: Storage, key: str) -> None:
        self.storage = storage
        self.path = f"backfill-{key}.json"
        self.lock_name = f"backfill-{key}.lock"

    def load(self) -> BackfillState | None:
        data = self.storage.read_bytes(self.path)
        if data is None:
            return None
        try:
            return BackfillState.from_json(data)
        except (ValueError, TypeError, KeyError) as error:
            raise UsageError(
                f"backfill state {self.storage.display(self.path)} is unreadable "
                f"({error}); delete it or pass --restart"
            ) from None

    def save(self, state: BackfillState) -> None:
        self.storage.write_bytes(self.path, state.to_json())

    def lock(self, holder: str) -> AbstractContextManager[None]:
        return self.storage.exclusive_lock(self.lock_name, holder)


class ActiveSetBuilder:
    """Collects the active set page by page into a Parquet file on local disk, so that
    memory stays flat however many sessions are live."""

    _BATCH_ROWS = 20_000

    def __init__(self) -> None:
        self._path: Path | None = None
        self._writer: pq.ParquetWriter | None = None
        self._pending: list[pa.Table] = []
        self._pending_rows = 0
        self.count = 0

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self._pending.append(table.cast(ACTIVE_SCHEMA))
            self._pending_rows += table.num_rows
            self.count += table.num_rows
            if self._pending_rows >= self._BATCH_ROWS:
                self._write_pending()

    def _write_pending(self) -> None:
        if not self._pending:
            return
        if self._writer is None:
            self._open()
        assert self._writer is not None
        self._writer.write_table(pa.concat_tables(self._pending))
        self._pending, self._pending_rows = [], 0

    def finish(self) -> Path:
        """The whole set as a local Parquet file (the same file on every call), streamed
        into storage by `StateStore.save_active`; `discard` removes it. Ends the adding."""
        if self._writer is None and self._path is None:
            self._open()
        if self._writer is not None:
            self._write_pending()
            self._writer.close()
            self._writer = None
        assert self._path is not None
        return self._path

    def _open(self) -> None:
        handle, name = tempfile.mkstemp(prefix="active-", suffix=".parquet")
        os.close(handle)
        self._path = Path(name)
        self._writer = pq.ParquetWriter(str(self._path), ACTIVE_SCHEMA, compression="zstd")

    def discard(self) -> None:
        """Remove the temporary file (also after a failed run)."""
        if self._writer is not None:
            with contextlib.suppress(OSError, pa.ArrowException):
                self._writer.close()
        self._writer = None
        if self._path is not None:
            self._path.unlink(missing_ok=True)
            self._path = None
