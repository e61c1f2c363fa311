"""`load postgres` next to `load duckdb`: a first load of one exported dataset, side by side.

One export of N sessions (emulator, triggerConfig on list rows), then, alternating, a first
load into a fresh DuckDB file and into a fresh PostgreSQL database on a throwaway server
(initdb + pg_ctl on 127.0.0.1, fsync off), each in its own child process; then a second
load of each, which must find nothing new. Reports rows/s per target (best of --repeat) and
the ratio. The target for PostgreSQL is >= 50,000 rows/s for 200,000 sessions.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from bench.common import Measured, emulator, export, measure, write_results
from tests.postgres_server import find_binaries, postgres_server


def load(target: str, out: str, *args: str, env: dict[str, str] | None = None) -> Measured:
    command = [sys.executable, "-m", "pipeline", "load", target, "--output", out,
               "--log-level", "warning", *args]
    return measure(command, env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sessions", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=2)
    args = parser.parse_args()
    bin_dir = find_binaries()
    if bin_dir is None:
        sys.exit("initdb and pg_ctl are not on this machine (set PG_BIN to their directory)")
    import psycopg

    flags = ("--sessions", str(args.sessions), "--seed", "1", "--no-rate-limit",
             "--list-trigger-config", "include")
    with tempfile.TemporaryDirectory() as work, emulator(*flags) as url:
        out = str(Path(work, "out"))
        exported = export("run", url, out)
        assert exported.returncode == 0, exported
        sessions = args.sessions
        runs: dict[str, list[tuple[Measured, float, Measured]]] = {"duckdb": [], "postgres": []}
        with postgres_server(bin_dir) as server:
            for attempt in range(args.repeat):
                database = f"bench{attempt}"
                with psycopg.connect(server.conninfo("postgres"), autocommit=True) as con:
                    con.execute(f"CREATE DATABASE {database}")
                duck = str(Path(work, f"w{attempt}.duckdb"))
                for target, extra, env in (
                    ("duckdb", ("--database", duck), None),
                    ("postgres", (), server.env(database)),
                ):
                    server_cpu = server.cpu_seconds()
                    first = load(target, out, *extra, env=env)
                    time.sleep(0.5)  # the backend exits and is reaped: its CPU is counted
                    server_cpu = server.cpu_seconds() - server_cpu if env else 0.0
                    expected = f"holds {sessions} sessions"
                    assert first.returncode == 0 and expected in first.stdout, first
                    again = load(target, out, *extra, env=env)
                    assert again.returncode == 0 and "nothing new" in again.stdout, again
                    runs[target].append((first, server_cpu, again))
                    print(f"{target} #{attempt + 1}: first load {first.seconds:.2f} s "
                          f"(CPU: loader {first.cpu_seconds:.2f} s, server {server_cpu:.2f} s), "
                          f"again {again.seconds:.2f} s; load average {os.getloadavg()[0]:.1f}",
                          file=sys.stderr)
    rows: list[dict] = []
    for target, measured in runs.items():
        best = min(measured, key=lambda m: m[0].seconds)
        cpu = best[0].cpu_seconds + best[1]
        rows.append({
            "target": target,
            "sessions": sessions,
            "first_load_seconds": round(best[0].seconds, 2),
            "first_load_rows_per_s": round(sessions / best[0].seconds),
            "cpu_seconds_loader": round(best[0].cpu_seconds, 2),
            "cpu_seconds_server": round(best[1], 2),
            "rows_per_cpu_second": round(sessions / cpu),
            "all_seconds": [round(m[0].seconds, 2) for m in measured],
            "reload_seconds": [round(m[2].seconds, 2) for m in measured],
            "peak_rss_mb": round(max(m[0].peak_rss_mb for m in measured), 1),
        })
    rows.append({
        "postgres_over_duckdb_time": round(
            rows[1]["first_load_seconds"] / rows[0]["first_load_seconds"], 2),
        "load_average_at_end": round(os.getloadavg()[0], 1),
    })
    write_results("load", rows)


if __name__ == "__main__":
    main()
