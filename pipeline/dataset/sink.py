"""The Parquet sink: buffer flattened pages, write one file per touched partition per flush.

Files are `sessions/created_date=YYYY-MM-DD/part-<run>-<seq>.parquet`, named only by run
and flush number, so a resumed run that redoes a flush overwrites rather than duplicates.
Each file is written whole, then made visible atomically by the storage.
"""

from __future__ import annotations

from typing import Protocol

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.dataset.layout import data_file_path, day_of
from pipeline.dataset.schema import SCHEMA
from pipeline.store.storage import Storage
from pipeline.timestamps import MS_PER_DAY as _MS_PER_DAY

BATCH_ROWS = 2000  # buffered pages are joined into batches of about this many rows
ROW_GROUP_ROWS = 8192  # bounds the Parquet writer's buffers: peak memory stays flat with file size


class Sink(Protocol):
    """Where a job's rows go: buffered by `add`, written by `flush` when `should_flush` says
    so (or at the end). `FlushingWriter` drives it and checkpoints after each flush."""

    flush_rows: int  # rows buffered before a flush is due

    def add(self, table: pa.Table) -> None: ...

    def should_flush(self) -> bool: ...

    def flush(self, seq: int) -> list[str]:
        """Write what is buffered as flush number `seq` (the same `seq` again rewrites the
        same files); the paths written, none when nothing was buffered."""
        ...


def use_lean_memory_pool() -> None:
    """Prefer jemalloc (else the system allocator) over mimalloc, which holds on to freed
    pages: measured peak RSS of a 100,000-session export drops from ~150 MB to ~130 MB."""
    try:
        pa.set_memory_pool(pa.jemalloc_memory_pool())
    except (NotImplementedError, pa.ArrowNotImplementedError):
        pa.set_memory_pool(pa.system_memory_pool())


def write_parquet(storage: Storage, path: str, table: pa.Table) -> int:
    """Write `table` as one zstd Parquet file at `path`; returns its size in bytes."""
    buffer = pa.BufferOutputStream()
    pq.write_table(
        table.cast(SCHEMA),
        buffer,
        compression="zstd",
        write_statistics=True,
        row_group_size=ROW_GROUP_ROWS,
    )
    data = buffer.getvalue()
    storage.write_bytes(path, memoryview(data))
    return data.size


def split_by_day(table: pa.Table) -> list[tuple[str, pa.Table]]:
    """Split rows by the UTC date of `created_at`, in date order.

    A listing arrives newest first, so each day is usually one contiguous run of rows and
    is cut out as a zero-copy slice; rows in any other order are gathered with a filter.
    """
    if table.num_rows == 0:
        return []
    days = pc.divide(table["created_at"].cast(pa.int64()), _MS_PER_DAY).combine_chunks()
    changes = pc.indices_nonzero(pc.not_equal(days.slice(1), days.slice(0, len(days) - 1)))
    starts = [0, *(i + 1 for i in changes.to_pylist())]
    run_days = [days[i].as_py() for i in starts]
    parts: dict[int, pa.Table] = {}
    if len(set(run_days)) == len(run_days):
        ends = [*starts[1:], table.num_rows]
        for day, start, end in zip(run_days, starts, ends, strict=True):
            parts[day] = table.slice(start, end - start)
    else:
        for day in set(run_days):
            parts[day] = table.filter(pc.equal(days, day))
    return [(_day_label(day), parts[day]) for day in sorted(parts)]


def _day_label(day: int) -> str:
    return day_of(day * _MS_PER_DAY)  # the layout's one day rule


class ParquetSink:
    """Collects tables until a flush writes them out, grouped by partition."""

    def __init__(self, storage: Storage, run_id: str, flush_rows: int, flush_bytes: int) -> None:
        self.storage = storage
        self.run_id = run_id
        self.flush_rows = flush_rows
        self.flush_bytes = flush_bytes
        self._tables: list[pa.Table] = []
        self._recent: list[pa.Table] = []  # pages not yet joined into one batch
        self._recent_rows = 0
        self.pending_rows = 0
        self.pending_bytes = 0

    def add(self, table: pa.Table) -> None:
        if table.num_rows:
            self._recent.append(table)
            self._recent_rows += table.num_rows
            self.pending_rows += table.num_rows
            # an upper bound (a buffer shared by two columns counts twice), ~30x cheaper
            self.pending_bytes += table.get_total_buffer_size()
            if self._recent_rows >= BATCH_ROWS:
                self._join_recent()

    def _join_recent(self) -> None:
        """Many small page tables as one contiguous batch: fewer, larger allocations while
        buffered, and a cheaper Parquet write than from hundreds of small chunks."""
        if self._recent:
            self._tables.append(pa.concat_tables(self._recent).combine_chunks())
            self._recent, self._recent_rows = [], 0

    def should_flush(self) -> bool:
        return self.pending_rows >= self.flush_rows or self.pending_bytes >= self.flush_bytes

    def flush(self, seq: int) -> list[str]:
        """Write what is buffered as flush number `seq`; empty buffer writes nothing."""
        self._join_recent()
        if not self._tables:
            return []
        table = pa.concat_tables(self._tables)
        self._tables = []
        self.pending_rows = self.pending_bytes = 0
        written = []
        for day, part in split_by_day(table):
            path = data_file_path(day, self.run_id, seq)
            write_parquet(self.storage, path, part)
            written.append(path)
        return written
