"""`make bench`: the export vs a bare fetch loop, side by side on one emulator.

For each size the emulator serves N sessions (no latency, no rate limit, triggerConfig on
list rows); the bare loop and `sessions-export run` walk the same listing, alternately,
`--repeat` times each. Reports the throughput ratio (best of the repeats) and each side's
peak RSS, measured with wait4 on the child process.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from bench.common import emulator, export, measure, write_results

HERE = Path(__file__).resolve().parent


def run_size(sessions: int, repeat: int) -> dict[str, object]:
    bare, ours = [], []
    with emulator(
        "--sessions",
        str(sessions),
        "--seed",
        "1",
        "--no-rate-limit",
        "--list-trigger-config",
        "include",
    ) as url:
        for _ in range(repeat):
            result = measure([sys.executable, str(HERE / "bare_loop.py"), url])
            assert result.returncode == 0 and int(result.stdout) == sessions, result
            bare.append(result)
            with tempfile.TemporaryDirectory() as out:
                result = export("run", url, out)
                assert result.returncode == 0 and f"{sessions} sessions" in result.stdout, result
                ours.append(result)
    best_bare = min(r.seconds for r in bare)
    best_ours = min(r.seconds for r in ours)
    return {
        "sessions": sessions,
        "bare_seconds": round(best_bare, 2),
        "export_seconds": round(best_ours, 2),
        "bare_sessions_per_s": round(sessions / best_bare),
        "export_sessions_per_s": round(sessions / best_ours),
        "throughput_ratio": round(best_bare / best_ours, 3),
        "bare_peak_rss_mb": round(max(r.peak_rss_mb for r in bare), 1),
        "export_peak_rss_mb": round(max(r.peak_rss_mb for r in ours), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="100000,400000")
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    rows = [run_size(int(size), args.repeat) for size in args.sizes.split(",")]
    if len(rows) >= 2:
        growth = rows[-1]["export_peak_rss_mb"] / rows[0]["export_peak_rss_mb"] - 1
        rows.append(
            {
                "export_rss_growth": round(growth, 3),
                "from": rows[0]["sessions"],
                "to": rows[-1]["sessions"],
            }
        )
    write_results("throughput", rows)


if __name__ == "__main__":
    main()
