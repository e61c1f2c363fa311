"""Property-style: over many seeds, id skews, page sizes and filters, with more than a page of
sessions in one millisecond, sessions created during the walk, and cuts (in process) or
kill -9 (the real CLI) followed by a resume, the union walked equals the emulator's data."""

from __future__ import annotations

import json
import random
import signal
import time
from pathlib import Path

import httpx
import pytest

from pipeline.api.client import TriggerClient
from pipeline.api.walker import Listing, WalkState, derived_status, walk_listing
from pipeline.config import Settings
from pipeline.emulator import EmulatorConfig, start_in_thread
from pipeline.emulator.timestamps import now_ms
from pipeline.runner import client_settings
from tests.conftest import (
    KEY,
    assert_dataset_equals,
    emulator_sessions,
    read_dataset,
    run_cli,
    spawn_cli,
)

AUTH = {"Authorization": f"Bearer {KEY}"}
FILTERS = [None, ("filter[type]", "chat.agent"), ("filter[tags]", "env:prod"),
           ("filter[status]", "ACTIVE"), ("filter[status]", "CLOSED"),
           ("filter[status]", "EXPIRED")]


def matches(session: dict, name: str, value: str, now: int) -> bool:
    if name == "filter[type]":
        return session["type"] == value
    if name == "filter[tags]":
        return value in session["tags"]
    return derived_status(session, now) == value


def _case(seed: int) -> dict:
    chance = random.Random(seed)
    count = chance.choice([200, 600, 1200])
    size = chance.choice([5, 13, 40, 100])
    return {
        "count": count,
        "size": size,
        "skew": chance.choice([0, 3, 25, 120]),
        "burst": chance.choice([0, 0, 2 * size + 3]),
        "spacing_ms": chance.choice([1, 13, 60]),
        "filter": chance.choice(FILTERS),
        "cut": chance.randint(2, 40),  # the page after which the walk is interrupted
    }


@pytest.mark.parametrize("seed", range(24))
def test_the_union_walked_equals_the_data(seed: int) -> None:
    case = _case(seed)
    config = EmulatorConfig(
        sessions=case["count"], seed=seed, days=case["count"] * case["spacing_ms"] / 86_400_000,
        id_skew_ms=case["skew"], same_ms_burst=case["burst"], rate_limit=False,
    )
    with start_in_thread(config) as emu, TriggerClient(
        client_settings(Settings(api_url=emu.url)), KEY
    ) as client, httpx.Client(base_url=emu.url, headers=AUTH) as http:
        started = now_ms()
        truth = emulator_sessions(emu.url)
        filters = dict([case["filter"]]) if case["filter"] else {}
        wanted = {s["id"] for s in truth if not filters or matches(s, *case["filter"], started)}
        pages = 0

        def fetch(params: dict[str, str]):
            nonlocal pages
            pages += 1
            if pages % 3 == 0:  # sessions keep arriving while the walk runs
                body = {"type": "chat.agent", "taskIdentifier": "t", "tags": ["env:prod"],
                        "triggerConfig": {"basePayload": {}}}
                assert http.post("/api/v1/sessions", json=body).is_success
            return client.list_sessions(params)

        listing = Listing(filters, page_size=case["size"])
        walked: list[str] = []
        state = None
        for page in walk_listing(fetch, listing):
            walked += [s["id"] for s in page.sessions]
            if pages == case["cut"]:
                state = json.loads(json.dumps(page.state.to_dict()))  # as a checkpoint holds it
                break
        if state is not None:
            for page in walk_listing(fetch, listing, WalkState.from_dict(state)):
                walked += [s["id"] for s in page.sessions]
    assert len(walked) == len(set(walked)), case  # no row returned twice
    assert set(walked) == wanted and (wanted or not filters), case


def _flushes(state_file: Path) -> int:
    try:
        data = json.loads(state_file.read_text())
    except (OSError, ValueError):
        return 0
    if "windows" in data:
        return sum(w["flush_seq"] for w in data["windows"])
    return (data.get("in_progress") or {}).get("flush_seq", 0)


def _kill_after_flushes(process, state_file: Path, more: int, chance: random.Random) -> None:
    """SIGKILL once `more` flushes past where the state stood, at a random moment after."""
    target = _flushes(state_file) + more
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:
        if _flushes(state_file) >= target:
            time.sleep(chance.uniform(0, 0.05))
            break
        time.sleep(0.005)
    process.send_signal(signal.SIGKILL)
    process.wait()


def _backfill_flushes(state_dir: Path) -> int:
    files = list(state_dir.glob("backfill-*.json"))
    return _flushes(files[0]) if files else 0


@pytest.mark.slow
def test_kill_9_at_random_points_then_resume_is_exact(emulator, output):
    emu = emulator(sessions=5000, seed=77, days=5000 * 13 / 86_400_000, id_skew_ms=25,
                   same_ms_burst=260, latency_ms=3, list_trigger_config="include")
    chance = random.Random(9)
    checkpoint = output / "_state" / "checkpoint.json"
    with httpx.Client(base_url=emu.url, headers=AUTH) as http:
        for kill in range(3):
            process = spawn_cli("run", "--output", str(output), "--flush-rows", "150",
                                url=emu.url)
            _kill_after_flushes(process, checkpoint, chance.randint(1, 8), chance)
            body = {"type": "chat.agent", "taskIdentifier": "late", "triggerConfig":
                    {"basePayload": {"kill": kill}}}
            assert http.post("/api/v1/sessions", json=body).is_success
    first = run_cli("run", "--output", str(output), "--flush-rows", "150", url=emu.url)
    assert first.returncode == 0, first.stderr
    assert "resumed" in first.stdout
    truth = emulator_sessions(emu.url)
    assert_dataset_equals(output, truth)  # the late ones came with the ACTIVE listing
    assert read_dataset(output).num_rows == len(truth)  # every row written once
    second = run_cli("run", "--output", str(output), url=emu.url)
    assert second.returncode == 0, second.stderr
    assert read_dataset(output).num_rows == len(truth)


@pytest.mark.slow
def test_backfill_killed_and_resumed_is_exact(emulator, gate, output):
    emu = emulator(sessions=9000, seed=78, days=9000 * 13 / 86_400_000, id_skew_ms=25,
                   same_ms_burst=260, latency_ms=10, list_trigger_config="include")
    truth = emulator_sessions(emu.url)
    since = min(s["createdAt"] for s in truth)
    until = max(s["createdAt"] for s in truth)
    args = ("backfill", "--output", str(output), "--since", since, "--until", until,
            "--concurrency", "3", "--flush-rows", "900")
    # 65 of the walk's 100-odd list pages pass (a window flushes every 1,000 rows), then the
    # gate holds the rest: the kill surely comes mid-walk, after a flush
    held = gate(emu.url, 65)
    process = spawn_cli(*args, url=held.url)
    state_files = output / "_state"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not (held.waiting and _backfill_flushes(state_files)):
        time.sleep(0.01)
    time.sleep(random.Random(3).uniform(0, 0.05))
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert held.waiting, "the walk should be held at the gate"
    assert _backfill_flushes(state_files) >= 1, held.passed
    result = run_cli(*args, url=emu.url)
    assert result.returncode == 0, result.stderr
    assert "resumed" in result.stdout
    assert_dataset_equals(output, truth)
    assert read_dataset(output).num_rows == len(truth)
