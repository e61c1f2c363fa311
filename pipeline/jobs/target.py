"""Where a job's rows go: hive-partitioned Parquet files (`ParquetTarget`, here) or the two
Delta tables (`jobs.delta_target.DeltaTarget`). The drive loop is the same; a job asks its
target for the sink the writer flushes, the versions already held, and what a run wrote.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import pyarrow as pa

from pipeline.dataset.layout import (
    day_of,
    file_rows,
    files_by_partition,
    partition_of,
    version_keys,
)
from pipeline.dataset.sink import ParquetSink, Sink
from pipeline.jobs.core import KnownVersions, remove_unrecorded
from pipeline.store.state import Counters, Window
from pipeline.store.storage import Storage


class DatasetTarget(Protocol):
    """The output's table format, as a job sees it."""

    output: Storage  # where the run manifests (`_runs/`) go
    # flushes are commits tagged with the run id, which the next start must know to finish
    # a half-done one: a new run's state is saved before its first flush, and a restarted
    # backfill's old run is finished first
    run_tagged_commits: bool

    def ahead_rows(self, flush_rows: int) -> int:
        """Rows a walk may fetch ahead of the writer while it flushes (0: two batches)."""
        ...

    def begin(self, run_id: str, recorded: Sequence[str], resumed: bool) -> None:
        """Before the first flush of `run_id` (under the run lock): make a resumed run's
        leftovers harmless; `recorded` are the flushes its state holds."""
        ...

    def sink(self, name: str, flush_rows: int, flush_bytes: int) -> Sink:
        """A sink for one walk of the run begun (`name`: its files' run part)."""
        ...

    def known(self, window: Window, run_id: str, share: int = 1) -> KnownVersions:
        """The versions stored in the partitions `window` touches (`share`: how many walks
        hold such an index at once)."""
        ...

    def written_keys(self, run_id: str, files: Sequence[str]) -> list[pa.Array]:
        """Version keys `run_id` wrote in the flushes `files`."""
        ...

    def partitions(self, files: Sequence[str]) -> list[str]:
        """The partitions the flushes `files` touched, for the manifest."""
        ...

    def stored_rows(self, low_ms: int, high_ms: int) -> int:
        """Rows stored in the partitions of a createdAt span (a cost estimate)."""
        ...

    def settle(self, totals: Counters) -> Counters:
        """The counters of the run begun, for its report, with what an interrupted attempt
        wrote and its resume could not count (the resume skipped those versions as held)."""
        ...


class ParquetTarget:
    """Hive-partitioned Parquet files under `sessions/`, one per partition per flush."""

    run_tagged_commits = False  # files of an unrecorded run are never read back

    def __init__(self, output: Storage) -> None:
        self.output = output

    def ahead_rows(self, flush_rows: int) -> int:
        return 0  # a flush writes in milliseconds: two batches ahead keep the walk busy

    def begin(self, run_id: str, recorded: Sequence[str], resumed: bool) -> None:
        if resumed:
            remove_unrecorded(self.output, run_id, recorded)

    def sink(self, name: str, flush_rows: int, flush_bytes: int) -> Sink:
        return ParquetSink(self.output, name, flush_rows, flush_bytes)

    def known(self, window: Window, run_id: str, share: int = 1) -> KnownVersions:
        # this run's files are left out: a resumed run rewrites them under the same names
        return KnownVersions.stored(self.output, window, run_id, share)

    def written_keys(self, run_id: str, files: Sequence[str]) -> list[pa.Array]:
        return [
            version_keys(self.output.read_table(path, columns=["id", "updated_at"]))
            .combine_chunks()
            for path in files
        ]

    def partitions(self, files: Sequence[str]) -> list[str]:
        return sorted({partition_of(path) for path in files})

    def settle(self, totals: Counters) -> Counters:
        return totals  # a resume rewrites the unrecorded files, and counts them again

    def stored_rows(self, low_ms: int, high_ms: int) -> int:
        first, last = day_of(low_ms), day_of(high_ms)
        total = 0
        for day, files in files_by_partition(self.output).items():
            if first <= day <= last:
                total += sum(file_rows(self.output, f.path) for f in files)
        return total
