"""Timestamps exactly as the API writes them: UTC, three millisecond digits, trailing `Z`."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

DAY_MS = 86_400_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Formatting through datetime costs ~2 µs; a page carries 500 timestamps, so reuse day prefixes.
_day_prefixes: dict[int, str] = {}


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def iso_ms(ms: int) -> str:
    """`2026-11-07T05:31:56.123Z` for an epoch-millisecond value."""
    day, rest = divmod(ms, DAY_MS)
    prefix = _day_prefixes.get(day)
    if prefix is None:
        prefix = (_EPOCH + timedelta(days=day)).strftime("%Y-%m-%dT")
        _day_prefixes[day] = prefix
    seconds, millis = divmod(rest, 1000)
    hours, seconds = divmod(seconds, 3600)
    minutes, seconds = divmod(seconds, 60)
    return f"{prefix}{hours:02d}:{minutes:02d}:{seconds:02d}.{millis:03d}Z"


def parse_iso_ms(text: str) -> int:
    """Epoch ms of an ISO-8601 date or datetime; naive values are UTC. Raises ValueError."""
    value = datetime.fromisoformat(text.strip())
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    delta = value - _EPOCH
    return (delta.days * DAY_MS) + (delta.seconds * 1000) + (delta.microseconds // 1000)
