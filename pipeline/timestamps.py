"""ISO-8601 text to epoch milliseconds: the one parse the walker and the flatten share, so
a keyset bound and a stored `created_at` can never disagree by a rounding."""

from __future__ import annotations

from datetime import UTC, datetime

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def parse_timestamp_ms(text: str) -> int:
    """ISO-8601 text to epoch milliseconds (UTC when no offset is given; sub-ms floored)."""
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    delta = parsed - _EPOCH
    return delta.days * 86_400_000 + delta.seconds * 1000 + delta.microseconds // 1000
