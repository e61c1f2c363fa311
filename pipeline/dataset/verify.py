"""`verify`: read the dataset back and check it against the contract.

Problems (non-zero exit): a file that is unreadable, a file whose schema differs from
`SCHEMA`, a row in the wrong partition, a stray file readers would pick up, the same
session version stored twice, or one id in two partitions. Notes (exit 0): hidden
temp files readers skip, and sessions with several versions (until `compact`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.dataset.layout import classify_files, read_file
from pipeline.dataset.schema import SCHEMA
from pipeline.dataset.sink import split_by_day
from pipeline.store.storage import Storage

_KEY_COLUMNS = ["id", "created_at", "updated_at", "extracted_at"]


@dataclass
class VerifyReport:
    files: int = 0
    rows: int = 0
    partitions: int = 0
    sessions: int = 0
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def lines(self) -> list[str]:
        head = (
            f"verify: {self.files} files, {self.partitions} partitions, {self.rows} rows, "
            f"{self.sessions} sessions: {'OK' if self.ok else f'{len(self.problems)} problems'}"
        )
        return [
            head,
            *(f"  problem: {p}" for p in self.problems),
            *(f"  note: {n}" for n in self.notes),
        ]


def verify(output: Storage, strict: bool = False) -> VerifyReport:
    report = VerifyReport()
    data, hidden, stray = classify_files(output)
    for stored in stray:
        report.problems.append(f"stray file readers would pick up: {stored.path}")
    if hidden:
        report.notes.append(f"{len(hidden)} hidden file(s) readers skip, e.g. {hidden[0].path}")

    keys: list[pa.Table] = []
    partitions: set[str] = set()
    for data_file in data:
        partitions.add(data_file.partition)
        try:
            table = read_file(output, data_file.path)
        except Exception as error:  # noqa: BLE001 - any read failure is a finding
            report.problems.append(f"unreadable file {data_file.path}: {error}")
            continue
        report.files += 1
        report.rows += table.num_rows
        if not table.schema.equals(SCHEMA, check_metadata=False):
            report.problems.append(f"schema differs from the contract in {data_file.path}")
            continue
        days = {day for day, _ in split_by_day(table)}
        if days - {data_file.partition}:
            report.problems.append(
                f"{data_file.path} holds rows created on {', '.join(sorted(days))}"
            )
        keys.append(
            table.select(_KEY_COLUMNS).append_column(
                "partition", pa.repeat(pa.scalar(data_file.partition), table.num_rows)
            )
        )
    report.partitions = len(partitions)
    if keys:
        _check_duplicates(pa.concat_tables(keys), report, strict)
    return report


def _check_duplicates(keys: pa.Table, report: VerifyReport, strict: bool) -> None:
    per_id = keys.group_by("id").aggregate([("id", "count"), ("partition", "count_distinct")])
    report.sessions = per_id.num_rows
    split = pc.sum(pc.greater(per_id["partition_count_distinct"], 1)).as_py() or 0
    if split:
        report.problems.append(f"{split} session id(s) appear in more than one partition")
    versions = keys.group_by(["id", "updated_at", "extracted_at"]).aggregate([("id", "count")])
    repeated = pc.sum(pc.greater(versions["id_count"], 1)).as_py() or 0
    if repeated:
        report.problems.append(f"{repeated} session version(s) are stored more than once")
    several = pc.sum(pc.greater(per_id["id_count"], 1)).as_py() or 0
    if several:
        message = f"{several} session(s) have older versions stored; `compact` keeps the latest"
        (report.problems if strict else report.notes).append(message)
