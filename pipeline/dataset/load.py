"""The load plan shared by every warehouse target (`load duckdb`, `load postgres`).

Run manifests (`_runs/<run>.json`) say what each finished run wrote. A ledger table in the
warehouse records which runs it has loaded, so a load reads only the data of runs it has not
seen: loading twice changes nothing, and loading after new runs applies only theirs.
`compact` may have replaced a run's files since; then the load reads the current files of
the partitions that run touched, which hold its versions or newer ones. Each partition is
reduced to the latest version per id and handed to the target, which replaces a stored row
only with a newer one (greater `updated_at`, then `extracted_at`), so reading a version
twice, or an older one, is harmless. The whole load is one transaction of the target.

A Delta output (`load_delta`) is read from its latest table instead: the ledger records the
table version loaded (`delta-v<N>`), and the next load reads only the data files added
since that version (a MERGE or OPTIMIZE rewrites whole files, so every row changed since
is in one of them); no new commit is "nothing new".

A target knows only its SQL dialect and its bulk path (`LoadTarget`).
"""

from __future__ import annotations

import importlib
import json
import logging
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from types import ModuleType
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from pipeline.dataset.layout import DataFile, files_by_partition, latest_versions, partition_of
from pipeline.dataset.manifest import read_manifests
from pipeline.dataset.schema import COLUMNS, PARTITION_KEY, SCHEMA
from pipeline.errors import UsageError
from pipeline.store.storage import Storage

if TYPE_CHECKING:
    from pipeline.dataset.delta import DeltaOutput

log = logging.getLogger(__name__)

DISTRIBUTION = "trigger-sessions-export"


@dataclass(frozen=True)
class LoadedRun:
    """One ledger row: a run manifest applied to the table."""

    run_id: str
    mode: str | None
    finished_at: str | None
    files: int
    rows: int | None
    loaded_at: datetime


@dataclass(frozen=True)
class LoadSummary:
    table: str
    runs: int
    files: int
    rows_read: int
    inserted: int
    updated: int
    sessions: int  # rows in the table afterwards
    delta_version: int | None = None  # the Delta table version loaded, for a Delta output

    def line(self) -> str:
        if not self.runs:
            return f"load: nothing new; {self.table} holds {self.sessions} sessions"
        what = (f"{self.runs} new runs" if self.delta_version is None
                else f"Delta version {self.delta_version}")
        return (
            f"load: {what}, {self.files} files, {self.rows_read} rows read, "
            f"{self.inserted} sessions inserted, {self.updated} updated; "
            f"{self.table} holds {self.sessions} sessions"
        )


class LoadTarget(Protocol):
    """A warehouse table plus its ledger, inside one transaction from `open` to `commit`."""

    table: str  # as shown to the user, e.g. "public.sessions"

    def open(self) -> set[str]:
        """Connect, begin the transaction, create or check both tables; the loaded run ids."""

    def stage(self, latest: pa.Table) -> None:
        """Take one partition's latest versions (schema columns + created_date) in bulk."""

    def merge(self) -> tuple[int, int]:
        """Finish applying what was staged, newest wins; (sessions inserted, updated)."""

    def record(self, runs: list[LoadedRun]) -> None: ...

    def count(self) -> int: ...

    def commit(self) -> None: ...

    def close(self) -> None:
        """Disconnect; an uncommitted transaction is rolled back."""


def load(output: Storage, target: LoadTarget) -> LoadSummary:
    """Apply every run the target has not loaded yet; one transaction."""
    try:
        done = target.open()
        manifests = [m for m in read_manifests(output) if m.get("run_id") not in done]
        files = rows_read = inserted = updated = 0
        if manifests:
            plan = files_to_read(manifests, files_by_partition(output))
            for partition, paths, read, latest in read_ahead(output, plan):
                files += len(paths)
                rows_read += read
                target.stage(latest)
                log.info("staged %s: %d rows read from %d files", partition, read, len(paths))
            inserted, updated = target.merge()
            now = datetime.now(UTC)
            target.record([loaded_run(m, now) for m in manifests])
        sessions = target.count()
        target.commit()
    finally:
        target.close()
    return LoadSummary(target.table, len(manifests), files, rows_read, inserted, updated, sessions)


DELTA_LOADED = "delta-v"  # a ledger run_id `delta-v<N>`: version N of the latest table loaded


def load_delta(output: DeltaOutput, target: LoadTarget) -> LoadSummary:
    """Apply the Delta latest table's files added since the version last loaded; one
    transaction. The ledger's row for the version is the load's run."""
    from pipeline.dataset.delta import LATEST_DIR

    try:
        done = target.open()
        table = output.open(LATEST_DIR, create=False) if output.exists(LATEST_DIR) else None
        version = None if table is None else table.version()
        files = rows_read = inserted = updated = runs = 0
        if version is not None and f"{DELTA_LOADED}{version}" not in done:
            runs = 1
            seen = _delta_files_at(output, _newest_loaded(done, version))
            dataset = table.to_pyarrow_dataset()  # the snapshot of `version`, no later
            fresh = [f for f in dataset.get_fragments() if unquote(f.path) not in seen]
            for day, fragments in sorted(_by_partition(fresh).items()):
                rows = ds.FileSystemDataset(fragments, dataset.schema, dataset.format,
                                            dataset.filesystem).to_table()
                files += len(fragments)
                rows_read += rows.num_rows
                target.stage(_as_loaded(rows))
                log.info("staged %s: %d rows from %d files", day, rows.num_rows, len(fragments))
            inserted, updated = target.merge()
            target.record([LoadedRun(f"{DELTA_LOADED}{version}", "delta", None, files, rows_read,
                                     datetime.now(UTC))])
        sessions = target.count()
        target.commit()
    finally:
        target.close()
    return LoadSummary(target.table, runs, files, rows_read, inserted, updated, sessions,
                       version)


def _newest_loaded(done: set[str], below: int) -> int | None:
    versions = [int(r[len(DELTA_LOADED):]) for r in done
                if r.startswith(DELTA_LOADED) and r[len(DELTA_LOADED):].isdigit()]
    return max((v for v in versions if v < below), default=None)


def _delta_files_at(output: DeltaOutput, version: int | None) -> set[str]:
    """The data files of the latest table at `version`; none when it is None or its log
    is gone (then every current file is read again: harmless, newest wins)."""
    from pipeline.dataset.delta import LATEST_DIR, require_deltalake

    if version is None:
        return set()
    deltalake = require_deltalake()
    try:
        old = deltalake.DeltaTable(output.table_uri(LATEST_DIR), version=version,
                                   storage_options=output.options or None)
    except (OSError, deltalake.exceptions.DeltaError):
        return set()
    return {unquote(p) for p in old.get_add_actions(flatten=True).column("path").to_pylist()}


def _by_partition(fragments: list[Any]) -> dict[str, list[Any]]:
    grouped: dict[str, list[Any]] = {}
    for fragment in fragments:
        day = ds.get_partition_keys(fragment.partition_expression)[PARTITION_KEY]
        grouped.setdefault(str(day), []).append(fragment)
    return grouped


def _as_loaded(rows: pa.Table) -> pa.Table:
    """Delta rows as the Parquet path stages them: the schema's types, then created_date."""
    table = rows.select(SCHEMA.names).cast(SCHEMA)
    return table.append_column(PARTITION_KEY, rows[PARTITION_KEY].cast(pa.date32()))


def read_ahead(
    output: Storage, plan: dict[str, list[str]]
) -> Iterator[tuple[str, list[str], int, pa.Table]]:
    """(partition, files, rows read, latest versions), the next partition read on a thread
    while the target stages this one (Arrow reads release the GIL)."""

    def read(partition: str, paths: list[str]) -> tuple[str, list[str], int, pa.Table]:
        batch = read_partition(output, partition, paths)
        return partition, paths, batch.num_rows, latest_only(batch)

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="load-read") as reader:
        pending: Future | None = None
        for partition, paths in plan.items():
            following = reader.submit(read, partition, paths)
            if pending is not None:
                yield pending.result()
            pending = following
        if pending is not None:
            yield pending.result()


def latest_only(batch: pa.Table) -> pa.Table:
    """The latest version per id; a partition whose ids all differ already is (no sort)."""
    if pc.count_distinct(batch["id"]).as_py() == batch.num_rows:
        return batch
    return latest_versions(batch)


def loaded_run(manifest: dict[str, Any], now: datetime) -> LoadedRun:
    return LoadedRun(
        run_id=manifest["run_id"],
        mode=manifest.get("mode"),
        finished_at=manifest.get("finished_at"),
        files=len(manifest.get("files", [])),
        rows=manifest.get("rows"),
        loaded_at=now,
    )


def files_to_read(
    manifests: Iterable[dict[str, Any]], current: dict[str, list[DataFile]]
) -> dict[str, list[str]]:
    """Per partition, the files holding the new runs' versions.

    A run's own files where they all still exist; where `compact` replaced any of them,
    every current file of that partition (the compacted file holds the latest versions).
    """
    listed: dict[str, set[str]] = {}
    for manifest in manifests:
        for path in manifest.get("files", []):
            partition = partition_of(path)
            listed.setdefault(partition, set()).add(path)
    plan = {}
    for partition, paths in sorted(listed.items()):
        present = {f.path for f in current.get(partition, [])}
        chosen = paths if paths <= present else present
        if chosen:
            plan[partition] = sorted(chosen)
    return plan


def read_partition(output: Storage, partition: str, paths: list[str]) -> pa.Table:
    table = pa.concat_tables([output.read_table(path).cast(SCHEMA) for path in paths])
    day = pa.scalar(datetime.fromisoformat(partition).date(), pa.date32())
    return table.append_column(PARTITION_KEY, pa.repeat(day, table.num_rows))


def column_types(
    type_of: dict[pa.DataType, str], date_type: str, json_type: str | None = None
) -> list[tuple[str, str]]:
    """The table's columns in order with a target's types; JSON text gets `json_type`."""
    columns = []
    for column in COLUMNS:
        kind = json_type if column.kind == "json" and json_type else type_of.get(column.type)
        if kind is None:  # a new column type must be mapped per target, not guessed
            raise TypeError(f"no warehouse type for {column.name}: {column.type}")
        columns.append((column.name, kind))
    return [*columns, (PARTITION_KEY, date_type)]


def not_null(name: str) -> bool:
    return name == PARTITION_KEY or not SCHEMA.field(name).nullable


def newer(incoming: str, stored: str) -> str:
    """SQL: the row `incoming` is a newer version than `stored` (null updated_at is oldest)."""
    return (
        f"(coalesce({incoming}.updated_at, '-infinity'::TIMESTAMPTZ) > "
        f"coalesce({stored}.updated_at, '-infinity'::TIMESTAMPTZ) OR "
        f"({incoming}.updated_at IS NOT DISTINCT FROM {stored}.updated_at AND "
        f"{incoming}.extracted_at > {stored}.extracted_at))"
    )


# the latest version first within each id, for DISTINCT ON (id) over several partitions
LATEST_FIRST = "id, updated_at DESC NULLS LAST, extracted_at DESC"


def table_difference(
    table: str, expected: list[tuple[str, str]], actual: list[tuple[str, str]]
) -> str | None:
    """Why an existing table cannot take the load, or None when its columns fit."""
    want, have = dict(expected), dict(actual)
    problems = [f"lacks column {name} {kind}" for name, kind in expected if name not in have]
    problems += [f"has column {name} {kind} the load does not know" for name, kind in actual
                 if name not in want]
    problems += [f"column {name} is {have[name]}, expected {kind}" for name, kind in expected
                 if name in have and have[name] != kind]
    if not problems:
        return None
    return (f"the existing table {table} does not match the sessions schema: "
            f"{'; '.join(problems)} (load into another --table, or alter or drop this one)")


def require_module(module: str, package: str, extra: str, command: str) -> ModuleType:
    """Import an optional dependency, or say exactly which install brings it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise UsageError(
            f"{command} needs the {package} package, which is not installed: "
            f"run {install_command(extra)}"
        ) from None


def install_command(extra: str) -> str:
    """`pip install '<what this copy was installed from>[extra]'`."""
    from importlib import metadata  # only on this error path: ~15 ms off every load's start

    # a source tree's egg-info can shadow the installed copy, which alone says where from
    for installed in metadata.distributions(name=DISTRIBUTION):
        origin = json.loads(installed.read_text("direct_url.json") or "{}")
        url = origin.get("url", "")
        if url.startswith("file://"):  # installed from a clone: point pip back at it
            editable = "-e " if origin.get("dir_info", {}).get("editable") else ""
            return f"pip install {editable}'{url.removeprefix('file://')}[{extra}]'"
    return f"pip install '{DISTRIBUTION}[{extra}]'"
