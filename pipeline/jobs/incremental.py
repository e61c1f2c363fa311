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
from dataclasses import dataclass, field, replace

import pyarrow as pa
import pyarrow.compute as pc

from pipeline.api.client import TriggerClient
from pipeline.api.walker import WalkState
from pipeline.dataset.layout import version_keys
from pipeline.jobs.capture import ChangeCapture, PartCost, active_rows, live_mask
from pipeline.jobs.core import (
    Clock,
    Flushed,
    FlushingWriter,
    KnownVersions,
    Prepared,
    RowPreparer,
    RunSummary,
    batch_stream,
    drain,
    finish_report,
    listing_for,
    new_run_id,
    wall_clock_ms,
)
from pipeline.jobs.enrich import TriggerConfigFiller
from pipeline.jobs.target import DatasetTarget, ParquetTarget
from pipeline.store.lock import lock_holder
from pipeline.store.state import (
    ACTIVE_SCHEMA,
    ActiveSetBuilder,
    Checkpoint,
    Counters,
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


@dataclass
class RunContext:
    """One execution of a run: the checkpoint it started from, its progress (folded after
    every flush), and what the window walk collects for parts 2 and 3."""

    checkpoint: Checkpoint
    progress: RunProgress
    resumed: bool  # this execution continues an interrupted run
    captures_changes: bool  # parts 2 and 3 run (no status filter, active set tracked)
    filler: TriggerConfigFiller | None
    preparer: RowPreparer
    previous_active: pa.Table  # the sessions ACTIVE at the last run
    part: str = "window"  # which part is walked, for the progress display
    window_cost: PartCost = PartCost()
    max_created: int | None = None
    live: ActiveSetBuilder = field(default_factory=ActiveSetBuilder)  # met by the window walk
    # versions the window walk met of sessions parts 2 and 3 may meet again (live now,
    # or live at the last run): bounded by the active set, unlike all the run's versions
    met_keys: list[pa.Array] = field(default_factory=list)

    @property
    def whole_history(self) -> bool:
        """A fresh walk of every createdAt: it meets every live session as it is now."""
        return self.progress.window.from_ms is None and self.progress.walked.walk is None

    def close(self) -> None:
        self.live.discard()
        if self.filler is not None:
            self.filler.close()


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
        target: DatasetTarget | None = None,
    ) -> None:
        self.client = client
        self.output = output
        self.state = state
        self.options = options
        self.clock = clock
        self.on_progress = on_progress
        self.target = target or ParquetTarget(output)

    def execute(self) -> RunSummary:
        with self.state.lock(lock_holder()):
            started = time.monotonic()
            run = self._context(self.state.load())
            active: ActiveSetBuilder | None = None
            try:
                capture, active = self._walk(run)
                return self._finish(run, active, capture, time.monotonic() - started)
            finally:
                run.close()
                if active is not None:
                    active.discard()

    def _context(self, checkpoint: Checkpoint) -> RunContext:
        progress = checkpoint.in_progress
        resumed = progress is not None and progress.mode == self.mode
        if progress is not None and resumed:
            progress = self._resume(progress)
        else:
            progress = self._start(checkpoint)
            if self.target.run_tagged_commits:
                self.state.save(replace(checkpoint, in_progress=progress))
        self.target.begin(progress.run_id, progress.walked.files, resumed)
        captures = self.options.track_active and "status" not in progress.filters
        filler = None
        if self.options.enrich_trigger_config:
            filler = TriggerConfigFiller(self.client, self.options.enrich_concurrency)
        return RunContext(
            checkpoint=checkpoint,
            progress=progress,
            resumed=resumed,
            captures_changes=captures,
            filler=filler,
            preparer=RowPreparer(filler),
            previous_active=(
                self.state.load_active() if captures else ACTIVE_SCHEMA.empty_table()
            ),
            max_created=progress.max_created_ms,
        )

    def _resume(self, progress: RunProgress) -> RunProgress:
        log.info(
            "resuming run %s after flush %d (%d sessions so far)",
            progress.run_id,
            progress.walked.flush_seq,
            progress.walked.counts.rows,
        )
        if progress.filters != self.options.filters:
            log.warning(
                "the interrupted run used filters %s; finishing it with those", progress.filters
            )
        return replace(progress, resumed=progress.resumed + 1)

    def _start(self, checkpoint: Checkpoint) -> RunProgress:
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
        return progress

    def _walk(self, run: RunContext) -> tuple[ChangeCapture | None, ActiveSetBuilder | None]:
        """The three parts; nothing is saved before the first flush (a run that fails early
        leaves no trace). The new active set, if changes are captured."""
        start = run.progress.walked.counts
        writer = FlushingWriter(
            self.target.sink(
                run.progress.run_id, self.options.flush_rows, self.options.flush_bytes
            ),
            lambda flushed, walk: self._checkpoint(run, flushed, walk),
            first_seq=run.progress.walked.flush_seq,
            stats=self.client.stats,
            on_rows=lambda pages, rows: self._report_progress(
                run.part, start.pages + pages, start.rows + rows
            ),
        )
        whole_history = run.whole_history
        window_walked = not run.progress.walked.complete
        if window_walked:
            self._walk_window(run, writer)
        if not run.captures_changes:
            return None, None
        if whole_history and window_walked:
            # a walk of the whole history met every live session in its current state
            writer.commit(None)
            return None, run.live
        run.part = "changes"
        capture = ChangeCapture(
            self.client,
            self.target,
            run.preparer,
            run.previous_active,
            self.options.enrich_concurrency,
        )
        active = capture.run(
            writer, self._capture_known(run), run.progress.filters, run.progress.run_id
        )
        try:
            writer.commit(None)
        except BaseException:
            active.discard()
            raise
        return capture, active

    def _report_progress(self, part: str, pages: int, rows: int) -> None:
        if self.on_progress is not None:
            self.on_progress(part, pages, rows, self.client.stats.requests)

    # -- part 1: the window ------------------------------------------------------------

    def _walk_window(self, run: RunContext, writer: FlushingWriter) -> None:
        progress = run.progress
        # a re-read window (lookback, rescan, full refresh) writes only versions not stored yet
        known = self.target.known(progress.window, progress.run_id)
        now = self.clock()
        watched = set(run.previous_active["id"].to_pylist()) if run.captures_changes else set()
        whole_history = run.whole_history

        def collect(prepared: Prepared) -> None:
            listed = prepared.listed
            newest = pc.max(listed["created_at"]).value
            run.max_created = max(run.max_created or newest, newest)
            if run.captures_changes:
                live = live_mask(listed, now)
                run.live.add(active_rows(listed.filter(live)))
                if not whole_history:  # else parts 2 and 3 are skipped: no keys needed
                    self._remember_met(run, prepared, live, watched)

        before = writer.counts
        resume = WalkState.from_dict(progress.walked.walk) if progress.walked.walk else None
        listing = listing_for(progress.window, progress.filters)
        drain(
            batch_stream(
                self.client, listing, resume, flush_rows=self.options.flush_rows,
                ahead_rows=self.target.ahead_rows(self.options.flush_rows),
            ),
            run.preparer,
            writer,
            progress.run_id,
            known,
            resumable=True,
            remember=False,  # the keyset walk never returns a row twice
            on_prepared=collect,
        )
        run.window_cost = PartCost(writer.counts - before)

    def _remember_met(
        self, run: RunContext, prepared: Prepared, live: pa.Array, watched: set[str]
    ) -> None:
        """Versions of live or watched sessions, listed and written, for parts 2 and 3."""
        listed = prepared.listed
        ids = listed["id"].to_pylist()
        met = pc.or_(live, pa.array([sid in watched for sid in ids]))
        if not pc.any(met).as_py():
            return
        mine = listed.filter(met)
        run.met_keys.append(version_keys(mine).combine_chunks())
        written = prepared.written
        if written is not listed and written.num_rows:
            found = pc.is_in(written["id"], value_set=mine["id"].combine_chunks())
            run.met_keys.append(version_keys(written.filter(found)).combine_chunks())

    def _capture_known(self, run: RunContext) -> KnownVersions:
        keys = list(run.met_keys)
        if run.progress.resumed:
            # versions this run wrote before it was interrupted (their keys were in memory)
            keys.extend(self.target.written_keys(run.progress.run_id, run.progress.walked.files))
        known = KnownVersions()
        for part in keys:
            known.add(part)
        return known

    # -- the flushes -------------------------------------------------------------------

    def _checkpoint(self, run: RunContext, flushed: Flushed, walk: WalkState | None) -> None:
        """Fold a flush into the progress; while the window is walked, save the checkpoint
        (parts 2 and 3 are redone whole after an interruption, so they save nothing)."""
        progress = run.progress
        saving = not progress.walked.complete
        walked = progress.walked.after_flush(
            flushed.seq, flushed.files, flushed.counts, None if walk is None else walk.to_dict()
        )
        run.progress = replace(progress, walked=walked, max_created_ms=run.max_created)
        if saving:
            self.state.save(replace(run.checkpoint, in_progress=run.progress))
        log.info(
            "flush %d: %d files, %d sessions so far, walk at %s",
            flushed.seq,
            len(flushed.files),
            walked.counts.rows,
            "end" if walk is None else f"createdAt <= {iso_ms(walk.to_ms)}",
        )

    # -- the report ----------------------------------------------------------------------

    def _finish(
        self,
        run: RunContext,
        active: ActiveSetBuilder | None,
        capture: ChangeCapture | None,
        seconds: float,
    ) -> RunSummary:
        progress = run.progress
        finished = self.clock()
        high_water = run.checkpoint.high_water_ms
        if progress.max_created_ms is not None:
            high_water = max(high_water or 0, progress.max_created_ms)
        summary = finish_report(
            self.output,
            branch=self.client.branch,
            run_id=progress.run_id,
            mode=progress.mode,
            window=progress.window,
            filters=progress.filters,
            started_at_ms=progress.started_at_ms,
            finished_ms=finished,
            totals=self.target.settle(self._totals(run)),
            files=list(progress.walked.files),
            partitions=self.target.partitions(progress.walked.files),
            resumed=progress.resumed,
            high_water_ms=high_water,
            extra=self._extra(run, active, capture),
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
        return replace(summary, resumed=run.resumed)

    def _totals(self, run: RunContext) -> Counters:
        """The run's counters, with the triggerConfig fetches of this execution."""
        fetches = run.filler.single_fetches if run.filler is not None else 0
        return run.progress.walked.counts + Counters(single_fetches=fetches)

    def _extra(
        self, run: RunContext, active: ActiveSetBuilder | None, capture: ChangeCapture | None
    ) -> dict[str, object]:
        """The manifest's run-specific fields: each part's cost, the triggerConfig reads."""
        costs = {"window": run.window_cost, "active": PartCost(), "departed": PartCost()}
        costs.update(capture.costs if capture else {})
        filler = run.filler
        return {
            "parts": {name: cost.to_dict() for name, cost in costs.items()},
            "trigger_config": {
                "single_fetches": filler.single_fetches if filler is not None else 0,
                "newer_versions": filler.newer_versions if filler is not None else 0,
            },
            "active_sessions": None if active is None else active.count,
        }
