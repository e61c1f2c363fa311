"""`compact` on a generated multi-million-row partition, exact against a reference dedupe;
crash safety of the streamed write."""

from __future__ import annotations

import shutil
from datetime import date

import duckdb
import pyarrow.parquet as pq
import pytest

from pipeline.dataset.compact import already_compacted, bucket_count
from pipeline.dataset.layout import DataFile, files_by_partition
from pipeline.errors import StorageError
from pipeline.store.storage import Storage
from tests.conftest import run_cli
from tests.synthetic import write_partition

REFERENCE = """
COPY (SELECT * EXCLUDE (rn) FROM (
  SELECT *, row_number() OVER (PARTITION BY id
                               ORDER BY updated_at DESC NULLS LAST, extracted_at DESC) AS rn
  FROM read_parquet('{src}/sessions/*/*.parquet'))
WHERE rn = 1) TO '{dst}' (FORMAT parquet)
"""


# a row is its version (id, updated_at), the extraction and the run that wrote it; every
# later version in the generated data also carries its own metadata
ROW = "id, updated_at, extracted_at, run_id, metadata"


def differences(con: duckdb.DuckDBPyConnection, left: str, right: str) -> int:
    query = f"SELECT count(*) FROM ((SELECT {ROW} FROM ({left})) EXCEPT ALL (SELECT {ROW} FROM ({right})))"
    return con.execute(query).fetchone()[0]


@pytest.mark.slow
def test_a_two_million_row_partition_compacts_to_exactly_the_latest_versions(tmp_path):
    out = tmp_path / "out"
    rows = write_partition(out, date(2026, 11, 1), 1_600_000, 0.25, seed=3)
    assert rows == 2_000_000
    reference = tmp_path / "reference.parquet"
    con = duckdb.connect()
    con.execute(REFERENCE.format(src=out, dst=reference))
    storage = Storage(str(out))
    assert bucket_count(storage, files_by_partition(storage)["2026-11-01"]) > 1  # it spills

    result = run_cli("compact", "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert "2000000 rows -> 1600000" in result.stdout
    files = list((out / "sessions").rglob("*"))
    assert [f.name[:7] for f in files if f.is_file()] == ["part-c2"]  # one file, no temp left
    got = f"SELECT * FROM read_parquet('{out}/sessions/*/*.parquet')"
    want = f"SELECT * FROM read_parquet('{reference}')"
    assert con.execute(f"SELECT count(*), count(DISTINCT id) FROM ({got})").fetchone() == (
        1_600_000, 1_600_000)
    assert differences(con, got, want) == 0
    assert differences(con, want, got) == 0


def test_a_compaction_interrupted_after_its_write_is_finished_by_the_next(tmp_path):
    """The new file was written but the old ones not yet deleted: rows are duplicated, none
    missing, and the next compaction folds them into one file again."""
    out = tmp_path / "out"
    write_partition(out, date(2026, 11, 2), 20_000, 0.5, seed=4, files=3)
    saved = tmp_path / "saved"
    shutil.copytree(out, saved)
    assert run_cli("compact", "--output", str(out)).returncode == 0
    for path in (saved / "sessions").rglob("*.parquet"):  # the files a crash left behind
        shutil.copy(path, out / path.relative_to(saved))
    storage = Storage(str(out))
    assert not already_compacted(files_by_partition(storage)["2026-11-02"])
    result = run_cli("compact", "--output", str(out))
    assert result.returncode == 0, result.stderr
    assert "50000 rows -> 20000" in result.stdout
    con = duckdb.connect()
    con.execute(REFERENCE.format(src=saved, dst=tmp_path / "reference.parquet"))
    got = f"SELECT * FROM read_parquet('{out}/sessions/*/*.parquet')"
    want = f"SELECT * FROM read_parquet('{tmp_path / 'reference.parquet'}')"
    assert differences(con, got, want) == differences(con, want, got) == 0
    assert "0 of 1 partitions rewritten" in run_cli("compact", "--output", str(out)).stdout


def test_a_streamed_write_that_fails_leaves_neither_the_file_nor_a_temp(tmp_path):
    storage = Storage(str(tmp_path))
    with pytest.raises(RuntimeError), storage.open_output("sessions/d=1/part.parquet") as stream:
        stream.write(b"half a file")
        raise RuntimeError("killed mid-write")
    assert not [p for p in tmp_path.rglob("*") if p.is_file()]
    with storage.open_output("sessions/d=1/part.parquet") as stream:
        stream.write(b"whole")
    assert (tmp_path / "sessions/d=1/part.parquet").read_bytes() == b"whole"
    assert [p.name for p in tmp_path.rglob("*") if p.is_file()] == ["part.parquet"]


def test_a_streamed_write_to_an_unwritable_place_is_a_storage_error(tmp_path):
    (tmp_path / "sessions").write_text("a file where a directory should be")
    storage = Storage(str(tmp_path))
    with pytest.raises(StorageError, match="cannot write"), storage.open_output("sessions/x/p") as out:
        out.write(b"x")


def test_only_files_of_one_earlier_compaction_count_as_compacted():
    def files(*names: str) -> list[DataFile]:
        return [DataFile(f"sessions/created_date=2026-11-01/{n}", "2026-11-01", 1) for n in names]

    assert already_compacted(files("part-cA-00000.parquet", "part-cA-00001.parquet"))
    assert not already_compacted(files("part-cA-00000.parquet", "part-cB-00000.parquet"))
    assert not already_compacted(files("part-cA-00000.parquet", "part-run1-00000.parquet"))
    assert not already_compacted(files("part-run1-00000.parquet"))


def test_the_compacted_file_has_the_contract_schema(tmp_path):
    out = tmp_path / "out"
    write_partition(out, date(2026, 11, 3), 1000, 0.25, files=2)
    assert run_cli("compact", "--output", str(out)).returncode == 0
    from pipeline.dataset.schema import SCHEMA

    (path,) = (out / "sessions").rglob("*.parquet")
    assert pq.read_schema(path).equals(SCHEMA, check_metadata=False)
    assert path.name.startswith("part-c") and path.parent.name == "created_date=2026-11-03"
    ids = pq.read_table(path, columns=["id"])["id"].to_pylist()
    assert len(ids) == len(set(ids)) == 1000  # the 1,250 versions folded to one per session
