"""The list endpoint's query string, validated the way upstream validates it."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import parse_qsl

from pipeline.emulator.issues import Issue, ValidationFailed, coerce_int, issue

DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
STATUSES = ("ACTIVE", "CLOSED", "EXPIRED")

_PERIOD = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d|w|y)\s*")
_PERIOD_UNIT_MS = {
    "ms": 1,
    "s": 1000,
    "m": 60_000,
    "h": 3_600_000,
    "d": 86_400_000,
    "w": 604_800_000,
    "y": 31_557_600_000,
}


@dataclass(frozen=True)
class ListQuery:
    """One validated `GET /api/v1/sessions` request; None means "not filtered"."""

    size: int = DEFAULT_PAGE_SIZE
    after: str | None = None
    before: str | None = None
    type: str | None = None
    task_identifier: str | None = None
    tag: str | None = None
    external_id: str | None = None
    status: str | None = None
    created_from_ms: int | None = None
    created_to_ms: int | None = None
    period_ms: int | None = None


def query_params(raw: bytes) -> dict[str, str]:
    """Decode a query string; a repeated key keeps its last value, as upstream does."""
    return dict(parse_qsl(raw.decode("utf-8", "replace"), keep_blank_values=True))


def parse_list_query(params: Mapping[str, str]) -> ListQuery:
    """Validate; raises ValidationFailed listing every problem. Unknown keys are dropped."""
    issues: list[Issue] = []
    size = _page_size(params.get("page[size]"), issues)
    # An empty cursor is falsy upstream, so it means "no cursor".
    after = params.get("page[after]") or None
    before = params.get("page[before]") or None
    if after is not None and before is not None:
        issues.append(issue("custom", "Cannot specify both page[after] and page[before]", ["page"]))
    status = params.get("filter[status]")
    if status is not None and status not in STATUSES:
        expected = " | ".join(f"'{name}'" for name in STATUSES)
        issues.append(
            issue(
                "invalid_enum_value",
                f"Invalid enum value. Expected {expected}, received '{status}'",
                ["filter", "status"],
            )
        )
    created_from = _epoch_ms(params.get("filter[createdAt][from]"), "from", issues)
    created_to = _epoch_ms(params.get("filter[createdAt][to]"), "to", issues)
    if issues:
        raise ValidationFailed(issues)
    return ListQuery(
        size=size,
        after=after,
        before=before,
        type=params.get("filter[type]"),
        task_identifier=params.get("filter[taskIdentifier]"),
        tag=params.get("filter[tags]"),
        # Upstream tests `if (externalId)`: an empty value filters nothing.
        external_id=params.get("filter[externalId]") or None,
        status=status,
        created_from_ms=created_from,
        created_to_ms=created_to,
        period_ms=parse_period(params.get("filter[createdAt][period]")),
    )


def _page_size(raw: str | None, issues: list[Issue]) -> int:
    if raw is None:
        return DEFAULT_PAGE_SIZE
    path: list[str | int] = ["page", "size"]
    size = coerce_int(raw, path, issues)
    if size is None:
        return DEFAULT_PAGE_SIZE
    if size < 1:
        issues.append(issue("too_small", "Number must be greater than or equal to 1", path))
    elif size > MAX_PAGE_SIZE:
        issues.append(
            issue("too_big", f"Number must be less than or equal to {MAX_PAGE_SIZE}", path)
        )
    return size


def _epoch_ms(raw: str | None, bound: str, issues: list[Issue]) -> int | None:
    if raw is None:
        return None
    value = coerce_int(raw, ["filter", "createdAt", bound], issues)
    return value or None  # upstream tests `if (from)`: 0 means "no bound"


def parse_period(raw: str | None) -> int | None:
    """`1d`, `6h`, `30m`, `2w`... in ms; anything unparseable (or zero) is ignored."""
    if not raw:
        return None
    match = _PERIOD.fullmatch(raw)
    if match is None:
        return None
    return int(float(match.group(1)) * _PERIOD_UNIT_MS[match.group(2)]) or None
