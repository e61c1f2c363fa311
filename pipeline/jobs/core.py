"""The job core: what `run`, `backfill` and change capture share.

```
listing (filters, window) ─► batch_stream (exact keyset walk, loop guard, prefetch)
   ─► RowPreparer (versions already held are skipped, triggerConfig filled, flattened)
   ─► FlushingWriter (sink, counters, progress, checkpoint hook) ─► finish_report
```

`drain` is the one loop over these pieces. A job is a short plan around it: which listings,
which checkpoint, how many at once.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import compress
from typing import Any

import pyarrow as pa

from pipeline.api.client import RequestStats, TriggerClient
from pipeline.api.filters import FILTER_PARAMS
from pipeline.api.records import ListedSession, has_trigger_config
from pipeline.api.walker import Listing, WalkedPage, WalkState, prefetched, walk_listing
from pipeline.dataset.flatten import (
    Extracted,
    MalformedSession,
    flatten_listed,
    flatten_sessions,
)
from pipeline.dataset.layout import classify_files, partition_of, version_keys, written_by
from pipeline.dataset.manifest import RunManifest
from pipeline.dataset.sink import Sink
from pipeline.dataset.versions import KEY_BUDGET, StoredVersions
from pipeline.errors import ApiError
from pipeline.jobs.enrich import TriggerConfigFiller
from pipeline.store.state import Counters, Window
from pipeline.store.storage import Storage
from pipeline.timestamps import MS_PER_DAY, iso_ms

log = logging.getLogger(__name__)

Clock = Callable[[], int]  # epoch milliseconds
BATCH_ROWS = 1000  # listed rows prepared at once
BATCH_PAGES = 10  # and at most this many pages (a status re-check can thin them out)
Session = dict[str, Any]

def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


def new_run_id(now_ms: int) -> str:
    stamp = datetime.fromtimestamp(now_ms / 1000, tz=UTC).strftime("%Y%m%dT%H%M%SZ")
    return f"{stamp}-{secrets.token_hex(3)}"


def listing_for(window: Window, filters: dict[str, str]) -> Listing:
    """The listing of sessions created in `window` that match `filters` (config names)."""
    params = {FILTER_PARAMS[name]: value for name, value in filters.items()}
    return Listing(params, window.from_ms, window.to_ms)


def batch_stream(
    client: TriggerClient,
    listing: Listing,
    state: WalkState | None = None,
    floor: Callable[[], int | None] | None = None,
    flush_rows: int = BATCH_ROWS,
    on_page: Callable[[WalkedPage], None] | None = None,
    ahead_rows: int = 0,
) -> Iterator[list[WalkedPage]]:
    """A listing's pages in batches (`batched`), grouped by the walking thread: the consumer
    is woken once a batch, not once a page, and the next batch is walked meanwhile. A batch
    never holds more rows than a flush (`flush_rows`), so flushes come as often as asked.
    `floor` is the walk's lower createdAt bound, asked before every request (`walk_listing`);
    `on_page` sees each page on the walking thread, as soon as it is walked; `ahead_rows`:
    how far the walk may run ahead of the consumer (at least two batches)."""
    rows = min(BATCH_ROWS, flush_rows)
    pages = walk_listing(client.list_sessions, listing, state, floor)
    if on_page is not None:
        pages = _watched(pages, on_page)
    return prefetched(batched(pages, rows), depth=max(2, -(-ahead_rows // rows)))


def _watched(
    pages: Iterator[WalkedPage], on_page: Callable[[WalkedPage], None]
) -> Iterator[WalkedPage]:
    for page in pages:
        on_page(page)
        yield page


def remove_unrecorded(output: Storage, run_id: str, recorded: Sequence[str]) -> int:
    """Delete the data files of `run_id` that its state does not record: flushes of an
    interrupted attempt made after its last checkpoint. The resumed run redoes them, and may
    redo them with other rows (a backfill window split meanwhile, a changed ACTIVE listing),
    so a file left from the first attempt could hold rows written again elsewhere."""
    known = set(recorded)
    stale = [
        data_file.path
        for data_file in classify_files(output)[0]
        if written_by(data_file.path, run_id) and data_file.path not in known
    ]
    for path in stale:
        output.delete(path)
    if stale:
        log.info("removed %d files of run %s written after its last checkpoint", len(stale), run_id)
    return len(stale)


# -- which versions are held already ---------------------------------------------------------


class KnownVersions:
    """Versions (`id|updatedAt`) the dataset or this run holds already.

    The one place a job asks "is this version stored?": the dataset's side is a
    `StoredVersions` index (one partition's keys at a time, bounded memory, linear time),
    this run's side a set of the keys it wrote or was told about. Keys are built from the
    flattened rows by `version_keys`, the same function that reads them back from files.
    """

    def __init__(self, stored: StoredVersions | None = None) -> None:
        self._stored = stored
        self._held: set[str] = set()

    @classmethod
    def stored(
        cls, storage: Storage, window: Window, skip_run: str, share: int = 1
    ) -> KnownVersions:
        """Versions stored in the partitions `window` touches, except the files of `skip_run`
        (a resumed run rewrites those under the same names, so their rows must be written).
        `share`: how many walks hold such an index at once (they split the memory budget)."""
        budget = KEY_BUDGET // max(1, share)
        return cls(StoredVersions(storage, window.from_ms, window.to_ms, skip_run, budget))

    def add(self, keys: pa.Array | pa.ChunkedArray) -> None:
        self._held.update(keys.to_pylist())

    def fresh(self, table: pa.Table, remember: bool) -> list[bool] | None:
        """For each row of `table`, whether its version is not held yet (None: none is held,
        as in a first export). With `remember`, the new versions count as held afterwards."""
        if not self._held and (self._stored is None or self._stored.nothing_stored()):
            if remember:
                self.add(version_keys(table))
            return None
        keys = version_keys(table).to_pylist()
        held = self._held
        new = [key not in held for key in keys]
        if self._stored is not None and any(new):
            created = table["created_at"].cast(pa.int64()).to_pylist()
            unseen = self._stored.unseen_keys(keys, [ms // MS_PER_DAY for ms in created])
            new = [a and b for a, b in zip(new, unseen, strict=True)]
        if remember:
            held.update(key for key, keep in zip(keys, new, strict=True) if keep)
        return new


# -- rows to write ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rows:
    """Sessions to prepare: listed pages' typed structs when every body fitted them (the
    fast path), else plain dicts; `received` says when (one time, or a run per page);
    `listed` is off for sessions read one by one (they carry their triggerConfig)."""

    typed: list[ListedSession] | None
    dicts: Callable[[], list[Session]]
    received: Extracted
    listed: bool = True

    @staticmethod
    def of_pages(pages: Sequence[WalkedPage]) -> Rows:
        """The kept rows of several pages, in order, as one batch."""
        received = [(page.count, page.received_at_ms) for page in pages]
        if len(pages) == 1:
            page = pages[0]
            return Rows(page.typed, lambda: page.sessions, received)
        typed: list[ListedSession] | None = []
        for page in pages:
            rows = page.typed
            if rows is None or typed is None:
                typed = None
                break
            typed.extend(rows)
        return Rows(typed, lambda: [s for page in pages for s in page.sessions], received)

    @staticmethod
    def of_sessions(sessions: list[Session], received_ms: int, listed: bool = True) -> Rows:
        return Rows(None, lambda: sessions, received_ms, listed)


def batched(pages: Iterator[WalkedPage], rows: int = BATCH_ROWS) -> Iterator[list[WalkedPage]]:
    """Consecutive pages in batches of about `rows` kept rows and at most `BATCH_PAGES`
    pages (a page that ends the walk ends its batch): one preparation per batch costs far
    less than one per page."""
    batch: list[WalkedPage] = []
    count = 0
    for page in pages:
        batch.append(page)
        count += page.count
        if count >= rows or len(batch) >= BATCH_PAGES or page.state.done:
            yield batch
            batch, count = [], 0
    if batch:
        yield batch


@dataclass(frozen=True)
class Prepared:
    """One batch of rows, flattened: `listed` every row as listed (for the job's
    bookkeeping: live sessions, version keys), `written` the versions not held yet, with
    their triggerConfig filled where list rows omit it."""

    listed: pa.Table
    written: pa.Table

    @property
    def unchanged(self) -> int:
        """Versions held already, so not written."""
        return self.listed.num_rows - self.written.num_rows


class RowPreparer:
    """Listed sessions into rows to write: flattened, versions already held skipped, and
    triggerConfig filled where list rows omit it (after the skip: no fetch for a held one)."""

    def __init__(self, filler: TriggerConfigFiller | None) -> None:
        self.filler = filler

    def prepare(
        self,
        rows: Rows,
        run_id: str,
        known: KnownVersions | None,
        *,
        remember: bool = True,
    ) -> Prepared:
        """`known` learns the versions written unless `remember` is off (a listing that
        cannot repeat a row)."""
        try:
            typed = rows.typed if rows.listed and self._lists_carry_config(rows.typed) else None
            if typed is not None:
                table = flatten_listed(typed, rows.received, run_id)
                dicts: list[Session] = []
            else:
                dicts = rows.dicts()
                table = flatten_sessions(dicts, rows.received, run_id)
            new = None if known is None else known.fresh(table, remember)
            written = table if new is None or all(new) else table.filter(pa.array(new))
            if typed is None and rows.listed and self.filler is not None and written.num_rows:
                fresh = dicts if new is None else list(compress(dicts, new))
                filled = self.filler.fill(fresh)
                if filled is not fresh:
                    written = flatten_sessions(filled, _runs_of(rows.received, new), run_id)
        except MalformedSession as error:
            raise ApiError(f"the API returned an unusable session: {error}") from None
        return Prepared(table, written)

    def _lists_carry_config(self, typed: list[ListedSession] | None) -> bool:
        """Whether typed rows can be written as they are: nothing to fill (no filler, or
        list rows carry triggerConfig); else the dict path fills them."""
        filler = self.filler
        if typed is None or filler is None or filler.lists_carry_config:
            return typed is not None
        filler.lists_carry_config = any(has_trigger_config(r) for r in typed)
        return filler.lists_carry_config or not typed


def _runs_of(received: Extracted, kept: list[bool] | None) -> Extracted:
    """The `received` runs of the rows `kept` (None: all of them)."""
    if kept is None or isinstance(received, int):
        return received
    runs: list[tuple[int, int]] = []
    start = 0
    for count, ms in received:
        runs.append((sum(kept[start : start + count]), ms))
        start += count
    return runs


# -- the flushing writer ------------------------------------------------------------------------


def request_counts(stats: RequestStats | None) -> Counters:
    """The client's request counters so far (none without a client)."""
    if stats is None:
        return Counters()
    return Counters(requests=stats.requests, retries=stats.retries, rate_limited=stats.rate_limited)


@dataclass(frozen=True)
class Flushed:
    """What one flush wrote (`files`), and what the job did since the flush before."""

    seq: int
    files: tuple[str, ...]
    counts: Counters


# Saves where the job stands after a flush; the walk's state is None once nothing is left.
CheckpointHook = Callable[[Flushed, WalkState | None], None]


class FlushingWriter:
    """The sink with its counters, progress and checkpoint hook: a commit writes the files,
    then hands a `Flushed` and the walk's state to the hook (files first, checkpoint after:
    a kill between the two redoes the flush under the same file names).

    The one place a job counts: rows, unchanged versions, pages and single fetches as they
    are added, the client's requests (`stats`) between flushes."""

    def __init__(
        self,
        sink: Sink,
        checkpoint: CheckpointHook,
        first_seq: int = 0,
        stats: RequestStats | None = None,
        on_rows: Callable[[int, int], None] | None = None,
    ) -> None:
        self.sink = sink
        self.checkpoint = checkpoint
        self.seq = first_seq
        self.stats = stats
        self.on_rows = on_rows  # (pages, rows) since the writer started, for a progress display
        self._added = Counters()  # since the writer started
        self._at_flush = Counters()  # `counts` at the last flush
        self._requests_at_start = request_counts(stats)

    @property
    def counts(self) -> Counters:
        """What the job did since the writer started."""
        return self._added + (request_counts(self.stats) - self._requests_at_start)

    def add(
        self, table: pa.Table | None, *, unchanged: int = 0, pages: int = 0, fetches: int = 0
    ) -> None:
        """Buffer `table` (the versions to write) and count what it took: `unchanged`
        versions skipped, `pages` walked, sessions read one by one (`fetches`)."""
        rows = 0
        if table is not None:
            self.sink.add(table)
            rows = table.num_rows
        self._added = self._added + Counters(
            rows=rows, unchanged=unchanged, pages=pages, single_fetches=fetches
        )
        if self.on_rows is not None:
            self.on_rows(self._added.pages, self._added.rows)

    def commit_if_due(self, walk: WalkState | None) -> None:
        if self.sink.should_flush():
            self.commit(walk)

    def commit(self, walk: WalkState | None) -> None:
        """Flush what is buffered, then checkpoint `walk` (None: nothing is left to walk)."""
        files = tuple(self.sink.flush(self.seq))
        counts = self.counts
        flushed = Flushed(self.seq, files, counts - self._at_flush)
        self.seq += 1
        self._at_flush = counts
        self.checkpoint(flushed, walk)


# -- the drive loop -----------------------------------------------------------------------------

# What part of a batch a walk keeps, and whether the walk ends with it (a backfill window
# split off its lower part)
Narrow = Callable[[list[WalkedPage]], tuple[list[WalkedPage], bool]]


def drain(
    batches: Iterator[list[WalkedPage]],
    preparer: RowPreparer,
    writer: FlushingWriter,
    run_id: str,
    known: KnownVersions | None,
    *,
    resumable: bool,
    remember: bool = True,
    narrow: Narrow | None = None,
    stopped: Callable[[], bool] | None = None,
    on_prepared: Callable[[Prepared], None] | None = None,
) -> None:
    """Write a walk's batches: prepare each (versions `known` holds are skipped; `remember`:
    it learns the ones written), add it to `writer`, and commit when a flush is due.

    `resumable`: each commit checkpoints the walk's state and the walk's end is committed
    (None), so a restart resumes inside the walk; else commits carry no state (the listing
    is redone whole). `narrow` trims a batch and may end the walk; `stopped` abandons it
    without a commit; `on_prepared` sees every prepared batch (the job's bookkeeping).
    """
    try:
        for batch in batches:
            if stopped is not None and stopped():
                return
            ended = False
            if narrow is not None:
                batch, ended = narrow(batch)
            if any(page.count for page in batch):
                prepared = preparer.prepare(
                    Rows.of_pages(batch), run_id, known, remember=remember
                )
                if on_prepared is not None:
                    on_prepared(prepared)
                writer.add(prepared.written, unchanged=prepared.unchanged, pages=len(batch))
            else:
                writer.add(None, pages=len(batch))
            state = batch[-1].state if batch else None
            if ended or state is None or state.done:
                if resumable:
                    writer.commit(None)
                    return
                state = None
            writer.commit_if_due(state if resumable else None)
        if resumable:
            writer.commit(None)  # the walk ended below its floor
    finally:
        close = getattr(batches, "close", None)
        if close is not None:
            close()


# -- the report ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSummary:
    """A finished run: what it wrote and cost (`counts`), and where."""

    run_id: str
    mode: str
    window: Window
    counts: Counters
    files: int
    partitions: int
    seconds: float
    resumed: bool

    @property
    def rows(self) -> int:
        return self.counts.rows

    @property
    def unchanged(self) -> int:
        return self.counts.unchanged

    @property
    def pages(self) -> int:
        return self.counts.pages

    @property
    def requests(self) -> int:
        return self.counts.requests

    @property
    def retries(self) -> int:
        return self.counts.retries

    @property
    def rate_limited(self) -> int:
        return self.counts.rate_limited

    @property
    def single_fetches(self) -> int:
        return self.counts.single_fetches

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


def finish_report(
    output: Storage,
    *,
    run_id: str,
    mode: str,
    window: Window,
    filters: dict[str, str],
    started_at_ms: int,
    finished_ms: int,
    totals: Counters,
    files: list[str],
    resumed: int,
    high_water_ms: int | None,
    extra: dict[str, object],
    seconds: float,
    branch: str | None = None,
    partitions: list[str] | None = None,
) -> RunSummary:
    """Write the run's manifest (`_runs/<run>.json`) and return its summary; `partitions`
    touched (default: those of the data files `files`)."""
    if partitions is None:
        partitions = sorted({partition_of(path) for path in files})
    RunManifest(
        run_id=run_id,
        mode=mode,
        window_from=iso_ms(window.from_ms),
        window_to=iso_ms(window.to_ms),
        filters=filters,
        started_at=iso_ms(started_at_ms),
        finished_at=iso_ms(finished_ms),
        seconds=round((finished_ms - started_at_ms) / 1000, 3),
        counts=totals,
        resumed=resumed,
        files=files,
        partitions=partitions,
        high_water=iso_ms(high_water_ms),
        branch=branch,
        extra={"unchanged_skipped": totals.unchanged, **extra},
    ).write(output)
    return RunSummary(
        run_id=run_id,
        mode=mode,
        window=window,
        counts=totals,
        files=len(files),
        partitions=len(partitions),
        seconds=seconds,
        resumed=bool(resumed),
    )
