"""IdBuckets: rows spilled by id hash come back whole, every id in one bucket."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa

from pipeline.dataset.spill import IdBuckets

SCHEMA = pa.schema([pa.field("id", pa.string(), nullable=False), pa.field("n", pa.int64())])


def test_every_row_comes_back_once_and_each_id_in_one_bucket():
    ids = [f"session-{i % 700}" for i in range(5000)]
    with IdBuckets(SCHEMA, 7) as spill:
        for start in range(0, 5000, 1000):
            spill.add(pa.table({"id": ids[start:start + 1000],
                                "n": list(range(start, start + 1000))}))
        folder = spill._folder
        buckets = list(spill.drain())
    assert folder is not None and not folder.exists()  # the spill is gone afterwards
    assert len(buckets) == 7 and all(b.schema.equals(SCHEMA) for b in buckets)
    assert sorted(n for b in buckets for n in b["n"].to_pylist()) == list(range(5000))
    owners = Counter(i for b in buckets for i in set(b["id"].to_pylist()))
    assert set(owners.values()) == {1} and len(owners) == 700


def test_one_bucket_stays_in_memory_and_an_empty_spill_gives_an_empty_table():
    with IdBuckets(SCHEMA, 1) as spill:
        assert spill._folder is None
        spill.add(pa.table({"id": ["a", "b"], "n": [1, 2]}))
        (table,) = spill.drain()
    assert table.num_rows == 2
    with IdBuckets(SCHEMA, 1) as spill:
        (empty,) = spill.drain()
    assert empty.num_rows == 0 and empty.schema.equals(SCHEMA)
