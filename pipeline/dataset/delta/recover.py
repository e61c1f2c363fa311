"""Start of a Delta run: finish a flush a crash cut in two, and find the newest checkpoint;
and the versions a window already holds (the Parquet path's `StoredVersions`)."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline.dataset.delta.commit import CHECKPOINT_KEY, apply_latest
from pipeline.dataset.delta.log import LogCommit, app_ids, commits_since, read_added
from pipeline.dataset.delta.tables import DELTA_SCHEMA, LATEST_DIR, VERSIONS_DIR, DeltaOutput
from pipeline.dataset.layout import DataFile, version_keys
from pipeline.dataset.versions import StoredVersions
from pipeline.store.storage import Storage

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeltaRecovery:
    """Where the Delta output stands for one app id."""

    generation: int  # the newest flush committed (0: none); the next flush is generation + 1
    checkpoint: dict[str, Any] | None  # the checkpoint that flush carried
    remerged: tuple[int, ...] = ()  # generations re-merged into `sessions` by this recovery


def recover(output: DeltaOutput, app_id: str) -> DeltaRecovery:
    """Re-merge into `sessions` every flush `sessions_versions` committed but `sessions`
    did not (a crash between the two commits); return the newest flush's checkpoint. A
    job resumes from it when its generation is newer than the state store's."""
    if not output.exists(VERSIONS_DIR):
        return DeltaRecovery(0, None)
    versions = output.open(VERSIONS_DIR, create=False)
    ahead = versions.transaction_version(app_id) or 0
    if ahead == 0:  # nothing committed by this app id: no log to read back
        return DeltaRecovery(0, None)
    latest = output.open(LATEST_DIR)
    behind = latest.transaction_version(app_id) or 0
    storage = Storage(output.table_uri(VERSIONS_DIR))
    missing: list[LogCommit] = []
    newest: LogCommit | None = None
    for commit in commits_since(storage, versions.version(), app_id, behind):
        newest = newest or commit
        if commit.txn is not None and commit.txn > behind:
            missing.append(commit)
    for commit in reversed(missing):
        log.info("re-merging flush %d of %s into %s", commit.txn, app_id, LATEST_DIR)
        rows = read_added(storage, commit.adds, DELTA_SCHEMA)
        apply_latest(output, rows, app_id, int(commit.txn or 0), _checkpoint_of(commit))
    checkpoint = _checkpoint_of(newest) if newest is not None else None
    return DeltaRecovery(ahead, checkpoint, tuple(int(c.txn or 0) for c in reversed(missing)))


def recover_all(output: DeltaOutput) -> dict[str, DeltaRecovery]:
    """`recover` for every app id that committed to `sessions_versions`: what a command
    that is not the writer (`compact`) runs first, not knowing which job was cut."""
    if not output.exists(VERSIONS_DIR):
        return {}
    return {app: recover(output, app)
            for app in sorted(app_ids(Storage(output.table_uri(VERSIONS_DIR))))}


def _checkpoint_of(commit: LogCommit) -> dict[str, Any] | None:
    text = commit.info.get(CHECKPOINT_KEY)
    return None if text is None else json.loads(text)


class DeltaStoredVersions(StoredVersions):
    """The (id, updated_at) `sessions_versions` holds in the partitions of a createdAt
    window, read one partition at a time under the same key budget as the Parquet path."""

    def __init__(self, output: DeltaOutput, from_ms: int | None, to_ms: int | None,
                 key_budget: int | None = None) -> None:
        extra = {} if key_budget is None else {"key_budget": key_budget}
        super().__init__(Storage(output.uri), from_ms, to_ms, exclude_run="", **extra)
        self.delta = output
        self._table: Any = None

    def nothing_stored(self) -> bool:
        if self._files is None:
            self._files = {}
            if self.delta.exists(VERSIONS_DIR):
                self._table = self.delta.open(VERSIONS_DIR, create=False)
                for values in self._table.partitions():
                    day = str(values["created_date"])
                    self._files[day] = [DataFile(day, day, 0)]  # one stand-in per partition
        return not self._files

    def _read_keys(self, files: list[DataFile]) -> set[str]:
        keys: set[str] = set()
        for stand_in in files:
            dataset = self._table.to_pyarrow_dataset(
                file_pruning_predicate=[("created_date", "=", stand_in.partition)]
            )
            for batch in dataset.to_batches(columns=["id", "updated_at"]):
                table = pa.Table.from_batches([batch])
                updated = table["updated_at"].cast(pa.timestamp("ms", "UTC"))
                ms = table.set_column(1, "updated_at", updated)
                keys.update(version_keys(ms).to_pylist())
        return keys


def known_versions(
    output: DeltaOutput, from_ms: int | None, to_ms: int | None, key_budget: int | None = None
) -> DeltaStoredVersions:
    """The versions `sessions_versions` holds in the partitions the window touches."""
    return DeltaStoredVersions(output, from_ms, to_ms, key_budget)
