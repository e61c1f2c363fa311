"""`load postgres` next to `load duckdb`: a first load of one exported dataset, side by side.

One export of N sessions (emulator, triggerConfig on list rows), then, alternating, a first
load into a fresh DuckDB file and into a fresh PostgreSQL database on a throwaway server
(initdb + pg_ctl on 127.0.0.1, fsync off), each in its own child process; then a second
load of each, which must find nothing new. With --baseline, another checkout's (the code
before a change) `load postgres` runs in the same rounds, the order alternating, on the
same export and server. Reports rows/s per target (best and median of --repeat, range)
and the ratio. The target for PostgreSQL is >= 50,000 rows/s for 200,000 sessions.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from bench.common import Measured, emulator, export, measure, write_results
from tests.postgres_server import find_binaries, postgres_server

TARGET_ROWS_PER_S = 50_000


def load(target: str, out: str, *args: str, env: dict[str, str] | None = None,
         cwd: str | None = None) -> Measured:
    command = [sys.executable, "-m", "pipeline", "load", target, "--output", out,
               "--log-level", "warning", *args]
    return measure(command, env, cwd)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sessions", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--baseline", metavar="CHECKOUT",
                        help="a checkout of the code to compare with, e.g. from `git archive "
                             "main | tar -x -C DIR`; its `load postgres` runs beside this one's")
    args = parser.parse_args()
    bin_dir = find_binaries()
    if bin_dir is None:
        sys.exit("initdb and pg_ctl are not on this machine (set PG_BIN to their directory)")
    if args.baseline and not Path(args.baseline, "pipeline", "__main__.py").exists():
        sys.exit(f"--baseline {args.baseline} is not a checkout of this project")
    import psycopg

    flags = ("--sessions", str(args.sessions), "--seed", "1", "--no-rate-limit",
             "--list-trigger-config", "include")
    postgres = ["postgres", "postgres (baseline)"] if args.baseline else ["postgres"]
    with tempfile.TemporaryDirectory() as work, emulator(*flags) as url:
        out = str(Path(work, "out"))
        exported = export("run", url, out)
        assert exported.returncode == 0, exported
        sessions = args.sessions
        runs: dict[str, list[tuple[Measured, float, Measured, float]]] = {
            name: [] for name in ["duckdb", *postgres]}
        with postgres_server(bin_dir) as server:
            for attempt in range(args.repeat):
                # each PostgreSQL load follows the DuckDB one as often as the other
                order = postgres if attempt % 2 == 0 else postgres[::-1]
                for name in ["duckdb", *order]:
                    target, cwd = name.split()[0], args.baseline if "baseline" in name else None
                    env, extra = None, ("--database", str(Path(work, f"w{attempt}.duckdb")))
                    if target == "postgres":
                        database = f"bench{attempt}_{len(runs[name])}{'b' if cwd else ''}"
                        with psycopg.connect(server.conninfo("postgres"),
                                             autocommit=True) as con:
                            con.execute(f"CREATE DATABASE {database}")
                        env, extra = server.env(database), ()
                    server_cpu = server.cpu_seconds()
                    first = load(target, out, *extra, env=env, cwd=cwd)
                    time.sleep(0.5)  # the backend exits and is reaped: its CPU is counted
                    server_cpu = server.cpu_seconds() - server_cpu if env else 0.0
                    expected = f"holds {sessions} sessions"
                    assert first.returncode == 0 and expected in first.stdout, (name, first)
                    again = load(target, out, *extra, env=env, cwd=cwd)
                    assert again.returncode == 0 and "nothing new" in again.stdout, again
                    load_average = os.getloadavg()[0]
                    runs[name].append((first, server_cpu, again, load_average))
                    print(f"{name} #{attempt + 1}: first load {first.seconds:.2f} s "
                          f"(CPU: loader {first.cpu_seconds:.2f} s, server {server_cpu:.2f} s), "
                          f"again {again.seconds:.2f} s; load average {load_average:.1f}",
                          file=sys.stderr)
    rows: list[dict] = []
    for name, measured in runs.items():
        best = min(measured, key=lambda m: m[0].seconds)
        seconds = [m[0].seconds for m in measured]
        median = statistics.median(seconds)
        cpu = best[0].cpu_seconds + best[1]
        rows.append({
            "target": name,
            "sessions": sessions,
            "first_load_seconds": round(best[0].seconds, 2),
            "first_load_rows_per_s": round(sessions / best[0].seconds),
            "median_seconds": round(median, 2),
            "median_rows_per_s": round(sessions / median),
            "range_seconds": [round(min(seconds), 2), round(max(seconds), 2)],
            "cpu_seconds_loader": round(best[0].cpu_seconds, 2),
            "cpu_seconds_server": round(best[1], 2),
            "median_cpu_seconds_loader": round(
                statistics.median(m[0].cpu_seconds for m in measured), 2),
            "median_cpu_seconds_server": round(statistics.median(m[1] for m in measured), 2),
            "rows_per_cpu_second": round(sessions / cpu),
            "all_seconds": [round(s, 2) for s in seconds],
            "load_averages": [round(m[3], 1) for m in measured],
            "reload_seconds": [round(m[2].seconds, 2) for m in measured],
            "peak_rss_mb": round(max(m[0].peak_rss_mb for m in measured), 1),
        })
    rows.append({
        "postgres_over_duckdb_time": round(
            rows[1]["median_seconds"] / rows[0]["median_seconds"], 2),
        "load_average_at_end": round(os.getloadavg()[0], 1),
    })
    write_results("load", rows)
    median = rows[1]["median_rows_per_s"]
    print(f"load postgres >= {TARGET_ROWS_PER_S:,} rows/s for {sessions:,} sessions: "
          f"{'met' if median >= TARGET_ROWS_PER_S else 'NOT met'} (median {median:,}/s, "
          f"best {rows[1]['first_load_rows_per_s']:,}/s)")


if __name__ == "__main__":
    main()
