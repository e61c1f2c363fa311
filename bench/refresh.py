"""`make bench-refresh`: a full refresh next to the first export of the same data.

For each size the emulator serves N sessions (no latency, no rate limit, triggerConfig on
list rows); `run` exports them into an empty output, then `run --full-refresh` walks the
whole history again over that output, checking every listed version against the stored
ones and writing none. Reports both times, their ratio, and each peak RSS (wait4).
"""

from __future__ import annotations

import argparse
import tempfile

from bench.common import emulator, export, write_results


def run_size(sessions: int) -> dict[str, object]:
    flags = ("--sessions", str(sessions), "--seed", "1", "--no-rate-limit")
    with (
        emulator(*flags, "--list-trigger-config", "include") as url,
        tempfile.TemporaryDirectory() as out,
    ):
        first = export("run", url, out)
        assert first.returncode == 0 and f"{sessions} sessions" in first.stdout, first
        refresh = export("run", url, out, "--full-refresh")
        assert refresh.returncode == 0, refresh
        assert f"0 sessions ({sessions} unchanged skipped)" in refresh.stdout, refresh.stdout
    return {
        "sessions": sessions,
        "first_export_seconds": round(first.seconds, 2),
        "full_refresh_seconds": round(refresh.seconds, 2),
        "refresh_over_first": round(refresh.seconds / first.seconds, 3),
        "first_export_peak_rss_mb": round(first.peak_rss_mb, 1),
        "full_refresh_peak_rss_mb": round(refresh.peak_rss_mb, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", default="200000,1000000")
    args = parser.parse_args()
    write_results("refresh", [run_size(int(size)) for size in args.sizes.split(",")])


if __name__ == "__main__":
    main()
