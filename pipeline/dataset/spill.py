"""Rows spilled to local disk by a hash of their id: every version of a session lands in
the same bucket, so work per session (keep the latest, count duplicates) can be done one
bucket at a time in bounded memory, whatever the size of the whole.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

import pyarrow as pa
import pyarrow.compute as pc

_OPTIONS = pa.ipc.IpcWriteOptions(compression="lz4")


class IdBuckets:
    """`add` tables of `schema` (with an `id` column); `drain` yields one table per bucket.
    With one bucket nothing touches the disk."""

    def __init__(self, schema: pa.Schema, buckets: int) -> None:
        self.schema = schema
        self.buckets = max(1, buckets)
        self._held: list[pa.Table] = []
        self._folder: Path | None = None
        self._writers: list[pa.ipc.RecordBatchFileWriter] = []
        if self.buckets > 1:
            self._folder = Path(tempfile.mkdtemp(prefix="sessions-spill-"))
            self._writers = [
                pa.ipc.new_file(str(self._path(n)), schema, options=_OPTIONS)
                for n in range(self.buckets)
            ]

    def __enter__(self) -> IdBuckets:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType
    ) -> None:
        self.close()

    def _path(self, n: int) -> Path:
        assert self._folder is not None
        return self._folder / f"bucket-{n:04d}.arrow"

    def add(self, table: pa.Table) -> None:
        if table.schema != self.schema:
            table = table.cast(self.schema)
        if self.buckets == 1:
            self._held.append(table)
            return
        for n, part in _split(table, bucket_of(table["id"], self.buckets)):
            self._writers[n].write_table(part)

    def drain(self) -> Iterator[pa.Table]:
        """Each bucket once, read back and deleted as it is handed over."""
        if self.buckets == 1:
            held, self._held = self._held, []
            yield pa.concat_tables(held) if held else self.schema.empty_table()
            return
        for writer in self._writers:
            writer.close()
        self._writers = []
        for n in range(self.buckets):
            with pa.OSFile(str(self._path(n))) as source:
                table = pa.ipc.open_file(source).read_all()
            self._path(n).unlink()
            yield table

    def close(self) -> None:
        for writer in self._writers:
            writer.close()
        self._writers = []
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


def bucket_of(ids: pa.ChunkedArray | pa.Array, buckets: int) -> pa.Array:
    import polars as pl

    return (pl.Series(ids).hash(seed=0) % buckets).cast(pl.Int32).to_arrow()


def _split(table: pa.Table, which: pa.Array) -> Iterator[tuple[int, pa.Table]]:
    """The rows of each bucket `which` names, cut from one sort rather than a filter each."""
    order = pc.sort_indices(which)
    runs = pc.run_end_encode(which.take(order))
    ordered = table.take(order)
    start = 0
    for n, end in zip(runs.values.to_pylist(), runs.run_ends.to_pylist(), strict=True):
        yield n, ordered.slice(start, end - start)
        start = end
