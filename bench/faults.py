"""`make bench-faults`: an export through faults and a tight rate limit, next to a clean one.

15,000 sessions; the faulty emulator answers 8% of requests with a 5xx, drops 4% of
connections and truncates 3% of bodies, under a 30-token bucket refilled 10 every 0.5 s
(20 requests/s). The clean emulator has the same data and the same rate limit. Reports
requests, 429s, retries and time for both, and checks that both datasets are exact.
"""

from __future__ import annotations

import tempfile

import httpx

from bench.common import emulator, export, exported_ids, only_manifest, write_results

SESSIONS = 15_000
COMMON = (
    "--sessions",
    str(SESSIONS),
    "--seed",
    "4",
    "--anchor",
    "2026-11-01T00:00:00Z",
    "--list-trigger-config",
    "include",
    "--rate-limit-burst",
    "30",
    "--rate-limit-refill",
    "10",
    "--rate-limit-interval",
    "0.5",
)
FAULTS = (
    "--fault-seed",
    "7",
    "--fault-5xx",
    "0.08",
    "--fault-reset",
    "0.04",
    "--fault-truncate",
    "0.03",
)


def one(label: str, flags: tuple[str, ...]) -> dict[str, object]:
    with emulator(*COMMON, *flags) as url, tempfile.TemporaryDirectory() as out:
        result = export("run", url, out, "--max-attempts", "10")
        assert result.returncode == 0, result
        served = httpx.get(f"{url}/_emulator/stats").json()
        manifest = only_manifest(out)
        ids = exported_ids(out)
        exact = len(ids) == SESSIONS and len(set(ids)) == SESSIONS
        return {
            "run": label,
            "seconds": round(result.seconds, 2),
            "requests": manifest["requests"],
            "pages": manifest["pages"],
            "retries": manifest["retries"],
            "429s": manifest["rate_limited"],
            "429_share": round(manifest["rate_limited"] / manifest["requests"], 4),
            "faults_served": served["faults"],
            "rows_exact": exact,
        }


def main() -> None:
    write_results("faults", [one("no faults", ()), one("faults", FAULTS)])


if __name__ == "__main__":
    main()
