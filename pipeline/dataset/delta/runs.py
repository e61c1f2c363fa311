"""What one run did to the Delta tables, read back for the job's bookkeeping: the versions
it wrote (change capture after a resume), the partitions its commits touched (its
manifest), and how many rows a span of partitions holds (a cost estimate)."""

from __future__ import annotations

from collections.abc import Sequence

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from pipeline.dataset.delta.log import LOG_DIR, read_commit
from pipeline.dataset.delta.tables import LATEST_DIR, VERSIONS_DIR, DeltaOutput
from pipeline.dataset.layout import version_keys
from pipeline.dataset.schema import PARTITION_KEY
from pipeline.store.storage import Storage


def run_version_keys(output: DeltaOutput, run_id: str) -> pa.Array:
    """The version keys (`id|updated-ms`) `sessions_versions` holds from `run_id`."""
    if not output.exists(VERSIONS_DIR):
        return pa.array([], pa.string())
    dataset = output.open(VERSIONS_DIR, create=False).to_pyarrow_dataset()
    rows = dataset.to_table(columns=["id", "updated_at"], filter=ds.field("run_id") == run_id)
    updated = rows["updated_at"].cast(pa.timestamp("ms", "UTC"))
    return version_keys(rows.set_column(1, "updated_at", updated)).combine_chunks()


def run_files(output: DeltaOutput, run_id: str) -> pa.Table:
    """The add actions (flattened) of the `sessions_versions` files that hold only
    `run_id`'s rows, by the log's file statistics: what a run wrote, its flushes a kill cut
    off before the job's checkpoint too (on any attempt), without reading the log back. A
    file OPTIMIZE merged with other runs' rows is not among them."""
    if not output.exists(VERSIONS_DIR):
        return pa.table({})
    actions = pa.table(output.open(VERSIONS_DIR, create=False).get_add_actions(flatten=True))
    if "min.run_id" not in actions.column_names:  # no statistics kept for the column
        return pa.table({})
    mine = pc.and_(pc.equal(actions["min.run_id"], run_id), pc.equal(actions["max.run_id"], run_id))
    return actions.filter(pc.fill_null(mine, False))


def files_partitions(files: pa.Table) -> set[str]:
    """The partitions of add actions such as `run_files`'."""
    if not files.num_rows:
        return set()
    return {str(day) for day in files[f"partition.{PARTITION_KEY}"].to_pylist()}


def files_rows(files: pa.Table) -> int:
    """The rows of add actions such as `run_files`'."""
    return int(pc.sum(files["num_records"]).as_py() or 0) if files.num_rows else 0


def touched_partitions(output: DeltaOutput, entries: Sequence[str]) -> list[str]:
    """The partitions the commits at `entries` (`<table>/_delta_log/<version>.json`) added
    files to, sorted."""
    days: set[str] = set()
    for entry in entries:
        table, _, name = entry.partition(f"/{LOG_DIR}/")
        commit = read_commit(Storage(output.table_uri(table)), int(name.split(".")[0]), "")
        for _, values in commit.adds if commit is not None else ():
            if values.get(PARTITION_KEY):
                days.add(values[PARTITION_KEY])
    return sorted(days)


def partition_rows(output: DeltaOutput, first_day: str, last_day: str) -> int:
    """Rows the latest table holds in the partitions `first_day` .. `last_day` (ISO dates),
    from the log's file statistics."""
    if not output.exists(LATEST_DIR):
        return 0
    # delta-rs hands back an arro3 table: read it through the Arrow C interface
    actions = pa.table(output.open(LATEST_DIR, create=False).get_add_actions(flatten=True))
    days = actions[f"partition.{PARTITION_KEY}"].cast(pa.string())
    inside = pc.and_(pc.greater_equal(days, first_day), pc.less_equal(days, last_day))
    return int(pc.sum(actions["num_records"].filter(inside)).as_py() or 0)
