"""`compact`: rewrite partitions so that each holds one row per session id, the latest.

Per partition: read every file, keep the latest version of each id, write one new file
(`part-c<id>-00000.parquet`, visible atomically), then delete the files it replaces. A
crash in between leaves rows duplicated, never missing. A partition whose only file is
already a compacted one is left alone.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import pyarrow as pa

from pipeline.dataset.layout import files_by_partition, latest_versions, read_file
from pipeline.dataset.schema import SCHEMA
from pipeline.dataset.sink import partition_dir, write_parquet
from pipeline.store.storage import Storage

log = logging.getLogger(__name__)

COMPACT_PREFIX = "part-c"


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


def is_compacted(path: str) -> bool:
    return path.rsplit("/", 1)[-1].startswith(COMPACT_PREFIX)


def compact(output: Storage, compact_id: str, only: Iterable[str] | None = None) -> CompactSummary:
    wanted = set(only) if only is not None else None
    grouped = files_by_partition(output)
    rewritten = rows_before = rows_after = removed = 0
    for partition, files in sorted(grouped.items()):
        if wanted is not None and partition not in wanted:
            continue
        if len(files) == 1 and is_compacted(files[0].path):
            continue
        table = pa.concat_tables([read_file(output, f.path).cast(SCHEMA) for f in files])
        latest = latest_versions(table)
        target = f"{partition_dir(partition)}/{COMPACT_PREFIX}{compact_id}-00000.parquet"
        write_parquet(
            output, target, latest.sort_by([("created_at", "descending"), ("id", "descending")])
        )
        for data_file in files:
            if data_file.path != target:
                output.delete(data_file.path)
        rewritten += 1
        rows_before += table.num_rows
        rows_after += latest.num_rows
        removed += len(files)
        log.info("compacted %s: %d rows -> %d", partition, table.num_rows, latest.num_rows)
    return CompactSummary(len(grouped), rewritten, rows_before, rows_after, removed)
