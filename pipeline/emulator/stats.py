"""Counters of what the emulator served, for tests and benchmarks to read back."""

from __future__ import annotations

from collections import Counter
from typing import Any


class EmulatorStats:
    """Only the event loop writes these; `/_emulator/stats` reads them on the same loop."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.by_kind: Counter[str] = Counter()
        self.by_status: Counter[int] = Counter()
        self.rate_limited = 0
        self.faults: Counter[str] = Counter()
        self.by_branch: Counter[str] = Counter()  # x-trigger-branch of /api/ requests; "" none

    def snapshot(self) -> dict[str, Any]:
        return {
            "requests": self.requests,
            "by_kind": dict(self.by_kind),
            "by_status": {str(status): count for status, count in sorted(self.by_status.items())},
            "rate_limited": self.rate_limited,
            "faults": dict(self.faults),
            "by_branch": dict(self.by_branch),
        }
