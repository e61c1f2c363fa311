"""Validation issues shaped like upstream's zod issues: `{code, message, path}`."""

from __future__ import annotations

import math
import re
from typing import Any

Issue = dict[str, Any]

_DECIMAL = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_RADIX = {"0x": 16, "0o": 8, "0b": 2}


class ValidationFailed(Exception):
    """Raised with every issue found, so one 400 reports them all."""

    def __init__(self, issues: list[Issue]) -> None:
        super().__init__("; ".join(issue["message"] for issue in issues))
        self.issues = issues


def issue(code: str, message: str, path: list[str | int]) -> Issue:
    return {"code": code, "message": message, "path": path}


def js_number(text: str) -> float:
    """`Number(text)` as JavaScript computes it, since upstream coerces query values so."""
    stripped = text.strip()
    if not stripped:
        return 0.0
    if _DECIMAL.fullmatch(stripped):
        return float(stripped)
    if stripped in ("Infinity", "+Infinity"):
        return math.inf
    if stripped == "-Infinity":
        return -math.inf
    radix = _RADIX.get(stripped[:2].lower())
    if radix is not None:
        try:
            return float(int(stripped[2:], radix))
        except ValueError:
            return math.nan
    return math.nan


def coerce_int(text: str, path: list[str | int], issues: list[Issue]) -> int | None:
    """An integer as `z.coerce.number().int()` accepts it, or None with an issue recorded."""
    number = js_number(text)
    if math.isnan(number):
        issues.append(issue("invalid_type", "Expected number, received nan", path))
        return None
    if not math.isfinite(number) or not number.is_integer():
        issues.append(issue("invalid_type", "Expected integer, received float", path))
        return None
    return int(number)
