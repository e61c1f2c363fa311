"""HTTP client for Trigger.dev's sessions API: auth, retries, 429 waits and pacing.

It knows requests and responses, never Parquet or checkpoints. Every request goes through
`_send`, which paces itself with the shared `RateLimiter`, waits out 429s until the
`x-ratelimit-reset` instant (the API sends no Retry-After) and retries transient faults
with capped, fully jittered exponential backoff. The secret key lives only in the
`Authorization` header of the underlying httpx client.

Transport: `HTTPS_PROXY` / `ALL_PROXY` / `NO_PROXY` are honoured for https (the proxy sees
only a CONNECT tunnel); a loopback API is reached directly; plain http to another host
through a proxy is refused, since the proxy would read the key. `ca_bundle` replaces the
trusted CAs (a self-hosted server's private CA).
"""

from __future__ import annotations

import logging
import random
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar, overload
from urllib.parse import quote, urlsplit

import httpx
import orjson
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_random_exponential,
)

from pipeline.api.auth import BRANCH_HEADER, check_branch, check_secret_key
from pipeline.api.pacing import RateLimiter
from pipeline.api.records import ListedKey, ListedSession, decode_list_body, decode_list_keys
from pipeline.errors import ApiError, AuthError, QueryRejected, UsageError
from pipeline.hosts import is_loopback

log = logging.getLogger(__name__)

SESSIONS_PATH = "/api/v1/sessions"
PAGE_SIZE = 100


@dataclass(frozen=True)
class ClientSettings:
    """How to reach the API and how hard to try. The options' defaults are `Settings`'
    (build with `runner.client_settings`); the rest are not options."""

    base_url: str
    connect_timeout: float
    read_timeout: float
    max_attempts: int  # per request, for faults; 429 waits are not counted
    backoff_initial: float
    backoff_max: float
    allow_insecure_http: bool
    branch: str | None  # sent as x-trigger-branch (preview and dev branches)
    ca_bundle: str | None  # PEM file of the CAs to trust instead of the default ones
    concurrency: int  # requests in flight at once: one pooled connection each
    max_rate_limit_wait: float = 900.0  # total seconds one request may spend waiting on 429s


class SessionPage:
    """One page of the list: its sessions, the cursor to the next page, when it arrived.

    A body that fits the typed structs is kept raw with only its row `keys` decoded (what
    the walk needs); `listed`, the rows as typed structs, and `sessions`, the rows as plain
    dicts, are decoded from it on first use (`listed` is None when a row does not fit the
    structs). A body that did not fit holds only `sessions`, and `keys` is None.
    """

    __slots__ = ("_listed", "_sessions", "body", "keys", "next_cursor", "received_at_ms")

    def __init__(
        self,
        sessions: list[dict[str, Any]] | None,
        next_cursor: str | None,
        received_at_ms: int,
        *,
        keys: list[ListedKey] | None = None,
        body: bytes | None = None,
    ) -> None:
        if sessions is None and (keys is None or body is None):
            raise ValueError("a page needs its sessions, or its row keys and raw body")
        self._sessions = sessions
        self._listed: list[ListedSession] | None | bool = False  # False: not decoded yet
        self.next_cursor = next_cursor
        self.received_at_ms = received_at_ms
        self.keys = keys
        self.body = body

    @property
    def listed(self) -> list[ListedSession] | None:
        if self._listed is False:
            decoded = None if self.body is None else decode_list_body(self.body)
            self._listed = None if decoded is None else decoded[0]
        return self._listed  # type: ignore[return-value]

    @property
    def sessions(self) -> list[dict[str, Any]]:
        if self._sessions is None:
            assert self.body is not None
            self._sessions = orjson.loads(self.body)["data"]
        return self._sessions


class TransientError(Exception):
    """A failure worth retrying: 5xx, 408, 409, transport errors, unusable 200 bodies."""


class RequestStats:
    """Counters shared by every request of a run (thread-safe)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.requests = 0
        self.retries = 0
        self.rate_limited = 0

    def add(self, *, requests: int = 0, retries: int = 0, rate_limited: int = 0) -> None:
        with self._lock:
            self.requests += requests
            self.retries += retries
            self.rate_limited += rate_limited


def check_base_url(url: str, allow_insecure_http: bool) -> str:
    """Validate the API base URL; plain http is only for loopback unless explicitly allowed."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UsageError(f"the API URL {url!r} is not an http(s) URL with a host")
    if parts.scheme == "http" and not allow_insecure_http and not is_loopback(parts.hostname):
        raise UsageError(
            f"refusing plain http to {parts.hostname}: the key would travel unencrypted; "
            "use https, or set allow_insecure_http = true if you really mean it"
        )
    return url.rstrip("/")


def proxy_for(url: str) -> str | None:
    """The proxy a request to `url` goes through, by the standard variables; None: direct.

    A loopback host is always reached directly. Plain http to any other host through a
    proxy is refused: the proxy would read the key in the Authorization header.
    """
    parts = urlsplit(url)
    host = parts.hostname or ""
    if is_loopback(host):
        return None
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(parts.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass_environment(host, proxies):
        return None
    proxy = proxy if "://" in proxy else f"http://{proxy}"
    proxy_parts = urlsplit(proxy)
    if proxy_parts.scheme not in ("http", "https"):
        raise UsageError(
            f"the proxy {proxy_parts.hostname} is {proxy_parts.scheme}://, which is not "
            "supported: use an http:// or https:// proxy"
        )
    if parts.scheme == "http":
        raise UsageError(
            f"refusing plain http to {host} through the proxy {proxy_parts.hostname}: the proxy "
            "would read the key; use https, or add the host to NO_PROXY"
        )
    return proxy


def tls_verification(ca_bundle: str | None) -> ssl.SSLContext | bool:
    """What httpx verifies the server with: the given CAs, else its default bundle."""
    if not ca_bundle:
        return True
    try:
        return ssl.create_default_context(cafile=ca_bundle)
    except FileNotFoundError:
        raise UsageError(f"ca_bundle {ca_bundle} does not exist") from None
    except (ssl.SSLError, OSError) as error:
        reason = getattr(error, "strerror", None) or getattr(error, "reason", None) or error
        raise UsageError(
            f"ca_bundle {ca_bundle} is not a readable PEM file of CA certificates ({reason})"
        ) from None


_T = TypeVar("_T")  # what a request's `parse` makes of the body


class TriggerClient:
    """Synchronous client; thread-safe, so several walkers may share one."""

    def __init__(
        self,
        settings: ClientSettings,
        secret_key: str,
        limiter: RateLimiter | None = None,
        stats: RequestStats | None = None,
        key_variable: str = "TRIGGER_SECRET_KEY",
    ) -> None:
        self.settings = settings
        self.key_variable = key_variable  # named in errors; the key itself never is
        self.base_url = check_base_url(settings.base_url, settings.allow_insecure_http)
        self.branch = settings.branch.strip() if settings.branch else None
        key = check_secret_key(secret_key, key_variable)
        check_branch(key, self.branch, key_variable)
        headers = {
            "Authorization": f"Bearer {key}",
            "Accept": "application/json",
            "User-Agent": "trigger-sessions-export/0.1",
        }
        if self.branch:
            headers[BRANCH_HEADER] = self.branch
        self.limiter = limiter or RateLimiter()
        self.stats = stats or RequestStats()
        self._http = httpx.Client(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx.Timeout(settings.read_timeout, connect=settings.connect_timeout),
            limits=httpx.Limits(max_connections=max(4, settings.concurrency * 2)),
            follow_redirects=False,
            verify=tls_verification(settings.ca_bundle),
            proxy=proxy_for(self.base_url),
            trust_env=False,  # proxies and CAs are decided above, never behind our back
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> TriggerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- endpoints -----------------------------------------------------------------------

    def list_sessions(self, params: dict[str, str]) -> SessionPage:
        """One page of `GET /api/v1/sessions` with exactly these query params."""
        parsed, received_ms = self._send("GET", SESSIONS_PATH, params, parse=_parse_list_body)
        sessions, keys, body, next_cursor = parsed
        return SessionPage(sessions, next_cursor, received_ms, keys=keys, body=body)

    def get_session(self, session_id: str) -> dict[str, Any] | None:
        """One session with its triggerConfig, or None when the API does not know it."""
        path = f"{SESSIONS_PATH}/{quote(session_id, safe='')}"
        body, _ = self._send("GET", path, None, parse=_parse_session_body, missing_ok=True)
        return body

    # -- the request loop ----------------------------------------------------------------

    @overload
    def _send(
        self,
        method: str,
        path: str,
        params: dict[str, str] | None,
        *,
        parse: Callable[[bytes], _T],
        missing_ok: Literal[False] = False,
    ) -> tuple[_T, int]: ...

    @overload
    def _send(
        self,
        method: str,
        path: str,
        params: dict[str, str] | None,
        *,
        parse: Callable[[bytes], _T],
        missing_ok: Literal[True],
    ) -> tuple[_T | None, int]: ...

    def _send(
        self,
        method: str,
        path: str,
        params: dict[str, str] | None,
        *,
        parse: Callable[[bytes], _T],
        missing_ok: bool = False,
    ) -> tuple[_T | None, int]:
        """The parsed body (None for a 404 when `missing_ok`) and when it arrived, in epoch
        ms; transient failures are retried."""
        retrying = Retrying(
            stop=stop_after_attempt(self.settings.max_attempts),
            wait=wait_random_exponential(
                multiplier=self.settings.backoff_initial, max=self.settings.backoff_max
            ),
            retry=retry_if_exception_type(TransientError),
            before_sleep=self._log_retry,
            reraise=True,
        )
        try:
            return retrying(self._attempt, method, path, params, parse, missing_ok)
        except TransientError as error:
            raise ApiError(
                f"the API is still failing after {self.settings.max_attempts} attempts "
                f"({error}); progress is checkpointed, the next run resumes"
            ) from None

    def _log_retry(self, state: RetryCallState) -> None:
        self.stats.add(retries=1)
        error = state.outcome.exception() if state.outcome else None
        sleep = state.next_action.sleep if state.next_action else 0.0
        log.warning(
            "request failed (%s); retry %d/%d in %.1fs",
            error,
            state.attempt_number,
            self.settings.max_attempts - 1,
            sleep,
        )

    def _attempt(
        self,
        method: str,
        path: str,
        params: dict[str, str] | None,
        parse: Callable[[bytes], _T],
        missing_ok: bool,
    ) -> tuple[_T | None, int]:
        """One attempt, including any number of 429 waits (they are not faults)."""
        waited = 0.0
        while True:
            ticket = self.limiter.acquire()
            self.stats.add(requests=1)
            try:
                response = self._http.request(method, path, params=params)
            except httpx.TransportError as error:
                self.limiter.release()
                if _untrusted_certificate(error):
                    raise UsageError(
                        f"the TLS certificate of {urlsplit(self.base_url).hostname} is not "
                        f"trusted ({_describe_transport(error)}); give its CA with ca_bundle "
                        "(or SSL_CERT_FILE)"
                    ) from None
                raise TransientError(_describe_transport(error)) from None
            received_ms = time.time_ns() // 1_000_000
            self.limiter.observe(response.headers, received_ms, ticket)
            status = response.status_code
            if status == 429:
                self.stats.add(rate_limited=1)
                delay = self.limiter.delay_after_429(response.headers, received_ms)
                delay += random.uniform(0, min(1.0, 0.1 + delay * 0.1))
                waited += delay
                if waited > self.settings.max_rate_limit_wait:
                    raise ApiError(
                        f"rate limited for over {self.settings.max_rate_limit_wait:.0f}s; "
                        "progress is checkpointed, the next run resumes"
                    )
                log.info("rate limited (429); waiting %.2fs for the bucket to refill", delay)
                time.sleep(delay)
                continue
            return self._interpret(response, status, parse, missing_ok), received_ms

    def _interpret(
        self,
        response: httpx.Response,
        status: int,
        parse: Callable[[bytes], _T],
        missing_ok: bool,
    ) -> _T | None:
        should_retry = response.headers.get("x-should-retry")
        if 200 <= status < 300:
            try:
                return parse(response.content)
            except (orjson.JSONDecodeError, ValueError, TypeError) as error:
                raise TransientError(f"unusable {status} body: {error}") from None
        detail = _error_detail(response)
        if should_retry == "true":
            raise TransientError(f"HTTP {status} {detail}")
        if should_retry != "false" and (status >= 500 or status in (408, 409)):
            raise TransientError(f"HTTP {status} {detail}")
        if status in (401, 403):
            raise AuthError(
                f"the API rejected the key (HTTP {status}: {detail}); "
                f"check {self.key_variable} and that it belongs to the right environment"
            )
        if status == 404 and missing_ok:
            return None
        if status in (400, 422):
            raise QueryRejected(f"the API refused the request (HTTP {status}): {detail}")
        raise ApiError(f"unexpected HTTP {status} from {response.request.url.path}: {detail}")


_ParsedList = tuple[list[dict[str, Any]] | None, list[ListedKey] | None, bytes | None, str | None]


def _parse_list_body(content: bytes) -> _ParsedList:
    """The row keys when the body fits them (the rest is decoded later, see `SessionPage`),
    else the generic decode (same checks)."""
    typed = decode_list_keys(content)
    if typed is not None:
        keys, next_cursor = typed
        return None, keys, content, next_cursor
    sessions, next_cursor = _check_list_body(orjson.loads(content))
    return sessions, None, None, next_cursor


def _check_list_body(body: Any) -> tuple[list[dict[str, Any]], str | None]:
    if not isinstance(body, dict) or not isinstance(body.get("data"), list):
        raise ValueError("response has no `data` list")
    sessions = body["data"]
    for session in sessions:
        if not isinstance(session, dict) or not isinstance(session.get("id"), str):
            raise ValueError("a session in `data` has no string `id`")
        if not isinstance(session.get("createdAt"), str):
            raise ValueError(f"session {session['id']} has no `createdAt`")
    pagination = body.get("pagination") or {}
    if not isinstance(pagination, dict):
        raise ValueError("`pagination` is not an object")
    next_cursor = pagination.get("next")
    if next_cursor is not None and (not isinstance(next_cursor, str) or not next_cursor):
        raise ValueError("`pagination.next` is not a string")
    return sessions, next_cursor


def _parse_session_body(content: bytes) -> dict[str, Any]:
    body = orjson.loads(content)
    if not isinstance(body, dict) or not isinstance(body.get("id"), str):
        raise ValueError("response is not a session object")
    return body


def _error_detail(response: httpx.Response) -> str:
    """A short, key-free description of an error body (JSON `error`/`detail`/`details`)."""
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        text = response.text.strip().splitlines()
        return text[0][:120] if text else "empty body"
    if not isinstance(body, dict):
        return str(body)[:200]
    parts = [str(body.get(k)) for k in ("error", "title", "detail") if body.get(k)]
    for item in body.get("details") or []:
        if isinstance(item, dict):
            where = ".".join(str(p) for p in item.get("path") or [])
            parts.append(f"{where}: {item.get('message')}" if where else str(item.get("message")))
    return "; ".join(parts) or str(body)[:200]


def _untrusted_certificate(error: BaseException) -> bool:
    """A failed certificate check is configuration, not a fault worth retrying."""
    seen: BaseException | None = error
    while seen is not None:
        if isinstance(seen, ssl.SSLCertVerificationError):
            return True
        if "CERTIFICATE_VERIFY_FAILED" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _describe_transport(error: httpx.TransportError) -> str:
    kind = type(error).__name__
    text = str(error)
    return f"{kind}: {text}" if text else kind
