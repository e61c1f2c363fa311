"""`sessions-export backfill`: windows, splits, resume, boundaries, bad ranges."""

from __future__ import annotations

import json
import signal
import time
from collections import Counter

import pytest

from pipeline.errors import UsageError
from pipeline.jobs.backfill import MIN_SPLIT_MS, plan_windows, split_point
from pipeline.timestamps import parse_timestamp_ms
from tests.conftest import (
    assert_dataset_equals,
    emulator_sessions,
    read_dataset,
    run_cli,
    spawn_cli,
)


def iso(ms: int) -> str:
    from pipeline.timestamps import iso_ms

    return iso_ms(ms)


def in_range(sessions, since_ms, until_ms):
    return [s for s in sessions if since_ms <= parse_timestamp_ms(s["createdAt"]) <= until_ms]


@pytest.mark.parametrize(("since", "until", "count"), [(0, 99, 4), (5, 5, 3), (0, 10, 11), (7, 1000, 3)])
def test_windows_cover_the_range_without_gaps_or_overlaps(since, until, count):
    windows = plan_windows(since, until, count)
    assert windows[0][0] == since and windows[-1][1] == until
    for (_, high), (low, _) in zip(windows, windows[1:], strict=False):
        assert low == high + 1
    assert all(low <= high for low, high in windows)


def test_bad_range_and_split_points():
    with pytest.raises(UsageError):
        plan_windows(10, 9, 2)
    assert split_point(0, MIN_SPLIT_MS - 2) is None
    cut = split_point(0, 10_000)
    assert 0 <= cut < 10_000


@pytest.mark.slow
def test_backfill_exports_the_range_exactly_and_leaves_the_checkpoint(emulator, output):
    emu = emulator(sessions=6000, seed=71, days=30, latency_ms=5, list_trigger_config="include",
                   rate_limit=True, rate_limit_burst=30, rate_limit_refill=15,
                   rate_limit_interval=0.25)
    sessions = emulator_sessions(emu.url)
    newest = max(parse_timestamp_ms(s["createdAt"]) for s in sessions)
    since, until = newest - 20 * 86_400_000, newest - 3 * 86_400_000
    assert run_cli("run", "--output", str(output), url=emu.url).returncode == 0
    checkpoint = (output / "_state" / "checkpoint.json").read_text()
    runs_before = set((output / "_runs").iterdir())

    backfill_out = output / "backfill"
    result = run_cli("backfill", "--since", iso(since), "--until", iso(until), "--output",
                     str(backfill_out), "--state", str(output / "_state"),
                     "--concurrency", "4", "--flush-rows", "800", "--log-format", "json",
                     url=emu.url)
    assert result.returncode == 0, result.stderr
    expected = in_range(sessions, since, until)
    assert_dataset_equals(backfill_out, expected)
    assert read_dataset(backfill_out).num_rows == len(expected)
    assert (output / "_state" / "checkpoint.json").read_text() == checkpoint  # untouched
    manifest = json.loads(next((backfill_out / "_runs").glob("*.json")).read_text())
    assert manifest["mode"] == "backfill" and manifest["rows"] == len(expected)
    assert set((output / "_runs").iterdir()) == runs_before
    progress = [json.loads(line) for line in result.stderr.splitlines()
                if '"pipeline.ops.progress"' in line]
    assert progress and progress[-1]["covered"] == 1.0
    assert progress[-1]["sessions"] == len(expected)


def test_sessions_sharing_a_boundary_millisecond_are_exported_once(emulator, output):
    emu = emulator(sessions=4000, seed=72, days=5)
    sessions = emulator_sessions(emu.url)
    counts = Counter(s["createdAt"] for s in sessions)
    shared = [t for t, n in counts.items() if n >= 2]
    assert shared, "the emulator should generate sessions sharing a millisecond"
    moment = parse_timestamp_ms(shared[len(shared) // 2])
    # two windows meeting exactly at the shared millisecond: [m-k, m-1] and [m, m+k-1]
    since, until = moment - 3_600_000, moment + 3_600_000 - 1
    assert plan_windows(since, until, 2)[1][0] == moment
    result = run_cli("backfill", "--since", iso(since), "--until", iso(until), "--output",
                     str(output), "--concurrency", "2", url=emu.url)
    assert result.returncode == 0, result.stderr
    expected = in_range(sessions, since, until)
    assert_dataset_equals(output, expected)
    assert read_dataset(output).num_rows == len(expected)
    # and a range that starts and ends on that very millisecond holds exactly the cluster
    edge = output.parent / "edge"
    result = run_cli("backfill", "--since", iso(moment), "--until", iso(moment), "--output",
                     str(edge), "--concurrency", "3", url=emu.url)
    assert result.returncode == 0, result.stderr
    assert read_dataset(edge).num_rows == counts[shared[len(shared) // 2]]


@pytest.mark.slow
def test_backfill_resumes_after_kill_9(emulator, gate, output):
    emu = emulator(sessions=9000, seed=73, days=20, list_trigger_config="include")
    args = ("backfill", "--since", "30d", "--output", str(output), "--concurrency", "3",
            "--flush-rows", "600")
    # 65 of the walk's about 95 list pages pass (its first flushes come near page 45), then
    # the gate holds the rest: the kill surely comes mid-walk, after a few flushes
    held = gate(emu.url, 65)
    process = spawn_cli(*args, url=held.url)
    deadline = time.monotonic() + 120
    state = {}
    while time.monotonic() < deadline and process.poll() is None:
        state_files = list((output / "_state").glob("backfill-*.json"))
        if held.waiting and state_files:
            state = json.loads(state_files[0].read_text())
            if sum(w["flush_seq"] for w in state["windows"]) >= 3:
                break
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert held.waiting, "the walk should be held at the gate"
    assert sum(w["flush_seq"] for w in state["windows"]) >= 3, state["windows"]
    assert not state["complete"] and not all(w["done"] for w in state["windows"])

    # a different range is a different backfill; the same command resumes this one
    resumed = run_cli(*args, url=emu.url)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed" in resumed.stdout and state["run_id"] in resumed.stdout
    sessions = emulator_sessions(emu.url)
    assert_dataset_equals(output, sessions)
    assert read_dataset(output).num_rows == len(sessions)

    again = run_cli(*args, url=emu.url)
    assert again.returncode == 2 and "already completed" in again.stderr
    restarted = run_cli(*args, "--restart", url=emu.url)
    assert restarted.returncode == 0, restarted.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--since", "2026-02-01", "--until", "2026-01-01"), "is after --until"),
        (("--since", "last spring"), "is not a time"),
        ((), "backfill needs --since"),
        (("--since", "3d", "--concurrency", "0"), "concurrency must be at least 1"),
    ],
)
def test_bad_ranges_are_refused_with_exit_2(output, args, message):
    result = run_cli("backfill", "--output", str(output), *args, url="http://127.0.0.1:9")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not output.exists()


def test_help_says_it_never_moves_the_incremental_checkpoint():
    result = run_cli("backfill", "--help")
    assert "never moves the incremental checkpoint" in " ".join(result.stdout.split())
