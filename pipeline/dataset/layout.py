"""Reading the dataset back: which files are where, and the latest version of each session."""

from __future__ import annotations

import re
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.dataset.schema import PARTITION_KEY
from pipeline.dataset.sink import DATASET_DIR, MS_PER_DAY, day_label
from pipeline.store.storage import Storage, StoredFile

_PARTITION_FILE = re.compile(
    rf"^{DATASET_DIR}/{PARTITION_KEY}=(\d{{4}}-\d{{2}}-\d{{2}})/([^/]+\.parquet)$"
)


@dataclass(frozen=True)
class DataFile:
    path: str
    partition: str
    size: int


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


def read_file(storage: Storage, path: str, columns: list[str] | None = None) -> pa.Table:
    return storage.read_table(path, columns)


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


def known_versions(
    storage: Storage, from_ms: int | None, to_ms: int | None, skip_run: str
) -> pa.Array:
    """Version keys already stored in the partitions a window touches.

    Files of `skip_run` are left out: a resumed run rewrites those under the same names,
    so their rows must be written again, not skipped.
    """
    first = _day_of(from_ms) if from_ms is not None else "0000-00-00"
    last = _day_of(to_ms) if to_ms is not None else "9999-99-99"
    keys = []
    for data_file in classify_files(storage)[0]:
        if not first <= data_file.partition <= last or f"-{skip_run}-" in data_file.path:
            continue
        table = read_file(storage, data_file.path, columns=["id", "created_at", "updated_at"])
        keys.extend(version_keys(table).chunks)
    if not keys:
        return pa.array([], pa.string())
    return pc.unique(pa.chunked_array(keys, pa.string()).combine_chunks())


def day_of_ms(epoch_ms: int) -> str:
    """The UTC day (`YYYY-MM-DD`, a partition's name) of an epoch-ms timestamp."""
    return day_label(epoch_ms // MS_PER_DAY)  # the sink's own rule, so the two never differ


def partition_of(path: str) -> str:
    """The partition (`YYYY-MM-DD`) of a data file's path under `sessions/`."""
    return path.split("/")[1].split("=", 1)[1]


_day_of = day_of_ms
