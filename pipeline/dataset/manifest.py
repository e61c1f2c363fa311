"""Run manifests: `_runs/<run>.json`, written once a run has finished, listing its files."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pipeline.store.state import Counters
from pipeline.store.storage import Storage

RUNS_DIR = "_runs"


MANIFEST_COUNTERS = ("rows", "pages", "requests", "retries", "rate_limited")


@dataclass(frozen=True)
class RunManifest:
    """A finished run: its window, filters, times, counters (`MANIFEST_COUNTERS` at the top
    level; the rest in `extra`) and the files it wrote."""

    run_id: str
    mode: str
    window_from: str | None
    window_to: str | None
    filters: dict[str, str]
    started_at: str | None
    finished_at: str | None
    seconds: float
    counts: Counters
    resumed: int
    files: list[str]
    partitions: list[str]
    high_water: str | None
    extra: dict[str, object]
    branch: str | None = None  # the preview or dev branch exported, if any

    def path(self) -> str:
        return f"{RUNS_DIR}/{self.run_id}.json"

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "mode": self.mode,
            "window_from": self.window_from,
            "window_to": self.window_to,
            "filters": self.filters,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
            "seconds": self.seconds,
            **self.counts.only(MANIFEST_COUNTERS),
            "resumed": self.resumed,
            "files": self.files,
            "partitions": self.partitions,
            "high_water": self.high_water,
            "extra": self.extra,
            "branch": self.branch,
        }

    def write(self, storage: Storage) -> None:
        storage.write_bytes(self.path(), json.dumps(self.to_dict(), indent=2).encode())


def read_manifests(storage: Storage) -> list[dict[str, object]]:
    """Every manifest in the dataset, oldest run first."""
    manifests = []
    for stored in storage.list_files(RUNS_DIR):
        if stored.path.endswith(".json") and not stored.path.rsplit("/", 1)[-1].startswith("."):
            data = storage.read_bytes(stored.path)
            if data is not None:
                manifests.append(json.loads(data))
    return manifests
