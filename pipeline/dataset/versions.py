"""Which session versions the dataset already holds: the check that lets a re-read window
(lookback, rescan, full refresh) write only what changed.

A version is `id|updated_at-ms`. The stored keys of one partition are read into a set when
a page first needs them, so a page costs a hundred set lookups, not a rebuild of every
stored key: a walk is linear in the rows it meets. Partitions are held least-recently-used
under a budget of keys, so memory stays bounded on any dataset; a
listing walks newest first, so a partition it has left is rarely needed again (if it is,
it is read again: slower, never wrong).
"""

from __future__ import annotations

import logging
from collections import OrderedDict

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.dataset.layout import (
    DataFile,
    day_of,
    files_by_partition,
    iter_batches,
    version_keys,
    written_by,
)
from pipeline.store.storage import Storage
from pipeline.timestamps import MS_PER_DAY

log = logging.getLogger(__name__)

KEY_BUDGET = 500_000  # stored keys held at once: about 70 MB (a set of str costs ~140 B a key)


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
        self._loaded: OrderedDict[int, set[str]] = OrderedDict()
        self._held = 0
        self.partitions_read = 0

    def unseen(self, table: pa.Table) -> pa.BooleanArray:
        """For each row (`id`, `created_at`, `updated_at`): True if its version is not stored."""
        if table.num_rows == 0 or self.nothing_stored():
            return pa.array([True] * table.num_rows, pa.bool_())
        keys = version_keys(table).to_pylist()
        days = pc.divide(table["created_at"].cast(pa.int64()), MS_PER_DAY).to_pylist()
        return pa.array(self.unseen_keys(keys, days), pa.bool_())

    def unseen_keys(self, keys: list[str], day_numbers: list[int]) -> list[bool]:
        """For each version key (`id|updated-ms`) with its createdAt day (days since the
        epoch): True if the partition of that day does not hold it."""
        if self.nothing_stored():
            return [True] * len(keys)
        return [
            key not in self._partition(day) for key, day in zip(keys, day_numbers, strict=True)
        ]

    def nothing_stored(self) -> bool:
        """Whether the dataset holds no file at all (a first export)."""
        if self._files is None:
            self._files = files_by_partition(self.output)
        return not self._files

    def _partition(self, day_number: int) -> set[str]:
        stored = self._loaded.get(day_number)
        if stored is not None:
            self._loaded.move_to_end(day_number)
            return stored
        day = day_of(day_number * MS_PER_DAY)
        stored: set[str] = set()
        if self.first <= day <= self.last and self._files:
            stored = self._read_keys(self._files.get(day, []))
            self.partitions_read += 1
            log.debug("stored versions of %s: %d keys", day, len(stored))
        self._loaded[day_number] = stored
        self._held += len(stored)
        while self._held > self.key_budget and len(self._loaded) > 1:
            _, evicted = self._loaded.popitem(last=False)
            self._held -= len(evicted)
        return stored

    def _read_keys(self, files: list[DataFile]) -> set[str]:
        keys: set[str] = set()
        for data_file in files:
            if written_by(data_file.path, self.exclude_run):
                continue
            for batch in iter_batches(self.output, data_file.path, ["id", "updated_at"]):
                keys.update(version_keys(pa.Table.from_batches([batch])).to_pylist())
        return keys
