"""The two Delta tables as a job's target (docs/delta.md has the commit protocol).

A run's flushes are the generations of one app id, the run id: each commits
`sessions_versions` (only versions not there) then MERGEs `sessions` (newer wins), and the
job checkpoints after, as for Parquet. On start, `recover` re-merges a flush a kill cut
between the two commits; the replay from the saved checkpoint then skips every version
the versions table holds (the run's own committed ones too), so nothing is written twice.
"""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa

from pipeline.dataset.delta import DeltaOutput, DeltaSink, known_versions, recover
from pipeline.dataset.delta.runs import (
    files_partitions,
    files_rows,
    partition_rows,
    run_files,
    run_version_keys,
    touched_partitions,
)
from pipeline.dataset.delta.sink import DeltaGenerations
from pipeline.dataset.layout import day_of
from pipeline.dataset.sink import Sink
from pipeline.dataset.versions import KEY_BUDGET
from pipeline.jobs.core import KnownVersions
from pipeline.store.state import Counters, Window
from pipeline.store.storage import Storage


class DeltaTarget:
    """`sessions/` (latest view) and `sessions_versions/` under the output."""

    # a kill between a run's first two commits must leave its id to the next start's recover
    run_tagged_commits = True

    def __init__(self, tables: DeltaOutput, output: Storage) -> None:
        self.tables = tables
        self.output = output
        self._generations: DeltaGenerations | None = None
        self._run_id = ""
        self._resumed = False
        self._own: pa.Table | None = None  # the run's own versions files, read once at its end

    def ahead_rows(self, flush_rows: int) -> int:
        # a flush's two MERGEs take about as long as walking its rows: overlap them
        return flush_rows

    def begin(self, run_id: str, recorded: Sequence[str], resumed: bool) -> None:
        """Finish a flush cut between its two commits; number the run's next flushes after
        its last committed one (one counter for all its sinks)."""
        recovery = recover(self.tables, run_id)
        self._generations = DeltaGenerations(self.tables, run_id, recovery.generation)
        self._run_id = run_id
        self._resumed = resumed
        self._own = None

    def sink(self, name: str, flush_rows: int, flush_bytes: int) -> Sink:
        generations = self._generations
        if generations is None:
            raise RuntimeError("DeltaTarget.sink before begin")
        return DeltaSink(
            self.tables, generations.app_id, generations.generation, flush_rows, flush_bytes,
            shared=generations,
        )

    def known(self, window: Window, run_id: str, share: int = 1) -> KnownVersions:
        # the run's own committed versions count as held: a replay must not write them again
        budget = KEY_BUDGET // max(1, share)
        return KnownVersions(known_versions(self.tables, window.from_ms, window.to_ms, budget))

    def written_keys(self, run_id: str, files: Sequence[str]) -> list[pa.Array]:
        return [run_version_keys(self.tables, run_id)]

    def partitions(self, files: Sequence[str]) -> list[str]:
        found = set(touched_partitions(self.tables, files))
        if self._resumed:
            # commits a kill cut off before a checkpoint stay in the tables, unrecorded in
            # `files` (the replay skips their versions): the run's own files name them
            found |= files_partitions(self._own_files())
        return sorted(found)

    def settle(self, totals: Counters) -> Counters:
        # the replay skipped (as unchanged) the versions of flushes committed after the last
        # checkpoint: the run's own files in sessions_versions count them
        missing = files_rows(self._own_files()) - totals.rows if self._resumed else 0
        if missing <= 0:
            return totals
        return totals + Counters(rows=missing, unchanged=-min(missing, totals.unchanged))

    def _own_files(self) -> pa.Table:
        if self._own is None:
            self._own = run_files(self.tables, self._run_id)
        return self._own

    def stored_rows(self, low_ms: int, high_ms: int) -> int:
        return partition_rows(self.tables, day_of(low_ms), day_of(high_ms))
