"""`make bench` (part 1): the export vs the fastest bare fetch loop, side by side.

For each size the emulator serves N sessions (no latency, no rate limit, triggerConfig on
list rows). The bare loop (`bench/bare_loop.py`) and `sessions-export run` walk the same
listing in alternating order, `--repeat` rounds each. Every round gives one ratio of the two
wall times, measured minutes apart at most; the table reports the median ratio and its
range, each side's median wall and CPU time (user + sys, from wait4), the CPU the emulator
spent serving each side (from /proc), and peak RSS. On 2 shared cores wall times are noisy;
CPU seconds per session are the steadier number.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from statistics import median

from bench.common import Measured, emulator_process, export, measure, print_table, write_results

HERE = Path(__file__).resolve().parent
TARGET_RATIO = 0.85
TARGET_RSS_MB = 130.0
TARGET_RSS_GROWTH = 0.10


def one_round(url: str, sessions: int, export_first: bool, emulator_cpu) -> dict[str, tuple]:
    """One bare run and one export, in the given order: (Measured, emulator CPU seconds)."""
    runs: dict[str, tuple[Measured, float]] = {}
    for side in ("export", "bare") if export_first else ("bare", "export"):
        before = emulator_cpu()
        if side == "bare":
            result = measure([sys.executable, str(HERE / "bare_loop.py"), url])
            assert result.returncode == 0 and int(result.stdout) == sessions, result
        else:
            with tempfile.TemporaryDirectory() as out:
                result = export("run", url, out)
            assert result.returncode == 0 and f"{sessions} sessions" in result.stdout, result
        runs[side] = (result, emulator_cpu() - before)
    return runs


def run_size(sessions: int, repeat: int) -> dict[str, object]:
    flags = ("--sessions", str(sessions), "--seed", "1", "--no-rate-limit")
    rounds = []
    with emulator_process(*flags, "--list-trigger-config", "include") as served:
        for index in range(repeat):
            rounds.append(one_round(served.url, sessions, index % 2 == 1, served.cpu_seconds))
            print(
                f"  {sessions:,} sessions, round {index + 1}/{repeat}: " + _round_line(rounds[-1]),
                file=sys.stderr,
                flush=True,
            )
    bare = [r["bare"] for r in rounds]
    ours = [r["export"] for r in rounds]
    ratios = [r["bare"][0].seconds / r["export"][0].seconds for r in rounds]
    per_million = 1_000_000 / sessions
    bare_s = median(m.seconds for m, _ in bare)
    ours_s = median(m.seconds for m, _ in ours)
    return {
        "sessions": sessions,
        "rounds": repeat,
        "bare_seconds": round(bare_s, 2),
        "export_seconds": round(ours_s, 2),
        "bare_sessions_per_s": round(sessions / bare_s),
        "export_sessions_per_s": round(sessions / ours_s),
        "throughput_ratio": round(median(ratios), 3),
        "ratio_min": round(min(ratios), 3),
        "ratio_max": round(max(ratios), 3),
        "bare_cpu_s_per_million": round(median(m.cpu_seconds for m, _ in bare) * per_million, 2),
        "export_cpu_s_per_million": round(median(m.cpu_seconds for m, _ in ours) * per_million, 2),
        "emulator_cpu_s_per_million_bare": round(median(c for _, c in bare) * per_million, 2),
        "emulator_cpu_s_per_million_export": round(median(c for _, c in ours) * per_million, 2),
        # the emulator's CPU over the export's wall time: near 1.0 it would be the limit
        "emulator_busy_during_export": round(median(c / m.seconds for m, c in ours), 2),
        "bare_peak_rss_mb": round(max(m.peak_rss_mb for m, _ in bare), 1),
        "export_peak_rss_mb": round(max(m.peak_rss_mb for m, _ in ours), 1),
    }


def _round_line(runs: dict[str, tuple[Measured, float]]) -> str:
    return ", ".join(
        f"{side} {m.seconds:.2f}s wall {m.cpu_seconds:.2f}s cpu {m.peak_rss_mb:.0f} MB"
        f" (emulator {cpu:.2f}s cpu)"
        for side, (m, cpu) in runs.items()
    )


def verdict(rows: list[dict[str, object]]) -> list[str]:
    lines = []
    for row in rows:
        ratio, rss = row["throughput_ratio"], row["export_peak_rss_mb"]
        lines.append(
            f"{row['sessions']:,} sessions: ratio {ratio} (target >= {TARGET_RATIO}: "
            f"{'met' if ratio >= TARGET_RATIO else 'NOT met'}), peak RSS {rss} MB "
            f"(target <= {TARGET_RSS_MB:.0f}: {'met' if rss <= TARGET_RSS_MB else 'NOT met'})"
        )
    if len(rows) >= 2:
        growth = rows[-1]["export_peak_rss_mb"] / rows[0]["export_peak_rss_mb"] - 1
        lines.append(
            f"peak RSS growth {rows[0]['sessions']:,} -> {rows[-1]['sessions']:,}: "
            f"{growth:+.1%} (target within {TARGET_RSS_GROWTH:.0%}: "
            f"{'met' if abs(growth) <= TARGET_RSS_GROWTH else 'NOT met'})"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    rows = [run_size(int(size), args.repeat) for size in args.sizes.split(",")]
    load_after = os.getloadavg()[0]
    write_results("throughput", rows)
    print_table(
        [
            "sessions",
            "bare s",
            "export s",
            "bare/s",
            "export/s",
            "ratio (median, range)",
            "CPU s per 1M: bare",
            "export",
            "emulator CPU s per 1M: bare",
            "export",
            "emulator busy",
            "peak RSS: bare",
            "export",
        ],
        [
            [
                f"{r['sessions']:,}",
                r["bare_seconds"],
                r["export_seconds"],
                f"{r['bare_sessions_per_s']:,}",
                f"{r['export_sessions_per_s']:,}",
                f"**{r['throughput_ratio']}** ({r['ratio_min']}–{r['ratio_max']})",
                r["bare_cpu_s_per_million"],
                r["export_cpu_s_per_million"],
                r["emulator_cpu_s_per_million_bare"],
                r["emulator_cpu_s_per_million_export"],
                r["emulator_busy_during_export"],
                f"{r['bare_peak_rss_mb']} MB",
                f"**{r['export_peak_rss_mb']} MB**",
            ]
            for r in rows
        ],
    )
    for line in verdict(rows):
        print(line)
    print(
        f"load average (1 min) {load_before:.2f} before, {load_after:.2f} after; "
        f"{os.cpu_count()} cores"
    )


if __name__ == "__main__":
    main()
