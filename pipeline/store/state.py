"""The checkpoint: where the incremental export stands, saved atomically after every flush.

Plain frozen dataclasses, (de)serialised as JSON; `StateStore` is the only place that reads
or writes them. The secret key is never part of the state.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import StorageError
from pipeline.store.storage import Storage

CHECKPOINT_FILE = "checkpoint.json"
ACTIVE_FILE = "active.parquet"  # the sessions ACTIVE at the last run (change capture)
ACTIVE_SCHEMA = pa.schema(
    [("id", pa.string()), ("created_ms", pa.int64()), ("updated_ms", pa.int64())]
)
LOCK_FILE = "lock"
STATE_VERSION = 1


@dataclass(frozen=True)
class Window:
    """A createdAt range in epoch milliseconds, both ends inclusive; None = unbounded."""

    from_ms: int | None
    to_ms: int | None


@dataclass(frozen=True)
class RunProgress:
    """An unfinished run: enough to resume it exactly where its last flush left it."""

    run_id: str
    mode: str
    window: Window
    filters: dict[str, str]
    started_at_ms: int
    cursor: str | None = None  # before exact walks: ignored now (the window restarts)
    walk: dict[str, Any] | None = None  # the window walk's state (pipeline.api.walker)
    flush_seq: int = 0
    walk_complete: bool = False
    rows: int = 0
    unchanged: int = 0  # rows re-read in the lookback whose version was already stored
    pages: int = 0
    requests: int = 0
    retries: int = 0
    rate_limited: int = 0
    max_created_ms: int | None = None
    files: tuple[str, ...] = ()
    resumed: int = 0

    def after_flush(self, **changes: Any) -> RunProgress:
        return replace(self, **changes)


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
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode()

    @staticmethod
    def from_json(data: bytes) -> Checkpoint:
        raw = json.loads(data)
        progress = raw.get("in_progress")
        if progress is not None:
            progress = RunProgress(
                **{
                    **progress,
                    "window": Window(**progress["window"]),
                    "files": tuple(progress.get("files", ())),
                }
            )
        known = {
            k: raw[k]
            for k in (
                "high_water_ms",
                "last_run_id",
                "last_success_ms",
                "filters",
                "active_sessions",
            )
            if k in raw
        }
        return Checkpoint(**known, in_progress=progress, version=raw.get("version", 1))


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

    def lock(self, holder: str):  # noqa: ANN201 - a context manager
        return self.storage.exclusive_lock(LOCK_FILE, holder)


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
