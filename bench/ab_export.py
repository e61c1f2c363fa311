"""`make bench-ab BASELINE=DIR`: this checkout's `run` next to another checkout's, side by side.

Both export the same emulator's sessions in alternating order (no latency, no rate limit,
`triggerConfig` on list rows); each round gives one speed ratio (baseline wall / this wall),
measured a minute apart at most. Prints, per size, the median ratio with its range, each
side's wall and CPU seconds (user + sys, from wait4) and peak RSS. A ratio near 1 with CPU
seconds alike says a change left the export's cost where it was.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path
from statistics import median

from bench.common import Measured, emulator_process, measure

HERE = Path(__file__).resolve().parents[1]


def export(checkout: str, url: str) -> Measured:
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "pipeline", "run", "--api-url", url, "--output", out,
                   "--log-level", "warning"]
        result = measure(command, cwd=checkout)  # the cwd's `pipeline` package runs
    assert result.returncode == 0, result
    return result


def compare(baseline: str, sessions: int, rounds: int) -> dict[str, object]:
    sides: dict[str, list[Measured]] = {"baseline": [], "this": []}
    flags = ("--sessions", str(sessions), "--seed", "1", "--no-rate-limit")
    with emulator_process(*flags, "--list-trigger-config", "include") as served:
        for index in range(rounds):
            order = ("baseline", "this") if index % 2 == 0 else ("this", "baseline")
            for side in order:
                checkout = baseline if side == "baseline" else str(HERE)
                sides[side].append(export(checkout, served.url))
    ratios = [b.seconds / t.seconds for b, t in zip(sides["baseline"], sides["this"], strict=True)]
    return {
        "sessions": sessions,
        "speed_ratio": round(median(ratios), 3),
        "range": [round(min(ratios), 3), round(max(ratios), 3)],
        **{f"{side}_wall_s": [round(m.seconds, 2) for m in runs] for side, runs in sides.items()},
        **{f"{side}_cpu_s": [round(m.cpu_seconds, 2) for m in runs]
           for side, runs in sides.items()},
        **{f"{side}_peak_rss_mb": max(round(m.peak_rss_mb, 1) for m in runs)
           for side, runs in sides.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("baseline", help="another checkout of this repository (git worktree)")
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    for size in (int(s) for s in args.sizes.split(",")):
        print(json.dumps(compare(args.baseline, size, args.rounds)), flush=True)


if __name__ == "__main__":
    main()
