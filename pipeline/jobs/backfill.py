"""`backfill`: one createdAt range, split into windows walked concurrently, resumable.

A cursor walk has one request in flight; with real network latency it runs far below the
API's limit. The range is cut into windows (epoch-ms bounds, both inclusive, neither
overlapping nor leaving gaps) that worker threads walk at once, all through one client and
so one rate limiter. When a worker runs out of windows it splits the unfinished part of the
largest running one (`WindowScheduler`), so no window is left walking alone at the end.
Each window is an exact keyset walk (`pipeline.api.walker`) through the job core's loop
(`drain`), writes only versions the dataset does not hold yet, and checkpoints its walk's
state in `_state/backfill-<key>.json` (`pipeline.store.state.BackfillState`); running the
same command again resumes only what is unfinished. The incremental checkpoint is never
touched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from pipeline.api.client import TriggerClient
from pipeline.api.walker import WalkedPage, WalkState
from pipeline.errors import UsageError
from pipeline.jobs.core import (
    Clock,
    Flushed,
    FlushingWriter,
    RowPreparer,
    RunSummary,
    batch_stream,
    drain,
    finish_report,
    listing_for,
    new_run_id,
    request_counts,
    wall_clock_ms,
)
from pipeline.jobs.enrich import TriggerConfigFiller
from pipeline.jobs.target import DatasetTarget, ParquetTarget
from pipeline.store.lock import lock_holder
from pipeline.store.state import (
    BackfillState,
    BackfillStateStore,
    Counters,
    Window,
    WindowProgress,
)
from pipeline.store.storage import Storage
from pipeline.timestamps import iso_ms

log = logging.getLogger(__name__)

MIN_SPLIT_MS = 1000  # never split a remaining range narrower than this
MIN_SPLIT_ROWS = 500  # nor one expected to hold fewer rows: each window ends on a short page
WINDOWS_PER_WORKER = 1


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


class WindowScheduler:
    """Which window a worker walks next, and the state's bookkeeping as windows are walked,
    split and flushed: every change happens under one lock; splits and flushes are saved at
    once (how far a walker has read is saved with them)."""

    def __init__(self, state: BackfillState, save: Callable[[BackfillState], None]) -> None:
        self.state = state
        self._save = save
        self._lock = threading.Condition()
        self._active: set[int] = set()
        self.failure: BaseException | None = None
        self.rows_seen = 0  # rows walked in this process, flushed or not (for progress)

    def take(self) -> WindowProgress | None:
        """The next window to walk: a pending one, else half of the largest running one;
        None once every window is done (or a worker failed)."""
        with self._lock:
            while self.failure is None:
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

    def release(self, window: WindowProgress) -> None:
        with self._lock:
            self._active.discard(window.wid)
            self._lock.notify_all()

    def fail(self, error: BaseException) -> None:
        """Stop every worker; the first error is the run's."""
        with self._lock:
            if self.failure is None:
                self.failure = error
            self._lock.notify_all()

    def _split_largest(self) -> WindowProgress | None:
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
        self._save(self.state)
        log.debug(
            "split window %d: new window %d takes %s .. %s",
            best.wid,
            fresh.wid,
            iso_ms(low),
            iso_ms(cut),
        )
        return fresh

    def floor(self, window: WindowProgress) -> int:
        """The window's lower bound now (it rises when the window is split)."""
        with self._lock:
            return window.from_ms

    def fetched(self, window: WindowProgress, page: WalkedPage) -> None:
        """On the walking thread: how far the window is walked, for splits (a split cuts
        below what the walk has fetched, so no request is made twice)."""
        created = page.created
        with self._lock:
            if created:
                window.oldest_seen_ms = min(created)
            window.walked_rows += len(created)

    def walked(
        self, window: WindowProgress, batch: list[WalkedPage]
    ) -> tuple[list[WalkedPage], bool]:
        """The part of a walked batch inside the window, and whether the window ends with it
        (a split may have raised the window's floor after the walk fetched these pages)."""
        kept: list[WalkedPage] = []
        with self._lock:
            for page in batch:
                ended = False
                if any(ms < window.from_ms for ms in page.created):
                    page = page.since(window.from_ms)
                    ended = True  # the rest belongs to a split-off window
                if page.state.to_ms is not None and page.state.to_ms < window.from_ms:
                    ended = True
                self.rows_seen += page.count
                kept.append(page)
                if ended:
                    return kept, True
        return kept, False

    def flushed(self, window: WindowProgress, flushed: Flushed, walk: WalkState | None) -> None:
        """After a window's flush: record its files and walk (None: the window is done)."""
        with self._lock:
            window.walked = window.walked.after_flush(
                flushed.seq, flushed.files, flushed.counts, None if walk is None else walk.to_dict()
            )
            self._save(self.state)

    def save(self) -> None:
        with self._lock:
            self._save(self.state)

    def complete(self) -> None:
        with self._lock:
            self.state.complete = True
            self._save(self.state)

    def snapshot(self) -> dict[str, float]:
        """Counters for a progress display: windows, sessions, coverage of the range."""
        state = self.state
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


Progress = Callable[["BackfillRun"], None]


class BackfillRun:
    """`sessions-export backfill`: resume the same command's unfinished windows, else plan
    new ones; walk them on `concurrency` threads; report the run."""

    mode = "backfill"

    def __init__(
        self,
        client: TriggerClient,
        output: Storage,
        state_storage: Storage,
        options: BackfillOptions,
        clock: Clock = wall_clock_ms,
        on_progress: Progress | None = None,
        target: DatasetTarget | None = None,
    ) -> None:
        self.client = client
        self.output = output
        self.target = target or ParquetTarget(output)
        self.options = options
        self.clock = clock
        self.on_progress = on_progress
        basis = options.range_basis or f"{options.since_ms}..{options.until_ms}"
        self.key = backfill_key(basis, options.filters)
        self.store = BackfillStateStore(state_storage, self.key)
        self.scheduler: WindowScheduler | None = None
        self.started = time.monotonic()
        self.resumed = False
        self.filler: TriggerConfigFiller | None = None

    def execute(self) -> RunSummary:
        with self.store.lock(lock_holder()):
            if self.options.enrich_trigger_config:
                self.filler = TriggerConfigFiller(self.client, self.options.enrich_concurrency)
            try:
                return self._execute()
            finally:
                if self.filler is not None:
                    self.filler.close()

    def _execute(self) -> RunSummary:
        state = self._state()
        # requests are counted for the whole run: those of earlier attempts, then the client's
        counted_before, stats_at_start = state.requests, request_counts(self.client.stats)

        def save(state: BackfillState) -> None:
            state.requests = counted_before + request_counts(self.client.stats) - stats_at_start
            self.store.save(state)

        scheduler = self.scheduler = WindowScheduler(state, save)
        self._run_workers(scheduler)
        if scheduler.failure is not None:
            scheduler.save()
            raise scheduler.failure
        scheduler.complete()
        return self._finish(state)

    def _state(self) -> BackfillState:
        """The state to go on from: the same command's, unless it completed or a restart
        was asked for."""
        state = self.store.load()
        if state is not None and state.complete and not self.options.restart:
            raise UsageError(
                f"this backfill ({iso_ms(state.since_ms)} .. {iso_ms(state.until_ms)}) already "
                f"completed as run {state.run_id}; pass --restart to export the range again"
            )
        if state is None or self.options.restart:
            if state is not None and self.target.run_tagged_commits:
                self.target.begin(state.run_id, state.files(), resumed=True)
            state = self._new_state()
            if self.target.run_tagged_commits:
                self.store.save(state)
            self.target.begin(state.run_id, [], resumed=False)
            return state
        self.resumed = True
        self.target.begin(state.run_id, state.files(), resumed=True)
        left = sum(1 for w in state.windows if not w.done)
        log.info(
            "resuming backfill %s: %d of %d windows unfinished",
            state.run_id,
            left,
            len(state.windows),
        )
        return state

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

    # -- threads ---------------------------------------------------------------------

    def _run_workers(self, scheduler: WindowScheduler) -> None:
        """Walk windows on `concurrency` threads until none is left; report progress."""
        workers = [
            threading.Thread(
                target=self._worker, args=(scheduler,), name=f"window-{n}", daemon=True
            )
            for n in range(self.options.concurrency)
        ]
        for worker in workers:
            worker.start()
        while any(w.is_alive() for w in workers):
            for worker in workers:
                worker.join(timeout=0.5)
            if self.on_progress is not None:
                self.on_progress(self)

    def _worker(self, scheduler: WindowScheduler) -> None:
        try:
            while True:
                window = scheduler.take()
                if window is None:
                    return
                try:
                    self._walk(scheduler, window)
                finally:
                    scheduler.release(window)
        except BaseException as error:  # handed to the main thread
            scheduler.fail(error)

    # -- walking ---------------------------------------------------------------------

    def _walk(self, scheduler: WindowScheduler, window: WindowProgress) -> None:
        """Walk one window from where its last flush left it, through the job core."""
        state = scheduler.state
        concurrency = self.options.concurrency
        writer = FlushingWriter(
            self.target.sink(
                f"{state.run_id}-w{window.wid:04d}",
                max(1000, self.options.flush_rows // concurrency),
                self.options.flush_bytes // concurrency,
            ),
            lambda flushed, walk: scheduler.flushed(window, flushed, walk),
            first_seq=window.walked.flush_seq,
        )
        bounds = Window(window.from_ms, window.to_ms)
        known = self.target.known(bounds, state.run_id, share=concurrency)
        resume = WalkState.from_dict(window.walked.walk) if window.walked.walk else None
        stream = batch_stream(
            self.client,
            listing_for(bounds, state.filters),
            resume,
            floor=lambda: scheduler.floor(window),
            flush_rows=writer.sink.flush_rows,
            on_page=lambda page: scheduler.fetched(window, page),
            ahead_rows=self.target.ahead_rows(writer.sink.flush_rows),
        )
        drain(
            stream,
            RowPreparer(self.filler),
            writer,
            state.run_id,
            known,
            resumable=True,
            remember=False,  # the keyset walk never returns a row twice
            narrow=lambda batch: scheduler.walked(window, batch),
            stopped=lambda: scheduler.failure is not None,
        )

    # -- the report ------------------------------------------------------------------

    def _finish(self, state: BackfillState) -> RunSummary:
        fetches = self.filler.single_fetches if self.filler else 0
        return finish_report(
            self.output,
            branch=self.client.branch,
            run_id=state.run_id,
            mode=self.mode,
            window=Window(state.since_ms, state.until_ms),
            filters=state.filters,
            started_at_ms=state.started_at_ms,
            finished_ms=self.clock(),
            totals=self.target.settle(state.totals() + Counters(single_fetches=fetches)),
            files=state.files(),
            partitions=self.target.partitions(state.files()),
            resumed=int(self.resumed),
            high_water_ms=None,
            extra={
                "windows": len(state.windows),
                "concurrency": self.options.concurrency,
                "trigger_config": {"single_fetches": fetches},
            },
            seconds=time.monotonic() - self.started,
        )

    def snapshot(self) -> dict[str, float]:
        """Counters for a progress display: windows, sessions, coverage of the range."""
        return {} if self.scheduler is None else self.scheduler.snapshot()
