"""Run manifests: `_runs/<run>.json`, written once a run has finished, listing its files."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

from pipeline.store.storage import Storage

RUNS_DIR = "_runs"


@dataclass(frozen=True)
class RunManifest:
    run_id: str
    mode: str
    window_from: str | None
    window_to: str | None
    filters: dict[str, str]
    started_at: str | None
    finished_at: str | None
    seconds: float
    rows: int
    pages: int
    requests: int
    retries: int
    rate_limited: int
    resumed: int
    files: list[str]
    partitions: list[str]
    high_water: str | None
    extra: dict[str, object]
    branch: str | None = None  # the preview or dev branch exported, if any

    def path(self) -> str:
        return f"{RUNS_DIR}/{self.run_id}.json"

    def write(self, storage: Storage) -> None:
        storage.write_bytes(self.path(), json.dumps(asdict(self), indent=2).encode())


def read_manifests(storage: Storage) -> list[dict[str, object]]:
    """Every manifest in the dataset, oldest run first."""
    manifests = []
    for stored in storage.list_files(RUNS_DIR):
        if stored.path.endswith(".json") and not stored.path.rsplit("/", 1)[-1].startswith("."):
            data = storage.read_bytes(stored.path)
            if data is not None:
                manifests.append(json.loads(data))
    return manifests
