"""Reading the Delta log itself (`_delta_log/NNN.json`): which commits carry which
app-transaction, their checkpoints and the files they added. Only what `recover` and
`verify` need; the tables' contents are read through delta-rs."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import pyarrow as pa

from pipeline.store.storage import Storage

LOG_DIR = "_delta_log"
_COMMIT = re.compile(r"^(\d{20})\.json$")
_CHECKPOINT = re.compile(r"^(\d{20})\.checkpoint(\.\d+\.\d+)?\.parquet$")


@dataclass(frozen=True)
class LogCommit:
    """One commit of the log: its version, its txn version for an app, what it added."""

    version: int
    txn: int | None
    info: dict[str, Any]
    adds: tuple[tuple[str, dict[str, str]], ...]  # (path, partition values)


def read_commit(table: Storage, version: int, app_id: str) -> LogCommit | None:
    """Commit `version`, or None when its JSON is gone (cleaned up after a checkpoint)."""
    data = table.read_bytes(f"{LOG_DIR}/{version:020d}.json")
    if data is None:
        return None
    txn, info, adds = None, {}, []
    for line in data.splitlines():
        if not line.strip():
            continue
        action = json.loads(line)
        if "txn" in action and action["txn"]["appId"] == app_id:
            txn = action["txn"]["version"]
        elif "commitInfo" in action:
            info = action["commitInfo"]
        elif "add" in action:
            add = action["add"]
            adds.append((unquote(add["path"]), add.get("partitionValues") or {}))
    return LogCommit(version, txn, info, tuple(adds))


def commits_since(table: Storage, latest: int, app_id: str, after: int) -> Iterator[LogCommit]:
    """The commits carrying a txn of `app_id` newer than `after`, newest first; stops at
    the first older txn of the app, or where the log's JSON ends."""
    for version in range(latest, -1, -1):
        commit = read_commit(table, version, app_id)
        if commit is None:
            return
        if commit.txn is None:
            continue
        if commit.txn <= after:
            yield commit  # the newest one at or below `after`: its checkpoint is still wanted
            return
        yield commit


def log_versions(table: Storage) -> tuple[list[int], list[int]]:
    """The versions of the log's JSON commits and of its checkpoints, sorted."""
    commits, checkpoints = set(), set()
    for stored in table.list_files(LOG_DIR):
        name = stored.path.rsplit("/", 1)[-1]
        if match := _COMMIT.match(name):
            commits.add(int(match.group(1)))
        elif match := _CHECKPOINT.match(name):
            checkpoints.add(int(match.group(1)))
    return sorted(commits), sorted(checkpoints)


def read_added(table: Storage, adds: tuple[tuple[str, dict[str, str]], ...],
               schema: pa.Schema) -> pa.Table:
    """The rows of data files a commit added, with their partition values as columns."""
    parts = []
    for path, values in adds:
        data = table.read_table(path)
        for name, value in values.items():
            column = pa.array([value] * data.num_rows, pa.string()).cast(schema.field(name).type)
            data = data.append_column(name, column)
        parts.append(data.select(schema.names).cast(schema))
    return pa.concat_tables(parts) if parts else schema.empty_table()


def app_ids(table: Storage) -> set[str]:
    """Every app id with a txn in the table: the newest checkpoint's, then the commits after."""
    commits, checkpoints = log_versions(table)
    found: set[str] = set()
    start = 0
    if checkpoints:
        start = checkpoints[-1] + 1
        prefix = f"{LOG_DIR}/{checkpoints[-1]:020d}.checkpoint"
        for part in table.list_files(LOG_DIR):
            if part.path.startswith(prefix):
                txns = table.read_table(part.path, columns=["txn"]).column("txn").to_pylist()
                found.update(t["appId"] for t in txns if t)
    for version in (v for v in commits if v >= start):
        data = table.read_bytes(f"{LOG_DIR}/{version:020d}.json") or b""
        for line in data.splitlines():
            if b'"txn"' in line:
                action = json.loads(line)
                if "txn" in action:
                    found.add(action["txn"]["appId"])
    return found
