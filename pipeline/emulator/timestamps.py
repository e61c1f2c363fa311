"""Timestamps exactly as the API writes them: UTC, three millisecond digits, trailing `Z`."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

DAY_MS = 86_400_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Formatting through datetime costs ~2 µs and a page carries ~300 timestamps: assemble them
# from a cached day prefix and small tables (small enough to stay in CPU cache) instead.
_day_prefixes: dict[int, bytes] = {}
_HOURS_MINUTES = tuple(f"{m // 60:02d}:{m % 60:02d}:".encode() for m in range(1440))
_SECONDS = tuple(f"{s:02d}.".encode() for s in range(60))
_MILLIS = tuple(f"{m:03d}Z".encode() for m in range(1000))


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def iso_bytes(ms: int) -> bytes:
    """`2026-11-07T05:31:56.123Z` for an epoch-millisecond value, as ASCII bytes."""
    day, rest = divmod(ms, DAY_MS)
    prefix = _day_prefixes.get(day)
    if prefix is None:
        prefix = (_EPOCH + timedelta(days=day)).strftime("%Y-%m-%dT").encode()
        _day_prefixes[day] = prefix
    seconds, millis = divmod(rest, 1000)
    minutes, seconds = divmod(seconds, 60)
    return b"".join((prefix, _HOURS_MINUTES[minutes], _SECONDS[seconds], _MILLIS[millis]))


def iso_ms(ms: int) -> str:
    return iso_bytes(ms).decode()


def parse_iso_ms(text: str) -> int:
    """Epoch ms of an ISO-8601 date or datetime; naive values are UTC. Raises ValueError."""
    value = datetime.fromisoformat(text.strip())
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    delta = value - _EPOCH
    return (delta.days * DAY_MS) + (delta.seconds * 1000) + (delta.microseconds // 1000)
