"""Change capture: created, closed, updated and old sessions reach the dataset."""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import time

import pytest

from pipeline.timestamps import parse_timestamp_ms
from tests.conftest import (
    ROOT,
    api,
    assert_dataset_equals,
    emulator_sessions,
    latest_rows,
    read_dataset,
    run_cli,
)


def is_active(session: dict, now_ms: int) -> bool:
    if session["closedAt"]:
        return False
    return session["expiresAt"] is None or parse_timestamp_ms(session["expiresAt"]) > now_ms


@pytest.mark.slow
def test_created_closed_and_updated_sessions_are_captured(emulator, output):
    emu = emulator(sessions=3000, seed=81, days=60)
    assert run_cli("run", "--output", str(output), url=emu.url).returncode == 0
    sessions = emulator_sessions(emu.url)
    now = int(time.time() * 1000)
    # sessions live for hours at least, so they are still ACTIVE a moment from now
    active = [s for s in sessions if is_active(s, now + 3_600_000)]
    chance = random.Random(5)
    chosen = chance.sample(active, 350)
    for session in chosen[:200]:
        api(emu.url, "POST", f"/{session['id']}/close", {"reason": "test closed it"})
    for session in chosen[200:]:
        api(emu.url, "PATCH", f"/{session['id']}", {"metadata": {"edited": session["id"]}})
    for n in range(300):
        api(emu.url, "POST", "", {"type": "chat.agent", "taskIdentifier": "fresh",
                                  "externalId": f"fresh-{n}", "tags": ["new"]})

    second = run_cli("run", "--output", str(output), url=emu.url)
    assert second.returncode == 0, second.stderr
    truth = emulator_sessions(emu.url)
    assert len(truth) == 3300
    assert_dataset_equals(output, truth)  # the latest view equals the emulator exactly
    manifest = json.loads((output / "_runs" / f"{second.stdout.split()[1]}.json").read_text())
    parts = manifest["extra"]["parts"]
    # every change written once: 300 created, 200 closed, 150 updated, by whichever part
    # met it first (the window walk, the ACTIVE listing, or the read of departed sessions)
    assert parts["window"]["rows"] + parts["active"]["rows"] + parts["departed"]["rows"] == 650
    assert parts["departed"]["strategy"] in ("get each", "list CLOSED and EXPIRED")

    # old closed sessions changed: outside the rescan and never active since the last run
    old_closed = [s for s in truth if s["closedAt"]
                  and parse_timestamp_ms(s["createdAt"]) < now - 10 * 86_400_000][:25]
    assert len(old_closed) == 25
    for session in old_closed:
        api(emu.url, "PATCH", f"/{session['id']}", {"tags": ["touched-later"]})
    assert run_cli("run", "--output", str(output), url=emu.url).returncode == 0
    latest = latest_rows(read_dataset(output))
    assert all(latest[s["id"]]["tags"] != ["touched-later"] for s in old_closed)  # missed
    full = run_cli("run", "--output", str(output), "--full-refresh", url=emu.url)
    assert full.returncode == 0, full.stderr
    assert_dataset_equals(output, emulator_sessions(emu.url))  # caught by the full refresh
    run_id = full.stdout.split()[1]
    full_manifest = json.loads((output / "_runs" / f"{run_id}.json").read_text())
    assert full_manifest["rows"] == 25  # only the changed versions were written


@pytest.mark.slow
def test_run_compact_compacts_what_the_run_touched(emulator, output):
    emu = emulator(sessions=1500, seed=82, days=10, list_trigger_config="include")
    assert run_cli("run", "--output", str(output), "--flush-rows", "200", url=emu.url).returncode == 0
    sessions = emulator_sessions(emu.url)
    for session in sessions[:30]:  # the newest: inside the rescan window
        api(emu.url, "PATCH", f"/{session['id']}", {"metadata": {"v": 2}})
    result = run_cli("run", "--output", str(output), "--compact", url=emu.url)
    assert result.returncode == 0, result.stderr
    assert "compact done" in result.stdout
    assert read_dataset(output).num_rows == 1500
    assert run_cli("verify", "--strict", "--output", str(output)).returncode == 0
    assert_dataset_equals(output, emulator_sessions(emu.url))


@pytest.mark.slow
def test_compact_killed_at_any_moment_never_loses_a_row(emulator, output):
    emu = emulator(sessions=20_000, seed=83, days=40, list_trigger_config="include")
    assert run_cli("run", "--output", str(output), "--flush-rows", "1500",
                   "--lookback", "90d", url=emu.url).returncode == 0
    for session in emulator_sessions(emu.url)[::50]:
        api(emu.url, "PATCH", f"/{session['id']}", {"metadata": {"v": 3}})
    assert run_cli("run", "--output", str(output), "--flush-rows", "1500", "--rescan", "90d",
                   url=emu.url).returncode == 0
    ids = set(read_dataset(output)["id"].to_pylist())
    assert len(ids) == 20_000
    chance = random.Random(9)
    for _ in range(5):
        process = subprocess.Popen([sys.executable, "-m", "pipeline", "compact", "--output",
                                    str(output)], cwd=ROOT, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        time.sleep(chance.uniform(0.3, 1.2))
        process.send_signal(signal.SIGKILL)
        process.wait()
        assert set(read_dataset(output)["id"].to_pylist()) == ids  # every row still readable
    assert run_cli("compact", "--output", str(output)).returncode == 0
    assert read_dataset(output).num_rows == 20_000
    assert_dataset_equals(output, emulator_sessions(emu.url))


def test_the_live_mask_derives_the_status_as_the_server_does():
    from pipeline.api.walker import derived_status
    from pipeline.dataset.flatten import flatten_sessions
    from pipeline.jobs.capture import live_mask

    now = parse_timestamp_ms("2026-06-01T00:00:00.000Z")
    base = {"createdAt": "2026-05-01T00:00:00.000Z"}
    sessions = [
        {**base, "id": "open"},
        {**base, "id": "closed", "closedAt": "2026-05-02T00:00:00.000Z"},
        {**base, "id": "expired", "expiresAt": "2026-05-31T23:59:59.999Z"},
        {**base, "id": "expires now", "expiresAt": "2026-06-01T00:00:00.000Z"},
        {**base, "id": "expires later", "expiresAt": "2026-06-01T00:00:00.001Z"},
        {**base, "id": "closed oddly", "closedAt": "not a time"},  # kept in `extra`
        {**base, "id": "odd expiry", "expiresAt": "not a time"},  # never expires
        {**base, "id": "closed as a number", "closedAt": 5, "other": {"closedAt": 1}},
    ]
    # the API's rule, by hand: closed by any closedAt, expired at or before now, an unreadable
    # expiresAt never expires
    active = [True, False, False, False, True, False, True, False]
    assert live_mask(flatten_sessions(sessions, 0, "r"), now).to_pylist() == active
    assert [derived_status(s, now) == "ACTIVE" for s in sessions] == active
