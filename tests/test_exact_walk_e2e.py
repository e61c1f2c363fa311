"""Exact walks where ids and createdAt disagree: run, backfill and change capture against the
skewed emulator, a server that repeats its cursor, and upserts that rewrite triggerConfig."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import httpx
import pytest

from pipeline.timestamps import parse_timestamp_ms
from tests.conftest import (
    KEY,
    assert_dataset_equals,
    emulator_sessions,
    emulator_stats,
    read_dataset,
    reset_stats,
    run_cli,
)

AUTH = {"Authorization": f"Bearer {KEY}"}
# 4,000 sessions about 13 ms apart, ids off their createdAt by up to ±25 ms
SKEWED = {"sessions": 4000, "seed": 3, "days": 4000 * 13 / 86_400_000, "id_skew_ms": 25,
          "list_trigger_config": "include"}  # enrichment has its own test below


def plain_cursor_walk(url: str, params: dict[str, str] | None = None) -> list[str]:
    """What a walker that only follows `next` gets (the official SDK's auto-pagination)."""
    ids, query = [], {"page[size]": "100", **(params or {})}
    with httpx.Client(base_url=url, headers=AUTH) as http:
        while True:
            body = http.get("/api/v1/sessions", params=query).json()
            ids += [row["id"] for row in body["data"]]
            if "next" not in body["pagination"]:
                return ids
            query["page[after]"] = body["pagination"]["next"]


@pytest.mark.slow
def test_a_plain_cursor_walk_loses_rows_and_run_and_backfill_are_exact(emulator, tmp_path):
    emu = emulator(**SKEWED)
    truth = emulator_sessions(emu.url)
    plain = plain_cursor_walk(emu.url)
    lost = {s["id"] for s in truth} - set(plain)
    assert lost and len(plain) > len(set(plain))  # rows lost and rows returned twice

    run_out = tmp_path / "run"
    result = run_cli("run", "--output", str(run_out), "--flush-rows", "700", url=emu.url)
    assert result.returncode == 0, result.stderr
    assert_dataset_equals(run_out, truth)
    assert read_dataset(run_out).num_rows == len(truth)  # none written twice

    since = min(s["createdAt"] for s in truth)
    until = max(s["createdAt"] for s in truth)
    back_out = tmp_path / "backfill"
    result = run_cli("backfill", "--output", str(back_out), "--since", since, "--until", until,
                     "--concurrency", "4", "--flush-rows", "700", url=emu.url)
    assert result.returncode == 0, result.stderr
    assert_dataset_equals(back_out, truth)
    assert read_dataset(back_out).num_rows == len(truth)


@pytest.mark.slow
def test_change_capture_listings_are_exact_over_skewed_ids(emulator, output):
    emu = emulator(**SKEWED)
    assert run_cli("run", "--output", str(output), url=emu.url).returncode == 0
    active = [s for s in emulator_sessions(emu.url)
              if s["closedAt"] is None and s["expiresAt"] is None]
    plain_active = set(plain_cursor_walk(emu.url, {"filter[status]": "ACTIVE"}))
    assert {s["id"] for s in active} - plain_active  # the plain walk of ACTIVE loses some too
    with httpx.Client(base_url=f"{emu.url}/api/v1/sessions", headers=AUTH) as http:
        for session in active[::3]:  # departed: closed since the last run
            assert http.post(f"/{session['id']}/close", json={"reason": "done"}).is_success
        for session in active[1::3]:  # changed but still live
            assert http.patch(f"/{session['id']}", json={"tags": ["changed"]}).is_success
    # a window of one second: every change must come from the ACTIVE and CLOSED listings
    result = run_cli("run", "--output", str(output), "--rescan", "0s", "--lookback", "1s",
                     url=emu.url)
    assert result.returncode == 0, result.stderr
    manifest = json.loads((output / "_runs" / f"{result.stdout.split()[1]}.json").read_text())
    parts = manifest["extra"]["parts"]
    assert parts["departed"]["strategy"] == "list CLOSED and EXPIRED"
    assert parts["departed"]["single_fetches"] == 0
    changed = len(active[::3]) + len(active[1::3])
    # the one-second window re-reads the newest few; the listings bring the rest, each once
    assert parts["window"]["rows"] < 100 < parts["active"]["rows"]
    assert parts["departed"]["rows"] > 100
    assert manifest["rows"] == changed
    truth = emulator_sessions(emu.url)
    assert_dataset_equals(output, truth)
    assert read_dataset(output).num_rows == len(truth) + len(active[::3]) + len(active[1::3])


@pytest.mark.slow
def test_a_recreated_session_carries_its_new_trigger_config(emulator, output):
    emu = emulator(sessions=200, seed=8)

    def create_all(version: str) -> None:
        with httpx.Client(base_url=emu.url, headers=AUTH) as http:
            for n in range(60):
                body = {"type": "chat.agent", "taskIdentifier": "chat", "externalId": f"chat-{n}",
                        "triggerConfig": {"basePayload": {"n": n}, "lockToVersion": version}}
                assert http.post("/api/v1/sessions", json=body).is_success

    create_all("v1")
    assert run_cli("run", "--output", str(output), url=emu.url).returncode == 0
    time.sleep(0.01)
    create_all("v2")  # chat.agent re-creates on every resume: a redeploy propagates
    reset_stats(emu.url)
    result = run_cli("run", "--output", str(output), url=emu.url)
    assert result.returncode == 0, result.stderr
    truth = emulator_sessions(emu.url)
    latest = assert_dataset_equals(output, truth)
    recreated = [s for s in truth if (s["externalId"] or "").startswith("chat-")]
    assert len(recreated) == 60
    assert all(latest[s["id"]]["trigger_config_lock_to_version"] == "v2" for s in recreated)
    # one GET per new version, none for the versions that did not move
    assert emulator_stats(emu.url)["by_kind"]["get"] == 60


# -- a server that answers with the cursor it was sent -------------------------------------


class RepeatingServer:
    """Answers list requests matching `loops` with one row and the cursor it was sent (or a
    first one), others with an empty last page; single sessions are 404."""

    def __init__(self, loops: Callable[[dict[str, str]], bool], created: str) -> None:
        self.requests = 0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                outer.requests += 1
                parts = urlsplit(self.path)
                params = dict(parse_qsl(parts.query))
                if parts.path.rstrip("/") != "/api/v1/sessions":
                    return self._reply(404, {"error": "Not found"})
                if not loops(params):
                    return self._reply(200, {"data": [], "pagination": {}})
                row = {"id": "session_cloop0000000000000000000", "createdAt": created,
                       "updatedAt": created, "type": "t", "taskIdentifier": "t", "tags": [],
                       "externalId": None, "currentRunId": None, "metadata": None,
                       "closedAt": None, "closedReason": None, "expiresAt": None,
                       "triggerConfig": {"basePayload": {}}}
                cursor = params.get("page[after]", "cloopcursor0000000000000000")
                self._reply(200, {"data": [row], "pagination": {"next": cursor}})

            def _reply(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def repeating() -> Iterator[Callable[..., RepeatingServer]]:
    servers: list[RepeatingServer] = []

    def start(loops: Callable[[dict[str, str]], bool], created: str) -> RepeatingServer:
        servers.append(RepeatingServer(loops, created))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def _assert_loop_stopped(result, server: RepeatingServer) -> None:
    assert result.returncode == 4, result.stderr
    assert "cloopcursor" in result.stderr and "Traceback" not in result.stderr
    assert server.requests < 20


def test_a_repeated_cursor_stops_run_and_backfill_with_exit_4(repeating, tmp_path):
    server = repeating(lambda params: True, "2026-11-01T00:00:00.000Z")
    result = run_cli("run", "--output", str(tmp_path / "run"), url=server.url, timeout=60)
    _assert_loop_stopped(result, server)
    server.requests = 0
    result = run_cli("backfill", "--output", str(tmp_path / "bf"), "--since", "2026-10-01",
                     "--until", "2026-11-02", "--concurrency", "2", url=server.url, timeout=60)
    _assert_loop_stopped(result, server)


def _exported_once(emulator, output: Path) -> list[dict]:
    emu = emulator(sessions=300, seed=12, days=1)
    assert run_cli("run", "--output", str(output), url=emu.url).returncode == 0
    return emulator_sessions(emu.url)


def test_a_repeated_cursor_stops_the_active_listing_with_exit_4(emulator, repeating, output):
    truth = _exported_once(emulator, output)
    newest = max(s["createdAt"] for s in truth)
    # the window (bounded below) is empty; the ACTIVE listing (unbounded) repeats its cursor
    server = repeating(lambda params: "filter[createdAt][from]" not in params, newest)
    result = run_cli("run", "--output", str(output), url=server.url, timeout=60)
    _assert_loop_stopped(result, server)


def test_a_repeated_cursor_stops_the_departed_listing_with_exit_4(emulator, repeating, output):
    truth = _exported_once(emulator, output)
    newest = max(s["createdAt"] for s in truth)
    newest_ms = parse_timestamp_ms(newest)

    def loops(params: dict[str, str]) -> bool:
        # no session is ACTIVE now (all departed), and the CLOSED/EXPIRED walk over their
        # span (bounded above inside the data) repeats its cursor
        return int(params.get("filter[createdAt][to]", 10**15)) <= newest_ms

    server = repeating(loops, newest)
    result = run_cli("run", "--output", str(output), url=server.url, timeout=60)
    _assert_loop_stopped(result, server)


@pytest.mark.slow
def test_sessions_the_lagging_list_shows_late_come_with_the_next_run(emulator, output):
    emu = emulator(sessions=300, seed=14, replication_delay=1.5, id_skew_ms=25)
    with httpx.Client(base_url=emu.url, headers=AUTH) as http:
        for n in range(5):
            body = {"type": "chat.agent", "taskIdentifier": "late", "externalId": f"late-{n}",
                    "triggerConfig": {"basePayload": {"n": n}}}
            assert http.post("/api/v1/sessions", json=body).is_success
    first = run_cli("run", "--output", str(output), url=emu.url)
    assert first.returncode == 0, first.stderr
    assert "300 sessions" in first.stdout  # the five are not listed yet
    time.sleep(1.6)
    second = run_cli("run", "--output", str(output), url=emu.url)
    assert second.returncode == 0, second.stderr
    assert_dataset_equals(output, emulator_sessions(emu.url))
