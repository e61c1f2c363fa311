"""The checkpoint: where the incremental export stands, saved atomically after every flush.

Plain frozen dataclasses, (de)serialised as JSON; `StateStore` is the only place that reads
or writes them. The secret key is never part of the state.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from typing import Any

from pipeline.errors import StorageError
from pipeline.storage import Storage

CHECKPOINT_FILE = "checkpoint.json"
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
    # sessions ACTIVE at the last run: id -> [createdAt ms, updatedAt ms or None]
    active: dict[str, list[int | None]] = field(default_factory=dict)
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
                "active",
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

    def reset(self) -> None:
        self.storage.delete(CHECKPOINT_FILE)

    def lock(self, holder: str):  # noqa: ANN201 - a context manager
        return self.storage.exclusive_lock(LOCK_FILE, holder)
