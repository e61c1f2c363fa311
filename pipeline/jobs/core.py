"""The job core: what `run`, `backfill` and change capture share.

```
listing (filters, window) ─► page_stream (exact keyset walk, loop guard, prefetch)
   ─► RowPreparer (versions already held are skipped, triggerConfig filled, flattened)
   ─► FlushingWriter (sink, counters, progress, checkpoint hook) ─► finish_report
```

A job is a short plan over these pieces: which listings, which checkpoint, how many at once.
"""

from __future__ import annotations

import logging
import secrets
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pyarrow as pa

from pipeline.api.client import RequestStats, TriggerClient
from pipeline.api.filters import FILTER_PARAMS
from pipeline.api.records import ListedSession, has_trigger_config
from pipeline.api.walker import (
    Listing,
    WalkedPage,
    WalkState,
    created_ms,
    prefetched,
    walk_listing,
)
from pipeline.dataset.flatten import MalformedSession, flatten_listed, flatten_sessions
from pipeline.dataset.layout import MS_PER_DAY, partition_of
from pipeline.dataset.manifest import RunManifest, iso_ms
from pipeline.dataset.sink import ParquetSink
from pipeline.dataset.versions import StoredVersions
from pipeline.errors import ApiError
from pipeline.jobs.enrich import TriggerConfigFiller
from pipeline.store.state import Window
from pipeline.store.storage import Storage
from pipeline.timestamps import parse_timestamp_ms

log = logging.getLogger(__name__)

Clock = Callable[[], int]  # epoch milliseconds
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


def page_stream(
    client: TriggerClient,
    listing: Listing,
    state: WalkState | None = None,
    floor: Callable[[], int | None] | None = None,
) -> Iterator[WalkedPage]:
    """Every listing's pages: the exact walk, its loop guard, the next request in flight."""
    return prefetched(walk_listing(client.list_sessions, listing, state, floor))


# -- which versions are held already ---------------------------------------------------------


def session_version(session: Session) -> str:
    """`id|updatedAt-ms`, the same key `dataset.version_keys` builds from stored rows."""
    updated = session.get("updatedAt")
    try:
        stamp = str(parse_timestamp_ms(updated)) if isinstance(updated, str) else "null"
    except ValueError:
        stamp = "null"
    return f"{session['id']}|{stamp}"


class KnownVersions:
    """Versions (`id|updatedAt`) the dataset or this run holds already.

    The one place a job asks "is this version stored?": the dataset's side is a
    `StoredVersions` index (one partition's keys at a time, bounded memory, linear time),
    this run's side a set of the keys it wrote or was told about.
    """

    def __init__(self, stored: StoredVersions | None = None) -> None:
        self._stored = stored
        self._held: set[str] = set()

    @classmethod
    def stored(cls, storage: Storage, window: Window, skip_run: str) -> KnownVersions:
        """Versions stored in the partitions `window` touches, except the files of `skip_run`
        (a resumed run rewrites those under the same names, so their rows must be written)."""
        return cls(StoredVersions(storage, window.from_ms, window.to_ms, skip_run))

    def add(self, keys: pa.Array | _LazyKeys) -> None:
        self._held.update(keys.to_pylist())

    def fresh(self, sessions: list[Session]) -> tuple[list[Session], pa.Array | _LazyKeys]:
        """The sessions whose version is not held yet, and the version keys of those."""
        if not self._held and (self._stored is None or self._stored.nothing_stored()):
            # nothing to compare with (a first export): no keys to build, page after page
            return list(sessions), _LazyKeys(sessions)
        keys = [session_version(s) for s in sessions]
        new = [key not in self._held for key in keys]
        if self._stored is not None and any(new):
            days = [created_ms(s) // MS_PER_DAY for s in sessions]
            unseen = self._stored.unseen_keys(keys, days)
            new = [a and b for a, b in zip(new, unseen, strict=True)]
        fresh = [s for s, keep in zip(sessions, new, strict=True) if keep]
        return fresh, pa.array([k for k, keep in zip(keys, new, strict=True) if keep], pa.string())


class _LazyKeys:
    """Version keys of sessions, built only if someone asks for them."""

    def __init__(self, sessions: list[Session]) -> None:
        self.sessions = sessions

    def to_pylist(self) -> list[str]:
        return [session_version(s) for s in self.sessions]


class RowPreparer:
    """Listed sessions into rows to write: versions already held are skipped, triggerConfig
    is filled where list rows omit it, and the rest is flattened."""

    def __init__(self, filler: TriggerConfigFiller | None) -> None:
        self.filler = filler

    def prepare(
        self,
        sessions: list[Session],
        received_ms: int,
        run_id: str,
        known: KnownVersions | None,
        *,
        remember: bool = True,
        listed: bool = True,
        typed: Mapping[str, ListedSession] | None = None,
    ) -> tuple[pa.Table, int]:
        """(rows to write, how many versions were held already).

        `known` learns the written versions unless `remember` is off (a listing that cannot
        repeat a row); `listed` is off for sessions read one by one (they carry their config).
        `typed`: the page's rows as typed structs, flattened on the fast path when none of
        them needs its configuration filled.
        """
        fresh = sessions
        if known is not None:
            fresh, keys = known.fresh(sessions)
            if remember:
                known.add(keys)
        try:
            rows = self._typed_rows(fresh, typed, listed)
            if rows is not None:
                return flatten_listed(rows, received_ms, run_id), len(sessions) - len(fresh)
            if self.filler is not None and listed and fresh:
                fresh = self.filler.fill(fresh)
            table = flatten_sessions(fresh, received_ms, run_id)
        except MalformedSession as error:
            raise ApiError(f"the API returned an unusable session: {error}") from None
        return table, len(sessions) - len(fresh)

    def _typed_rows(
        self,
        sessions: list[Session],
        typed: Mapping[str, ListedSession] | None,
        listed: bool,
    ) -> list[ListedSession] | None:
        """The typed structs of `sessions`, or None where the dict path must run (no structs,
        or rows whose configuration the filler must fetch)."""
        if typed is None or not listed:
            return None
        rows = [typed.get(s["id"]) for s in sessions]
        if any(row is None for row in rows):
            return None
        filler = self.filler
        if filler is not None and not filler.lists_carry_config:
            filler.lists_carry_config = any(has_trigger_config(r) for r in rows)  # type: ignore[arg-type]
            if not filler.lists_carry_config and rows:
                return None
        return rows  # type: ignore[return-value]


# -- the flushing writer ------------------------------------------------------------------------


@dataclass(frozen=True)
class Flushed:
    """What one flush wrote, and what the job did since the flush before."""

    seq: int
    files: tuple[str, ...]
    rows: int
    unchanged: int
    pages: int
    requests: int
    retries: int
    rate_limited: int


# Saves where the job stands after a flush; the walk's state is None once nothing is left.
CheckpointHook = Callable[[Flushed, WalkState | None], None]


class FlushingWriter:
    """The sink with its counters, progress and checkpoint hook: a commit writes the files,
    then hands a `Flushed` and the walk's state to the hook (files first, checkpoint after:
    a kill between the two redoes the flush under the same file names)."""

    def __init__(
        self,
        sink: ParquetSink,
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
        self.pages = self.rows = self.unchanged = 0
        self.total_pages = self.total_rows = 0
        self._base = self._request_counts()

    def _request_counts(self) -> tuple[int, int, int]:
        if self.stats is None:
            return 0, 0, 0
        return self.stats.requests, self.stats.retries, self.stats.rate_limited

    def page(self) -> None:
        self.pages += 1
        self.total_pages += 1

    def add(self, table: pa.Table, unchanged: int = 0) -> None:
        self.sink.add(table)
        self.rows += table.num_rows
        self.total_rows += table.num_rows
        self.unchanged += unchanged
        if self.on_rows is not None:
            self.on_rows(self.total_pages, self.total_rows)

    def commit_if_due(self, walk: WalkState | None) -> None:
        if self.sink.should_flush():
            self.commit(walk)

    def commit(self, walk: WalkState | None) -> None:
        """Flush what is buffered, then checkpoint `walk` (None: nothing is left to walk)."""
        written = self.sink.flush(self.seq)
        counts = self._request_counts()
        flushed = Flushed(
            seq=self.seq,
            files=tuple(f.path for f in written),
            rows=self.rows,
            unchanged=self.unchanged,
            pages=self.pages,
            requests=counts[0] - self._base[0],
            retries=counts[1] - self._base[1],
            rate_limited=counts[2] - self._base[2],
        )
        self.seq += 1
        self.pages = self.rows = self.unchanged = 0
        self._base = counts
        self.checkpoint(flushed, walk)


# -- the report ---------------------------------------------------------------------------------


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


@dataclass(frozen=True)
class RunTotals:
    """A finished run's counters, whichever job ran."""

    rows: int
    unchanged: int
    pages: int
    requests: int
    retries: int
    rate_limited: int
    single_fetches: int


def finish_report(
    output: Storage,
    *,
    run_id: str,
    mode: str,
    window: Window,
    filters: dict[str, str],
    started_at_ms: int,
    finished_ms: int,
    totals: RunTotals,
    files: list[str],
    resumed: int,
    high_water_ms: int | None,
    extra: dict[str, object],
    seconds: float,
    branch: str | None = None,
) -> RunSummary:
    """Write the run's manifest (`_runs/<run>.json`) and return its summary."""
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
        rows=totals.rows,
        pages=totals.pages,
        requests=totals.requests,
        retries=totals.retries,
        rate_limited=totals.rate_limited,
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
        rows=totals.rows,
        unchanged=totals.unchanged,
        pages=totals.pages,
        requests=totals.requests,
        retries=totals.retries,
        rate_limited=totals.rate_limited,
        files=len(files),
        partitions=len(partitions),
        seconds=seconds,
        resumed=bool(resumed),
        single_fetches=totals.single_fetches,
    )
