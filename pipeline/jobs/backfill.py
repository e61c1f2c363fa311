"""`backfill`: one createdAt range, split into windows walked concurrently, resumable.

A cursor walk has one request in flight; with real network latency it runs far below the
API's limit. The range is cut into windows (epoch-ms bounds, both inclusive, neither
overlapping nor leaving gaps) that worker threads walk at once, all through one client and
so one rate limiter. When a worker runs out of windows it splits the unfinished part of the
largest running one, so no window is left walking alone at the end. Each window is an
exact keyset walk (`pipeline.api.walker`) through the job core and checkpoints its walk's
state in `_state/backfill-<key>.json`; running the same command again resumes only what is
unfinished. The incremental checkpoint is never touched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline.api.client import TriggerClient
from pipeline.api.walker import WalkState
from pipeline.dataset.sink import ParquetSink
from pipeline.errors import UsageError
from pipeline.jobs.core import (
    Clock,
    Flushed,
    FlushingWriter,
    RowPreparer,
    Rows,
    RunSummary,
    RunTotals,
    finish_report,
    listing_for,
    new_run_id,
    page_stream,
    wall_clock_ms,
)
from pipeline.jobs.enrich import TriggerConfigFiller
from pipeline.store.lock import lock_holder
from pipeline.store.state import Window
from pipeline.store.storage import Storage
from pipeline.timestamps import iso_ms

log = logging.getLogger(__name__)

MIN_SPLIT_MS = 1000  # never split a remaining range narrower than this
MIN_SPLIT_ROWS = 500  # nor one expected to hold fewer rows: each window ends on a short page
WINDOWS_PER_WORKER = 1


@dataclass
class WindowProgress:
    """One window of the range: its bounds (the lower one may rise when it is split)."""

    wid: int
    from_ms: int
    to_ms: int
    cursor: str | None = None  # before exact walks: ignored now (the window restarts)
    walk: dict[str, Any] | None = None  # the window walk's state (pipeline.api.walker)
    flush_seq: int = 0
    done: bool = False
    rows: int = 0
    pages: int = 0
    files: list[str] = field(default_factory=list)
    oldest_seen_ms: int | None = None  # createdAt of the last row walked so far
    walked_rows: int = 0  # rows walked so far, flushed or not: gives the window's density

    def remaining(self) -> tuple[int, int]:
        """The createdAt range not walked yet (inclusive)."""
        upper = self.to_ms if self.oldest_seen_ms is None else self.oldest_seen_ms
        return self.from_ms, upper

    def expected_remaining_rows(self) -> float | None:
        """Rows still to walk, guessed from the density so far; None before the first page."""
        if self.oldest_seen_ms is None or self.walked_rows == 0:
            return None
        walked_span = max(1, self.to_ms - self.oldest_seen_ms)
        return self.walked_rows * (self.oldest_seen_ms - self.from_ms) / walked_span


@dataclass
class BackfillState:
    key: str
    run_id: str
    since_ms: int
    until_ms: int
    filters: dict[str, str]
    started_at_ms: int
    windows: list[WindowProgress]
    next_wid: int
    complete: bool = False
    requests: int = 0
    retries: int = 0
    rate_limited: int = 0

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    @staticmethod
    def from_json(data: bytes) -> BackfillState:
        raw = json.loads(data)
        raw["windows"] = [WindowProgress(**w) for w in raw["windows"]]
        return BackfillState(**raw)


def backfill_key(range_basis: str, filters: dict[str, str]) -> str:
    """Names a backfill's state: the same command (same range words, same filters) again
    finds it, so `--since 90d` resumes the range it meant the first time."""
    text = json.dumps([range_basis, sorted(filters.items())])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def plan_windows(since_ms: int, until_ms: int, count: int) -> list[tuple[int, int]]:
    """Cut [since, until] (inclusive) into at most `count` adjacent inclusive windows."""
    if until_ms < since_ms:
        raise UsageError("--since must not be after --until")
    span = until_ms - since_ms + 1
    count = max(1, min(count, span))
    bounds = [since_ms + span * i // count for i in range(count + 1)]
    return [(bounds[i], bounds[i + 1] - 1) for i in range(count)]


def split_point(low: int, high: int) -> int | None:
    """Where to cut the inclusive range [low, high] into [low, m] and [m + 1, high]."""
    if high - low + 1 < MIN_SPLIT_MS:
        return None
    return low + (high - low) // 2


@dataclass(frozen=True)
class BackfillOptions:
    """What one `backfill` is asked to do; built from `Settings` (`config.settings_for`),
    whose options declare the defaults."""

    since_ms: int
    until_ms: int
    filters: dict[str, str]
    concurrency: int
    flush_rows: int
    flush_bytes: int
    restart: bool
    enrich_trigger_config: bool
    enrich_concurrency: int
    range_basis: str  # what identifies the range: absolute ms, or the relative words


Progress = Callable[["BackfillRun"], None]


class BackfillRun:
    mode = "backfill"

    def __init__(
        self,
        client: TriggerClient,
        output: Storage,
        state_storage: Storage,
        options: BackfillOptions,
        clock: Clock = wall_clock_ms,
        on_progress: Progress | None = None,
    ) -> None:
        self.client = client
        self.output = output
        self.state_storage = state_storage
        self.options = options
        self.clock = clock
        self.on_progress = on_progress
        basis = options.range_basis or f"{options.since_ms}..{options.until_ms}"
        self.key = backfill_key(basis, options.filters)
        self.state_path = f"backfill-{self.key}.json"
        self._lock = threading.Condition()
        self._active: set[int] = set()
        self._failure: BaseException | None = None
        self.state: BackfillState | None = None
        self.started = time.monotonic()
        self.resumed = False
        self.rows_seen = 0  # rows walked in this process, flushed or not (for progress)
        self.filler: TriggerConfigFiller | None = None

    # -- entry -----------------------------------------------------------------------

    def execute(self) -> RunSummary:
        with self.state_storage.exclusive_lock(f"backfill-{self.key}.lock", lock_holder()):
            if self.options.enrich_trigger_config:
                self.filler = TriggerConfigFiller(self.client, self.options.enrich_concurrency)
            try:
                return self._execute()
            finally:
                if self.filler is not None:
                    self.filler.close()

    def _execute(self) -> RunSummary:
        state = self._load()
        if state is not None and state.complete and not self.options.restart:
            raise UsageError(
                f"this backfill ({iso_ms(state.since_ms)} .. {iso_ms(state.until_ms)}) already "
                f"completed as run {state.run_id}; pass --restart to export the range again"
            )
        if state is None or self.options.restart:
            state = self._new_state()
        else:
            self.resumed = True
            left = sum(1 for w in state.windows if not w.done)
            log.info(
                "resuming backfill %s: %d of %d windows unfinished",
                state.run_id,
                left,
                len(state.windows),
            )
        self.state = state
        base = (
            self.client.stats.requests,
            self.client.stats.retries,
            self.client.stats.rate_limited,
        )
        self._base_counts = (state.requests, state.retries, state.rate_limited)
        self._stats_base = base

        workers = [
            threading.Thread(target=self._worker, name=f"window-{n}", daemon=True)
            for n in range(self.options.concurrency)
        ]
        for worker in workers:
            worker.start()
        while any(w.is_alive() for w in workers):
            for worker in workers:
                worker.join(timeout=0.5)
            if self.on_progress is not None:
                self.on_progress(self)
        if self._failure is not None:
            with self._lock:
                self._save()
            raise self._failure
        return self._finish()

    # -- state -----------------------------------------------------------------------

    def _load(self) -> BackfillState | None:
        data = self.state_storage.read_bytes(self.state_path)
        if data is None:
            return None
        try:
            return BackfillState.from_json(data)
        except (ValueError, TypeError, KeyError) as error:
            raise UsageError(
                f"backfill state {self.state_storage.display(self.state_path)} is unreadable "
                f"({error}); delete it or pass --restart"
            ) from None

    def _new_state(self) -> BackfillState:
        now = self.clock()
        count = self.options.concurrency * WINDOWS_PER_WORKER
        spans = plan_windows(self.options.since_ms, self.options.until_ms, count)
        windows = [WindowProgress(wid, low, high) for wid, (low, high) in enumerate(spans)]
        run_id = new_run_id(now)
        log.info(
            "starting backfill %s of %s .. %s in %d windows, %d at once",
            run_id,
            iso_ms(self.options.since_ms),
            iso_ms(self.options.until_ms),
            len(windows),
            self.options.concurrency,
        )
        return BackfillState(
            self.key,
            run_id,
            self.options.since_ms,
            self.options.until_ms,
            dict(self.options.filters),
            now,
            windows,
            len(windows),
        )

    def _save(self) -> None:
        """Write the whole state; callers hold `self._lock`."""
        assert self.state is not None
        stats = self.client.stats
        self.state.requests = self._base_counts[0] + stats.requests - self._stats_base[0]
        self.state.retries = self._base_counts[1] + stats.retries - self._stats_base[1]
        self.state.rate_limited = self._base_counts[2] + stats.rate_limited - self._stats_base[2]
        self.state_storage.write_bytes(self.state_path, self.state.to_json())

    # -- scheduling ------------------------------------------------------------------

    def _take(self) -> WindowProgress | None:
        """The next window to walk: a pending one, else half of the largest running one."""
        assert self.state is not None
        with self._lock:
            while self._failure is None:
                for window in self.state.windows:
                    if not window.done and window.wid not in self._active:
                        self._active.add(window.wid)
                        return window
                split = self._split_largest()
                if split is not None:
                    self._active.add(split.wid)
                    return split
                if not self._active:
                    return None
                self._lock.wait(timeout=0.5)
            return None

    def _split_largest(self) -> WindowProgress | None:
        assert self.state is not None
        best, best_rows = None, float(MIN_SPLIT_ROWS)
        for window in self.state.windows:
            if window.wid in self._active and not window.done:
                expected = window.expected_remaining_rows()
                if expected is not None and expected >= best_rows:
                    best, best_rows = window, expected
        if best is None:
            return None
        low, high = best.remaining()
        cut = split_point(low, high)
        if cut is None:
            return None
        fresh = WindowProgress(self.state.next_wid, low, cut)
        self.state.next_wid += 1
        best.from_ms = cut + 1  # the running walker stops once its rows pass below this
        self.state.windows.append(fresh)
        self._save()
        log.debug(
            "split window %d: new window %d takes %s .. %s",
            best.wid,
            fresh.wid,
            iso_ms(low),
            iso_ms(cut),
        )
        return fresh

    # -- walking ---------------------------------------------------------------------

    def _worker(self) -> None:
        try:
            while True:
                window = self._take()
                if window is None:
                    return
                try:
                    self._walk(window)
                finally:
                    with self._lock:
                        self._active.discard(window.wid)
                        self._lock.notify_all()
        except BaseException as error:  # noqa: BLE001 - handed to the main thread
            with self._lock:
                if self._failure is None:
                    self._failure = error
                self._lock.notify_all()

    def _walk(self, window: WindowProgress) -> None:
        assert self.state is not None
        per_window_rows = max(1000, self.options.flush_rows // self.options.concurrency)
        writer = FlushingWriter(
            ParquetSink(
                self.output,
                f"{self.state.run_id}-w{window.wid:04d}",
                per_window_rows,
                self.options.flush_bytes // self.options.concurrency,
            ),
            lambda flushed, walk: self._checkpoint(window, flushed, walk),
            first_seq=window.flush_seq,
        )
        preparer = RowPreparer(self.filler)
        listing = listing_for(Window(window.from_ms, window.to_ms), self.state.filters)
        resume = WalkState.from_dict(window.walk) if window.walk else None

        def floor() -> int:
            with self._lock:
                return window.from_ms  # rises when the window is split

        walk = page_stream(self.client, listing, resume, floor)
        try:
            for page in walk:
                if self._failure is not None:
                    return
                finished = page.state.done
                # one critical section: a split must see these rows as walked, or it would
                # hand part of them to a new window as well
                with self._lock:
                    if any(ms < window.from_ms for ms in page.created):
                        page = page.since(window.from_ms)
                        finished = True  # the rest belongs to a split-off window
                    if page.state.to_ms is not None and page.state.to_ms < window.from_ms:
                        finished = True
                    if page.created:
                        window.oldest_seen_ms = min(page.created)
                    window.walked_rows += page.count
                    self.rows_seen += page.count
                prepared = preparer.prepare(Rows.of_pages([page]), self.state.run_id, None)
                writer.page()
                writer.add(prepared.written)
                if finished:
                    writer.commit(None)
                    return
                writer.commit_if_due(page.state)
            writer.commit(None)  # the walk ended below the window
        finally:
            walk.close()

    def _checkpoint(self, window: WindowProgress, flushed: Flushed, walk: WalkState | None) -> None:
        """After a window's flush: record its files and walk (None: the window is done)."""
        with self._lock:
            window.flush_seq = flushed.seq + 1
            window.walk = None if walk is None else walk.to_dict()
            window.done = walk is None
            window.rows += flushed.rows
            window.pages += flushed.pages
            window.files.extend(flushed.files)
            self._save()

    # -- the end ---------------------------------------------------------------------

    def _finish(self) -> RunSummary:
        state = self.state
        assert state is not None
        finished = self.clock()
        with self._lock:
            state.complete = True
            self._save()
        fetches = self.filler.single_fetches if self.filler else 0
        return finish_report(
            self.output,
            branch=self.client.branch,
            run_id=state.run_id,
            mode=self.mode,
            window=Window(state.since_ms, state.until_ms),
            filters=state.filters,
            started_at_ms=state.started_at_ms,
            finished_ms=finished,
            totals=RunTotals(
                rows=sum(w.rows for w in state.windows),
                unchanged=0,
                pages=sum(w.pages for w in state.windows),
                requests=state.requests,
                retries=state.retries,
                rate_limited=state.rate_limited,
                single_fetches=fetches,
            ),
            files=[path for w in state.windows for path in w.files],
            resumed=int(self.resumed),
            high_water_ms=None,
            extra={
                "windows": len(state.windows),
                "concurrency": self.options.concurrency,
                "trigger_config": {"single_fetches": fetches},
            },
            seconds=time.monotonic() - self.started,
        )

    # -- progress --------------------------------------------------------------------

    def snapshot(self) -> dict[str, float]:
        """Counters for a progress display: windows, sessions, coverage of the range."""
        state = self.state
        if state is None:
            return {}
        with self._lock:
            total = state.until_ms - state.since_ms + 1
            left = 0
            for window in state.windows:
                if not window.done:
                    low, high = window.remaining()
                    left += max(0, high - low + 1)
            return {
                "windows_done": sum(1 for w in state.windows if w.done),
                "windows": len(state.windows),
                "sessions": self.rows_seen,
                "covered": 1 - left / total if total else 1.0,
            }
