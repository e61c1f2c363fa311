"""`make bench` (part 2): a first export whose list rows omit triggerConfig, against the
rate-limit ceiling.

The emulator leaves `triggerConfig` out of list rows (as upstream's source does), adds 40 ms
to every request and limits the key to a 50-token bucket refilled 25 every 0.5 s (50
requests/s: upstream's 750 / 250 per 10 s, scaled down so that the run takes seconds).
A first export then makes one `GET /api/v1/sessions/{id}` per session besides the list
pages. The ceiling is the time the bucket needs to hand out the tokens of every request
that got through: (tokens - burst) / refill rate; no client can finish sooner. The run's
wall time (process start to exit) is compared with it, and the data is checked: every
session exported once, every configured session with its configuration.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import httpx

from bench.common import emulator, export, only_manifest, print_table, write_results

SESSIONS = 1_500
BURST, REFILL, INTERVAL_S = 50, 25, 0.5
TARGET_FRACTION = 0.9
TARGET_429_SHARE = 0.02
FLAGS = (
    "--sessions",
    str(SESSIONS),
    "--seed",
    "5",
    "--anchor",
    "2026-11-01T00:00:00Z",
    "--latency-ms",
    "40",
    "--list-trigger-config",
    "omit",
    "--rate-limit-burst",
    str(BURST),
    "--rate-limit-refill",
    str(REFILL),
    "--rate-limit-interval",
    str(INTERVAL_S),
)


def ceiling_seconds(tokens: int) -> float:
    return max(0, tokens - BURST) / (REFILL / INTERVAL_S)


def rows_with_config(out: str) -> tuple[int, int, int]:
    """(rows, distinct ids, rows with a triggerConfig) of the exported dataset."""
    import pyarrow.compute as pc  # here: see bench.common.exported_ids
    import pyarrow.dataset as ds

    table = ds.dataset(Path(out, "sessions"), format="parquet").to_table(
        columns=["id", "trigger_config_base_payload"]
    )
    configured = table.num_rows - table["trigger_config_base_payload"].null_count
    return table.num_rows, len(pc.unique(table["id"])), configured


def configured_in_truth(url: str) -> int:
    """How many of the emulator's sessions have a triggerConfig (a GET shows it)."""
    lines = httpx.get(f"{url}/_emulator/sessions", timeout=60).text.splitlines()
    return sum(1 for line in lines if line and json.loads(line).get("triggerConfig") is not None)


def main() -> None:
    with emulator(*FLAGS) as url, tempfile.TemporaryDirectory() as out:
        result = export("run", url, out)
        assert result.returncode == 0, result
        manifest = only_manifest(out)
        rows, distinct, configured = rows_with_config(out)
        truth_configured = configured_in_truth(url)
    requests, limited = manifest["requests"], manifest["rate_limited"]
    ceiling = ceiling_seconds(requests - limited)
    row = {
        "sessions": SESSIONS,
        "wall_seconds": round(result.seconds, 2),
        "ceiling_seconds": round(ceiling, 2),
        "fraction_of_ceiling": round(ceiling / result.seconds, 3),
        "requests": requests,
        "single_fetches": manifest["extra"]["trigger_config"]["single_fetches"],
        "429s": limited,
        "429_share": round(limited / requests, 4),
        "cpu_seconds": round(result.cpu_seconds, 2),
        "peak_rss_mb": round(result.peak_rss_mb, 1),
        "data_exact": rows == distinct == SESSIONS and configured == truth_configured,
    }
    write_results("enrich", [row])
    print_table(
        [
            "sessions",
            "wall s",
            "ceiling s",
            "fraction of ceiling",
            "requests",
            "single GETs",
            "429s",
            "CPU s",
            "peak RSS",
            "data",
        ],
        [
            [
                f"{SESSIONS:,}",
                row["wall_seconds"],
                row["ceiling_seconds"],
                f"**{row['fraction_of_ceiling']}**",
                requests,
                row["single_fetches"],
                f"{limited} ({row['429_share']:.1%})",
                row["cpu_seconds"],
                f"{row['peak_rss_mb']} MB",
                f"exact, {configured} rows configured as the API holds them"
                if row["data_exact"]
                else "NOT exact",
            ]
        ],
    )
    fraction, share = row["fraction_of_ceiling"], row["429_share"]
    print(
        f"enrichment: {fraction} of the ceiling (target >= {TARGET_FRACTION}: "
        f"{'met' if fraction >= TARGET_FRACTION else 'NOT met'}), 429s {share:.1%} "
        f"(target < {TARGET_429_SHARE:.0%}: {'met' if share < TARGET_429_SHARE else 'NOT met'})"
    )


if __name__ == "__main__":
    main()
