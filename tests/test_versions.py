"""StoredVersions: which versions a partition already holds, loaded per partition."""

from __future__ import annotations

from datetime import date

import pyarrow as pa

from pipeline.dataset.layout import data_file_path
from pipeline.dataset.schema import SCHEMA
from pipeline.dataset.sink import write_parquet
from pipeline.dataset.versions import StoredVersions
from pipeline.store.storage import Storage

DAY = 86_400_000
D1 = (date(2026, 11, 1) - date(1970, 1, 1)).days * DAY


def rows(*versions: tuple[str, int, int | None]) -> pa.Table:
    """(id, created ms, updated ms) rows with every other column null."""
    columns = {f.name: pa.nulls(len(versions), f.type) for f in SCHEMA}
    columns["id"] = pa.array([v[0] for v in versions])
    columns["created_at"] = pa.array([v[1] for v in versions], SCHEMA.field("created_at").type)
    columns["updated_at"] = pa.array([v[2] for v in versions], SCHEMA.field("updated_at").type)
    columns["extracted_at"] = columns["created_at"]
    columns["run_id"] = pa.array(["r"] * len(versions))
    return pa.table(columns, schema=SCHEMA)


def store(tmp_path, run_id: str, table: pa.Table, day: str, seq: int = 0) -> Storage:
    storage = Storage(str(tmp_path))
    write_parquet(storage, data_file_path(day, run_id, seq), table)
    return storage


def test_stored_versions_are_seen_and_new_ones_are_not(tmp_path):
    storage = store(tmp_path, "old", rows(("a", D1, D1 + 5), ("b", D1 + 1, None)), "2026-11-01")
    store(tmp_path, "old", rows(("c", D1 + DAY, D1 + DAY)), "2026-11-02", seq=1)
    versions = StoredVersions(storage, None, None, exclude_run="now")
    page = rows(
        ("a", D1, D1 + 5),  # stored
        ("a", D1, D1 + 6),  # a newer version
        ("b", D1 + 1, None),  # stored, no updatedAt
        ("c", D1 + DAY, D1 + DAY),  # stored in the next partition
        ("d", D1 + 2 * DAY, D1 + 2 * DAY),  # a partition that does not exist
    )
    assert versions.unseen(page).to_pylist() == [False, True, False, False, True]
    assert versions.unseen(rows()).to_pylist() == []


def test_files_of_the_excluded_run_and_partitions_outside_the_window_count_as_unseen(tmp_path):
    storage = store(tmp_path, "resumed", rows(("a", D1, D1)), "2026-11-01")
    store(tmp_path, "old", rows(("b", D1 + DAY, D1 + DAY)), "2026-11-02")
    page = rows(("a", D1, D1), ("b", D1 + DAY, D1 + DAY))
    assert StoredVersions(storage, None, None, "resumed").unseen(page).to_pylist() == [True, False]
    window = StoredVersions(storage, D1 + 2 * DAY, None, "other")
    assert window.unseen(page).to_pylist() == [True, True]


def test_a_tiny_budget_evicts_partitions_and_reads_them_again_without_a_wrong_answer(tmp_path):
    storage = Storage(str(tmp_path))
    for n in range(4):
        day = date.fromordinal(date(2026, 11, 1).toordinal() + n).isoformat()
        stored = [(f"s{n}-{i}", D1 + n * DAY + i, D1 + n * DAY + i) for i in range(50)]
        store(tmp_path, "old", rows(*stored), day)
    versions = StoredVersions(storage, None, None, "now", key_budget=60)
    for _ in range(2):
        for n in (3, 2, 1, 0):
            page = rows((f"s{n}-7", D1 + n * DAY + 7, D1 + n * DAY + 7),
                        (f"s{n}-7", D1 + n * DAY + 7, D1 + n * DAY + 8))
            assert versions.unseen(page).to_pylist() == [False, True]
    assert len(versions._loaded) == 1
    assert versions.partitions_read == 8
