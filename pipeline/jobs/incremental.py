"""`sessions-export run`: the incremental export, from checkpoint to manifest.

A run is three listings through the job core (`jobs.core`):

1. the window: every session created since the high-water mark minus the lookback (or the
   longer rescan), checkpointed after every flush with the walk's state, resumable exactly;
2. and 3., change capture (`jobs.capture`): the ACTIVE listing and the departed sessions.

Only versions the dataset does not hold yet are written.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.api.client import TriggerClient
from pipeline.api.walker import WalkState
from pipeline.dataset.layout import version_keys
from pipeline.dataset.sink import ParquetSink
from pipeline.jobs.capture import ChangeCapture, PartCost, active_rows, live_mask
from pipeline.jobs.core import (
    Clock,
    Flushed,
    FlushingWriter,
    KnownVersions,
    Prepared,
    RowPreparer,
    Rows,
    RunSummary,
    RunTotals,
    batch_stream,
    finish_report,
    listing_for,
    new_run_id,
    wall_clock_ms,
)
from pipeline.jobs.enrich import TriggerConfigFiller
from pipeline.store.lock import lock_holder
from pipeline.store.state import (
    ACTIVE_SCHEMA,
    ActiveSetBuilder,
    Checkpoint,
    RunProgress,
    StateStore,
    Window,
)
from pipeline.store.storage import Storage
from pipeline.timestamps import iso_ms

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    """What one `run` is asked to do; built from `Settings` (`config.settings_for`), whose
    options declare the defaults."""

    filters: dict[str, str]
    lookback_ms: int
    rescan_ms: int
    track_active: bool
    enrich_trigger_config: bool
    enrich_concurrency: int
    flush_rows: int
    flush_bytes: int
    full_refresh: bool


def plan_window(checkpoint: Checkpoint, now_ms: int, reread_ms: int, full: bool) -> Window:
    """The createdAt window of a new incremental run."""
    if full or checkpoint.high_water_ms is None:
        return Window(None, now_ms)
    return Window(max(1, checkpoint.high_water_ms - reread_ms), now_ms)


class IncrementalRun:
    """`sessions-export run`: resume an interrupted run, else export what is new or changed."""

    mode = "incremental"

    def __init__(
        self,
        client: TriggerClient,
        output: Storage,
        state: StateStore,
        options: RunOptions,
        clock: Clock = wall_clock_ms,
        on_progress: Callable[[str, int, int, int], None] | None = None,
    ) -> None:
        self.client = client
        self.output = output
        self.state = state
        self.options = options
        self.clock = clock
        self.on_progress = on_progress
        self.window_cost = PartCost()
        self.filler: TriggerConfigFiller | None = None
        self.rows = RowPreparer(None)
        # versions the window walk met of sessions parts 2 and 3 may meet again (live now,
        # or live at the last run): bounded by the active set, unlike all the run's versions
        self._met_keys: list[pa.Array] = []
        self._live = ActiveSetBuilder()  # live sessions the window walk met
        self._previous_active = ACTIVE_SCHEMA.empty_table()
        self._part = "window"
        self._max_created: int | None = None
        self.progress: RunProgress | None = None
        self.checkpoint = Checkpoint()

    def execute(self) -> RunSummary:
        with self.state.lock(lock_holder()):
            return self._execute()

    def _execute(self) -> RunSummary:
        started = time.monotonic()
        checkpoint = self.checkpoint = self.state.load()
        progress = checkpoint.in_progress
        resumed = progress is not None and progress.mode == self.mode
        if progress is not None and resumed:
            log.info(
                "resuming run %s after flush %d (%d sessions so far)",
                progress.run_id,
                progress.flush_seq,
                progress.rows,
            )
            if progress.filters != self.options.filters:
                log.warning(
                    "the interrupted run used filters %s; finishing it with those", progress.filters
                )
            progress = replace(progress, resumed=progress.resumed + 1)
        else:
            now = self.clock()
            reread = max(self.options.lookback_ms, self.options.rescan_ms)
            window = plan_window(checkpoint, now, reread, self.options.full_refresh)
            progress = RunProgress(
                run_id=new_run_id(now),
                mode=self.mode,
                window=window,
                filters=dict(self.options.filters),
                started_at_ms=now,
            )
            log.info(
                "starting run %s for sessions created %s .. %s",
                progress.run_id,
                iso_ms(window.from_ms) or "at any time",
                iso_ms(window.to_ms),
            )
        self.progress = progress
        self._max_created = progress.max_created_ms
        if self.options.enrich_trigger_config:
            self.filler = TriggerConfigFiller(self.client, self.options.enrich_concurrency)
        self.rows = RowPreparer(self.filler)
        if self._captures_changes(progress):
            self._previous_active = self.state.load_active()
        start_pages, start_rows = progress.pages, progress.rows
        writer = FlushingWriter(
            ParquetSink(
                self.output, progress.run_id, self.options.flush_rows, self.options.flush_bytes
            ),
            self._checkpoint,
            first_seq=progress.flush_seq,
            stats=self.client.stats,
            on_rows=lambda pages, rows: self._report_progress(
                start_pages + pages, start_rows + rows
            ),
        )
        capture: ChangeCapture | None = None
        active: ActiveSetBuilder | None = None
        try:
            # nothing is saved before the first flush: a run that fails early leaves no trace
            whole_history = progress.window.from_ms is None and progress.walk is None
            if not progress.walk_complete:
                self._walk_window(writer, whole_history)
            if self._captures_changes(self.progress):
                if whole_history and not progress.walk_complete:
                    # a walk of the whole history met every live session in its current state
                    active = self._live
                else:
                    self._part = "changes"
                    capture = ChangeCapture(
                        self.client,
                        self.output,
                        self.rows,
                        self._previous_active,
                        self.options.enrich_concurrency,
                    )
                    active = capture.run(
                        writer, self._capture_known(), self.progress.filters, self.progress.run_id
                    )
                writer.commit(None)
            return self._finish(active, capture, time.monotonic() - started, resumed)
        finally:
            self._live.discard()
            if active is not None:
                active.discard()
            if self.filler is not None:
                self.filler.close()

    def _captures_changes(self, progress: RunProgress) -> bool:
        return self.options.track_active and "status" not in progress.filters

    def _report_progress(self, pages: int, rows: int) -> None:
        if self.on_progress is not None:
            self.on_progress(self._part, pages, rows, self.client.stats.requests)

    # -- part 1: the window ------------------------------------------------------------

    def _walk_window(self, writer: FlushingWriter, whole_history: bool) -> None:
        progress = self.progress
        assert progress is not None
        # a re-read window (lookback, rescan, full refresh) writes only versions not stored yet
        known = KnownVersions.stored(self.output, progress.window, progress.run_id)
        now = self.clock()
        capture = self._captures_changes(progress)
        watched = set(self._previous_active["id"].to_pylist()) if capture else set()
        resume = WalkState.from_dict(progress.walk) if progress.walk else None
        cost = self.window_cost
        listing = listing_for(progress.window, progress.filters)
        for batch in batch_stream(self.client, listing, resume, self.options.flush_rows):
            cost.pages += len(batch)
            writer.page(len(batch))
            # the keyset walk never returns a row twice, so `known` need not learn the window's
            prepared = self.rows.prepare(
                Rows.of_pages(batch), progress.run_id, known, remember=False
            )
            listed = prepared.listed
            if listed.num_rows:
                newest = pc.max(listed["created_at"]).value
                self._max_created = max(self._max_created or newest, newest)
            if capture and listed.num_rows:
                live = live_mask(listed, now)
                self._live.add(active_rows(listed.filter(live)))
                if not whole_history:  # else parts 2 and 3 are skipped: no keys needed
                    self._remember_met(prepared, live, watched)
            cost.unchanged += prepared.unchanged
            cost.rows += prepared.written.num_rows
            writer.add(prepared.written, prepared.unchanged)
            state = batch[-1].state
            writer.commit_if_due(None if state.done else state)
        assert self.progress is not None
        if not self.progress.walk_complete:
            writer.commit(None)

    def _remember_met(self, prepared: Prepared, live: pa.Array, watched: set[str]) -> None:
        """Versions of live or watched sessions, listed and written, for parts 2 and 3."""
        listed = prepared.listed
        ids = listed["id"].to_pylist()
        met = pc.or_(live, pa.array([sid in watched for sid in ids]))
        if not pc.any(met).as_py():
            return
        mine = listed.filter(met)
        self._met_keys.append(version_keys(mine).combine_chunks())
        written = prepared.written
        if written is not listed and written.num_rows:
            found = pc.is_in(written["id"], value_set=mine["id"].combine_chunks())
            self._met_keys.append(version_keys(written.filter(found)).combine_chunks())

    def _capture_known(self) -> KnownVersions:
        progress = self.progress
        assert progress is not None
        keys = list(self._met_keys)
        if progress.resumed:
            # versions this run wrote before it was interrupted (their keys were in memory)
            for path in progress.files:
                table = self.output.read_table(path, columns=["id", "updated_at"])
                keys.append(version_keys(table).combine_chunks())
        known = KnownVersions()
        for part in keys:
            known.add(part)
        return known

    # -- the flushes -------------------------------------------------------------------

    def _checkpoint(self, flushed: Flushed, walk: WalkState | None) -> None:
        """Fold a flush into the progress; while the window is walked, save the checkpoint
        (parts 2 and 3 are redone whole after an interruption, so they save nothing)."""
        progress = self.progress
        assert progress is not None
        saving = not progress.walk_complete
        self.progress = progress.after_flush(
            walk=None if walk is None else walk.to_dict(),
            flush_seq=flushed.seq + 1,
            walk_complete=walk is None,
            rows=progress.rows + flushed.rows,
            unchanged=progress.unchanged + flushed.unchanged,
            pages=progress.pages + flushed.pages,
            requests=progress.requests + flushed.requests,
            retries=progress.retries + flushed.retries,
            rate_limited=progress.rate_limited + flushed.rate_limited,
            max_created_ms=self._max_created,
            files=progress.files + flushed.files,
        )
        if saving:
            self.state.save(replace(self.checkpoint, in_progress=self.progress))
        log.info(
            "flush %d: %d files, %d sessions so far, walk at %s",
            flushed.seq,
            len(flushed.files),
            self.progress.rows,
            "end" if walk is None else f"createdAt <= {iso_ms(walk.to_ms)}",
        )

    # -- the report ----------------------------------------------------------------------

    def _finish(
        self,
        active: ActiveSetBuilder | None,
        capture: ChangeCapture | None,
        seconds: float,
        resumed: bool,
    ) -> RunSummary:
        progress = self.progress
        assert progress is not None
        finished = self.clock()
        high_water = self.checkpoint.high_water_ms
        if progress.max_created_ms is not None:
            high_water = max(high_water or 0, progress.max_created_ms)
        fetches = self.filler.single_fetches if self.filler is not None else 0
        costs = {"window": self.window_cost, "active": PartCost(), "departed": PartCost()}
        costs.update(capture.costs if capture else {})
        departed = capture.costs["departed"].single_fetches if capture else 0
        summary = finish_report(
            self.output,
            branch=self.client.branch,
            run_id=progress.run_id,
            mode=progress.mode,
            window=progress.window,
            filters=progress.filters,
            started_at_ms=progress.started_at_ms,
            finished_ms=finished,
            totals=RunTotals(
                rows=progress.rows,
                unchanged=progress.unchanged,
                pages=progress.pages,
                requests=progress.requests,
                retries=progress.retries,
                rate_limited=progress.rate_limited,
                single_fetches=fetches + departed,
            ),
            files=list(progress.files),
            resumed=progress.resumed,
            high_water_ms=high_water,
            extra={
                "parts": {name: vars(cost) for name, cost in costs.items()},
                "trigger_config": {
                    "single_fetches": fetches,
                    "newer_versions": self.filler.newer_versions if self.filler else 0,
                },
                "active_sessions": None if active is None else active.count,
            },
            seconds=seconds,
        )
        if active is not None:
            self.state.save_active(active.finish())
        self.state.save(
            Checkpoint(
                high_water_ms=high_water,
                last_run_id=progress.run_id,
                last_success_ms=finished,
                filters=progress.filters,
                in_progress=None,
                active_sessions=active.count if active is not None else 0,
            )
        )
        return replace(summary, resumed=resumed)
