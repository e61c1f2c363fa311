"""`make bench-compact`: `sessions-export compact` of one partition at three sizes.

Each partition is generated with `bench.dataset` (sessions plus 25% newer versions, in
the files of several runs, ordinary metadata); the compaction runs in a child process
measured with wait4. Reports time, peak RSS and time per million rows, whose flatness
across sizes shows the linear cost.
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
from datetime import date
from pathlib import Path

from bench.common import measure, write_results
from bench.dataset import write_partition


def run_size(rows: int) -> dict[str, object]:
    sessions = int(rows / 1.25)
    with tempfile.TemporaryDirectory() as out:
        written = write_partition(Path(out), date(2026, 11, 1), sessions, 0.25)
        result = measure(
            [sys.executable, "-m", "pipeline", "compact", "--output", out, "--log-level", "warning"]
        )
        assert result.returncode == 0, result
        match = re.search(r"(\d+) rows -> (\d+)", result.stdout)
        assert match and int(match.group(1)) == written and int(match.group(2)) == sessions
    return {
        "rows": written,
        "sessions": sessions,
        "seconds": round(result.seconds, 2),
        "seconds_per_million_rows": round(result.seconds / written * 1e6, 2),
        "peak_rss_mb": round(result.peak_rss_mb, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rows", default="750000,1500000,3000000")
    args = parser.parse_args()
    write_results("compact", [run_size(int(n)) for n in args.rows.split(",")])


if __name__ == "__main__":
    main()
