"""`verify`: read the dataset back and check it against the contract.

Files are read in batches and the keys of their rows spilled by id hash (`spill`), so the
duplicate checks run one bucket at a time: memory stays bounded whatever the dataset's size.
Problems (non-zero exit): a file that is unreadable, a file whose schema differs from
`SCHEMA`, a row in the wrong partition, a stray file readers would pick up, the same
session version stored twice, or one id in two partitions. Notes (exit 0): hidden
temp files readers skip, and sessions with several versions (until `compact`).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.dataset.layout import DataFile, classify_files, iter_batches, read_footer
from pipeline.dataset.schema import SCHEMA
from pipeline.dataset.sink import split_by_day
from pipeline.dataset.spill import IdBuckets
from pipeline.store.storage import Storage

_KEY_COLUMNS = ["id", "created_at", "updated_at", "extracted_at"]


@dataclass
class Findings:
    """What a check found: problems (fail it) and notes (do not)."""

    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def report_lines(self, counted: str) -> list[str]:
        """`verify: <counted>: OK` (or how many problems), then each problem and note."""
        verdict = "OK" if self.ok else f"{len(self.problems)} problems"
        return [
            f"verify: {counted}: {verdict}",
            *(f"  problem: {p}" for p in self.problems),
            *(f"  note: {n}" for n in self.notes),
        ]


@dataclass
class VerifyReport(Findings):
    files: int = 0
    rows: int = 0
    partitions: int = 0
    sessions: int = 0

    def lines(self) -> list[str]:
        return self.report_lines(
            f"{self.files} files, {self.partitions} partitions, {self.rows} rows, "
            f"{self.sessions} sessions"
        )


# a key row's bytes in memory, about; 8 MB buckets: 1,500,000 rows verify at 350 MB peak
# RSS (all keys at once: 900 MB)
_KEY_ROW_BYTES = 80
_BUCKET_BYTES = 8 * 1024 * 1024
_KEYS = pa.schema([*(SCHEMA.field(c) for c in _KEY_COLUMNS), pa.field("partition", pa.string())])


def verify(output: Storage, strict: bool = False) -> VerifyReport:
    report = VerifyReport()
    data, hidden, stray = classify_files(output)
    for stored in stray:
        report.problems.append(f"stray file readers would pick up: {stored.path}")
    if hidden:
        report.notes.append(f"{len(hidden)} hidden file(s) readers skip, e.g. {hidden[0].path}")

    footers: dict[str, pq.FileMetaData] = {}
    for data_file in data:
        try:
            footers[data_file.path] = read_footer(output, data_file.path)
        except Exception as error:  # any read failure is a finding
            report.problems.append(f"unreadable file {data_file.path}: {error}")
    # the keys of every row, by id hash: the duplicate checks then need one bucket at a time
    estimate = sum(f.num_rows for f in footers.values()) * _KEY_ROW_BYTES
    with IdBuckets(_KEYS, math.ceil(estimate / _BUCKET_BYTES)) as keys:
        partitions: set[str] = set()
        for data_file in data:
            partitions.add(data_file.partition)
            footer = footers.get(data_file.path)
            if footer is None:
                continue
            if not footer.schema.to_arrow_schema().equals(SCHEMA, check_metadata=False):
                report.problems.append(f"schema differs from the contract in {data_file.path}")
            elif not _check_rows(output, data_file, keys, report):
                continue
            report.files += 1
            report.rows += footer.num_rows
        report.partitions = len(partitions)
        counts = Counter()
        for bucket in keys.drain():
            counts.update(_duplicates(bucket))
    report.sessions = counts["sessions"]
    if counts["split"]:
        report.problems.append(f"{counts['split']} session id(s) appear in more than one partition")
    if counts["repeated"]:
        report.problems.append(
            f"{counts['repeated']} session version(s) are stored more than once"
        )
    if counts["several"]:
        message = (
            f"{counts['several']} session(s) have older versions stored; "
            "`compact` keeps the latest"
        )
        (report.problems if strict else report.notes).append(message)
    return report


def _check_rows(
    output: Storage, data_file: DataFile, keys: IdBuckets, report: VerifyReport
) -> bool:
    """Partition keys of every row, and their keys kept aside; False if unreadable."""
    days: set[str] = set()
    try:
        for batch in iter_batches(output, data_file.path):
            table = pa.Table.from_batches([batch])
            days.update(day for day, _ in split_by_day(table))
            partition = pa.repeat(pa.scalar(data_file.partition), table.num_rows)
            keys.add(table.select(_KEY_COLUMNS).append_column("partition", partition))
    except Exception as error:  # any read failure is a finding
        report.problems.append(f"unreadable file {data_file.path}: {error}")
        return False
    if days - {data_file.partition}:
        report.problems.append(f"{data_file.path} holds rows created on {', '.join(sorted(days))}")
    return True


def _duplicates(keys: pa.Table) -> dict[str, int]:
    """Sessions, ids in several partitions, versions stored twice, sessions with several
    versions: in one bucket (every row of an id is in the same bucket)."""
    if keys.num_rows == 0:
        return {}
    per_id = keys.group_by("id").aggregate([("id", "count"), ("partition", "count_distinct")])
    versions = keys.group_by(["id", "updated_at", "extracted_at"]).aggregate([("id", "count")])
    return {
        "sessions": per_id.num_rows,
        "split": pc.sum(pc.greater(per_id["partition_count_distinct"], 1)).as_py() or 0,
        "repeated": pc.sum(pc.greater(versions["id_count"], 1)).as_py() or 0,
        "several": pc.sum(pc.greater(per_id["id_count"], 1)).as_py() or 0,
    }
