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
import sys
import tempfile
from pathlib import Path

import httpx
import pyarrow.dataset as ds

from bench.common import emulator, measure

SESSIONS = 40_000
BURST, REFILL, INTERVAL_S = 40, 10, 0.25
FLAGS = ("--sessions", str(SESSIONS), "--days", "30", "--seed", "3", "--latency-ms", "40",
         "--rate-limit-burst", str(BURST), "--rate-limit-refill", str(REFILL),
         "--rate-limit-interval", str(INTERVAL_S))


def ceiling_seconds(pages: int) -> float:
    return max(0, pages - BURST) / (REFILL / INTERVAL_S)


def one(concurrency: int) -> dict[str, object]:
    with emulator(*FLAGS) as url, tempfile.TemporaryDirectory() as out:
        result = measure([sys.executable, "-m", "pipeline", "backfill", "--since", "31d",
                          "--api-url", url, "--output", out, "--concurrency", str(concurrency),
                          "--log-level", "warning"])
        assert result.returncode == 0, result
        # read the truth only now: a child forked from a big parent would report its pages
        truth = {json.loads(line)["id"] for line in
                 httpx.get(f"{url}/_emulator/sessions", timeout=60).text.splitlines() if line}
        manifest = json.loads(next(Path(out, "_runs").glob("*.json")).read_text())
        ids = ds.dataset(Path(out, "sessions"), format="parquet").to_table(columns=["id"])
        exact = ids.num_rows == len(truth) and set(ids["id"].to_pylist()) == truth
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
            "data_exact": exact,
        }


def main() -> None:
    rows = [one(8), one(1)]
    for row in rows:
        print(json.dumps(row))
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    (results / "backfill.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
