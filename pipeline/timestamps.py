"""ISO-8601 text to epoch milliseconds: the one parse the walker and the flatten share, so
a keyset bound and a stored `created_at` can never disagree by a rounding."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pyarrow as pa

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


UTC_MS = pa.timestamp("ms", tz="UTC")  # how every timestamp column is stored


def parse_timestamps_ms(texts: list[str]) -> list[int] | None:
    """Many ISO-8601 texts at once with Arrow's cast (the flatten's fast path), or None when
    Arrow refuses any of them: the caller then takes `parse_timestamp_ms` one by one, as
    the flatten does."""
    try:
        return pa.array(texts, pa.string()).cast(UTC_MS).cast(pa.int64()).to_pylist()
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError):
        return None
