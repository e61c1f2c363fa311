"""`make bench-delta-export`: a first export of 1,000,000 sessions into Delta next to the
same into Parquet, side by side in one run.

The emulator serves N sessions (no latency, no rate limit, triggerConfig on list rows);
`--days` sets their createdAt span (30 by default; 1 is a busy day, where every flush lands
in one partition). `sessions-export run` writes them once with `--table-format parquet`
and once with `--table-format delta`, in alternating order over `--repeat` rounds. The
table reports each
side's median wall and CPU time and its peak RSS (the child's own, via wait4, split into
its anonymous and mapped-file parts, sampled), and the ratios Delta / Parquet against the
targets (≤ 1.3× time, ≤ 1.5× RSS); then what delta-rs alone costs a process (`FLOOR`).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from statistics import median

from bench.common import Measured, emulator_process, export, print_table, write_results

TARGET_TIME = 1.3
TARGET_RSS = 1.5
FORMATS = ("parquet", "delta")


# delta-rs' floor: a process that has loaded the CLI, then an empty Delta write and MERGE
FLOOR = """
import tempfile
def peak(step):
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    anon, files, hwm = (int(fields[k].split()[0]) // 1024 for k in ("RssAnon", "RssFile", "VmHWM"))
    print(f"  {step}: peak {hwm} MB (now anonymous {anon}, mapped files {files})")
import pipeline.cli
peak("the CLI loaded")
import deltalake
peak("deltalake imported")
from pipeline.dataset.delta.tables import DELTA_SCHEMA
empty, where = DELTA_SCHEMA.empty_table(), tempfile.mkdtemp() + "/t"
deltalake.write_deltalake(where, empty, mode="append", partition_by=["created_date"])
peak("an empty table written")
(deltalake.DeltaTable(where).merge(empty, "t.id = s.id", source_alias="s", target_alias="t")
 .when_not_matched_insert_all().execute())
peak("a MERGE of no rows")
"""


def one_round(url: str, sessions: int, delta_first: bool) -> dict[str, Measured]:
    """One export per table format, in the given order."""
    runs: dict[str, Measured] = {}
    for table_format in reversed(FORMATS) if delta_first else FORMATS:
        with tempfile.TemporaryDirectory() as out:
            result = export("run", url, out, "--table-format", table_format)
        assert result.returncode == 0 and f"{sessions} sessions" in result.stdout, result
        runs[table_format] = result
        print(f"  {table_format}: {result.seconds:.1f} s, {result.peak_rss_mb:.0f} MB "
              f"(anonymous {result.peak_anon_mb:.0f}, mapped files {result.peak_file_mb:.0f})",
              file=sys.stderr, flush=True)
    return runs


def summary(sessions: int, days: float, rounds: list[dict[str, Measured]]) -> dict[str, object]:
    row: dict[str, object] = {"sessions": sessions, "days": days, "rounds": len(rounds)}
    for table_format in FORMATS:
        runs = [r[table_format] for r in rounds]
        row[f"{table_format}_seconds"] = round(median(m.seconds for m in runs), 2)
        row[f"{table_format}_cpu_seconds"] = round(median(m.cpu_seconds for m in runs), 2)
        row[f"{table_format}_peak_rss_mb"] = round(max(m.peak_rss_mb for m in runs), 1)
        row[f"{table_format}_peak_anon_mb"] = round(max(m.peak_anon_mb for m in runs), 1)
        row[f"{table_format}_peak_file_mb"] = round(max(m.peak_file_mb for m in runs), 1)
    row["time_ratio"] = round(median(r["delta"].seconds / r["parquet"].seconds for r in rounds), 3)
    row["rss_ratio"] = round(
        float(row["delta_peak_rss_mb"]) / float(row["parquet_peak_rss_mb"]), 3  # type: ignore[arg-type]
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=1_000_000)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--days", type=float, default=30.0,
                        help="the createdAt span (1: a busy day, every flush in one partition)")
    args = parser.parse_args()
    flags = ("--sessions", str(args.sessions), "--days", str(args.days), "--seed", "1",
             "--no-rate-limit", "--list-trigger-config", "include")
    with emulator_process(*flags) as served:
        rounds = [one_round(served.url, args.sessions, n % 2 == 1) for n in range(args.repeat)]
    row = summary(args.sessions, args.days, rounds)
    write_results("delta_export", [row])
    print_table(
        ["sessions", "days", "Parquet s / MB", "Delta s / MB", "time ×", "RSS ×"],
        [[f"{args.sessions:,}", f"{args.days:g}",
          f"{row['parquet_seconds']} / {row['parquet_peak_rss_mb']}",
          f"{row['delta_seconds']} / {row['delta_peak_rss_mb']}",
          row["time_ratio"], row["rss_ratio"]]],
    )
    for name, value, target in (("time", row["time_ratio"], TARGET_TIME),
                                ("RSS", row["rss_ratio"], TARGET_RSS)):
        verdict = "met" if float(value) <= target else "NOT met"  # type: ignore[arg-type]
        print(f"Delta / Parquet {name}: {value}× (target ≤ {target}×): {verdict}")
    print("delta-rs' floor, before any row (bench/README.md):", flush=True)
    subprocess.run([sys.executable, "-c", FLOOR], check=True)
    print("peak RSS, anonymous + mapped files: " + ", ".join(
        f"{f} {row[f'{f}_peak_anon_mb']} + {row[f'{f}_peak_file_mb']} MB" for f in FORMATS))


if __name__ == "__main__":
    main()
