"""One flush into the two tables: the versions append, then the latest MERGE, both carrying
the flush's app-transaction id and checkpoint (see docs/delta.md for the protocol).

A flush is idempotent: a generation the table's `txn` already holds is skipped; a replay
under a new generation inserts no version twice (the versions MERGE only inserts absent
(id, updated_at)) and updates no latest row that is not strictly older.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.dataset.delta.tables import (
    LATEST_DIR,
    VERSIONS_DIR,
    DeltaOutput,
    days_of,
    partition_literals,
    require_deltalake,
)
from pipeline.errors import StorageError

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "sessions_export.checkpoint"  # the commit's custom metadata key
GENERATION_KEY = "sessions_export.generation"
MAX_ATTEMPTS = 8  # optimistic conflicts retried this many times, then DeltaConflict

# a session's createdAt never changes (its partition depends on it too): naming it beside
# the id lets delta-rs skip, from the source's createdAt range, the files of the partition
# that cannot hold a match; each flush's rows are a narrow createdAt range of the walk
SAME_SESSION = "t.id = s.id AND t.created_at = s.created_at"
# null updated_at counts as the oldest; a tie on updated_at goes to the later extraction
NEWER = (
    "(s.updated_at > t.updated_at)"
    " OR (s.updated_at IS NOT NULL AND t.updated_at IS NULL)"
    " OR ((s.updated_at IS NOT DISTINCT FROM t.updated_at) AND s.extracted_at > t.extracted_at)"
)


class DeltaConflict(StorageError):
    """A Delta commit kept conflicting with concurrent writers (exit 5): nothing of the
    failed flush is lost, the next run redoes it."""


class OpenTables:
    """The two tables kept open across a job's flushes: each flush brings its handle up to
    date from the log's newest entries instead of replaying the whole log again."""

    def __init__(self, output: DeltaOutput) -> None:
        self.output = output
        self._open: dict[str, Any] = {}

    def current(self, name: str) -> Any:
        """`name`'s table at its newest committed version."""
        deltalake = require_deltalake()
        table = self._open.get(name)
        if table is not None:
            try:
                table.update_incremental()
                return table
            except (OSError, deltalake.exceptions.DeltaError):
                log.info("reopening %s: its log moved on past an incremental update", name)
        table = self._open[name] = self.output.open(name)
        return table


@dataclass(frozen=True)
class DeltaCommit:
    """What one flush did to one table."""

    table: str
    version: int | None  # the table's version after the commit; None when skipped
    inserted: int
    updated: int


def newest_per_id(rows: pa.Table) -> pa.Table:
    """One row per id: the newest by (updated_at, nulls oldest; then extracted_at)."""
    return _first_per(rows, ["id"])


def one_per_version(rows: pa.Table) -> pa.Table:
    """One row per (id, updated_at): the latest extraction of it."""
    return _first_per(rows, ["id", "updated_at"])


def _first_per(rows: pa.Table, keys: list[str]) -> pa.Table:
    if rows.num_rows <= 1 or pc.count_distinct(rows["id"]).as_py() == rows.num_rows:
        return rows  # every id once (a first export's usual flush): nothing to choose
    order = pc.sort_indices(
        rows,
        sort_keys=[("id", "ascending", "at_end"), ("updated_at", "descending", "at_end"),
                   ("extracted_at", "descending", "at_end")],
    )
    ranked = rows.take(order)
    index = pa.array(range(ranked.num_rows), pa.int64())
    firsts = (
        pa.table({**{k: ranked[k] for k in keys}, "i": index})
        .group_by(keys, use_threads=False)
        .aggregate([("i", "min")])
    )
    return ranked.take(firsts["i_min"])


def commit_properties(app_id: str, generation: int, checkpoint: Mapping[str, Any] | None) -> Any:
    deltalake = require_deltalake()
    metadata = {GENERATION_KEY: str(generation)}
    if checkpoint is not None:
        metadata[CHECKPOINT_KEY] = json.dumps(checkpoint, sort_keys=True)
    return deltalake.CommitProperties(
        app_transactions=[deltalake.Transaction(app_id, generation)], custom_metadata=metadata
    )


def apply_versions(
    output: DeltaOutput, rows: pa.Table, app_id: str, generation: int,
    checkpoint: Mapping[str, Any] | None, tables: OpenTables | None = None,
) -> DeltaCommit:
    """Insert the (id, updated_at) of `rows` the versions table lacks, as `generation`."""
    source = one_per_version(rows)
    predicate = (
        f"{partition_literals(days_of(source))} AND {SAME_SESSION}"
        " AND (t.updated_at IS NOT DISTINCT FROM s.updated_at)"
    )

    def merge(table: Any) -> dict[str, Any]:
        return (
            table.merge(source, predicate, source_alias="s", target_alias="t",
                        streamed_exec=False,  # the source is in memory: its ranges prune files
                        commit_properties=commit_properties(app_id, generation, checkpoint))
            .when_not_matched_insert_all()
            .execute()
        )

    return _commit(tables or OpenTables(output), VERSIONS_DIR, source, app_id, generation,
                   checkpoint, merge)


def apply_latest(
    output: DeltaOutput, rows: pa.Table, app_id: str, generation: int,
    checkpoint: Mapping[str, Any] | None, tables: OpenTables | None = None,
) -> DeltaCommit:
    """MERGE the newest row per id of `rows` into the latest view, as `generation`."""
    source = newest_per_id(rows)
    predicate = f"{partition_literals(days_of(source))} AND {SAME_SESSION}"

    def merge(table: Any) -> dict[str, Any]:
        return (
            table.merge(source, predicate, source_alias="s", target_alias="t",
                        streamed_exec=False,  # the source is in memory: its ranges prune files
                        commit_properties=commit_properties(app_id, generation, checkpoint))
            .when_matched_update_all(predicate=NEWER)
            .when_not_matched_insert_all()
            .execute()
        )

    return _commit(tables or OpenTables(output), LATEST_DIR, source, app_id, generation,
                   checkpoint, merge)


def _commit(
    tables: OpenTables, name: str, source: pa.Table, app_id: str, generation: int,
    checkpoint: Mapping[str, Any] | None, merge: Callable[[Any], dict[str, Any]],
) -> DeltaCommit:
    """Run `merge` unless `generation` is already committed; a merge that changes nothing
    still commits the txn and checkpoint (an empty commit); conflicts are retried."""
    deltalake = require_deltalake()
    for attempt in range(1, MAX_ATTEMPTS + 1):
        table = tables.current(name)
        done = table.transaction_version(app_id)
        if done is not None and done >= generation:
            return DeltaCommit(name, None, 0, 0)
        try:
            metrics = merge(table) if source.num_rows else {}
            table.update_incremental()
            if (table.transaction_version(app_id) or -1) < generation:
                _empty_commit(table, commit_properties(app_id, generation, checkpoint))
                table.update_incremental()
        except deltalake.exceptions.CommitFailedError as error:
            log.info("delta commit to %s conflicted (attempt %d): %s", name, attempt, error)
            time.sleep(min(2.0, 0.05 * 2**attempt))
            continue
        return DeltaCommit(
            name, table.version(), metrics.get("num_target_rows_inserted", 0),
            metrics.get("num_target_rows_updated", 0),
        )
    raise DeltaConflict(
        f"{tables.output.table_uri(name)}: the commit conflicted with other writers {MAX_ATTEMPTS} "
        "times; nothing was lost, run again"
    )


def _empty_commit(table: Any, properties: Any) -> None:
    """A commit that adds no file: the txn and checkpoint of a flush that changed nothing."""
    table.create_write_transaction(
        [], mode="append", schema=table.schema(),
        partition_by=table.metadata().partition_columns, commit_properties=properties,
    )
