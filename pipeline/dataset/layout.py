"""The dataset's layout, in one place: partition key, paths, file names, listing and reads.

```
sessions/created_date=YYYY-MM-DD/part-<run>-<seq>.parquet     written by a run's flush
sessions/created_date=YYYY-MM-DD/part-c<compact>-<seq>.parquet written by `compact`
```

A path part starting with `.` or `_` is hidden (Spark, Hive, DuckDB skip it). Readers go
through here: a file's footer, or its row groups in batches (bounded memory); the
partition-pruned polars view of the whole dataset is `scan.scan_sessions`.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.dataset.schema import PARTITION_KEY
from pipeline.store.storage import Storage, StoredFile

DATASET_DIR = "sessions"
COMPACT_PREFIX = "part-c"

_PARTITION_FILE = re.compile(
    rf"^{DATASET_DIR}/{PARTITION_KEY}=(\d{{4}}-\d{{2}}-\d{{2}})/([^/]+\.parquet)$"
)


@dataclass(frozen=True)
class DataFile:
    path: str
    partition: str
    size: int


def partition_dir(day: str) -> str:
    return f"{DATASET_DIR}/{PARTITION_KEY}={day}"


def data_file_path(day: str, run_id: str, seq: int) -> str:
    """Named by run and flush only: a resumed run redoing a flush overwrites, not duplicates."""
    return f"{partition_dir(day)}/part-{run_id}-{seq:05d}.parquet"


def compacted_file_path(day: str, compact_id: str, seq: int) -> str:
    return f"{partition_dir(day)}/{COMPACT_PREFIX}{compact_id}-{seq:05d}.parquet"


def written_by(path: str, run_id: str) -> bool:
    return f"-{run_id}-" in path.rsplit("/", 1)[-1]


def day_of(epoch_ms: int) -> str:
    """The partition (UTC date) a createdAt in epoch milliseconds falls in."""
    return datetime.fromtimestamp(epoch_ms // 1000, tz=UTC).date().isoformat()


def partition_of(path: str) -> str:
    """The partition (`YYYY-MM-DD`) of a data file's path under `sessions/`."""
    return path.split("/")[1].split("=", 1)[1]


def is_hidden(path: str) -> bool:
    """Readers (Spark, Hive, DuckDB) skip any path part starting with `.` or `_`."""
    return any(part.startswith((".", "_")) for part in path.split("/")[1:])


def classify_files(storage: Storage) -> tuple[list[DataFile], list[StoredFile], list[StoredFile]]:
    """Split everything under `sessions/` into (data files, hidden files, stray files)."""
    data, hidden, stray = [], [], []
    for stored in storage.list_files(DATASET_DIR):
        if is_hidden(stored.path):
            hidden.append(stored)
            continue
        match = _PARTITION_FILE.match(stored.path)
        if match:
            data.append(DataFile(stored.path, match.group(1), stored.size))
        else:
            stray.append(stored)
    return data, hidden, stray


def files_by_partition(storage: Storage) -> dict[str, list[DataFile]]:
    grouped: dict[str, list[DataFile]] = {}
    for data_file in classify_files(storage)[0]:
        grouped.setdefault(data_file.partition, []).append(data_file)
    return grouped


def read_footer(storage: Storage, path: str) -> pq.FileMetaData:
    """One file's footer (schema, rows, row groups) without its data."""
    return storage.read_footer(path)


def file_rows(storage: Storage, path: str) -> int:
    return read_footer(storage, path).num_rows


def iter_batches(
    storage: Storage, path: str, columns: list[str] | None = None, rows: int = 65_536
) -> Iterator[pa.RecordBatch]:
    """One file in record batches of at most `rows`: memory stays flat with file size."""
    return storage.iter_batches(path, columns, rows)


def latest_versions(table: pa.Table) -> pa.Table:
    """One row per id: greatest `updated_at` (null counts as oldest), then `extracted_at`."""
    if table.num_rows == 0:
        return table
    order = pc.sort_indices(
        table,
        sort_keys=[
            ("id", "ascending", "at_end"),
            ("updated_at", "descending", "at_end"),  # null counts as the oldest
            ("extracted_at", "descending", "at_end"),
        ],
    )
    ordered = table.take(order)
    ids = ordered["id"]
    first = pc.not_equal(ids.slice(1), ids.slice(0, len(ids) - 1))
    keep = pa.concat_arrays([pa.array([True]), first.combine_chunks()])
    return ordered.filter(keep)


def version_keys(table: pa.Table) -> pa.ChunkedArray:
    """`id|updated_at-ms` for each row: what identifies one version of a session."""
    updated = pc.cast(table["updated_at"].cast(pa.int64()), pa.string())
    return pc.binary_join_element_wise(table["id"], pc.fill_null(updated, "null"), "|")
