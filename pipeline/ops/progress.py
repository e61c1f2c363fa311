"""Progress of long work: a bar on a terminal, periodic structured log lines elsewhere."""

from __future__ import annotations

import logging
import sys
import time
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from tqdm import tqdm

log = logging.getLogger("pipeline.ops.progress")

LOG_EVERY_S = 10.0


class BackfillProgress:
    """Called by the backfill's main thread about twice a second with the run itself."""

    def __init__(self, interactive: bool | None = None) -> None:
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self._bar: tqdm | None = None
        self._started = time.monotonic()
        self._last_log = self._started - LOG_EVERY_S  # the first call logs at once
        self._last_run: Any = None

    def __call__(self, run: Any, final: bool = False) -> None:
        self._last_run = run
        snap = run.snapshot()
        if not snap:
            return
        stats = run.client.stats
        elapsed = max(1e-6, time.monotonic() - self._started)
        rate = stats.requests / elapsed
        covered = snap["covered"]
        eta = elapsed * (1 - covered) / covered if covered > 0 else None
        if self.interactive:
            if self._bar is None:
                from tqdm import tqdm  # only where a bar is shown: ~20 ms of startup

                self._bar = tqdm(
                    total=1000,
                    unit="‰",
                    desc="backfill",
                    file=sys.stderr,
                    bar_format="{desc} {percentage:3.0f}%|{bar}| {postfix}",
                )
            self._bar.n = int(covered * 1000)
            self._bar.set_postfix_str(
                f"windows {snap['windows_done']}/{snap['windows']}, {snap['sessions']} sessions, "
                f"{rate:.1f} req/s, {stats.rate_limited} 429s, ETA {_eta(eta)}",
                refresh=True,
            )
        elif final or time.monotonic() - self._last_log >= LOG_EVERY_S:
            self._last_log = time.monotonic()
            log.info(
                "backfill %.0f%% covered: %d/%d windows, %d sessions, %.1f req/s, %d 429s, ETA %s",
                covered * 100,
                snap["windows_done"],
                snap["windows"],
                snap["sessions"],
                rate,
                stats.rate_limited,
                _eta(eta),
                extra={
                    "fields": {
                        "covered": round(covered, 4),
                        "windows_done": snap["windows_done"],
                        "windows": snap["windows"],
                        "sessions": snap["sessions"],
                        "requests_per_s": round(rate, 2),
                        "rate_limited": stats.rate_limited,
                        "eta_s": None if eta is None else round(eta),
                    }
                },
            )

    def close(self) -> None:
        if self._last_run is not None and not self.interactive:
            self(self._last_run, final=True)
        if self._bar is not None:
            self._bar.close()


def _eta(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class RunProgressDisplay:
    """Progress of `run`: a live counter on a terminal, a log line every 10 s elsewhere.

    The listing has no total, so it shows what has been done: pages, sessions, requests.
    """

    def __init__(self, interactive: bool | None = None) -> None:
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self._bar: tqdm | None = None
        self._started = time.monotonic()
        self._last_log = self._started

    def __call__(self, part: str, pages: int, sessions: int, requests: int) -> None:
        elapsed = max(1e-6, time.monotonic() - self._started)
        if self.interactive:
            if self._bar is None:
                from tqdm import tqdm

                self._bar = tqdm(unit=" pages", desc="export", file=sys.stderr, leave=False)
            self._bar.n = pages
            self._bar.set_postfix_str(
                f"{part}: {sessions} sessions, {requests} requests, {requests / elapsed:.1f} req/s",
                refresh=True,
            )
        elif time.monotonic() - self._last_log >= LOG_EVERY_S:
            self._last_log = time.monotonic()
            log.info(
                "run progress (%s): %d pages, %d sessions, %d requests",
                part,
                pages,
                sessions,
                requests,
                extra={
                    "fields": {
                        "part": part,
                        "pages": pages,
                        "sessions": sessions,
                        "requests": requests,
                    }
                },
            )

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
