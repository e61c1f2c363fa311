"""`DeltaSink`: the Parquet sink's interface over the two Delta tables, so the job's
flushing writer drives either one."""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from pipeline.dataset.delta.commit import DeltaCommit, OpenTables, apply_latest, apply_versions
from pipeline.dataset.delta.tables import DELTA_SCHEMA, DeltaOutput, days_of, to_delta_rows


@dataclass(frozen=True)
class DeltaWritten:
    """One table's commit of a flush, shaped like the Parquet sink's `WrittenFile`."""

    path: str  # the commit's log entry, e.g. sessions/_delta_log/00000000000000000007.json
    partition: str  # the touched partitions, comma separated
    rows: int  # rows inserted or updated
    bytes: int = 0

    @property
    def committed(self) -> bool:
        """Whether the flush wrote a log entry (not skipped as already committed)."""
        return self.path.endswith(".json")


class DeltaGenerations:
    """The flushes of one app id in this process, numbered and committed one at a time:
    sinks that share it (a backfill's windows) never conflict with each other."""

    def __init__(self, output: DeltaOutput, app_id: str, generation: int) -> None:
        self.output = output
        self.app_id = app_id
        self.generation = generation  # the last generation committed (recover's answer)
        self.tables = OpenTables(output)
        self._lock = threading.Lock()

    def commit(
        self, rows: pa.Table, checkpoint: Mapping[str, Any] | None
    ) -> list[DeltaWritten]:
        """`rows` (Delta rows) to both tables as the next generation."""
        with self._lock:
            generation = self.generation + 1
            versions = apply_versions(
                self.output, rows, self.app_id, generation, checkpoint, self.tables
            )
            latest = apply_latest(
                self.output, rows, self.app_id, generation, checkpoint, self.tables
            )
            self.generation = generation
        days = ",".join(sorted(days_of(rows)))
        return [_written(c, days) for c in (versions, latest)]


class DeltaSink:
    """Buffers flattened tables; a flush commits them to `sessions_versions`, then MERGEs
    them into `sessions`, both as the next generation of `app_id` (docs/delta.md)."""

    def __init__(
        self, output: DeltaOutput, app_id: str, generation: int, flush_rows: int,
        flush_bytes: int, shared: DeltaGenerations | None = None,
    ) -> None:
        self.generations = shared or DeltaGenerations(output, app_id, generation)
        self.flush_rows = flush_rows
        self.flush_bytes = flush_bytes
        self._tables: list[pa.Table] = []
        self.pending_rows = 0
        self.pending_bytes = 0
        self.written: list[DeltaWritten] = []  # what the last flush did to each table

    @property
    def generation(self) -> int:
        return self.generations.generation

    @property
    def next_generation(self) -> int:
        """The generation the next flush commits: put it in the checkpoint it carries."""
        return self.generations.generation + 1

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self._tables.append(table)
            self.pending_rows += table.num_rows
            self.pending_bytes += table.get_total_buffer_size()

    def should_flush(self) -> bool:
        return self.pending_rows >= self.flush_rows or self.pending_bytes >= self.flush_bytes

    def flush(self, seq: int, checkpoint: Mapping[str, Any] | None = None) -> list[str]:
        """Commit what is buffered as the next generation, with `checkpoint` in both
        commits; an empty buffer still commits the checkpoint when one is given. The log
        entries written (`written` says more). `seq` is the job's flush number (kept for
        the Parquet sink's interface)."""
        if not self._tables and checkpoint is None:
            return []
        rows = (
            to_delta_rows(pa.concat_tables(self._tables)) if self._tables
            else DELTA_SCHEMA.empty_table()
        )
        self.written = self.generations.commit(rows, checkpoint)
        self._tables = []
        self.pending_rows = self.pending_bytes = 0
        return [w.path for w in self.written if w.committed]


def _written(commit: DeltaCommit, days: str) -> DeltaWritten:
    entry = "" if commit.version is None else f"/_delta_log/{commit.version:020d}.json"
    return DeltaWritten(f"{commit.table}{entry}", days, commit.inserted + commit.updated)
