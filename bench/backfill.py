"""`make bench-backfill`: a concurrent backfill against the rate-limit ceiling, next to a
sequential walk of the same range.

The emulator adds 40 ms to every request and limits the key to a 40-token bucket refilled
10 every 250 ms (40 requests/s); it serves 40,000 sessions over 30 days, so the range
needs 400 full pages. The ceiling is the time the bucket needs to hand out those 400
tokens: (400 - 40 burst) / 40 per second = 9 s. Each command's wall time (process start to
exit) is compared with it; the data is checked exactly against the emulator.
"""

from __future__ import annotations

import json
import math
import tempfile
from datetime import UTC, datetime, timedelta

import httpx

from bench.common import emulator, export, exported_ids, only_manifest, write_results

SESSIONS = 40_000
BURST, REFILL, INTERVAL_S = 40, 10, 0.25
ANCHOR = datetime.now(UTC).replace(microsecond=0)
SINCE = (ANCHOR - timedelta(days=31)).isoformat()
FLAGS = (
    "--sessions",
    str(SESSIONS),
    "--days",
    "30",
    "--seed",
    "3",
    "--latency-ms",
    "40",
    "--list-trigger-config",
    "include",
    "--anchor",
    ANCHOR.isoformat(),
    "--rate-limit-burst",
    str(BURST),
    "--rate-limit-refill",
    str(REFILL),
    "--rate-limit-interval",
    str(INTERVAL_S),
)


def ceiling_seconds(pages: int) -> float:
    return max(0, pages - BURST) / (REFILL / INTERVAL_S)


def one(concurrency: int, out: str) -> dict[str, object]:
    """Measure one backfill; the dataset is checked later, so this process stays small
    (a child forked from a big parent would count the parent's pages as its own)."""
    with emulator(*FLAGS) as url:
        result = export("backfill", url, out, "--since", SINCE, "--concurrency", str(concurrency))
        assert result.returncode == 0, result
    manifest = only_manifest(out)
    ceiling = ceiling_seconds(math.ceil(SESSIONS / 100))
    return {
        "concurrency": concurrency,
        "wall_seconds": round(result.seconds, 2),
        "ceiling_seconds": round(ceiling, 2),
        "fraction_of_ceiling": round(ceiling / result.seconds, 3),
        "requests": manifest["requests"],
        "429s": manifest["rate_limited"],
        "429_share": round(manifest["rate_limited"] / manifest["requests"], 4),
        "windows": manifest["extra"]["windows"],
        "peak_rss_mb": round(result.peak_rss_mb, 1),
    }


def truth_ids() -> set[str]:
    """The emulator's ids (same flags, same seed: the same data)."""
    with emulator(*FLAGS) as url:
        lines = httpx.get(f"{url}/_emulator/sessions", timeout=60).text.splitlines()
    return {json.loads(line)["id"] for line in lines if line}


def main() -> None:
    with tempfile.TemporaryDirectory() as concurrent, tempfile.TemporaryDirectory() as sequential:
        rows = [one(8, concurrent), one(1, sequential)]
        truth = truth_ids()
        for row, out in zip(rows, (concurrent, sequential), strict=True):
            ids = exported_ids(out)
            row["data_exact"] = len(ids) == len(truth) and set(ids) == truth
    write_results("backfill", rows)


if __name__ == "__main__":
    main()
