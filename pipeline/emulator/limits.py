"""Upstream's per-key token bucket, and the faults the emulator injects on purpose."""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from pipeline.emulator.config import EmulatorConfig


@dataclass(frozen=True)
class RateDecision:
    allowed: bool
    limit: int
    remaining: int  # -1 on refusal, as upstream's bucket reports it (headers clamp to 0)
    reset_ms: int  # epoch ms of the next refill

    def headers(self) -> list[tuple[bytes, bytes]]:
        return [
            (b"x-ratelimit-limit", str(self.limit).encode()),
            (b"x-ratelimit-remaining", str(max(0, self.remaining)).encode()),
            (b"x-ratelimit-reset", str(self.reset_ms).encode()),
        ]


@dataclass
class _Bucket:
    tokens: int
    refilled_at: float


class RateLimiter:
    """`refill` tokens every `interval` seconds, capped at `burst`; one token per request."""

    def __init__(
        self,
        burst: int,
        refill: int,
        interval: float,
        *,
        enabled: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._burst = burst
        self._refill = refill
        self._interval = interval
        self._enabled = enabled
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def take(self, key: str) -> RateDecision:
        now = self._clock()
        if not self._enabled:
            return self.idle()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(self._burst, now)
        elif now >= bucket.refilled_at + self._interval:
            refills = int((now - bucket.refilled_at) // self._interval)
            bucket.tokens = min(self._burst, bucket.tokens + refills * self._refill)
            bucket.refilled_at += refills * self._interval
        reset_ms = round((bucket.refilled_at + self._interval) * 1000)
        if bucket.tokens == 0:
            return RateDecision(False, self._burst, -1, reset_ms)
        bucket.tokens -= 1
        return RateDecision(True, self._burst, bucket.tokens, reset_ms)

    def idle(self) -> RateDecision:
        """What a request that touches no bucket reports: a full one."""
        reset_ms = round((self._clock() + self._interval) * 1000)
        return RateDecision(True, self._burst, self._burst, reset_ms)


class Fault(StrEnum):
    SERVER_ERROR = "5xx"
    RESET = "reset"
    TRUNCATE = "truncate"
    STALL = "stall"


@dataclass(frozen=True)
class ServerError:
    status: int
    body: bytes
    content_type: bytes
    should_retry_false: bool


_SERVER_ERRORS: tuple[tuple[int, bytes, bytes], ...] = (
    (500, b'{"error":"Internal Server Error"}', b"application/json; charset=utf-8"),
    (
        502,
        b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
        b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>cloudflare</center>\r\n"
        b"</body>\r\n</html>\r\n",
        b"text/html",
    ),
    (503, b"upstream connect error or disconnect/reset before headers", b"text/plain"),
    (
        504,
        b"<html><body><h1>504 Gateway Time-out</h1>The server didn't respond in time.</body>"
        b"</html>\n",
        b"text/html",
    ),
)


class FaultInjector:
    """One seeded draw per API request decides which fault, if any, hits it."""

    def __init__(self, config: EmulatorConfig) -> None:
        self._rng = random.Random(config.fault_seed)
        self._thresholds: list[tuple[float, Fault]] = []
        total = 0.0
        for probability, fault in (
            (config.fault_5xx, Fault.SERVER_ERROR),
            (config.fault_reset, Fault.RESET),
            (config.fault_truncate, Fault.TRUNCATE),
            (config.fault_stall, Fault.STALL),
        ):
            if probability > 0:
                total += probability
                self._thresholds.append((total, fault))
        self._should_retry_header = config.fault_header_should_retry

    def draw(self) -> Fault | None:
        if not self._thresholds:
            return None
        roll = self._rng.random()
        for threshold, fault in self._thresholds:
            if roll < threshold:
                return fault
        return None

    def reset_cut(self, length: int) -> int:
        """How many body bytes to deliver before dropping: none, or the first half."""
        return 0 if self._rng.random() < 0.5 else length // 2

    def server_error(self) -> ServerError:
        status, body, content_type = self._rng.choice(_SERVER_ERRORS)
        no_retry = self._should_retry_header and self._rng.random() < 0.5
        return ServerError(status, body, content_type, no_retry)
