"""The ASGI app: routing, auth, rate limit, faults, and the sessions endpoints.

Order per `/api/` request follows upstream: the rate-limit middleware answers a missing
Authorization header, then spends a token of the key's bucket (even for a key the route
will reject), then the route authenticates and runs. Injected faults sit between the two,
where a proxy or a crashing handler would.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import orjson

from pipeline.emulator.bodies import (
    MAX_BODY_BYTES,
    parse_close_reason,
    parse_new_session,
    parse_session_patch,
)
from pipeline.emulator.config import EmulatorConfig
from pipeline.emulator.issues import ValidationFailed
from pipeline.emulator.limits import Fault, FaultInjector, RateDecision, RateLimiter
from pipeline.emulator.query import parse_list_query, query_params
from pipeline.emulator.stats import EmulatorStats
from pipeline.emulator.store import SessionConflict, SessionStore
from pipeline.emulator.timestamps import now_ms

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
Headers = list[tuple[bytes, bytes]]

JSON = b"application/json; charset=utf-8"
PROBLEM_JSON = b"application/problem+json"
DEFAULT_KEY = re.compile(r"tr_(dev|stg|prod|preview)_[A-Za-z0-9_]+")
PREVIEW_PREFIX = "tr_preview_"
BRANCH_REQUIRED = "x-trigger-branch header required for preview env"  # upstream's words


class DroppedConnection(Exception):
    """Raised on purpose mid-response so that uvicorn aborts the connection."""


class _BodyTooLarge(Exception):
    pass


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    content_type: bytes = JSON
    headers: Headers = field(default_factory=list)


def json_reply(status: int, payload: Any) -> Reply:
    return Reply(status, orjson.dumps(payload))


def _problem(status: int, title: str, detail: str, **extra: Any) -> Reply:
    # Upstream's middleware writes these with JSON.stringify(body, null, 2).
    payload = {
        "title": title,
        "status": status,
        "type": f"https://developer.mozilla.org/en-US/docs/Web/HTTP/Status/{status}",
        "detail": detail,
        **extra,
        "error": detail,
    }
    return Reply(status, orjson.dumps(payload, option=orjson.OPT_INDENT_2), PROBLEM_JSON)


def _not_found() -> Reply:
    """Upstream's answer for an unknown session: not worth retrying."""
    return Reply(404, orjson.dumps({"error": "Not found"}), headers=[(b"x-should-retry", b"false")])


def _js_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


@dataclass(frozen=True)
class _Route:
    kind: str  # list | get | create | update | close | other
    param: str | None = None
    allowed: bool = True  # False: path known, method not


def _route(method: str, raw_path: bytes) -> _Route:
    parts = [unquote(part.decode("utf-8", "replace")) for part in raw_path.split(b"/")[1:]]
    if len(parts) > 3 and parts[-1] == "":
        parts.pop()  # tolerate one trailing slash
    if parts[:3] != ["api", "v1", "sessions"]:
        return _Route("other", allowed=False)
    rest = parts[3:]
    if not rest or rest == [""]:
        if method == "GET":
            return _Route("list")
        return _Route("create", allowed=method == "POST")
    if len(rest) == 1:
        if method == "GET":
            return _Route("get", rest[0])
        return _Route("update", rest[0], allowed=method == "PATCH")
    if len(rest) == 2 and rest[1] == "close":
        return _Route("close", rest[0], allowed=method == "POST")
    return _Route("other", allowed=False)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


def _bearer_key(authorization: str) -> str:
    value = authorization.strip()
    if value.lower().startswith("bearer "):
        return value[7:].strip()
    return "" if value.lower() == "bearer" else value


class EmulatorApp:
    """The ASGI callable; holds the store, the limiter, the fault draws and the counters."""

    def __init__(
        self,
        config: EmulatorConfig,
        store: SessionStore,
        *,
        limiter: RateLimiter | None = None,
        faults: FaultInjector | None = None,
        stats: EmulatorStats | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.limiter = limiter or RateLimiter(
            config.rate_limit_burst,
            config.rate_limit_refill,
            config.rate_limit_interval,
            enabled=config.rate_limit,
        )
        self.faults = faults or FaultInjector(config)
        self.stats = stats or EmulatorStats()
        self._allowed_keys = frozenset(config.api_keys)
        self._forbidden_keys = frozenset(config.forbidden_keys)
        self._list_trigger_config = config.list_trigger_config == "include"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        prefix = self.config.path_prefix.rstrip("/")
        if prefix:  # a self-hosted server behind a path prefix
            if scope["path"] != prefix and not scope["path"].startswith(prefix + "/"):
                await _send(send, json_reply(404, {"error": "Not found"}))
                return
            raw = scope.get("raw_path") or scope["path"].encode()
            scope = {**scope, "path": scope["path"][len(prefix) :], "raw_path": raw[len(prefix) :]}
        path: str = scope["path"]
        if path.startswith("/api/"):
            await self._api(scope, receive, send)
        elif path.startswith("/_emulator/"):
            await self._private(scope, send)
        else:
            await _send(send, json_reply(404, {"error": "Not found"}))

    # -- the upstream surface --------------------------------------------------------------

    async def _api(self, scope: Scope, receive: Receive, send: Send) -> None:
        route = _route(scope["method"], scope.get("raw_path") or scope["path"].encode())
        stats = self.stats
        stats.requests += 1
        stats.by_kind[route.kind] += 1
        branch = _header(scope, b"x-trigger-branch")
        stats.by_branch[branch or ""] += 1
        if self.config.latency_ms:
            await asyncio.sleep(self.config.latency_ms / 1000)
        authorization = _header(scope, b"authorization")
        if not authorization:
            # answered before the rate limiter is consulted: no rate-limit headers
            reply = _problem(401, "Unauthorized", "No authorization header provided")
            stats.by_status[reply.status] += 1
            await _send(send, reply)
            return
        # a preview branch is an environment of its own, with its own bucket
        preview = branch and PREVIEW_PREFIX in authorization
        decision = self.limiter.take(f"{authorization}\n{branch}" if preview else authorization)
        if not decision.allowed:
            stats.rate_limited += 1
            await self._finish(send, self._rate_limited(decision), decision)
            return
        fault = self.faults.draw()
        if fault is not None:
            stats.faults[fault.value] += 1
        if fault is Fault.STALL:
            await asyncio.sleep(self.config.stall_seconds)
        if fault is Fault.SERVER_ERROR:
            error = self.faults.server_error()
            extra = [(b"x-should-retry", b"false")] if error.should_retry_false else []
            reply = Reply(error.status, error.body, error.content_type, extra)
            await self._finish(send, reply, decision)
            return
        reply = self._authenticate(authorization, branch) or await self._dispatch(
            route, scope, receive
        )
        if fault is Fault.TRUNCATE and 200 <= reply.status < 300:
            reply = Reply(reply.status, reply.body[: len(reply.body) // 2], reply.content_type)
        if fault is Fault.RESET:
            cut = self.faults.reset_cut(len(reply.body))
            await _send_partial(send, reply, cut, decision.headers())
            raise DroppedConnection
        await self._finish(send, reply, decision)

    async def _finish(self, send: Send, reply: Reply, decision: RateDecision) -> None:
        self.stats.by_status[reply.status] += 1
        await _send(send, reply, decision.headers())

    def _rate_limited(self, decision: RateDecision) -> Reply:
        seconds = _js_number(max(0, decision.reset_ms - now_ms()) / 1000)
        detail = (
            f"Rate limit exceeded {max(0, decision.remaining)}/{decision.limit} requests "
            f"remaining. Retry in {seconds} seconds."
        )
        return _problem(
            429,
            "Rate Limit Exceeded",
            detail,
            reset=decision.reset_ms,
            limit=decision.limit,
            remaining=decision.remaining,
            secondsUntilReset=seconds,
        )

    def _authenticate(self, authorization: str, branch: str | None) -> Reply | None:
        key = _bearer_key(authorization)
        if not key:
            return json_reply(401, {"error": "Invalid or Missing API key"})
        if key in self._forbidden_keys:
            return json_reply(403, {"error": "Unauthorized: this key may not access sessions"})
        accepted = key in self._allowed_keys if self._allowed_keys else DEFAULT_KEY.fullmatch(key)
        if not accepted:
            return json_reply(401, {"error": "Invalid API key"})
        if key.startswith(PREVIEW_PREFIX) and not (branch and branch.strip()):
            return json_reply(401, {"error": BRANCH_REQUIRED})
        return None

    async def _dispatch(self, route: _Route, scope: Scope, receive: Receive) -> Reply:
        if route.kind == "other":
            return json_reply(404, {"error": "Not found"})
        if not route.allowed:
            return json_reply(405, {"error": "Method not allowed"})
        try:
            if route.kind == "list":
                return self._list(scope)
            if route.kind == "get":
                return self._get(route.param or "")
            body = await _read_body(receive)
            if route.kind == "create":
                return self._create(body)
            if route.kind == "update":
                return self._update(route.param or "", body)
            return self._close(route.param or "", body)
        except _BodyTooLarge:
            return json_reply(413, {"error": "Request body too large"})
        except ValidationFailed as failed:
            error = "Query Error" if route.kind == "list" else "Invalid request body"
            return json_reply(400, {"error": error, "details": failed.issues})

    def _list(self, scope: Scope) -> Reply:
        query = parse_list_query(query_params(scope["query_string"]))
        page = self.store.list_page(query, with_trigger_config=self._list_trigger_config)
        pagination: dict[str, str] = {}
        if page.next_cursor is not None:
            pagination["next"] = page.next_cursor
        if page.previous_cursor is not None:
            pagination["previous"] = page.previous_cursor
        body = b"".join(
            (
                b'{"data":[',
                b",".join(page.rows),
                b'],"pagination":',
                orjson.dumps(pagination),
                b"}",
            )
        )
        return Reply(200, body)

    def _get(self, ident: str) -> Reply:
        raw = self.store.get_bytes(ident)
        if raw is None:
            return _not_found()
        return Reply(200, raw)

    def _create(self, body: bytes) -> Reply:
        new = parse_new_session(body)
        try:
            result = self.store.create(new)
        except SessionConflict as conflict:
            return json_reply(409, {"error": str(conflict)})
        session = result.session
        payload = {
            **session,
            "runId": session["currentRunId"],
            "publicAccessToken": "emulator_pat_" + session["id"],
            "isCached": not result.created,
        }
        return json_reply(201 if result.created else 200, payload)

    def _update(self, ident: str, body: bytes) -> Reply:
        session = self.store.update(ident, parse_session_patch(body))
        if session is None:
            return _not_found()
        return json_reply(200, session)

    def _close(self, ident: str, body: bytes) -> Reply:
        session = self.store.close(ident, parse_close_reason(body))
        if session is None:
            return _not_found()
        return json_reply(200, session)

    # -- private test endpoints (no auth, no limits, no faults) ----------------------------

    async def _private(self, scope: Scope, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        if path == "/_emulator/sessions" and method == "GET":
            await self._stream_sessions(send)
        elif path == "/_emulator/stats" and method == "GET":
            await _send(send, json_reply(200, self.stats.snapshot()))
        elif path == "/_emulator/stats/reset" and method == "POST":
            self.stats.reset()
            await _send(send, json_reply(200, self.stats.snapshot()))
        else:
            await _send(send, json_reply(404, {"error": "Not found"}))

    async def _stream_sessions(self, send: Send) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/x-ndjson")],
            }
        )
        for chunk in self.store.session_lines():
            body = b"\n".join(chunk) + b"\n"
            await send({"type": "http.response.body", "body": body, "more_body": True})
        await send({"type": "http.response.body", "body": b""})


async def _read_body(receive: Receive) -> bytes:
    parts: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            break
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _BodyTooLarge
        parts.append(chunk)
        if not message.get("more_body"):
            break
    return b"".join(parts)


def _start(reply: Reply, length: int, extra: Headers) -> MutableMapping[str, Any]:
    headers = [
        (b"content-type", reply.content_type),
        (b"content-length", str(length).encode()),
        *extra,
        *reply.headers,
    ]
    return {"type": "http.response.start", "status": reply.status, "headers": headers}


async def _send(send: Send, reply: Reply, extra: Headers | None = None) -> None:
    await send(_start(reply, len(reply.body), extra or []))
    await send({"type": "http.response.body", "body": reply.body})


async def _send_partial(send: Send, reply: Reply, cut: int, extra: Headers) -> None:
    """Promise the whole body, deliver `cut` bytes: the client sees the connection drop."""
    await send(_start(reply, len(reply.body), extra))
    await send(
        {
            "type": "http.response.body",
            "body": reply.body[:cut],
            "more_body": True,
        }
    )
