"""`compact`: rewrite partitions so that each holds one row per session id, the latest.

Per partition, in bounded memory whatever its size: the rows are read in batches and
spilled by a hash of their id into buckets on local disk (Arrow IPC, lz4), so that every
version of a session lands in the same bucket; each bucket is then small enough to keep
the latest version of each id in memory, and is appended to one new file
(`part-c<id>-00000.parquet`, streamed to a hidden name, visible once whole). Only then are
the files it replaces deleted: a crash in between leaves rows duplicated, never missing.
Each row is read twice and written twice: the cost grows linearly with the rows. A
partition small enough for one bucket skips the spill. A partition whose only files are
those of one earlier compaction is left alone.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.dataset.layout import (
    COMPACT_PREFIX,
    DataFile,
    compacted_file_path,
    files_by_partition,
    iter_batches,
    latest_versions,
    read_footer,
)
from pipeline.dataset.schema import SCHEMA
from pipeline.dataset.sink import ROW_GROUP_ROWS
from pipeline.dataset.spill import IdBuckets
from pipeline.store.storage import Storage

log = logging.getLogger(__name__)

# Parquet's uncompressed bytes per bucket (measured: 1,500,000 rows in 34 buckets of this
# size compact at 291 MB peak RSS; 17 buckets of twice the size at 360 MB)
BUCKET_BYTES = 8 * 1024 * 1024
_BATCH_ROWS = 16_384


@dataclass(frozen=True)
class CompactSummary:
    partitions_seen: int
    partitions_rewritten: int
    rows_before: int
    rows_after: int
    files_removed: int

    def line(self) -> str:
        return (
            f"compact done: {self.partitions_rewritten} of {self.partitions_seen} partitions "
            f"rewritten, {self.rows_before} rows -> {self.rows_after}, "
            f"{self.files_removed} files replaced"
        )


def _compaction_of(path: str) -> str | None:
    name = path.rsplit("/", 1)[-1]
    return name[: name.rfind("-")] if name.startswith(COMPACT_PREFIX) else None


def already_compacted(files: list[DataFile]) -> bool:
    """Every file comes from one earlier compaction: nothing to do."""
    runs = {_compaction_of(f.path) for f in files}
    return len(runs) == 1 and None not in runs


def compact(output: Storage, compact_id: str, only: Iterable[str] | None = None) -> CompactSummary:
    wanted = set(only) if only is not None else None
    grouped = files_by_partition(output)
    rewritten = rows_before = rows_after = removed = 0
    for partition, files in sorted(grouped.items()):
        if wanted is not None and partition not in wanted:
            continue
        if already_compacted(files):
            continue
        target = compacted_file_path(partition, compact_id, 0)
        before, after = compact_partition(output, files, target)
        for data_file in files:
            if data_file.path != target:
                output.delete(data_file.path)
        rewritten += 1
        rows_before += before
        rows_after += after
        removed += len(files)
        log.info("compacted %s: %d rows -> %d", partition, before, after)
    return CompactSummary(len(grouped), rewritten, rows_before, rows_after, removed)


def bucket_count(output: Storage, files: list[DataFile]) -> int:
    """Buckets that keep each one under `BUCKET_BYTES`, from the files' footers."""
    total = 0
    for data_file in files:
        footer = read_footer(output, data_file.path)
        total += sum(footer.row_group(i).total_byte_size for i in range(footer.num_row_groups))
    return max(1, math.ceil(total / BUCKET_BYTES))


def compact_partition(output: Storage, files: list[DataFile], target: str) -> tuple[int, int]:
    """Write the latest version of every session in `files` to `target`; (rows in, out)."""
    buckets = bucket_count(output, files)
    rows_in = rows_out = 0
    with (
        output.open_output(target) as stream,
        pq.ParquetWriter(stream, SCHEMA, compression="zstd") as writer,
    ):
        for bucket in _buckets(output, files, buckets):
            rows_in += bucket.num_rows
            latest = latest_versions(bucket)
            del bucket
            rows_out += latest.num_rows
            writer.write_table(latest, row_group_size=ROW_GROUP_ROWS)
    return rows_in, rows_out


def _buckets(output: Storage, files: list[DataFile], buckets: int) -> Iterator[pa.Table]:
    """The partition's rows in `buckets` tables, every version of one id in the same one."""
    with IdBuckets(SCHEMA, buckets) as spill:
        for data_file in files:
            for batch in iter_batches(output, data_file.path, rows=_BATCH_ROWS):
                spill.add(pa.Table.from_batches([batch]))
        yield from spill.drain()
