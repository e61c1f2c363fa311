"""Which session versions the dataset already holds: the check that lets a re-read window
(lookback, rescan, full refresh) write only what changed.

A version is `id|updated_at-ms`. The stored keys of one partition are read when a page
first needs them, kept sorted, and each page is checked with a binary search: a page costs
O(rows · log n), not a rebuild of the whole set, so a walk is linear in the rows it meets.
Partitions are held least-recently-used under a budget of keys, so memory stays bounded
on any dataset; a listing walks newest-first, so a partition it has left is rarely needed
again (if it is, it is read again: slower, never wrong).
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import TYPE_CHECKING

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.dataset.layout import (
    MS_PER_DAY,
    DataFile,
    day_of,
    files_by_partition,
    iter_batches,
    version_keys,
    written_by,
)
from pipeline.store.storage import Storage

if TYPE_CHECKING:
    import polars as pl

log = logging.getLogger(__name__)

KEY_BUDGET = 3_000_000  # stored keys held at once (about 50 bytes each)


class StoredVersions:
    """The versions stored in the partitions of a createdAt window.

    Files of `exclude_run` are left out: a resumed run rewrites those under the same names,
    so their rows must be written again, not skipped.
    """

    def __init__(
        self,
        output: Storage,
        from_ms: int | None,
        to_ms: int | None,
        exclude_run: str,
        key_budget: int = KEY_BUDGET,
    ) -> None:
        self.output = output
        self.first = day_of(from_ms) if from_ms is not None else "0000-00-00"
        self.last = day_of(to_ms) if to_ms is not None else "9999-99-99"
        self.exclude_run = exclude_run
        self.key_budget = key_budget
        self._files: dict[str, list[DataFile]] | None = None
        self._loaded: OrderedDict[str, pl.Series] = OrderedDict()
        self.partitions_read = 0

    def unseen(self, table: pa.Table) -> pa.BooleanArray:
        """For each row (`id`, `created_at`, `updated_at`): True if its version is not stored."""
        if table.num_rows == 0 or self._nothing_stored():
            return pa.array([True] * table.num_rows, pa.bool_())
        import polars as pl  # only once there is something stored: a first export needs none

        keys = pl.Series(version_keys(table))
        days = pl.Series(pc.divide(table["created_at"].cast(pa.int64()), MS_PER_DAY))
        seen = pl.Series([False] * table.num_rows)
        for day_number in days.unique().to_list():
            stored = self._partition(day_of(day_number * MS_PER_DAY))
            if stored is None or stored.is_empty():
                continue
            rows = days == day_number
            wanted = keys.filter(rows)
            at = stored.search_sorted(wanted).clip(upper_bound=len(stored) - 1)
            found = stored.gather(at) == wanted
            seen = seen.scatter(rows.arg_true(), found)
        return (~seen).to_arrow()

    def _nothing_stored(self) -> bool:
        if self._files is None:
            self._files = files_by_partition(self.output)
        return not self._files

    def _partition(self, day: str) -> pl.Series | None:
        if not self.first <= day <= self.last:
            return None
        if day in self._loaded:
            self._loaded.move_to_end(day)
            return self._loaded[day]
        assert self._files is not None
        keys = self._read_keys(self._files.get(day, []))
        self._loaded[day] = keys
        self.partitions_read += 1
        held = sum(len(k) for k in self._loaded.values())
        while held > self.key_budget and len(self._loaded) > 1:
            _, evicted = self._loaded.popitem(last=False)
            held -= len(evicted)
        log.debug("stored versions of %s: %d keys", day, len(keys))
        return keys

    def _read_keys(self, files: list[DataFile]) -> pl.Series:
        import polars as pl

        chunks = []
        for data_file in files:
            if written_by(data_file.path, self.exclude_run):
                continue
            for batch in iter_batches(self.output, data_file.path, ["id", "updated_at"]):
                chunks.append(pl.Series(version_keys(pa.Table.from_batches([batch]))))
        if not chunks:
            return pl.Series([], dtype=pl.String)
        return pl.concat(chunks).unique().sort()
