"""The Delta layer against real tables (delta-rs on local disk), batches flattened from
emulator-shaped sessions, checked field by field against the truth the batches imply."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from deltalake import DeltaTable, write_deltalake

from pipeline.dataset.delta import (
    LATEST_DIR,
    VERSIONS_DIR,
    DeltaOutput,
    DeltaSink,
    compact_delta,
    delta_dataset,
    known_versions,
    recover,
    scan_delta_sessions,
    verify_delta,
)
from pipeline.dataset.delta.commit import apply_versions
from pipeline.dataset.delta.tables import to_delta_rows
from pipeline.dataset.flatten import flatten_sessions
from pipeline.errors import UsageError
from tests.conftest import DUCKDB_READ, ROOT, assert_row_matches
from tests.delta_worker import batch, extracted, run, session, truth

APP = "sessions-export"


def rows_of(uri: str, options: dict[str, str] | None = None) -> list[dict[str, Any]]:
    table = DeltaTable(uri, storage_options=options).to_pyarrow_table()
    return [{**r, "created_date": r["created_date"].isoformat()} for r in table.to_pylist()]


def iso_ms(value) -> str | None:
    return None if value is None else value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


def assert_tables_match(output: str, seed: int, batches: int, exact_extraction: bool = True,
                        options: dict[str, str] | None = None) -> None:
    latest, versions = truth(seed, batches)
    stored = rows_of(f"{output}/{LATEST_DIR}", options)
    assert sorted(r["id"] for r in stored) == sorted(latest)  # one row per id, none missing
    for row in stored:
        expected, index = latest[row["id"]]
        assert_row_matches(row, expected, with_config=True)
        if exact_extraction:
            assert row["extracted_at"].timestamp() * 1000 == extracted(index), row["id"]
    history = rows_of(f"{output}/{VERSIONS_DIR}", options)
    keys = [(r["id"], iso_ms(r["updated_at"])) for r in history]
    assert sorted(keys, key=str) == sorted(versions, key=str)  # each version once, none missing
    for row in history:
        expected, index = versions[(row["id"], iso_ms(row["updated_at"]))]
        assert_row_matches(row, expected, with_config=True)
        assert row["extracted_at"].timestamp() * 1000 == extracted(index)


def test_flushes_dedupe_and_merge_field_by_field(tmp_path: Path) -> None:
    output = str(tmp_path / "out")
    run(output, APP, seed=1, batches=12)
    assert_tables_match(output, seed=1, batches=12)
    report = verify_delta(DeltaOutput.at(output))
    assert report.ok, report.lines()
    latest, versions = truth(1, 12)
    assert report.sessions == len(latest) and report.versions == len(versions)
    for name in (LATEST_DIR, VERSIONS_DIR):  # no table feature an outside reader may lack
        protocol = DeltaTable(f"{output}/{name}").protocol()
        assert (protocol.min_reader_version, protocol.min_writer_version) == (1, 2), protocol
        assert not protocol.reader_features and not protocol.writer_features, protocol


def test_null_updated_at_is_the_oldest_and_ties_go_to_the_later_extraction(tmp_path) -> None:
    out = DeltaOutput.at(tmp_path / "out")
    sink = DeltaSink(out, APP, 0, 1, 1 << 30)
    for sessions, at in (([session(1, 2)], 1000), ([session(1, None)], 2000),
                         ([session(1, 2)], 3000), ([session(1, 1)], 4000)):
        sink.add(flatten_sessions(sessions, at, "r"))
        sink.flush(0)
    (row,) = rows_of(out.table_uri(LATEST_DIR))
    assert_row_matches(row, session(1, 2))
    assert row["extracted_at"].timestamp() * 1000 == 3000  # the equal version, seen later
    assert len(rows_of(out.table_uri(VERSIONS_DIR))) == 3  # v2, null, v1


def test_a_replayed_flush_is_a_no_op(tmp_path: Path) -> None:
    out = DeltaOutput.at(tmp_path / "out")
    table = flatten_sessions(batch(2, 0), extracted(0), "r")
    sink = DeltaSink(out, APP, 0, 1, 1 << 30)
    sink.add(table)
    sink.flush(0, {"next_batch": 1})
    before = [rows_of(out.table_uri(n)) for n in (LATEST_DIR, VERSIONS_DIR)]
    versions = [DeltaTable(out.table_uri(n)).version() for n in (LATEST_DIR, VERSIONS_DIR)]
    again = DeltaSink(out, APP, 0, 1, 1 << 30)  # a writer that did not see the commit
    again.add(table)
    assert again.flush(0, {"next_batch": 1}) == []  # both commits skipped: nothing logged
    assert [w.path for w in again.written] == [VERSIONS_DIR, LATEST_DIR]
    assert [DeltaTable(out.table_uri(n)).version() for n in (LATEST_DIR, VERSIONS_DIR)] == versions
    sink.add(table)  # the same rows under a new generation: an empty commit each
    sink.flush(1, {"next_batch": 1})
    assert [rows_of(out.table_uri(n)) for n in (LATEST_DIR, VERSIONS_DIR)] == before
    assert recover(out, APP).generation == 2


def test_recover_finishes_a_flush_cut_between_the_two_commits(tmp_path: Path) -> None:
    output = str(tmp_path / "out")
    run(output, APP, seed=3, batches=3)
    out = DeltaOutput.at(output)
    rows = to_delta_rows(flatten_sessions(batch(3, 3), extracted(3), "run-3"))
    apply_versions(out, rows, APP, 4, {"next_batch": 4})  # killed before the MERGE
    recovery = recover(out, APP)
    assert (recovery.generation, recovery.checkpoint, recovery.remerged) == (4, {"next_batch": 4}, (4,))
    assert DeltaTable(out.table_uri(LATEST_DIR)).transaction_version(APP) == 4
    assert recover(out, APP).remerged == ()
    run(output, APP, seed=3, batches=6)
    assert_tables_match(output, seed=3, batches=6, exact_extraction=False)


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_is_exact(tmp_path: Path) -> None:
    output, batches, rng = str(tmp_path / "out"), 250, random.Random(7)
    argv = [sys.executable, "-m", "tests.delta_worker", output, APP, "5", str(batches)]
    kills = 0
    while kills < 22:
        worker = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, text=True)
        time.sleep(rng.uniform(0.4, 1.6))
        if worker.poll() is not None:
            break
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait()
        kills += 1
    finished = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert finished.returncode == 0, finished.stderr
    assert kills >= 20
    assert_tables_match(output, seed=5, batches=batches, exact_extraction=False)
    assert verify_delta(DeltaOutput.at(output)).ok


@pytest.mark.slow
def test_two_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    output = str(tmp_path / "out")
    run(output, "first", seed=9, batches=1)  # the tables exist before the race
    argv = [[sys.executable, "-m", "tests.delta_worker", output, app, "9", "16"]
            for app in ("first", "second")]
    workers = [subprocess.Popen(a, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for a in argv]
    for worker in workers:
        _, err = worker.communicate(timeout=600)
        assert worker.returncode == 0, err
    assert_tables_match(output, seed=9, batches=16, exact_extraction=False)


def test_known_versions_reads_the_window_partitions(tmp_path: Path) -> None:
    output = str(tmp_path / "out")
    run(output, APP, seed=4, batches=2)
    stored = known_versions(DeltaOutput.at(output), None, None)
    table = flatten_sessions([session(n, 3) for n in range(90)] + batch(4, 0)[:5], 1, "r")
    _, versions = truth(4, 2)
    expected = [(s["id"], s["updatedAt"]) not in versions
                for s in [session(n, 3) for n in range(90)] + batch(4, 0)[:5]]
    assert stored.unseen(table).to_pylist() == expected
    assert stored.partitions_read == 4


def test_compact_bin_packs_checkpoints_and_refuses_a_short_retention(tmp_path: Path) -> None:
    output = str(tmp_path / "out")
    run(output, APP, seed=6, batches=8)
    out = DeltaOutput.at(output)
    with pytest.raises(UsageError, match="under 1:00:00"):
        compact_delta(out, retention=timedelta(minutes=30))
    reports = compact_delta(out)
    assert [r.table for r in reports] == [VERSIONS_DIR, LATEST_DIR]
    assert reports[0].files_removed > reports[0].files_added > 0
    assert reports[0].vacuumed == 0  # nothing is older than 7 days
    assert list((tmp_path / "out" / VERSIONS_DIR / "_delta_log").glob("*.checkpoint.parquet"))
    forced = compact_delta(out, retention=timedelta(0), force=True)
    assert forced[0].vacuumed > 0
    assert_tables_match(output, seed=6, batches=8)
    assert verify_delta(out).ok
    assert_independent_reader_agrees(output)


def test_verify_catches_a_deleted_file_and_a_duplicated_id(tmp_path: Path) -> None:
    output = str(tmp_path / "out")
    run(output, APP, seed=8, batches=3)
    out = DeltaOutput.at(output)
    again = DeltaTable(out.table_uri(LATEST_DIR)).to_pyarrow_table().slice(0, 1)
    write_deltalake(out.table_uri(LATEST_DIR), again, mode="append")
    report = verify_delta(out)
    assert "sessions: 1 id(s) have more than one row" in report.problems, report.lines()
    victim = next((tmp_path / "out" / VERSIONS_DIR).rglob("*.parquet"))
    victim.unlink()
    report = verify_delta(out)
    assert any("file(s) the log names are missing" in p for p in report.problems), report.lines()
    assert report.lines()[0].endswith("problems")


def test_scan_reads_either_table_with_partition_pruning(tmp_path: Path) -> None:
    import polars as pl

    output = str(tmp_path / "out")
    run(output, APP, seed=1, batches=4)
    latest, versions = truth(1, 4)
    assert scan_delta_sessions(output).collect().height == len(latest)
    assert scan_delta_sessions(output, latest=False).collect().height == len(versions)
    day = scan_delta_sessions(output).filter(pl.col("created_date") == pl.date(2026, 10, 2))
    assert day.collect().height == sum(s["createdAt"].startswith("2026-10-02")
                                       for s, _ in latest.values())
    batches = delta_dataset(DeltaOutput.at(output)).to_batches(batch_size=7)
    assert sum(b.num_rows for b in batches) == len(latest)


def test_without_deltalake_exit_2_names_the_pip_command() -> None:
    code = ("import sys; sys.modules['deltalake'] = None\n"
            "from pipeline.dataset.delta import DeltaOutput\n"
            "from pipeline.errors import ExportError\n"
            "try:\n    DeltaOutput.at('out').open('sessions')\n"
            "except ExportError as e:\n    print(e); sys.exit(int(e.exit_code))\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert f"pip install -e '{ROOT}[delta]'" in done.stdout  # this checkout is installed editable


# -- an independent reader: the Delta log read here (JSON commits, Parquet checkpoints) ----------


def read_log(table_dir: Path) -> list[dict[str, Any]]:
    """The table's rows, from its log alone: the last checkpoint, then the commits after it."""
    log = table_dir / "_delta_log"
    checkpoints = sorted(log.glob("*.checkpoint.parquet"))
    live: dict[str, dict[str, str]] = {}
    start = 0
    if checkpoints:
        start = int(checkpoints[-1].name.split(".")[0]) + 1
        for action in pq.read_table(checkpoints[-1], columns=["add"]).column("add").to_pylist():
            if action:
                live[action["path"]] = dict(action["partitionValues"])
    for commit in sorted(log.glob("*.json")):
        if int(commit.stem) < start:
            continue
        for line in commit.read_text().splitlines():
            action = json.loads(line)
            if "add" in action:
                live[action["add"]["path"]] = action["add"]["partitionValues"]
            elif "remove" in action:
                live.pop(action["remove"]["path"], None)
    rows = []
    for path, values in live.items():
        for row in pq.read_table(table_dir / path).to_pylist():
            rows.append({**row, **values})
    return rows


def assert_independent_reader_agrees(output: str) -> None:
    for name in (LATEST_DIR, VERSIONS_DIR):
        ours = {(r["id"], str(r["updated_at"]), r["metadata"]) for r in rows_of(f"{output}/{name}")}
        theirs = read_log(Path(output) / name)
        assert len(theirs) == len(ours)
        assert {(r["id"], str(r["updated_at"]), r["metadata"]) for r in theirs} == ours


def test_an_independent_log_reader_sees_what_delta_rs_sees(tmp_path: Path) -> None:
    output = str(tmp_path / "out")
    run(output, APP, seed=11, batches=6)
    assert_independent_reader_agrees(output)


def test_a_commit_from_a_stale_snapshot_conflicts_and_a_rerun_inserts_nothing_twice(tmp_path) -> None:
    """The fence concurrent writers rely on: delta-rs refuses a MERGE whose partitions
    another commit changed since its snapshot; `_commit` then reruns it on a fresh one."""
    from deltalake.exceptions import CommitFailedError

    out = DeltaOutput.at(tmp_path / "out")
    stale = out.open(VERSIONS_DIR)
    rows = to_delta_rows(flatten_sessions([session(1, 1), session(2, 1)], 1000, "r"))
    assert apply_versions(out, rows, "other", 1, None).inserted == 2
    predicate = ("t.created_date IN ('2026-10-02', '2026-10-03') AND t.id = s.id"
                 " AND (t.updated_at IS NOT DISTINCT FROM s.updated_at)")
    with pytest.raises(CommitFailedError, match="concurrent"):
        stale.merge(rows, predicate, source_alias="s", target_alias="t") \
            .when_not_matched_insert_all().execute()
    assert apply_versions(out, rows, APP, 1, None).inserted == 0
    assert len(rows_of(out.table_uri(VERSIONS_DIR))) == 2


# -- DuckDB's delta extension (delta-kernel-rs, not delta-rs): a second independent reader -------

@pytest.mark.slow
def test_duckdb_delta_scan_reads_what_delta_rs_wrote(tmp_path: Path, duckdb_delta: Path) -> None:
    output = str(tmp_path / "out")
    run(output, APP, seed=12, batches=6)
    compact_delta(DeltaOutput.at(output))  # a checkpoint in the log too
    run(output, APP, seed=12, batches=9)
    for name in (LATEST_DIR, VERSIONS_DIR):
        read = subprocess.run([str(duckdb_delta), "-c", DUCKDB_READ, f"{output}/{name}"],
                              capture_output=True, text=True, timeout=300)
        assert read.returncode == 0, read.stderr
        theirs = sorted(map(tuple, json.loads(read.stdout)), key=str)
        ours = sorted(((r["id"], None if r["updated_at"] is None else
                        int(r["updated_at"].timestamp() * 1000), r["metadata"], r["created_date"])
                       for r in rows_of(f"{output}/{name}")), key=str)
        assert theirs == ours


COMPACT = ("import sys; from datetime import timedelta\n"
           "from pipeline.dataset.delta import DeltaOutput, compact_delta\n"
           "compact_delta(DeltaOutput.at(sys.argv[1]), timedelta(0), force=True)\n")


@pytest.mark.slow
def test_kill_9_during_compact_then_flushes_and_compact_again_is_exact(tmp_path: Path) -> None:
    output, rng = str(tmp_path / "out"), random.Random(3)
    run(output, APP, seed=13, batches=30)
    for kill in range(6):
        compactor = subprocess.Popen([sys.executable, "-c", COMPACT, output], cwd=ROOT)
        time.sleep(rng.uniform(0.2, 1.5))
        os.kill(compactor.pid, signal.SIGKILL)
        compactor.wait()
        run(output, APP, seed=13, batches=31 + kill)
    compact_delta(DeltaOutput.at(output))
    assert_tables_match(output, seed=13, batches=36)
    assert verify_delta(DeltaOutput.at(output)).ok


def test_a_flush_reads_only_the_files_its_created_at_range_can_match(tmp_path: Path) -> None:
    """A busy day: flushes of the walk (each a narrow createdAt range, ids in no order) into
    one partition. Each MERGE scans only the files whose createdAt range meets its own, not
    the whole day: the cost of a flush does not grow with the partition."""
    out = DeltaOutput.at(tmp_path / "out")
    sink = DeltaSink(out, APP, 0, 10**9, 2**40)
    rng = random.Random(5)
    for flush in range(6):
        sessions = []
        for n in range(50):
            value = session(flush * 50 + n, 1)
            value["id"] = f"session_{rng.getrandbits(64):016x}"
            value["createdAt"] = f"2026-10-01T{flush:02d}:{n:02d}:00.000Z"
            sessions.append(value)
        sink.add(flatten_sessions(sessions, extracted(flush), "run-busy"))
        sink.flush(flush + 1)
    assert len(DeltaTable(out.table_uri(LATEST_DIR)).file_uris()) == 6  # one day, six files
    for name in (LATEST_DIR, VERSIONS_DIR):
        metrics = DeltaTable(out.table_uri(name)).history(1)[0]["operationMetrics"]
        assert metrics["num_target_files_scanned"] == 0, (name, metrics)
        assert metrics["num_target_files_skipped_during_scan"] == 5, (name, metrics)
