"""The emulator over real HTTP: ordering, cursors, filters, auth, mutations, limits, faults."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import pytest

from pipeline.emulator import EmulatorConfig, RunningEmulator, SessionStore, start_in_thread
from pipeline.emulator.bodies import SessionPatch
from pipeline.emulator.timestamps import DAY_MS, now_ms, parse_iso_ms

AUTH = {"Authorization": "Bearer tr_dev_emulator_tests"}
SESSIONS = 3000
STATUSES = ("ACTIVE", "CLOSED", "EXPIRED")


@pytest.fixture(scope="module")
def emulator() -> Iterator[RunningEmulator]:
    with start_in_thread(EmulatorConfig(sessions=SESSIONS, seed=11, rate_limit=False)) as running:
        yield running


@pytest.fixture(scope="module")
def client(emulator: RunningEmulator) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=emulator.url, headers=AUTH) as http:
        yield http


@pytest.fixture(scope="module")
def truth(emulator: RunningEmulator) -> list[dict[str, Any]]:
    """Every session as the store holds it (full state), newest first."""
    return list(emulator.store.iter_sessions())


@pytest.fixture()
def scratch() -> Iterator[RunningEmulator]:
    """A small emulator that a test may change freely."""
    with start_in_thread(EmulatorConfig(sessions=200, seed=5, rate_limit=False)) as running:
        yield running


def listed(session: dict[str, Any]) -> dict[str, Any]:
    """A session as list rows show it by default: without triggerConfig."""
    return {name: value for name, value in session.items() if name != "triggerConfig"}


def status_of(session: dict[str, Any], now: int) -> str:
    if session["closedAt"] is not None:
        return "CLOSED"
    expires = session["expiresAt"]
    if expires is not None and parse_iso_ms(expires) <= now:
        return "EXPIRED"
    return "ACTIVE"


def walk(
    http: httpx.Client, params: dict[str, str] | None = None, size: int = 100
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """All rows following `next`, and every page's body."""
    rows: list[dict[str, Any]] = []
    pages: list[dict[str, Any]] = []
    query = {"page[size]": str(size), **(params or {})}
    while True:
        response = http.get("/api/v1/sessions", params=query)
        assert response.status_code == 200, response.text
        body = response.json()
        pages.append(body)
        rows.extend(body["data"])
        cursor = body["pagination"].get("next")
        if cursor is None:
            return rows, pages
        assert cursor != query.get("page[after]"), "cursor did not advance"
        query["page[after]"] = cursor


def sort_key(session: dict[str, Any]) -> tuple[int, str]:
    return parse_iso_ms(session["createdAt"]), session["id"]


# -- order and pagination ------------------------------------------------------------------


def test_first_page_is_newest_first_with_default_size(
    client: httpx.Client, truth: list[dict[str, Any]]
) -> None:
    body = client.get("/api/v1/sessions").json()
    assert len(body["data"]) == 20
    assert body["data"] == [listed(session) for session in truth[:20]]
    keys = [sort_key(session) for session in body["data"]]
    assert keys == sorted(keys, reverse=True)
    assert body["pagination"] == {"next": body["data"][-1]["id"].removeprefix("session_")}


def test_walking_every_page_yields_each_session_exactly_once(
    client: httpx.Client, truth: list[dict[str, Any]]
) -> None:
    rows, pages = walk(client)
    assert len(pages) == SESSIONS // 100
    assert rows == [listed(session) for session in truth]
    assert len({row["id"] for row in rows}) == SESSIONS
    assert "previous" not in pages[0]["pagination"]
    assert all("previous" in page["pagination"] for page in pages[1:])
    assert "next" not in pages[-1]["pagination"]


def test_ids_are_cuids_whose_order_matches_created_at(truth: list[dict[str, Any]]) -> None:
    cuids = [session["id"].removeprefix("session_") for session in truth]
    assert all(len(cuid) == 25 and cuid[0] == "c" and cuid.islower() for cuid in cuids)
    assert cuids == sorted(cuids, reverse=True)
    for session in truth:
        assert session["createdAt"].endswith("Z") and len(session["createdAt"]) == 24
        assert int(session["id"][9:17], 36) == parse_iso_ms(session["createdAt"])


def test_page_before_returns_the_rows_just_newer_than_the_cursor(
    client: httpx.Client, emulator: RunningEmulator, truth: list[dict[str, Any]]
) -> None:
    cursor = emulator.store.cursor_at_rank(250)
    body = client.get("/api/v1/sessions", params={"page[size]": "100", "page[before]": cursor})
    data = body.json()
    assert data["data"] == [listed(session) for session in truth[150:250]]
    assert data["pagination"] == {
        "next": truth[249]["id"].removeprefix("session_"),
        "previous": truth[150]["id"].removeprefix("session_"),
    }
    newest = client.get(
        "/api/v1/sessions",
        params={"page[size]": "100", "page[before]": truth[50]["id"].removeprefix("session_")},
    ).json()
    assert newest["data"] == [listed(session) for session in truth[:50]]
    assert newest["pagination"] == {"next": truth[49]["id"].removeprefix("session_")}


def test_a_cursor_that_is_not_an_id_still_works_by_position(
    client: httpx.Client, truth: list[dict[str, Any]]
) -> None:
    cuid = truth[10]["id"].removeprefix("session_")
    between = cuid[:-1] + chr(ord(cuid[-1]) + 1)  # sorts just after truth[10], before truth[9]
    body = client.get("/api/v1/sessions", params={"page[size]": "5", "page[after]": between})
    assert [row["id"] for row in body.json()["data"]] == [s["id"] for s in truth[10:15]]


def test_a_public_session_id_as_cursor_behaves_like_no_cursor(
    client: httpx.Client, truth: list[dict[str, Any]]
) -> None:
    body = client.get(
        "/api/v1/sessions", params={"page[size]": "5", "page[after]": truth[100]["id"]}
    ).json()
    assert [row["id"] for row in body["data"]] == [s["id"] for s in truth[:5]]


@pytest.mark.parametrize(
    ("params", "path"),
    [
        ({"page[after]": "a", "page[before]": "b"}, ["page"]),
        ({"page[size]": "0"}, ["page", "size"]),
        ({"page[size]": "101"}, ["page", "size"]),
        ({"page[size]": "abc"}, ["page", "size"]),
        ({"page[size]": "5.5"}, ["page", "size"]),
        ({"filter[status]": "ACTIVE,CLOSED"}, ["filter", "status"]),
        ({"filter[status]": "active"}, ["filter", "status"]),
        ({"filter[createdAt][from]": "2026-01-01T00:00:00Z"}, ["filter", "createdAt", "from"]),
        ({"filter[createdAt][to]": "yesterday"}, ["filter", "createdAt", "to"]),
    ],
)
def test_invalid_queries_are_400_query_errors(
    client: httpx.Client, params: dict[str, str], path: list[str]
) -> None:
    response = client.get("/api/v1/sessions", params=params)
    assert response.status_code == 400
    body = response.json()
    assert body["error"] == "Query Error"
    assert [detail["path"] for detail in body["details"]] == [path]
    assert set(body["details"][0]) == {"code", "message", "path"}


def test_unknown_params_are_dropped(client: httpx.Client) -> None:
    plain = client.get("/api/v1/sessions").json()
    noisy = client.get("/api/v1/sessions", params={"filter[color]": "red", "sort": "x"}).json()
    assert noisy == plain


# -- filters -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("param", "field", "value"),
    [
        ("filter[type]", "type", "workflow"),
        ("filter[taskIdentifier]", "taskIdentifier", "support-agent"),
    ],
)
def test_exact_value_filters(
    client: httpx.Client, truth: list[dict[str, Any]], param: str, field: str, value: str
) -> None:
    rows, _ = walk(client, {param: value})
    assert rows == [listed(s) for s in truth if s[field] == value]
    assert rows


@pytest.mark.parametrize("tag", ["a,b", "priority,high", "🔥hot", "with space"])
def test_tag_filter_takes_the_value_literally_commas_included(
    client: httpx.Client, truth: list[dict[str, Any]], tag: str
) -> None:
    rows, _ = walk(client, {"filter[tags]": tag})
    assert rows == [listed(s) for s in truth if tag in s["tags"]]
    assert rows


def test_comma_separated_values_are_not_split(client: httpx.Client) -> None:
    rows, _ = walk(client, {"filter[type]": "workflow,chat.agent"})
    assert rows == []


def test_a_repeated_key_keeps_the_last_value(
    client: httpx.Client, truth: list[dict[str, Any]]
) -> None:
    query = "filter[type]=chat.agent&filter[type]=workflow&page[size]=100"
    body = client.get(f"/api/v1/sessions?{query}").json()
    assert body["data"] == [listed(s) for s in truth if s["type"] == "workflow"][:100]


def test_filters_combine(client: httpx.Client, truth: list[dict[str, Any]]) -> None:
    params = {"filter[type]": "chat.agent", "filter[tags]": "vip", "filter[status]": "CLOSED"}
    rows, _ = walk(client, params, size=7)
    expected = [
        listed(s)
        for s in truth
        if s["type"] == "chat.agent" and "vip" in s["tags"] and s["closedAt"] is not None
    ]
    assert rows == expected and rows


def test_external_id_filter_is_an_exact_match(
    client: httpx.Client, truth: list[dict[str, Any]]
) -> None:
    target = next(s for s in truth if (s["externalId"] or "").startswith("order,"))
    rows, _ = walk(client, {"filter[externalId]": target["externalId"]})
    assert rows == [listed(target)]
    rows, _ = walk(client, {"filter[externalId]": target["externalId"][:-1]})
    assert rows == []


def test_created_at_bounds_are_inclusive_at_a_shared_millisecond(
    client: httpx.Client, truth: list[dict[str, Any]]
) -> None:
    per_ms = Counter(parse_iso_ms(s["createdAt"]) for s in truth)
    shared = [ms for ms, count in per_ms.items() if count > 1]
    assert shared, "the data should hold same-millisecond clusters"
    ms = shared[len(shared) // 2]
    exact, _ = walk(client, {"filter[createdAt][from]": str(ms), "filter[createdAt][to]": str(ms)})
    assert [r["id"] for r in exact] == [
        s["id"] for s in truth if parse_iso_ms(s["createdAt"]) == ms
    ]
    assert len(exact) == per_ms[ms]
    older, _ = walk(client, {"filter[createdAt][to]": str(ms)})
    assert [r["id"] for r in older] == [
        s["id"] for s in truth if parse_iso_ms(s["createdAt"]) <= ms
    ]
    newer, _ = walk(client, {"filter[createdAt][from]": str(ms)})
    assert [r["id"] for r in newer] == [
        s["id"] for s in truth if parse_iso_ms(s["createdAt"]) >= ms
    ]


def test_sessions_cluster_on_utc_midnight(truth: list[dict[str, Any]]) -> None:
    midnight = Counter(s["createdAt"] for s in truth if s["createdAt"].endswith("T00:00:00.000Z"))
    assert any(count > 1 for count in midnight.values())


def test_created_from_zero_is_ignored(client: httpx.Client) -> None:
    plain = client.get("/api/v1/sessions").json()
    assert client.get("/api/v1/sessions", params={"filter[createdAt][from]": "0"}).json() == plain


def test_period_filter(client: httpx.Client, truth: list[dict[str, Any]]) -> None:
    before = now_ms()
    rows, _ = walk(client, {"filter[createdAt][period]": "2d"})
    after = now_ms()
    got = {row["id"] for row in rows}
    surely = {s["id"] for s in truth if parse_iso_ms(s["createdAt"]) >= after - 2 * DAY_MS}
    maybe = {s["id"] for s in truth if parse_iso_ms(s["createdAt"]) >= before - 2 * DAY_MS}
    assert surely <= got <= maybe
    assert got and len(got) < len(truth)
    plain = client.get("/api/v1/sessions").json()
    garbage = {"filter[createdAt][period]": "two days"}
    assert client.get("/api/v1/sessions", params=garbage).json() == plain


@pytest.mark.parametrize("status", STATUSES)
def test_status_filter_returns_short_pages_that_still_have_next(
    client: httpx.Client, truth: list[dict[str, Any]], status: str
) -> None:
    before = now_ms()
    rows, pages = walk(client, {"filter[status]": status})
    after = now_ms()
    assert all(status_of(row, after) == status for row in rows)
    got = {row["id"] for row in rows}
    assert {s["id"] for s in truth if status_of(s, before) == status} <= got
    if status != "CLOSED":  # closed sessions are exactly what the first pass selects
        assert any(len(p["data"]) < 100 and "next" in p["pagination"] for p in pages)


# -- single session, auth ------------------------------------------------------------------


def test_get_one_session_carries_trigger_config(
    client: httpx.Client, truth: list[dict[str, Any]]
) -> None:
    assert all(isinstance(s["triggerConfig"]["basePayload"], dict) for s in truth)
    for session in (truth[0], truth[len(truth) // 2], truth[-1]):
        assert client.get(f"/api/v1/sessions/{session['id']}").json() == session
    by_external = next(s for s in truth if s["externalId"] and "🚀" in s["externalId"])
    response = client.get(f"/api/v1/sessions/{by_external['externalId']}")
    assert response.json() == by_external


def test_list_rows_omit_trigger_config_by_default(client: httpx.Client) -> None:
    rows, _ = walk(client)
    assert all("triggerConfig" not in row for row in rows)


def test_list_rows_carry_trigger_config_when_asked() -> None:
    config = EmulatorConfig(sessions=300, seed=3, list_trigger_config="include")
    with start_in_thread(config) as running, httpx.Client(headers=AUTH) as http:
        rows = http.get(running.url + "/api/v1/sessions", params={"page[size]": "100"}).json()
        truth = list(running.store.iter_sessions())[:100]
        assert rows["data"] == truth
        shapes = Counter(len(s["triggerConfig"]) for s in truth)
        assert shapes[1] and shapes[9] and len(shapes) > 2  # basePayload only, full, partial


@pytest.mark.parametrize(
    "ident", ["session_cnotthere000000000000000", "no-such-external-id", "session_x"]
)
def test_unknown_session_is_404(client: httpx.Client, ident: str) -> None:
    response = client.get(f"/api/v1/sessions/{ident}")
    assert response.status_code == 404
    assert response.json() == {"error": "Not found"}
    assert response.headers["x-should-retry"] == "false"


def test_missing_authorization_is_a_problem_json_401(emulator: RunningEmulator) -> None:
    response = httpx.get(emulator.url + "/api/v1/sessions")
    assert response.status_code == 401
    assert response.headers["content-type"] == "application/problem+json"
    body = response.json()
    assert body["title"] == "Unauthorized" and body["status"] == 401
    assert body["detail"] == "No authorization header provided"
    assert not any(name.startswith("x-ratelimit") for name in response.headers)


@pytest.mark.parametrize(
    ("header", "error"),
    [("Bearer", "Invalid or Missing API key"), ("Bearer tr_live_123", "Invalid API key")],
)
def test_bad_keys_are_401(emulator: RunningEmulator, header: str, error: str) -> None:
    response = httpx.get(emulator.url + "/api/v1/sessions", headers={"Authorization": header})
    assert response.status_code == 401
    assert response.json() == {"error": error}


def test_explicit_and_forbidden_keys() -> None:
    config = EmulatorConfig(
        sessions=10, api_keys=("tr_prod_only",), forbidden_keys=("tr_prod_readonly",)
    )
    with start_in_thread(config) as running:
        url = running.url + "/api/v1/sessions"

        def status(key: str) -> int:
            return httpx.get(url, headers={"Authorization": f"Bearer {key}"}).status_code

        assert status("tr_prod_only") == 200
        assert status("tr_dev_other") == 401
        assert status("tr_prod_readonly") == 403
        forbidden = httpx.get(url, headers={"Authorization": "Bearer tr_prod_readonly"})
        assert "error" in forbidden.json()


# -- changing sessions ---------------------------------------------------------------------


def test_create_patch_close(scratch: RunningEmulator) -> None:
    with httpx.Client(base_url=scratch.url, headers=AUTH) as http:
        body = {
            "type": "chat.agent",
            "taskIdentifier": "my-chat",
            "externalId": "fresh-élan",
            "tags": ["new-tag"],
            "metadata": {"a": {"b": [1, "ü"]}},
            "triggerConfig": {"basePayload": {"x": 1}, "machine": "small-2x"},
        }
        created = http.post("/api/v1/sessions", json=body)
        assert created.status_code == 201
        session = created.json()
        assert session["isCached"] is False and session["runId"] == session["currentRunId"]
        assert session["createdAt"] == session["updatedAt"]
        first = http.get("/api/v1/sessions", params={"page[size]": "1"}).json()["data"][0]
        assert first["id"] == session["id"]
        assert http.get("/api/v1/sessions", params={"filter[tags]": "new-tag"}).json()["data"]

        time.sleep(0.002)
        redeployed = {**body, "triggerConfig": {"basePayload": {"x": 2}, "lockToVersion": "v2"}}
        again = http.post("/api/v1/sessions", json=redeployed)
        assert again.status_code == 200 and again.json()["isCached"] is True
        upserted = http.get(f"/api/v1/sessions/{session['id']}").json()
        assert upserted["triggerConfig"] == redeployed["triggerConfig"]  # the upsert rewrites it
        assert parse_iso_ms(upserted["updatedAt"]) > parse_iso_ms(session["updatedAt"])
        same = ("triggerConfig", "updatedAt", "runId", "publicAccessToken", "isCached")
        assert {k: v for k, v in upserted.items() if k not in same} == {
            k: v for k, v in session.items() if k not in same
        }
        assert http.post("/api/v1/sessions", json=body).json()["triggerConfig"] == body[
            "triggerConfig"
        ]

        missing = {k: v for k, v in body.items() if k != "triggerConfig"}
        refused_create = http.post("/api/v1/sessions", json={**missing, "externalId": "other"})
        assert refused_create.status_code == 400  # triggerConfig is required

        patched = http.patch(
            f"/api/v1/sessions/{session['id']}", json={"tags": ["other"], "metadata": None}
        )
        assert patched.status_code == 200
        updated = patched.json()
        assert updated["tags"] == ["other"] and updated["metadata"] is None
        assert parse_iso_ms(updated["updatedAt"]) > parse_iso_ms(session["updatedAt"])
        assert updated["triggerConfig"] == {"basePayload": {"x": 1}, "machine": "small-2x"}
        assert not http.get("/api/v1/sessions", params={"filter[tags]": "new-tag"}).json()["data"]
        assert http.get("/api/v1/sessions", params={"filter[tags]": "other"}).json()["data"]

        refused = http.patch(f"/api/v1/sessions/{session['id']}", json={"type": "workflow"})
        assert refused.status_code == 400

        closed = http.post(f"/api/v1/sessions/{session['id']}/close", json={"reason": "done"})
        assert closed.status_code == 200
        final = closed.json()
        assert final["closedReason"] == "done"
        assert final["currentRunId"] == session["currentRunId"] is not None  # close keeps it
        assert final["closedAt"] is not None
        assert parse_iso_ms(final["updatedAt"]) > parse_iso_ms(updated["updatedAt"])
        repeat = http.post(f"/api/v1/sessions/{session['id']}/close", json={"reason": "again"})
        assert repeat.json() == final
        late = http.patch(f"/api/v1/sessions/{session['id']}", json={"tags": ["late"]})
        assert late.status_code == 200 and late.json()["closedAt"] == final["closedAt"]
        final = late.json()
        assert http.post("/api/v1/sessions", json=body).status_code == 409

        closed_rows, _ = walk(http, {"filter[status]": "CLOSED"})
        assert session["id"] in {row["id"] for row in closed_rows}
        assert scratch.store.get(session["id"]) == final


def test_changes_to_generated_sessions_show_everywhere(scratch: RunningEmulator) -> None:
    store = scratch.store
    target = list(store.iter_sessions())[42]
    with httpx.Client(base_url=scratch.url, headers=AUTH) as http:
        response = http.patch(f"/api/v1/sessions/{target['id']}", json={"metadata": {"k": "v"}})
        assert response.status_code == 200
        rows, _ = walk(http)
    row = next(r for r in rows if r["id"] == target["id"])
    assert row["metadata"] == {"k": "v"}
    assert row == listed(store.get(target["id"]) or {})
    assert [r["id"] for r in rows] == [s["id"] for s in store.iter_sessions()]


def test_updated_at_strictly_increases_within_one_millisecond(scratch: RunningEmulator) -> None:
    store = scratch.store
    ident = next(store.iter_sessions())["id"]
    moment = now_ms()
    versions = [store.update(ident, SessionPatch(tags=(str(i),)), now=moment) for i in range(5)]
    versions.append(store.close(ident, "x", now=moment))
    updated = [parse_iso_ms(version["updatedAt"]) for version in versions if version]
    assert len(updated) == 6 and all(a < b for a, b in zip(updated, updated[1:], strict=False))


def test_invalid_bodies_are_400(scratch: RunningEmulator) -> None:
    with httpx.Client(base_url=scratch.url, headers=AUTH) as http:
        assert http.post("/api/v1/sessions", json={"type": "x"}).status_code == 400
        bad_config = {
            "type": "x",
            "taskIdentifier": "y",
            "triggerConfig": {"basePayload": {}, "maxAttempts": 11},
        }
        assert http.post("/api/v1/sessions", json=bad_config).status_code == 400
        assert http.post("/api/v1/sessions", content=b"{not json").status_code == 400
        assert http.post("/api/v1/sessions/session_cx/close").status_code == 404


# -- rate limit and faults -----------------------------------------------------------------


def test_rate_limit_429_body_and_headers() -> None:
    config = EmulatorConfig(
        sessions=10, rate_limit_burst=5, rate_limit_refill=2, rate_limit_interval=0.5
    )
    with start_in_thread(config) as running, httpx.Client(base_url=running.url) as http:
        remaining = []
        for _ in range(5):
            response = http.get("/api/v1/sessions", headers=AUTH)
            assert response.status_code == 200
            remaining.append(int(response.headers["x-ratelimit-remaining"]))
        assert remaining == [4, 3, 2, 1, 0]
        limited = http.get("/api/v1/sessions", headers=AUTH)
        assert limited.status_code == 429
        assert limited.headers["content-type"] == "application/problem+json"
        assert "retry-after" not in limited.headers
        assert limited.headers["x-ratelimit-remaining"] == "0"
        assert limited.headers["x-ratelimit-limit"] == "5"
        body = limited.json()
        assert set(body) >= {
            "title",
            "status",
            "detail",
            "reset",
            "limit",
            "remaining",
            "secondsUntilReset",
            "error",
        }
        assert body["title"] == "Rate Limit Exceeded" and body["status"] == 429
        assert body["reset"] == int(limited.headers["x-ratelimit-reset"])
        assert 0 <= body["secondsUntilReset"] <= 0.5
        other = http.get("/api/v1/sessions", headers={"Authorization": "Bearer tr_dev_second"})
        assert other.status_code == 200  # buckets are per key
        time.sleep(max(0.0, body["reset"] / 1000 - time.time()) + 0.02)
        after_refill = [http.get("/api/v1/sessions", headers=AUTH).status_code for _ in range(3)]
        assert after_refill == [200, 200, 429]  # two tokens per refill
        assert running.stats.rate_limited == 2
        assert http.get("/_emulator/stats").status_code == 200  # private routes: no limit


def _fault_run(config: EmulatorConfig, requests: int = 300) -> tuple[Counter[str], RunningEmulator]:
    outcomes: Counter[str] = Counter()
    running = start_in_thread(config)
    with httpx.Client(base_url=running.url, headers=AUTH, timeout=5) as http:
        for _ in range(requests):
            try:
                response = http.get("/api/v1/sessions", params={"page[size]": "50"})
            except httpx.TransportError:
                outcomes["transport"] += 1
                continue
            if response.status_code >= 500:
                outcomes["5xx"] += 1
                continue
            try:
                orjson.loads(response.content)
            except orjson.JSONDecodeError:
                assert int(response.headers["content-length"]) == len(response.content)
                outcomes["truncated"] += 1
            else:
                outcomes["ok"] += 1
    return outcomes, running


def test_faults_show_up_at_about_their_rate() -> None:
    config = EmulatorConfig(
        sessions=200, rate_limit=False, fault_5xx=0.1, fault_reset=0.1, fault_truncate=0.1
    )
    outcomes, running = _fault_run(config)
    running.stop()
    for outcome in ("5xx", "transport", "truncated"):
        assert 12 <= outcomes[outcome] <= 55, outcomes
    assert running.stats.faults["5xx"] == outcomes["5xx"]
    assert running.stats.faults["reset"] == outcomes["transport"]


def test_server_errors_vary_and_can_say_do_not_retry() -> None:
    config = EmulatorConfig(sessions=20, fault_5xx=1.0, fault_header_should_retry=True)
    with start_in_thread(config) as running, httpx.Client(headers=AUTH) as http:
        responses = [http.get(running.url + "/api/v1/sessions") for _ in range(60)]
        assert {r.status_code for r in responses} == {500, 502, 503, 504}
        assert any(r.headers.get("x-should-retry") == "false" for r in responses)
        html = next(r for r in responses if r.status_code == 502)
        assert html.headers["content-type"].startswith("text/html")
        stats = http.get(running.url + "/_emulator/stats").json()  # faults skip private routes
        assert stats["faults"] == {"5xx": 60}


@pytest.mark.slow
def test_stall_and_latency_delay_answers() -> None:
    config = EmulatorConfig(sessions=20, fault_stall=0.5, stall_seconds=0.15, latency_ms=20)
    with start_in_thread(config) as running, httpx.Client(headers=AUTH) as http:
        durations = []
        for _ in range(30):
            start = time.perf_counter()
            assert http.get(running.url + "/api/v1/sessions").status_code == 200
            durations.append(time.perf_counter() - start)
    # asyncio wakes a timer up to one clock resolution early (a ~20 ms wait measured 19.96 ms)
    assert min(durations) >= 0.02 - 0.001
    stalled = sum(1 for duration in durations if duration >= 0.15)
    assert stalled == running.stats.faults["stall"] and 5 <= stalled <= 25


# -- data, private endpoints, scale --------------------------------------------------------


def _lines(seed: int, anchor: int) -> list[bytes]:
    store = SessionStore.generate(2000, seed=seed, anchor_ms=anchor)
    return [line for chunk in store.session_lines() for line in chunk]


def test_same_seed_same_data_and_realistic_variety() -> None:
    anchor = int(datetime(2026, 3, 1, tzinfo=UTC).timestamp() * 1000)
    first = _lines(9, anchor)
    assert first == _lines(9, anchor)
    assert first != _lines(10, anchor)
    for line in first:
        assert orjson.dumps(orjson.loads(line)) == line  # hand-assembled JSON is canonical
    sessions = list(SessionStore.generate(2000, seed=9, anchor_ms=anchor).iter_sessions())
    for session in sessions:
        assert parse_iso_ms(session["updatedAt"]) >= parse_iso_ms(session["createdAt"])
        assert anchor - 30 * DAY_MS <= parse_iso_ms(session["createdAt"]) <= anchor
        assert len(session["tags"]) <= 5
        if session["closedAt"] is not None:
            assert isinstance(session["closedReason"], str)
        config = session["triggerConfig"]  # NOT NULL upstream
        assert isinstance(config["basePayload"], dict)
        assert 1 <= config.get("maxAttempts", 1) <= 10
        assert 1 <= config.get("idleTimeoutInSeconds", 1) <= 3600
    metadata_kinds = Counter(type(s["metadata"]).__name__ for s in sessions)
    assert metadata_kinds["NoneType"] and metadata_kinds["dict"]
    assert any(s["metadata"] == {} for s in sessions)
    assert any(s["externalId"] is None for s in sessions)
    assert any(s["currentRunId"] for s in sessions)
    deep = max(_depth(s["metadata"]) for s in sessions)
    assert deep >= 6


def _depth(value: Any) -> int:
    if isinstance(value, dict):
        return 1 + max((_depth(v) for v in value.values()), default=0)
    if isinstance(value, list):
        return 1 + max((_depth(v) for v in value), default=0)
    return 0


def test_private_sessions_dump_and_stats(
    emulator: RunningEmulator, client: httpx.Client, truth: list[dict[str, Any]]
) -> None:
    dump = httpx.get(emulator.url + "/_emulator/sessions")
    assert dump.status_code == 200
    lines = [orjson.loads(line) for line in dump.content.splitlines()]
    assert lines == truth
    httpx.post(emulator.url + "/_emulator/stats/reset")
    client.get("/api/v1/sessions")
    client.get(f"/api/v1/sessions/{truth[0]['id']}")
    client.get("/api/v1/sessions/nope")
    stats = httpx.get(emulator.url + "/_emulator/stats").json()
    assert stats["requests"] == 3
    assert stats["by_kind"] == {"list": 1, "get": 2}
    assert stats["by_status"] == {"200": 2, "404": 1}


def test_every_authorized_api_response_carries_rate_limit_headers(
    emulator: RunningEmulator,
) -> None:
    # a missing Authorization header is answered before the limiter, without them
    for headers in (AUTH, {"Authorization": "Bearer nope"}):
        response = httpx.get(emulator.url + "/api/v1/sessions", headers=headers)
        assert {"x-ratelimit-limit", "x-ratelimit-remaining", "x-ratelimit-reset"} <= set(
            response.headers
        )


@pytest.mark.slow
def test_a_million_sessions_start_fast_and_deep_pages_cost_like_the_first() -> None:
    started = time.perf_counter()
    config = EmulatorConfig(sessions=1_000_000, seed=2, rate_limit=False)
    with (
        start_in_thread(config) as running,
        httpx.Client(base_url=running.url, headers=AUTH) as http,
    ):
        startup = time.perf_counter() - started
        assert startup < 10, startup
        deep_cursor = running.store.cursor_at_rank(999_000)

        def timed(params: dict[str, str]) -> tuple[float, dict[str, Any]]:
            best = float("inf")
            body: dict[str, Any] = {}
            for _ in range(5):
                start = time.perf_counter()
                response = http.get("/api/v1/sessions", params=params)
                best = min(best, time.perf_counter() - start)
                body = response.json()
            return best, body

        first, _ = timed({"page[size]": "100"})
        deep, body = timed({"page[size]": "100", "page[after]": deep_cursor})
        assert len(body["data"]) == 100
        assert deep < max(5 * first, 0.02), (first, deep)
        tagged, _ = timed({"page[size]": "100", "page[after]": deep_cursor, "filter[tags]": "vip"})
        assert tagged < max(5 * first, 0.02), (first, tagged)
        ranged_ms = parse_iso_ms(body["data"][0]["createdAt"])
        window = {
            "page[size]": "100",
            "filter[createdAt][from]": str(ranged_ms - 60_000),
            "filter[createdAt][to]": str(ranged_ms),
        }
        ranged, ranged_body = timed(window)
        assert ranged < max(5 * first, 0.02)
        assert ranged_body["data"][0]["createdAt"] == body["data"][0]["createdAt"]
        assert len(running.store) == 1_000_000


# -- upstream's skewed ids and lagging replica ----------------------------------------------


def test_skewed_ids_follow_upstreams_query_exactly() -> None:
    config = EmulatorConfig(sessions=2000, seed=4, days=2000 * 13 / 86_400_000, id_skew_ms=25,
                            rate_limit=False)
    with start_in_thread(config) as running, httpx.Client(headers=AUTH) as http:
        truth = list(running.store.iter_sessions())
        key = {s["id"]: (parse_iso_ms(s["createdAt"]), s["id"]) for s in truth}
        assert sorted(truth, key=lambda s: s["id"]) != sorted(truth, key=lambda s: key[s["id"]])
        params: dict[str, str] = {"page[size]": "100"}
        for _ in range(6):
            body = http.get(running.url + "/api/v1/sessions", params=params).json()
            cursor = params.get("page[after]")
            # WHERE session_id < cursor ORDER BY created_at DESC, session_id DESC LIMIT 100
            expected = sorted(
                (s for s in truth if cursor is None or s["id"][len("session_"):] < cursor),
                key=lambda s: key[s["id"]], reverse=True)[:100]
            assert [row["id"] for row in body["data"]] == [s["id"] for s in expected]
            assert body["pagination"]["next"] == expected[-1]["id"][len("session_"):]
            params["page[after]"] = body["pagination"]["next"]
        for session in truth[::97]:  # a skewed id is still found by GET
            assert http.get(f"{running.url}/api/v1/sessions/{session['id']}").json() == session


@pytest.mark.slow
def test_the_list_lags_by_the_replication_delay() -> None:
    config = EmulatorConfig(sessions=50, seed=6, replication_delay=0.6, rate_limit=False)
    with start_in_thread(config) as running, httpx.Client(
        base_url=running.url, headers=AUTH
    ) as http:
        def listed(**filters: str) -> set[str]:
            params = {"page[size]": "100", **{f"filter[{k}]": v for k, v in filters.items()}}
            return {row["id"] for row in http.get("/api/v1/sessions", params=params).json()["data"]}

        body = {"type": "chat.agent", "taskIdentifier": "t", "tags": ["old"],
                "triggerConfig": {"basePayload": {}}}
        session = http.post("/api/v1/sessions", json=body).json()
        assert http.get(f"/api/v1/sessions/{session['id']}").status_code == 200
        assert session["id"] not in listed()  # not replicated yet
        time.sleep(0.7)
        assert session["id"] in listed() and session["id"] in listed(tags="old")
        http.patch(f"/api/v1/sessions/{session['id']}", json={"tags": ["new"]})
        http.post(f"/api/v1/sessions/{session['id']}/close", json={})
        assert session["id"] in listed(tags="old")  # the replica still has the old tags
        assert session["id"] not in listed(tags="new")
        assert session["id"] not in listed(status="CLOSED")  # nor the close, yet
        assert session["id"] not in listed(status="ACTIVE")  # status is re-checked fresh
        time.sleep(0.7)
        assert session["id"] in listed(tags="new") and session["id"] not in listed(tags="old")
        assert session["id"] in listed(status="CLOSED")


def test_the_emulator_flags_are_the_config_fields() -> None:
    import dataclasses

    from pipeline.emulator.cli import emulator_command

    params = {p.name: p for p in emulator_command.params if p.name != "help"}
    fields = {f.name: f for f in dataclasses.fields(EmulatorConfig)}
    assert set(params) == set(fields)
    for name, param in params.items():
        if name != "anchor":  # None means now, resolved when the command runs
            assert param.default == fields[name].default, name
    flags = {opt for p in params.values() for opt in p.opts}
    assert {"--api-key", "--forbidden-key", "--no-rate-limit", "--allow-remote", "--fault-5xx"} <= flags
    assert params["rate_limit"].flag_value is False and params["allow_remote"].flag_value is True
