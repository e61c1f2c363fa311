"""Time in epoch milliseconds, in one home: the API's ISO-8601 text (the one parse the walker
and the flatten share, so a keyset bound and a stored `created_at` can never disagree by a
rounding), the manifests' text, and the times and durations users type (`90d`, `2026-01-31`)."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta

import pyarrow as pa

from pipeline.errors import UsageError

MS_PER_DAY = 86_400_000
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)


def parse_timestamp_ms(text: str) -> int:
    """ISO-8601 text to epoch milliseconds (UTC when no offset is given; sub-ms floored)."""
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return (parsed - _EPOCH) // _ONE_MS


def format_timestamp_ms(epoch_ms: int) -> str:
    """Epoch milliseconds as the API writes timestamps (`2026-11-29T18:20:57.123Z`), exactly
    (no float on the way); OverflowError outside the years 0001-9999."""
    moment = _EPOCH + timedelta(milliseconds=epoch_ms)
    return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso_ms(epoch_ms: int | None) -> str | None:
    """`format_timestamp_ms`, with None for no time (an open window's start)."""
    return None if epoch_ms is None else format_timestamp_ms(epoch_ms)


UTC_MS = pa.timestamp("ms", tz="UTC")  # how every timestamp column is stored


def parse_timestamps_ms(texts: list[str]) -> list[int] | None:
    """Many ISO-8601 texts at once with Arrow's cast (the flatten's fast path), or None when
    Arrow refuses any of them: the caller then takes `parse_timestamp_ms` one by one, as
    the flatten does."""
    try:
        return pa.array(texts, pa.string()).cast(UTC_MS).cast(pa.int64()).to_pylist()
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
        return None


DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": MS_PER_DAY, "w": 7 * MS_PER_DAY}


def parse_duration_ms(text: str, what: str) -> int:
    """A duration such as `15m`, `6h` or `90d` in milliseconds; `what` names it in the error."""
    match = DURATION.match(str(text))
    if not match:
        raise UsageError(f"{what} must be a duration like 15m, 6h or 90d, got {text!r}")
    return int(match.group(1)) * _UNIT_MS[match.group(2)]


def parse_time_ms(text: str, what: str, now_ms: int) -> int:
    """ISO-8601 date or datetime (UTC unless an offset is given), or a duration back from now."""
    if DURATION.match(text):
        return now_ms - parse_duration_ms(text, what)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(
            f"{what} {text!r} is not a time: use 2026-01-31, 2026-01-31T12:00:00Z or 90d"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - _EPOCH) // _ONE_MS
