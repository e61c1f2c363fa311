"""A Delta writer for the tests: flushes deterministic batches into an output, resuming
from the checkpoint its commits carry. `python -m tests.delta_worker OUT APP SEED BATCHES`."""

from __future__ import annotations

import random
import sys
from typing import Any

from pipeline.dataset.delta import DeltaOutput, DeltaSink, recover
from pipeline.dataset.flatten import flatten_sessions

EXTRACTED_BASE = 1_790_000_000_000
_DAYS = ("2026-10-01", "2026-10-02", "2026-10-03", "2026-10-05")


def session(number: int, version: int | None) -> dict[str, Any]:
    """Session `number` at `version` (None: no updatedAt); the same inputs give the same dict."""
    day = _DAYS[number % len(_DAYS)]
    created = f"{day}T0{number % 10}:00:00.{number % 1000:03d}Z"
    value: dict[str, Any] = {
        "id": f"session_{number:05d}",
        "type": "chat.agent" if number % 2 else "workflow",
        "taskIdentifier": f"task-{number % 7}",
        "tags": [f"t{number % 3}", f"v{version}"],
        "externalId": f"ext-{number}" if number % 5 else None,
        "currentRunId": f"run_{number}_{version}",
        "metadata": {"n": number, "v": version, "nested": {"x": [1, 2]}},
        "createdAt": created,
        "updatedAt": None if version is None else f"2026-11-{10 + version:02d}T12:00:00.000Z",
        "closedAt": f"2026-11-{10 + (version or 0):02d}T12:00:00.000Z" if version and version >= 4 else None,
        "closedReason": "completed" if version and version >= 4 else None,
        "expiresAt": None,
    }
    if number % 4:  # every fourth session is listed without triggerConfig
        value["triggerConfig"] = {
            "basePayload": {"plan": number % 3}, "machine": "small-1x", "queue": f"q{number % 2}",
            "tags": ["managed"], "maxAttempts": 3, "maxDuration": 600 + number,
            "lockToVersion": None, "region": "eu", "idleTimeoutInSeconds": 30,
        }
    return value


def batch(seed: int, index: int, size: int = 40, pool: int = 90) -> list[dict[str, Any]]:
    """Batch `index`: repeats within it, older, equal and newer versions than before."""
    rng = random.Random(seed * 100_003 + index)
    picks = []
    for _ in range(size):
        version = rng.choice([None, 0, 1, 2, 3, 4, 5, 6, min(6, index // 3)])
        picks.append(session(rng.randrange(pool), version))
    return picks


def extracted(index: int) -> int:
    return EXTRACTED_BASE + index * 1000


def run(output: str, app_id: str, seed: int, batches: int) -> int:
    target = DeltaOutput.at(output)
    recovery = recover(target, app_id)
    start = recovery.checkpoint["next_batch"] if recovery.checkpoint else 0
    sink = DeltaSink(target, app_id, recovery.generation, flush_rows=1, flush_bytes=1 << 30)
    for index in range(start, batches):
        sink.add(flatten_sessions(batch(seed, index), extracted(index), f"run-{seed}"))
        sink.flush(index, {"next_batch": index + 1, "generation": sink.next_generation})
        print(index, flush=True)
    return start



def _rank(session: dict[str, Any], index: int) -> tuple:
    return (session["updatedAt"] is not None, session["updatedAt"] or "", index)


def truth(seed: int, batches: int) -> tuple[dict[str, tuple], dict[tuple, tuple]]:
    """Newest (session, batch) per id; first (session, batch) per (id, updatedAt)."""
    latest: dict[str, tuple] = {}
    versions: dict[tuple, tuple] = {}
    for index in range(batches):
        for item in batch(seed, index):
            versions.setdefault((item["id"], item["updatedAt"]), (item, index))
            best = latest.get(item["id"])
            if best is None or _rank(item, index) >= _rank(*best):
                latest[item["id"]] = (item, index)
    return latest, versions


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
