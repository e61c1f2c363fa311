"""Run plans: the incremental export, from checkpoint to manifest.

The plan (which window, which params) is plain functions over plain data; `IncrementalRun`
moves pages from the client through `flatten` into the sink in three parts:

1. the window: every session created since the high-water mark minus the lookback (or the
   longer rescan), checkpointed after every flush, resumable at its cursor;
2. the active set: `filter[status]=ACTIVE` lists the newest version of every live session;
3. the departed: sessions ACTIVE at the last run that are not any more (closed or expired)
   are read in their final state, one by one or by walking CLOSED/EXPIRED over their span,
   whichever costs fewer requests.

Only versions the dataset does not hold yet are written. Parts 2 and 3 are redone whole if
a run is interrupted during them.
"""

from __future__ import annotations

import logging
import math
import secrets
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.api.client import PAGE_SIZE, SessionPage, TriggerClient
from pipeline.api.records import UNSET, ListedSession, has_trigger_config
from pipeline.api.walker import prefetched, walk_pages
from pipeline.dataset.flatten import (
    MalformedSession,
    flatten_listed,
    flatten_sessions,
    parse_timestamp_ms,
)
from pipeline.dataset.layout import files_by_partition, known_versions, read_file, version_keys
from pipeline.dataset.manifest import RunManifest, iso_ms
from pipeline.dataset.sink import ParquetSink
from pipeline.errors import ApiError
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

log = logging.getLogger(__name__)

Clock = Callable[[], int]  # epoch milliseconds
Session = dict[str, Any]


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
    rescan_ms: int = 24 * 3600 * 1000
    track_active: bool = True
    enrich_trigger_config: bool = True
    enrich_concurrency: int = 8
    flush_rows: int = 10_000
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
    single_fetches: int = 0

    def line(self) -> str:
        window = f"{iso_ms(self.window.from_ms) or 'beginning'} .. {iso_ms(self.window.to_ms)}"
        return (
            f"run {self.run_id} ({self.mode}{', resumed' if self.resumed else ''}) done: "
            f"{self.rows} sessions ({self.unchanged} unchanged skipped), "
            f"{self.partitions} partitions, {self.files} files, "
            f"{self.pages} pages, {self.single_fetches} single fetches, "
            f"{self.requests} requests, {self.retries} retries, "
            f"{self.rate_limited} rate-limited, {self.seconds:.1f}s; window {window}"
        )


def sessions_table(
    sessions: list[Session], received_ms: int, run_id: str, filler: TriggerConfigFiller | None
) -> pa.Table:
    """Listed sessions as rows: triggerConfig filled where lists omit it, then flattened."""
    if filler is not None and sessions:
        filler.remember_listed(sessions)
        filler.fill(sessions)
    try:
        return flatten_sessions(sessions, received_ms, run_id)
    except MalformedSession as error:
        raise ApiError(f"the API returned an unusable session: {error}") from None


def page_table(page: SessionPage, run_id: str, filler: TriggerConfigFiller | None) -> pa.Table:
    """A listed page as rows: straight from its typed rows unless some need triggerConfig
    filled (that path works on the page's sessions as dicts)."""
    listed = page.listed
    if listed is None or (filler is not None and _needs_filling(listed, filler)):
        return sessions_table(page.sessions, page.received_at_ms, run_id, filler)
    try:
        return flatten_listed(listed, page.received_at_ms, run_id)
    except MalformedSession as error:
        raise ApiError(f"the API returned an unusable session: {error}") from None


def _needs_filling(listed: list[ListedSession], filler: TriggerConfigFiller) -> bool:
    """`filler.remember_listed` + whether `filler.fill` would have work, on typed rows."""
    if not filler.lists_carry_config:
        filler.lists_carry_config = any(has_trigger_config(s) for s in listed)
    return not filler.lists_carry_config and any(s.triggerConfig is UNSET for s in listed)


def new_run_id(now_ms: int) -> str:
    stamp = datetime.fromtimestamp(now_ms / 1000, tz=UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(3)}"


def plan_window(checkpoint: Checkpoint, now_ms: int, reread_ms: int, full: bool) -> Window:
    """The createdAt window of a new incremental run."""
    if full or checkpoint.high_water_ms is None:
        return Window(None, now_ms)
    return Window(max(1, checkpoint.high_water_ms - reread_ms), now_ms)


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


def session_version(session: Session) -> str:
    """`id|updatedAt-ms`, the same key `dataset.version_keys` builds from stored rows."""
    updated = session.get("updatedAt")
    try:
        stamp = str(parse_timestamp_ms(updated)) if isinstance(updated, str) else "null"
    except ValueError:
        stamp = "null"
    return f"{session['id']}|{stamp}"


@dataclass
class PartCost:
    """What one part of a run cost and wrote (for the manifest)."""

    pages: int = 0
    single_fetches: int = 0
    rows: int = 0
    unchanged: int = 0
    strategy: str | None = None


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
        self.costs = {"window": PartCost(), "active": PartCost(), "departed": PartCost()}
        self.filler: TriggerConfigFiller | None = None
        # versions the window walk met of sessions parts 2 and 3 may meet again (live now,
        # or live at the last run): bounded by the active set, unlike all the run's versions
        self._written_keys: list[pa.Array] = []
        self._live = ActiveSetBuilder()  # live sessions the window walk met
        self._walked_whole_window = False
        self._previous_active = ACTIVE_SCHEMA.empty_table()

    def execute(self) -> RunSummary:
        with self.state.lock(lock_holder()):
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
        if self.options.enrich_trigger_config:
            self.filler = TriggerConfigFiller(
                self.client,
                self.output,
                self.options.enrich_concurrency,
                checkpoint.without_trigger_config,
            )
        if self._captures_changes(progress):
            self._previous_active = self.state.load_active()
        try:
            # nothing is saved before the first flush: a run that fails early leaves no trace
            writer = _Writer(self, checkpoint, progress)
            if not progress.walk_complete:
                self._walk_window(writer)
            active = None
            if self._captures_changes(writer.progress):
                if writer.progress.window.from_ms is None and self._walked_whole_window:
                    # a walk of the whole history met every live session in its current state
                    active = self._live
                else:
                    if self.filler is not None:
                        self.filler.refresh()
                    active = self._capture_changes(writer)
                writer.commit(cursor=None, complete=True, save=False)
            return self._finish(
                checkpoint, writer.progress, active, time.monotonic() - started, resumed
            )
        finally:
            self._live.discard()
            if self.filler is not None:
                self.filler.close()

    def _captures_changes(self, progress: RunProgress) -> bool:
        return self.options.track_active and "status" not in progress.filters

    # -- part 1: the window ------------------------------------------------------------

    def _walk_window(self, writer: _Writer) -> None:
        progress = writer.progress
        window, filters = progress.window, progress.filters
        cost = self.costs["window"]

        def fetch(cursor: str | None) -> SessionPage:
            return self.client.list_sessions(list_params(window, filters, cursor))

        # a re-read window (lookback, rescan, full refresh) writes only versions not stored yet
        known = known_versions(self.output, window.from_ms, window.to_ms, progress.run_id)
        now = self.clock()
        capture = self._captures_changes(progress)
        watched = self._previous_active["id"]
        whole_history = window.from_ms is None and progress.cursor is None
        for page in prefetched(walk_pages(fetch, progress.cursor)):
            cost.pages += 1
            writer.pages += 1
            table = page_table(page, writer.progress.run_id, self.filler)
            if table.num_rows:
                writer.saw_created(pc.max(table["created_at"]).value)
                if capture:
                    live = _live_mask(table, now)
                    self._live.add(_active_rows(table.filter(live)))
                    if not whole_history:  # else parts 2 and 3 are skipped: no keys needed
                        met = pc.or_(live, pc.is_in(table["id"], value_set=watched))
                        keys = version_keys(table.filter(met)).combine_chunks()
                        self._written_keys.append(keys)
            if len(known) and table.num_rows:
                fresh = pc.invert(pc.is_in(version_keys(table), value_set=known))
                skipped = table.num_rows - (pc.sum(fresh).as_py() or 0)
                cost.unchanged += skipped
                writer.unchanged += skipped
                table = table.filter(fresh)
            cost.rows += table.num_rows
            writer.add(table, "window")
            if writer.sink.should_flush():
                writer.commit(page.next_cursor, page.next_cursor is None, save=True)
        if not writer.progress.walk_complete:
            writer.commit(None, True, save=True)
        self._walked_whole_window = progress.cursor is None

    # -- parts 2 and 3: the active set and the departed ---------------------------------

    def _capture_changes(self, writer: _Writer) -> ActiveSetBuilder:
        previous = self._previous_active
        keys = [_active_keys(previous), *self._written_keys]
        if writer.progress.resumed:
            # versions this run wrote before it was interrupted (their keys were in memory)
            for path in writer.progress.files:
                table = read_file(self.output, path, columns=["id", "updated_at"])
                keys.append(version_keys(table).combine_chunks())
        known = pa.chunked_array(keys, pa.string()).combine_chunks()
        filters = {**writer.progress.filters, "status": "ACTIVE"}
        cost = self.costs["active"]
        active = ActiveSetBuilder()

        def fetch(cursor: str | None) -> SessionPage:
            return self.client.list_sessions(list_params(Window(None, None), filters, cursor))

        for page in prefetched(walk_pages(fetch)):
            cost.pages += 1
            writer.pages += 1
            active.add(_active_rows_of(page.sessions))
            self._write_versions(writer, page.sessions, page.received_at_ms, known, cost)

        data = active.finish()
        now_live = pq.read_table(pa.BufferReader(data), columns=["id"])["id"]
        gone = pc.invert(pc.is_in(previous["id"], value_set=now_live))
        departed = previous.filter(gone)
        if departed.num_rows:
            self._read_departed(writer, departed, known)
        log.info(
            "active sessions: %d now, %d at the last run, %d departed",
            len(now_live),
            previous.num_rows,
            departed.num_rows,
        )
        return active

    def _read_departed(self, writer: _Writer, departed: pa.Table, known: pa.Array) -> None:
        """Final state of sessions that left the active set: closed or expired since."""
        cost = self.costs["departed"]
        low = pc.min(departed["created_ms"]).as_py()
        high = pc.max(departed["created_ms"]).as_py()
        estimated_pages = 2 * math.ceil(self._stored_rows(low, high) / PAGE_SIZE)
        remaining = set(departed["id"].to_pylist())
        if estimated_pages < len(remaining):
            cost.strategy = "list CLOSED and EXPIRED"
            for status in ("CLOSED", "EXPIRED"):
                filters = {**writer.progress.filters, "status": status}

                def fetch(cursor: str | None, f: dict[str, str] = filters) -> SessionPage:
                    return self.client.list_sessions(list_params(Window(low, high), f, cursor))

                for page in prefetched(walk_pages(fetch)):
                    cost.pages += 1
                    writer.pages += 1
                    mine = [s for s in page.sessions if s["id"] in remaining]
                    remaining.difference_update(s["id"] for s in mine)
                    self._write_versions(writer, mine, page.received_at_ms, known, cost)
        else:
            cost.strategy = "get each"
        if remaining:
            with ThreadPoolExecutor(max_workers=self.options.enrich_concurrency) as pool:
                found = list(pool.map(self.client.get_session, sorted(remaining)))
            cost.single_fetches += len(remaining)
            sessions = [s for s in found if s is not None]
            self._write_versions(writer, sessions, self.clock(), known, cost)

    def _write_versions(
        self,
        writer: _Writer,
        sessions: list[Session],
        received_ms: int,
        known: pa.Array,
        cost: PartCost,
    ) -> None:
        """Write the sessions whose version is not among `known`."""
        if not sessions:
            return
        keys = pa.array([session_version(s) for s in sessions], pa.string())
        stored = pc.is_in(keys, value_set=known).to_pylist()
        fresh = [s for s, old in zip(sessions, stored, strict=True) if not old]
        cost.unchanged += len(sessions) - len(fresh)
        writer.unchanged += len(sessions) - len(fresh)
        table = self._table(fresh, received_ms, writer.progress.run_id)
        cost.rows += table.num_rows
        writer.add(table, "changes")
        if writer.sink.should_flush():
            writer.commit(None, True, save=False)

    def _stored_rows(self, low_ms: int, high_ms: int) -> int:
        """Rows the dataset holds in the partitions of a createdAt span (file metadata only)."""
        first, last = iso_ms(low_ms)[:10], iso_ms(high_ms)[:10]
        total = 0
        for day, files in files_by_partition(self.output).items():
            if first <= day <= last:
                for data_file in files:
                    total += pq.read_metadata(
                        self.output.full_path(data_file.path), filesystem=self.output.fs
                    ).num_rows
        return total

    # -- shared ------------------------------------------------------------------------

    def _table(self, sessions: list[Session], received_ms: int, run_id: str) -> pa.Table:
        return sessions_table(sessions, received_ms, run_id, self.filler)

    def _finish(
        self,
        checkpoint: Checkpoint,
        progress: RunProgress,
        active: ActiveSetBuilder | None,
        seconds: float,
        resumed: bool,
    ) -> RunSummary:
        finished = self.clock()
        high_water = checkpoint.high_water_ms
        if progress.max_created_ms is not None:
            high_water = max(high_water or 0, progress.max_created_ms)
        partitions = sorted({p.split("/")[1].split("=", 1)[1] for p in progress.files})
        fetches = self.filler.single_fetches if self.filler is not None else 0
        manifest = RunManifest(
            run_id=progress.run_id,
            mode=progress.mode,
            window_from=iso_ms(progress.window.from_ms),
            window_to=iso_ms(progress.window.to_ms),
            filters=progress.filters,
            started_at=iso_ms(progress.started_at_ms),
            finished_at=iso_ms(finished),
            seconds=round((finished - progress.started_at_ms) / 1000, 3),
            rows=progress.rows,
            pages=progress.pages,
            requests=progress.requests,
            retries=progress.retries,
            rate_limited=progress.rate_limited,
            resumed=progress.resumed,
            files=list(progress.files),
            partitions=partitions,
            high_water=iso_ms(high_water),
            extra={
                "unchanged_skipped": progress.unchanged,
                "parts": {name: vars(cost) for name, cost in self.costs.items()},
                "trigger_config": {
                    "single_fetches": fetches,
                    "from_dataset": self.filler.from_dataset if self.filler else 0,
                },
                "active_sessions": None if active is None else active.count,
            },
        )
        manifest.write(self.output)
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
                without_trigger_config=self._without_config(high_water, active),
            )
        )
        departed = self.costs["departed"].single_fetches
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
            single_fetches=fetches + departed,
        )

    def _without_config(
        self, high_water: int | None, active: ActiveSetBuilder | None
    ) -> dict[str, int]:
        """Ids without a triggerConfig that later runs may meet again (re-read or active)."""
        if self.filler is None or not self.filler.without_config:
            return {}
        oldest = (high_water or 0) - max(self.options.lookback_ms, self.options.rescan_ms)
        ids = pa.array(list(self.filler.without_config), pa.string())
        live = set()
        if active is not None:
            live_ids = pq.read_table(pa.BufferReader(active.finish()), columns=["id"])["id"]
            live = set(ids.filter(pc.is_in(ids, value_set=live_ids)).to_pylist())
        return {
            sid: created
            for sid, created in self.filler.without_config.items()
            if created >= oldest or sid in live
        }


def _live_mask(table: pa.Table, now_ms: int) -> pa.Array:
    """Rows of sessions still ACTIVE: not closed, and not expired by `now_ms`."""
    expires = table["expires_at"].cast(pa.int64())
    not_expired = pc.or_(pc.is_null(expires), pc.fill_null(pc.greater(expires, now_ms), False))
    return pc.and_(pc.is_null(table["closed_at"]), not_expired)


def _active_rows(table: pa.Table) -> pa.Table:
    return pa.table(
        {
            "id": table["id"],
            "created_ms": table["created_at"].cast(pa.int64()),
            "updated_ms": table["updated_at"].cast(pa.int64()),
        },
        schema=ACTIVE_SCHEMA,
    )


def _active_rows_of(sessions: list[Session]) -> pa.Table:
    """id, createdAt and updatedAt (epoch ms) of listed sessions."""
    updated = [s.get("updatedAt") for s in sessions]
    return pa.table(
        {
            "id": [s["id"] for s in sessions],
            "created_ms": [parse_timestamp_ms(s["createdAt"]) for s in sessions],
            "updated_ms": [parse_timestamp_ms(u) if isinstance(u, str) else None for u in updated],
        },
        schema=ACTIVE_SCHEMA,
    )


def _active_keys(active: pa.Table) -> pa.Array:
    """Version keys (`id|updatedAt-ms`) of the stored active set."""
    return version_keys(
        pa.table({"id": active["id"], "updated_at": active["updated_ms"].cast(pa.timestamp("ms"))})
    ).combine_chunks()


class _Writer:
    """The sink plus the run's progress: flushes, counts and checkpoints."""

    def __init__(self, run: IncrementalRun, checkpoint: Checkpoint, progress: RunProgress):
        self.run = run
        self.checkpoint = checkpoint
        self.progress = progress
        self.sink = ParquetSink(
            run.output, progress.run_id, run.options.flush_rows, run.options.flush_bytes
        )
        self.pages = self.rows = self.unchanged = 0
        self.max_created = progress.max_created_ms
        stats = run.client.stats
        self._base = (stats.requests, stats.retries, stats.rate_limited)

    def add(self, table: pa.Table, part: str) -> None:
        self.sink.add(table)
        self.rows += table.num_rows
        if self.run.on_progress is not None:
            self.run.on_progress(
                part,
                self.progress.pages + self.pages,
                self.progress.rows + self.rows,
                self.run.client.stats.requests,
            )

    def saw_created(self, created_ms: int) -> None:
        if self.max_created is None or created_ms > self.max_created:
            self.max_created = created_ms

    def commit(self, cursor: str | None, complete: bool, save: bool) -> None:
        """Flush, fold the counters into the progress, and (part 1) save the checkpoint."""
        stats = self.run.client.stats
        written = self.sink.flush(self.progress.flush_seq)
        progress = self.progress
        self.progress = progress.after_flush(
            cursor=cursor,
            flush_seq=progress.flush_seq + 1,
            walk_complete=complete,
            rows=progress.rows + self.rows,
            unchanged=progress.unchanged + self.unchanged,
            pages=progress.pages + self.pages,
            requests=progress.requests + stats.requests - self._base[0],
            retries=progress.retries + stats.retries - self._base[1],
            rate_limited=progress.rate_limited + stats.rate_limited - self._base[2],
            max_created_ms=self.max_created,
            files=progress.files + tuple(f.path for f in written),
        )
        if save:
            self.run.state.save(replace(self.checkpoint, in_progress=self.progress))
        log.info(
            "flush %d: %d files, %d sessions so far, cursor %s",
            progress.flush_seq,
            len(written),
            self.progress.rows,
            cursor or "end",
        )
        self.pages = self.rows = self.unchanged = 0
        self._base = (stats.requests, stats.retries, stats.rate_limited)
