"""The checkpoint: where the incremental export stands, saved atomically after every flush.

Plain frozen dataclasses, (de)serialised as JSON; `StateStore` is the only place that reads
or writes them. The secret key is never part of the state.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.errors import StorageError
from pipeline.storage import Storage

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
    cursor: str | None = None
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
    # sessions known to have no triggerConfig (not fetched again): id -> createdAt ms
    without_trigger_config: dict[str, int] = field(default_factory=dict)
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
                "without_trigger_config",
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

    def save_active(self, table: pa.Table) -> None:
        buffer = pa.BufferOutputStream()
        pq.write_table(table.cast(ACTIVE_SCHEMA), buffer, compression="zstd")
        self.storage.write_bytes(ACTIVE_FILE, memoryview(buffer.getvalue()))

    def reset(self) -> None:
        self.storage.delete(CHECKPOINT_FILE)
        self.storage.delete(ACTIVE_FILE)

    def lock(self, holder: str):  # noqa: ANN201 - a context manager
        return self.storage.exclusive_lock(LOCK_FILE, holder)
