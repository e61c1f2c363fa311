"""The commands on a Delta output (`--table-format delta`), run as the real CLI: `compact`,
`verify`, `stats`, `state show`, `load duckdb`, `load postgres`, and `scan_sessions`. The
tables are built with the Delta layer directly (tests/delta_worker.py), so these tests do
not depend on how `run` writes them."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import duckdb
import polars as pl
import psycopg
import pytest
from deltalake import DeltaTable, write_deltalake

from pipeline import scan_sessions
from pipeline.dataset.delta import LATEST_DIR, VERSIONS_DIR, DeltaOutput
from pipeline.dataset.delta.commit import apply_versions
from pipeline.dataset.delta.tables import to_delta_rows
from pipeline.dataset.flatten import flatten_sessions
from tests.conftest import (
    DUCKDB_READ,
    KEY,
    ROOT,
    assert_dataset_equals,
    clean_env,
    emulator_sessions,
    run_cli,
    s3_cli,
)
from tests.delta_worker import batch, extracted, run, truth

APP = "sessions-export"
DELTA = ("--table-format", "delta")


def cli(output: str | Path, *args: str, env: dict[str, str] | None = None):
    return run_cli(*args, "--output", str(output), *DELTA, "--log-level", "warning",
                   env_extra=env)


def latest_ids(output: str | Path) -> list[tuple[str, object]]:
    table = DeltaTable(f"{output}/{LATEST_DIR}").to_pyarrow_table(columns=["id", "updated_at"])
    return sorted(zip(table["id"].to_pylist(), table["updated_at"].to_pylist(), strict=True))


def test_verify_passes_then_catches_a_duplicated_id_and_a_deleted_file(tmp_path: Path) -> None:
    output = tmp_path / "out"
    run(str(output), APP, seed=31, batches=4)
    latest, versions = truth(31, 4)
    ok = cli(output, "verify")
    assert ok.returncode == 0, ok.stderr
    assert f"{len(latest)} sessions, {len(versions)} versions: OK" in ok.stdout
    one = DeltaTable(f"{output}/{LATEST_DIR}").to_pyarrow_table().slice(0, 1)
    write_deltalake(f"{output}/{LATEST_DIR}", one, mode="append")
    twice = cli(output, "verify")
    assert twice.returncode == 6, twice
    assert "problem: sessions: 1 id(s) have more than one row" in twice.stdout
    next((output / VERSIONS_DIR).rglob("*.parquet")).unlink()
    gone = cli(output, "verify")
    assert gone.returncode == 6 and "file(s) the log names are missing" in gone.stdout, gone


def test_verify_of_an_output_without_tables_fails(tmp_path: Path) -> None:
    done = cli(tmp_path / "nothing", "verify")
    assert done.returncode == 6 and "is not a Delta table" in done.stdout, done


@pytest.mark.slow
def test_stats_counts_each_day_from_the_two_tables(tmp_path: Path) -> None:
    output = tmp_path / "out"
    run(str(output), APP, seed=32, batches=5)
    latest, versions = truth(32, 5)
    done = cli(output, "stats", "--format", "json")
    assert done.returncode == 0, done.stderr
    rows = {r["created_date"]: r for r in json.loads(done.stdout)}
    for day, row in rows.items():
        day_latest = [s for s, _ in latest.values() if s["createdAt"].startswith(day)]
        assert row["sessions"] == len(day_latest)
        assert row["versions"] == sum(1 for s, _ in versions.values() if s["createdAt"].startswith(day))
        assert row["closed"] == sum(1 for s in day_latest if s["closedAt"])
    assert sum(r["sessions"] for r in rows.values()) == len(latest)
    one_day = cli(output, "stats", "--format", "json", "--since", "2026-10-02", "--until", "2026-10-02")
    assert [r["created_date"] for r in json.loads(one_day.stdout)] == ["2026-10-02"]
    empty = cli(tmp_path / "nothing", "stats", "--format", "csv")
    assert empty.returncode == 0 and empty.stdout.strip().count("\n") == 0, empty


def test_state_show_reports_table_versions_and_the_newest_flush(tmp_path: Path) -> None:
    output = tmp_path / "out"
    run(str(output), APP, seed=33, batches=3)
    done = cli(output, "state", "show")
    assert done.returncode == 0, done.stderr
    versions = DeltaTable(f"{output}/{VERSIONS_DIR}").version()
    assert f"delta sessions_versions: version {versions}; {APP} flush 3" in done.stdout
    assert f"delta sessions: version {DeltaTable(f'{output}/{LATEST_DIR}').version()}; {APP} flush 3" \
        in done.stdout


@pytest.mark.slow
def test_compact_refuses_a_short_retention_unless_forced_and_duckdb_reads_the_result(
        tmp_path: Path, duckdb_delta: Path) -> None:
    output = tmp_path / "out"
    run(str(output), APP, seed=34, batches=8)
    before = latest_ids(output)
    refused = cli(output, "compact", "--retention", "30m")
    assert refused.returncode == 2, refused
    assert "under 1:00:00" in refused.stderr and "--force" in refused.stderr
    assert refused.stderr.strip().count("\n") == 0
    kept = cli(output, "compact")
    assert kept.returncode == 0, kept.stderr
    assert "compact sessions_versions: " in kept.stdout and "0 old files vacuumed" in kept.stdout
    forced = cli(output, "compact", "--retention", "0s", "--force")
    assert forced.returncode == 0, forced.stderr
    assert "0 old files vacuumed" not in forced.stdout.splitlines()[0]
    assert list((output / VERSIONS_DIR / "_delta_log").glob("*.checkpoint.parquet"))
    assert latest_ids(output) == before
    assert cli(output, "verify").returncode == 0
    for name in (LATEST_DIR, VERSIONS_DIR):  # an independent reader: delta-kernel-rs
        read = subprocess.run([str(duckdb_delta), "-c", DUCKDB_READ, f"{output}/{name}"],
                              capture_output=True, text=True, timeout=300)
        assert read.returncode == 0, read.stderr
        theirs = sorted(row[0] for row in json.loads(read.stdout))
        ours = DeltaTable(f"{output}/{name}").to_pyarrow_table(columns=["id"])["id"].to_pylist()
        assert theirs == sorted(ours)


def test_compact_first_finishes_a_flush_cut_between_its_two_commits(tmp_path: Path) -> None:
    output = tmp_path / "out"
    run(str(output), APP, seed=35, batches=3)
    rows = to_delta_rows(flatten_sessions(batch(35, 3), extracted(3), "run-35"))
    apply_versions(DeltaOutput.at(output), rows, APP, 4, {"next_batch": 4})  # killed before MERGE
    done = cli(output, "compact")
    assert done.returncode == 0, done.stderr
    assert f"flushes [4] of {APP} re-merged" in done.stdout
    assert DeltaTable(f"{output}/{LATEST_DIR}").transaction_version(APP) == 4
    latest, _ = truth(35, 4)
    assert [i for i, _ in latest_ids(output)] == sorted(latest)
    assert cli(output, "verify").returncode == 0


@pytest.mark.slow
def test_kill_9_during_compact_then_compact_again_and_verify(tmp_path: Path) -> None:
    """The CLI's `compact` killed at random moments, flushes between the kills; a final
    `compact` and `verify` pass and the tables hold exactly the truth."""
    output, rng = tmp_path / "out", random.Random(17)
    run(str(output), APP, seed=36, batches=20)
    argv = [sys.executable, "-m", "pipeline", "compact", "--output", str(output), *DELTA,
            "--retention", "0s", "--force"]
    started = time.monotonic()
    subprocess.run(argv, cwd=ROOT, check=True, capture_output=True)  # how long a whole one takes
    whole = time.monotonic() - started
    kills, batches = 0, 20
    for _ in range(40):
        run(str(output), APP, seed=36, batches=batches + 3)  # small files to bin-pack again
        batches += 3
        compactor = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.2, whole))
        if compactor.poll() is None:
            os.kill(compactor.pid, signal.SIGKILL)
            kills += 1
        compactor.wait()
        if kills == 12:
            break
    assert kills == 12
    done = cli(output, "compact")
    assert done.returncode == 0, done.stderr
    verified = cli(output, "verify")
    assert verified.returncode == 0, verified.stdout
    latest, versions = truth(36, batches)
    assert f"{len(latest)} sessions, {len(versions)} versions: OK" in verified.stdout
    expected = sorted((k, s["updatedAt"]) for k, (s, _) in latest.items())
    found = [(i, None if u is None else u.strftime("%Y-%m-%dT%H:%M:%S.000Z"))
             for i, u in latest_ids(output)]
    assert found == expected


@pytest.mark.slow
def test_load_duckdb_loads_the_latest_table_once_per_version(tmp_path: Path) -> None:
    output, database = tmp_path / "out", str(tmp_path / "w.duckdb")
    run(str(output), APP, seed=37, batches=4)
    first = cli(output, "load", "duckdb", "--database", database)
    assert first.returncode == 0, first.stderr
    version = DeltaTable(f"{output}/{LATEST_DIR}").version()
    assert f"load: Delta version {version}," in first.stdout
    again = cli(output, "load", "duckdb", "--database", database)
    assert again.stdout.startswith("load: nothing new"), again
    run(str(output), APP, seed=37, batches=7)
    cli(output, "compact")  # OPTIMIZE rewrites files: the load reads them again, harmlessly
    third = cli(output, "load", "duckdb", "--database", database)
    assert third.returncode == 0 and "nothing new" not in third.stdout, third
    with duckdb.connect(database) as con:
        loaded = con.execute("SELECT id, updated_at FROM sessions ORDER BY id").fetchall()
        ledger = con.execute("SELECT run_id FROM sessions_export_loads ORDER BY loaded_at").fetchall()
    assert [(i, u) for i, u in loaded] == latest_ids(output)
    assert ledger[0] == (f"delta-v{version}",) and len(ledger) == 2


@pytest.mark.slow
def test_load_postgres_loads_the_latest_table_once_per_version(tmp_path: Path, postgres) -> None:
    with psycopg.connect(postgres.conninfo("postgres"), autocommit=True) as con:
        con.execute("CREATE DATABASE delta_load")
    output, env = tmp_path / "out", postgres.env("delta_load", None)
    run(str(output), APP, seed=38, batches=4)
    first = cli(output, "load", "postgres", env=env)
    assert first.returncode == 0, first.stderr
    assert cli(output, "load", "postgres", env=env).stdout.startswith("load: nothing new")
    run(str(output), APP, seed=38, batches=6)
    assert "nothing new" not in cli(output, "load", "postgres", env=env).stdout
    with psycopg.connect(postgres.conninfo("delta_load")) as con:
        loaded = con.execute("SELECT id, updated_at FROM sessions ORDER BY id").fetchall()
    assert loaded == latest_ids(output)


def test_scan_sessions_finds_the_delta_tables_or_is_told(tmp_path: Path) -> None:
    output = str(tmp_path / "out")
    run(output, APP, seed=39, batches=4)
    latest, versions = truth(39, 4)
    assert scan_sessions(output).collect().height == len(latest)  # found by its _delta_log
    assert scan_sessions(output, latest=False, table_format="delta").collect().height == len(versions)
    day = scan_sessions(output).filter(pl.col("created_date") == pl.date(2026, 10, 3)).collect()
    assert day.height == sum(s["createdAt"].startswith("2026-10-03") for s, _ in latest.values())
    assert scan_sessions(tmp_path / "none").collect().height == 0  # no _delta_log: Parquet


@pytest.mark.slow
def test_the_commands_on_s3(s3, tmp_path: Path) -> None:
    bucket = s3.new_bucket()
    output = f"s3://{bucket}/exports/delta"
    run(output, APP, seed=40, batches=5)
    latest, versions = truth(40, 5)

    def on_s3(*args: str) -> subprocess.CompletedProcess[str]:
        return s3_cli(*args, "--output", output, *DELTA, url=None, aws=s3.env)

    verified = on_s3("verify")
    assert verified.returncode == 0, verified.stderr
    assert f"{len(latest)} sessions, {len(versions)} versions: OK" in verified.stdout
    compacted = on_s3("compact", "--retention", "0s", "--force")
    assert compacted.returncode == 0 and "compact sessions:" in compacted.stdout, compacted
    stats = on_s3("stats", "--format", "json")
    assert sum(r["sessions"] for r in json.loads(stats.stdout)) == len(latest), stats
    database = str(tmp_path / "w.duckdb")
    assert "Delta version" in on_s3("load", "duckdb", "--database", database).stdout
    assert on_s3("load", "duckdb", "--database", database).stdout.startswith("load: nothing new")
    assert f"{APP} flush 5" in on_s3("state", "show").stdout
    assert scan_sessions(output).collect().height == len(latest)


LIBRARY_CALLS = """
import sys
import pipeline
from pipeline import export, scan_sessions
from pipeline.errors import UsageError
print(pipeline.__file__)
for call in (lambda: export(output=sys.argv[1], table_format="delta"),
             lambda: scan_sessions(sys.argv[1], table_format="delta")):
    try:
        call()
    except UsageError as error:
        print(error.exit_code, error)
    else:
        sys.exit("no UsageError")
"""


def tree(path: Path) -> dict[str, tuple[int, int]]:
    """Every file under `path`: its size and modification time."""
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in path.rglob("*") if p.is_file()}


def assert_names_the_pip_command(done: subprocess.CompletedProcess[str]) -> None:
    assert done.returncode == 2, done
    assert done.stderr.strip().count("\n") == 0, done.stderr
    assert f"run pip install '{ROOT}[delta]'" in done.stderr, done.stderr  # not editable


@pytest.mark.slow
def test_a_plain_install_without_the_delta_extra(nodelta: Path, emulator, tmp_path: Path) -> None:
    """`pip install <repo>` without `[delta]` (its own venv, cwd outside the repo): Parquet
    works; every command on Delta exits 2 naming the pip command and writes nothing."""
    emu = emulator(sessions=300, days=2, list_trigger_config="include")
    env = clean_env(TRIGGER_SECRET_KEY=KEY, TRIGGER_API_URL=emu.url)
    work = tmp_path / "cwd"
    work.mkdir()

    def installed(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*argv, "--log-level", "warning"], env=env, text=True,
                              capture_output=True, timeout=300, cwd=work)

    parquet = tmp_path / "parquet"
    done = installed(str(nodelta / APP), "run", "--output", str(parquet))
    assert done.returncode == 0, done.stderr
    assert_dataset_equals(parquet, emulator_sessions(emu.url))

    output = tmp_path / "delta"
    run(str(output), APP, seed=41, batches=3)  # a Delta output, made where deltalake is
    before = tree(output)
    database = tmp_path / "w.duckdb"
    fresh = tmp_path / "fresh"
    commands = (["run", "--output", str(fresh)], ["backfill", "--output", str(fresh), "--since", "7d"],
                *(([*c, "--output", str(output)]) for c in (
                    ["verify"], ["compact"], ["stats"], ["state", "show"],
                    ["load", "duckdb", "--database", str(database)])))
    for command in commands:
        for program in ([str(nodelta / APP)], [str(nodelta / "python"), "-m", "pipeline"]):
            assert_names_the_pip_command(installed(*program, *command, *DELTA))
    assert not fresh.exists() and not database.exists()
    assert tree(output) == before

    library = subprocess.run([str(nodelta / "python"), "-c", LIBRARY_CALLS, str(fresh)], env=env,
                             text=True, capture_output=True, timeout=120, cwd=work)
    assert library.returncode == 0, library
    where, *lines = library.stdout.splitlines()
    assert Path(where).is_relative_to(nodelta.parent), where  # the installed copy, not the repo's
    assert len(lines) == 2 and all(line.startswith("2 ") and f"'{ROOT}[delta]'" in line for line in lines), lines
    assert not fresh.exists()
