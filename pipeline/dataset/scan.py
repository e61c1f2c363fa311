"""`scan_sessions`: the dataset as a polars LazyFrame, for notebooks and orchestrators.

Polars lists and reads the files itself (local paths, `s3://`, `gs://`, with
`storage_options` for object stores), skipping hidden files the way other readers do;
`created_date` comes from the directory names, so a filter on it reads only those
partitions, also through the latest-version step (which works per partition: an id never
spans two). A Delta output (`table_format="delta"`, or found by its `sessions/_delta_log/`)
is read through its log with polars' `scan_delta`, pruned on `created_date` the same way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.dataset.layout import DATASET_DIR
from pipeline.dataset.schema import PARTITION_KEY, SCHEMA
from pipeline.errors import ExportError
from pipeline.store.storage import Storage, storage_endpoint

# visible data files only: a name starting with `.` or `_` is a temp file readers skip.
# polars expands a local glob's class as a glob (`[!…]`), an object store's as a regex (`[^…]`)
_LOCAL_FILES = f"{DATASET_DIR}/{PARTITION_KEY}=*/[!._]*.parquet"
_REMOTE_FILES = f"{DATASET_DIR}/{PARTITION_KEY}=*/[^._]*.parquet"


def polars_schema() -> pl.Schema:
    return pl.Schema(pl.from_arrow(SCHEMA.empty_table()).schema)


def scan_sessions(
    output: str | Path,
    *,
    latest: bool = True,
    storage_options: dict[str, Any] | None = None,
    table_format: str | None = None,
) -> pl.LazyFrame:
    """Every stored session (`latest=True`: its latest version only; else every version),
    with the contract's columns in order plus `created_date` (a Date). `table_format`:
    `"parquet"` or `"delta"`; by default Delta when `<output>/sessions/_delta_log/` exists."""
    base = str(output).rstrip("/")
    if (table_format or ("delta" if is_delta_output(base) else "parquet")).lower() == "delta":
        from pipeline.dataset.delta import require_deltalake, scan_delta_sessions

        require_deltalake()
        return scan_delta_sessions(base, latest=latest, storage_options=storage_options)
    options = _object_store_options(base, storage_options)
    columns = [*SCHEMA.names, PARTITION_KEY]
    local = "://" not in base or base.startswith("file://")
    if local and not any(Path(base.removeprefix("file://")).glob(_LOCAL_FILES)):
        empty = polars_schema()
        empty[PARTITION_KEY] = pl.Date
        return pl.LazyFrame(schema=empty)
    frame = pl.scan_parquet(
        f"{base}/{_LOCAL_FILES if local else _REMOTE_FILES}",
        schema=polars_schema(),
        hive_partitioning=True,
        hive_schema={PARTITION_KEY: pl.Date},
        storage_options=options,
    ).select(columns)
    if not latest:
        return frame
    # greatest updated_at (null counts as the oldest), ties to the greatest extracted_at
    return frame.sort(
        ["updated_at", "extracted_at"], descending=True, nulls_last=True
    ).unique(subset=[PARTITION_KEY, "id"], keep="first")


def is_delta_output(output: str) -> bool:
    """Whether `output` holds the Delta tables (a `sessions/_delta_log/` directory)."""
    try:
        storage = Storage(output)
        log_dir = storage.full_path(f"{DATASET_DIR}/_delta_log")
        return storage.fs.get_file_info(log_dir).type == pafs.FileType.Directory
    except (ExportError, OSError, pa.ArrowException):
        return False  # a bad or unreachable output: the Parquet scan reports it


def _object_store_options(base: str, given: dict[str, Any] | None) -> dict[str, Any] | None:
    """The endpoint the export itself uses (`AWS_ENDPOINT_URL`), plain http allowed only
    when that endpoint is plain http; the caller's options win."""
    if not base.startswith("s3://"):
        return given
    options: dict[str, Any] = {}
    endpoint = storage_endpoint()
    if endpoint:
        options["aws_endpoint_url"] = endpoint
        if endpoint.startswith("http://"):
            options["aws_allow_http"] = "true"
    options.update(given or {})
    return options or None
