"""Change capture: the ACTIVE listing and the departed sessions, through the job core.

Sessions change after they are created, but the API can only be bounded by `createdAt`.
The checkpoint keeps the sessions ACTIVE at the last run; a run lists `filter[status]=ACTIVE`
(the newest version of every live session) and reads the final state of the sessions that
left the set since (closed or expired): one GET each, or a walk of CLOSED and EXPIRED over
the createdAt span they cover, whichever costs fewer requests. Both listings are exact
keyset walks; a version met twice in the run is written once.
"""

from __future__ import annotations

import logging
import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.api.client import PAGE_SIZE, TriggerClient
from pipeline.api.walker import WalkedPage
from pipeline.dataset.layout import version_keys
from pipeline.jobs.core import (
    FlushingWriter,
    KnownVersions,
    RowPreparer,
    Rows,
    batch_stream,
    drain,
    listing_for,
    wall_clock_ms,
)
from pipeline.store.state import ACTIVE_SCHEMA, ActiveSetBuilder, Counters, Window

if TYPE_CHECKING:
    from pipeline.jobs.target import DatasetTarget

log = logging.getLogger(__name__)

Session = dict[str, Any]


@dataclass(frozen=True)
class PartCost:
    """What one part of a run cost and wrote (for the manifest), read off the writer."""

    counts: Counters = Counters()
    strategy: str | None = None

    def to_dict(self) -> dict[str, object]:
        return {**self.counts.only(PART_COUNTERS), "strategy": self.strategy}


PART_COUNTERS = ("pages", "single_fetches", "rows", "unchanged")


def active_rows(table: pa.Table) -> pa.Table:
    """id, createdAt and updatedAt (epoch ms) of flattened sessions: the active set's rows."""
    return pa.table(
        {
            "id": table["id"],
            "created_ms": table["created_at"].cast(pa.int64()),
            "updated_ms": table["updated_at"].cast(pa.int64()),
        },
        schema=ACTIVE_SCHEMA,
    )


def live_mask(table: pa.Table, now_ms: int) -> pa.Array:
    """Which flattened sessions the server calls ACTIVE now (`walker.derived_status`): not
    closed, and not expired by `now_ms`. A `closedAt` no column could hold (kept in `extra`)
    still closes its session; an unreadable `expiresAt` does not expire it."""
    expires = table["expires_at"]
    live = pc.and_kleene(
        pc.is_null(table["closed_at"]),
        pc.or_kleene(pc.is_null(expires), pc.greater(expires, pa.scalar(now_ms, expires.type))),
    ).combine_chunks()
    extras = table["extra"]
    if extras.null_count == len(extras):
        return live
    flags = live.to_pylist()
    for index, extra in enumerate(extras.to_pylist()):
        if extra is not None and "closedAt" in orjson.loads(extra):
            flags[index] = False
    return pa.array(flags, pa.bool_())


def active_keys(active: pa.Table) -> pa.Array:
    """Version keys (`id|updatedAt-ms`) of the stored active set."""
    return version_keys(
        pa.table({"id": active["id"], "updated_at": active["updated_ms"].cast(pa.timestamp("ms"))})
    ).combine_chunks()


class ChangeCapture:
    """Parts 2 and 3 of a run: the ACTIVE listing, then the sessions that left the set."""

    def __init__(
        self,
        client: TriggerClient,
        target: DatasetTarget,
        rows: RowPreparer,
        previous_active: pa.Table,
        concurrency: int,
    ) -> None:
        self.client = client
        self.target = target
        self.rows = rows
        self.previous = previous_active
        self.concurrency = concurrency
        self.costs = {"active": PartCost(), "departed": PartCost()}

    def run(
        self,
        writer: FlushingWriter,
        known: KnownVersions,
        filters: dict[str, str],
        run_id: str,
    ) -> ActiveSetBuilder:
        """Write the versions of live and departed sessions not held yet; the new active set."""
        known.add(active_keys(self.previous))
        active = ActiveSetBuilder()
        try:
            self._walk_active(writer, known, filters, run_id, active)
        except BaseException:
            active.discard()
            raise
        return active

    def _walk_active(
        self,
        writer: FlushingWriter,
        known: KnownVersions,
        filters: dict[str, str],
        run_id: str,
        active: ActiveSetBuilder,
    ) -> None:
        before = writer.counts
        listing = listing_for(Window(None, None), {**filters, "status": "ACTIVE"})
        drain(
            batch_stream(
                self.client, listing, flush_rows=writer.sink.flush_rows,
                ahead_rows=self.target.ahead_rows(writer.sink.flush_rows),
            ),
            self.rows,
            writer,
            run_id,
            known,
            resumable=False,  # these listings are redone whole after an interruption
            on_prepared=lambda prepared: active.add(active_rows(prepared.listed)),
        )
        self.costs["active"] = PartCost(writer.counts - before)

        now_live = pq.read_table(active.finish(), columns=["id"])["id"]
        gone = pc.invert(pc.is_in(self.previous["id"], value_set=now_live))
        departed = self.previous.filter(gone)
        if departed.num_rows:
            self._read_departed(writer, departed, filters, run_id, known)
        log.info(
            "active sessions: %d now, %d at the last run, %d departed",
            len(now_live),
            self.previous.num_rows,
            departed.num_rows,
        )

    def _read_departed(
        self,
        writer: FlushingWriter,
        departed: pa.Table,
        filters: dict[str, str],
        run_id: str,
        known: KnownVersions,
    ) -> None:
        """Final state of sessions that left the active set: closed or expired since."""
        before = writer.counts
        low = pc.min(departed["created_ms"]).as_py()
        high = pc.max(departed["created_ms"]).as_py()
        estimated_pages = 2 * math.ceil(self.target.stored_rows(low, high) / PAGE_SIZE)
        remaining = set(departed["id"].to_pylist())
        strategy = "get each"
        if estimated_pages < len(remaining):
            strategy = "list CLOSED and EXPIRED"
            for status in ("CLOSED", "EXPIRED"):
                listing = listing_for(Window(low, high), {**filters, "status": status})
                stream = batch_stream(self.client, listing, flush_rows=writer.sink.flush_rows)
                drain(
                    stream,
                    self.rows,
                    writer,
                    run_id,
                    known,
                    resumable=False,
                    narrow=lambda batch: (_departed_rows(batch, remaining), False),
                )
        if remaining:
            self._get_each(writer, sorted(remaining), run_id, known)
        self.costs["departed"] = PartCost(writer.counts - before, strategy)

    def _get_each(
        self, writer: FlushingWriter, ids: list[str], run_id: str, known: KnownVersions
    ) -> None:
        """Read sessions one by one (a GET each) and write their versions not held yet."""
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            found = list(pool.map(self.client.get_session, ids))
        sessions = [s for s in found if s is not None]
        if sessions:
            rows = Rows.of_sessions(sessions, wall_clock_ms(), listed=False)
            prepared = self.rows.prepare(rows, run_id, known)
            writer.add(prepared.written, unchanged=prepared.unchanged, fetches=len(ids))
        else:
            writer.add(None, fetches=len(ids))
        writer.commit_if_due(None)


def _departed_rows(batch: list[WalkedPage], remaining: set[str]) -> list[WalkedPage]:
    """The rows of departed sessions not read yet (`remaining` forgets them)."""
    mine = []
    for page in batch:
        kept = page.only(remaining)
        remaining.difference_update(kept.ids)
        mine.append(kept)
    return mine
