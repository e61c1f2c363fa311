import pyarrow as pa

from pipeline.dataset.schema import TIMESTAMP
from pipeline.dataset.sink import split_by_day

DAY = 86_400_000


def table(ms):
    return pa.table({"created_at": pa.array(ms, TIMESTAMP), "n": list(range(len(ms)))})


def test_newest_first_rows_split_into_contiguous_days():
    parts = split_by_day(table([2 * DAY + 5, 2 * DAY, DAY + 1, DAY, DAY - 1, 0]))
    assert [(d, t["n"].to_pylist()) for d, t in parts] == [
        ("1970-01-01", [4, 5]), ("1970-01-02", [2, 3]), ("1970-01-03", [0, 1])]


def test_interleaved_days_are_gathered():
    parts = split_by_day(table([DAY, 0, DAY + 7, 3]))
    assert [(d, t["n"].to_pylist()) for d, t in parts] == [
        ("1970-01-01", [1, 3]), ("1970-01-02", [0, 2])]


def test_boundary_millisecond_belongs_to_the_new_day():
    parts = split_by_day(table([DAY, DAY - 1]))
    assert [d for d, _ in parts] == ["1970-01-02", "1970-01-01"][::-1]


def test_empty_table_has_no_parts():
    assert split_by_day(table([])) == []
