"""Run plans: the incremental export, from checkpoint to manifest.

The plan (which window, which params) is plain functions over plain data; `IncrementalRun`
is the loop that moves pages from the client through `flatten` into the sink and commits a
checkpoint after every flush.
"""

from __future__ import annotations

import logging
import os
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime

import pyarrow.compute as pc

from pipeline.client import PAGE_SIZE, TriggerClient
from pipeline.dataset import known_versions, version_keys
from pipeline.errors import ApiError
from pipeline.flatten import MalformedSession, flatten_sessions
from pipeline.manifest import RunManifest, iso_ms
from pipeline.sink import ParquetSink
from pipeline.state import Checkpoint, RunProgress, StateStore, Window
from pipeline.storage import Storage
from pipeline.walk import prefetched, walk_pages

log = logging.getLogger(__name__)

Clock = Callable[[], int]  # epoch milliseconds


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


# Filters as the API names them; one value each (the server does not split commas).
FILTER_PARAMS = {
    "type": "filter[type]",
    "task_identifier": "filter[taskIdentifier]",
    "tags": "filter[tags]",
    "external_id": "filter[externalId]",
    "status": "filter[status]",
}


@dataclass(frozen=True)
class RunOptions:
    filters: dict[str, str] = field(default_factory=dict)
    lookback_ms: int = 15 * 60 * 1000
    flush_rows: int = 25_000
    flush_bytes: int = 64 * 1024 * 1024
    full_refresh: bool = False


@dataclass(frozen=True)
class RunSummary:
    run_id: str
    mode: str
    window: Window
    rows: int
    unchanged: int
    pages: int
    requests: int
    retries: int
    rate_limited: int
    files: int
    partitions: int
    seconds: float
    resumed: bool

    def line(self) -> str:
        window = f"{iso_ms(self.window.from_ms) or 'beginning'} .. {iso_ms(self.window.to_ms)}"
        return (
            f"run {self.run_id} ({self.mode}{', resumed' if self.resumed else ''}) done: "
            f"{self.rows} sessions ({self.unchanged} unchanged skipped), "
            f"{self.partitions} partitions, {self.files} files, "
            f"{self.pages} pages, {self.requests} requests, {self.retries} retries, "
            f"{self.rate_limited} rate-limited, {self.seconds:.1f}s; window {window}"
        )


def new_run_id(now_ms: int) -> str:
    stamp = datetime.fromtimestamp(now_ms / 1000, tz=UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(3)}"


def plan_window(checkpoint: Checkpoint, now_ms: int, lookback_ms: int, full: bool) -> Window:
    """The createdAt window of a new incremental run."""
    if full or checkpoint.high_water_ms is None:
        return Window(None, now_ms)
    return Window(max(1, checkpoint.high_water_ms - lookback_ms), now_ms)


def list_params(window: Window, filters: dict[str, str], cursor: str | None) -> dict[str, str]:
    """Query params for one list request: full pages, the window, filters, the cursor."""
    params = {"page[size]": str(PAGE_SIZE)}
    if window.from_ms:  # the API ignores 0, so never send it
        params["filter[createdAt][from]"] = str(window.from_ms)
    if window.to_ms:
        params["filter[createdAt][to]"] = str(window.to_ms)
    for name, value in filters.items():
        params[FILTER_PARAMS[name]] = value
    if cursor is not None:
        params["page[after]"] = cursor
    return params


def _holder() -> str:
    return f"pid={os.getpid()} host={os.uname().nodename} since={iso_ms(wall_clock_ms())}"


class IncrementalRun:
    """`sessions-export run`: resume an interrupted run, else export what is new."""

    mode = "incremental"

    def __init__(
        self,
        client: TriggerClient,
        output: Storage,
        state: StateStore,
        options: RunOptions,
        clock: Clock = wall_clock_ms,
    ) -> None:
        self.client = client
        self.output = output
        self.state = state
        self.options = options
        self.clock = clock

    def execute(self) -> RunSummary:
        with self.state.lock(_holder()):
            return self._execute()

    def _execute(self) -> RunSummary:
        started = time.monotonic()
        checkpoint = self.state.load()
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
            window = plan_window(
                checkpoint, now, self.options.lookback_ms, self.options.full_refresh
            )
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
        # nothing is saved before the first flush: a run that fails early leaves no trace
        if not progress.walk_complete:
            progress = self._walk(checkpoint, progress)
        return self._finish(checkpoint, progress, time.monotonic() - started, resumed)

    def _walk(self, checkpoint: Checkpoint, progress: RunProgress) -> RunProgress:
        sink = ParquetSink(
            self.output, progress.run_id, self.options.flush_rows, self.options.flush_bytes
        )
        stats = self.client.stats
        base = (stats.requests, stats.retries, stats.rate_limited)
        window, filters = progress.window, progress.filters

        def fetch(cursor: str | None):  # noqa: ANN202
            return self.client.list_sessions(list_params(window, filters, cursor))

        pages = rows = unchanged = 0
        max_created = progress.max_created_ms
        # a re-read window (lookback) writes only versions the dataset does not hold yet
        known = None
        if window.from_ms is not None and window.to_ms is not None:
            known = known_versions(self.output, window.from_ms, window.to_ms, progress.run_id)

        def commit(cursor: str | None, complete: bool) -> RunProgress:
            nonlocal pages, rows, unchanged, base
            written = sink.flush(progress.flush_seq)
            updated = progress.after_flush(
                cursor=cursor,
                flush_seq=progress.flush_seq + 1,
                walk_complete=complete,
                rows=progress.rows + rows,
                unchanged=progress.unchanged + unchanged,
                pages=progress.pages + pages,
                requests=progress.requests + stats.requests - base[0],
                retries=progress.retries + stats.retries - base[1],
                rate_limited=progress.rate_limited + stats.rate_limited - base[2],
                max_created_ms=max_created,
                files=progress.files + tuple(f.path for f in written),
            )
            self.state.save(replace(checkpoint, in_progress=updated))
            log.info(
                "flush %d: %d files, %d sessions so far, cursor %s",
                progress.flush_seq,
                len(written),
                updated.rows,
                cursor or "end",
            )
            pages = rows = unchanged = 0
            base = (stats.requests, stats.retries, stats.rate_limited)
            return updated

        for page in prefetched(walk_pages(fetch, progress.cursor)):
            try:
                table = flatten_sessions(page.sessions, page.received_at_ms, progress.run_id)
            except MalformedSession as error:
                raise ApiError(f"the API returned an unusable session: {error}") from None
            pages += 1
            if table.num_rows:
                newest = pc.max(table["created_at"]).value
                max_created = newest if max_created is None else max(max_created, newest)
            if known is not None and len(known) and table.num_rows:
                fresh = pc.invert(pc.is_in(version_keys(table), value_set=known))
                unchanged += table.num_rows - pc.sum(fresh).as_py()
                table = table.filter(fresh)
            sink.add(table)
            rows += table.num_rows
            if sink.should_flush():
                progress = commit(page.next_cursor, page.next_cursor is None)
        if not progress.walk_complete:
            progress = commit(None, True)
        return progress

    def _finish(
        self, checkpoint: Checkpoint, progress: RunProgress, seconds: float, resumed: bool
    ) -> RunSummary:
        finished = self.clock()
        high_water = checkpoint.high_water_ms
        if progress.max_created_ms is not None:
            high_water = max(high_water or 0, progress.max_created_ms)
        partitions = sorted({p.split("/")[1].split("=", 1)[1] for p in progress.files})
        total_seconds = (finished - progress.started_at_ms) / 1000
        manifest = RunManifest(
            run_id=progress.run_id,
            mode=progress.mode,
            window_from=iso_ms(progress.window.from_ms),
            window_to=iso_ms(progress.window.to_ms),
            filters=progress.filters,
            started_at=iso_ms(progress.started_at_ms),
            finished_at=iso_ms(finished),
            seconds=round(total_seconds, 3),
            rows=progress.rows,
            pages=progress.pages,
            requests=progress.requests,
            retries=progress.retries,
            rate_limited=progress.rate_limited,
            resumed=progress.resumed,
            files=list(progress.files),
            partitions=partitions,
            high_water=iso_ms(high_water),
            extra={"unchanged_skipped": progress.unchanged},
        )
        manifest.write(self.output)
        self.state.save(
            Checkpoint(
                high_water_ms=high_water,
                last_run_id=progress.run_id,
                last_success_ms=finished,
                filters=progress.filters,
                in_progress=None,
            )
        )
        return RunSummary(
            run_id=progress.run_id,
            mode=progress.mode,
            window=progress.window,
            rows=progress.rows,
            unchanged=progress.unchanged,
            pages=progress.pages,
            requests=progress.requests,
            retries=progress.retries,
            rate_limited=progress.rate_limited,
            files=len(progress.files),
            partitions=len(partitions),
            seconds=seconds,
            resumed=resumed,
        )
