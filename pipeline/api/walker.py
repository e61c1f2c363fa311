"""The exact walk over one listing: a createdAt keyset, guarded against loops, prefetched.

Upstream orders a listing by `createdAt` but continues it with `session_id < cursor`, and
ids are made before `createdAt` is stamped, so a walk that only follows `next` loses rows
where the two orders disagree. `KeysetWalk` never relies on the id to reach older rows:

- each request asks for `filter[createdAt][to] = T`, where T is the oldest createdAt of the
  page before; ids already met at T are dropped when they come again;
- only while more than a page of rows share one millisecond does it follow `page[after]`,
  and then only inside that millisecond (from = to = T), where id order is the only order;
- a page shortened by the status re-check to nothing new at T tells no createdAt to move
  to: the next request is the same range without `filter[status]` (every row of a page
  comes back then) and the status is matched here, as the server derives it.

`WalkState` is plain data and is what a checkpoint stores, so a resumed walk sends exactly
the request it would have sent. A request the walk already sent means the API did not let
it advance: `walk_listing` stops with `CursorLoop` (exit 4) instead of looping.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from typing import Any, TypeVar

from pipeline.api.client import PAGE_SIZE, SessionPage
from pipeline.api.records import ListedSession
from pipeline.errors import ApiError, CursorLoop
from pipeline.timestamps import parse_timestamp_ms

T = TypeVar("T")
Session = dict[str, Any]

_RECENT_REQUESTS = 1024  # how many recent requests the loop guard remembers
STATUS_PARAM = "filter[status]"


@dataclass(frozen=True)
class Listing:
    """One listing: its filters (API parameter names) and createdAt window (inclusive ms)."""

    filters: dict[str, str] = field(default_factory=dict)
    from_ms: int | None = None
    to_ms: int | None = None
    page_size: int = PAGE_SIZE


@dataclass(frozen=True)
class WalkState:
    """Where a walk stands: enough to send exactly the next request after a restart."""

    to_ms: int | None = None  # upper createdAt bound of the next request; None: unbounded
    seen: tuple[str, ...] = ()  # ids already met whose createdAt is `to_ms`
    cursor: str | None = None  # `page[after]` inside the millisecond `to_ms` (pinned only)
    pinned: bool = False  # walking the one millisecond `to_ms` by cursor
    probe: bool = False  # the next request leaves `filter[status]` out
    done: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "seen": list(self.seen)}

    @staticmethod
    def from_dict(raw: dict[str, Any]) -> WalkState:
        return WalkState(**{**raw, "seen": tuple(raw.get("seen", ()))})


@dataclass(frozen=True)
class WalkedPage:
    sessions: list[Session]  # rows new to this walk, inside the listing
    state: WalkState  # the walk after this page: what a checkpoint stores
    received_at_ms: int
    # the page's rows as typed structs by id, when its body fitted the typed fast path
    typed: dict[str, ListedSession] | None = None


def _iso(epoch_ms: int) -> str:
    return datetime.fromtimestamp(epoch_ms / 1000, UTC).isoformat(timespec="milliseconds")


def created_ms(session: Session) -> int:
    """`createdAt` in epoch ms (the API writes ISO-8601 UTC with milliseconds)."""
    try:
        return parse_timestamp_ms(session["createdAt"])
    except (TypeError, ValueError):
        raise ApiError(
            f"session {session.get('id')!r} has an unusable createdAt {session.get('createdAt')!r}"
        ) from None


def derived_status(session: Session, now_ms: int) -> str:
    """The status the server derives: closed, else expired by now, else active."""
    if session.get("closedAt") is not None:
        return "CLOSED"
    expires = session.get("expiresAt")
    if isinstance(expires, str):
        try:
            if parse_timestamp_ms(expires) <= now_ms:
                return "EXPIRED"
        except ValueError:
            pass
    return "ACTIVE"


class KeysetWalk:
    """The walk strategy: shapes each request from the state, reads a page into the next."""

    def __init__(self, listing: Listing) -> None:
        self.listing = listing
        self.status = listing.filters.get(STATUS_PARAM)

    def start(self) -> WalkState:
        return WalkState(to_ms=self.listing.to_ms)

    def request(self, state: WalkState, floor_ms: int | None) -> dict[str, str]:
        params = {"page[size]": str(self.listing.page_size)}
        if state.pinned:
            assert state.to_ms is not None
            low: int | None = state.to_ms
        else:
            low = floor_ms
        if low:  # the API ignores 0, so never send it
            params["filter[createdAt][from]"] = str(low)
        if state.to_ms:
            params["filter[createdAt][to]"] = str(state.to_ms)
        for name, value in self.listing.filters.items():
            if not (state.probe and name == STATUS_PARAM):
                params[name] = value
        if state.pinned and state.cursor is not None:
            params["page[after]"] = state.cursor
        return params

    def advance(
        self, state: WalkState, page: SessionPage, floor_ms: int | None
    ) -> tuple[list[Session], WalkState]:
        """The rows of `page` new to the walk, and the state for the next request."""
        met = set(state.seen)
        fresh: list[Session] = []
        oldest: int | None = None
        at_oldest: list[str] = []
        rows_at_top = 0
        for session in page.sessions:
            created = created_ms(session)
            if state.to_ms is not None and created > state.to_ms:
                continue  # outside what was asked: not part of this listing
            if state.to_ms is not None and created == state.to_ms:
                rows_at_top += 1
            if oldest is None or created < oldest:
                oldest, at_oldest = created, [session["id"]]
            elif created == oldest:
                at_oldest.append(session["id"])
            if session["id"] in met or (floor_ms is not None and created < floor_ms):
                continue
            met.add(session["id"])
            unfiltered = state.probe and self.status is not None
            if unfiltered and derived_status(session, page.received_at_ms) != self.status:
                continue
            fresh.append(session)
        return fresh, self._next(state, page, floor_ms, oldest, at_oldest, rows_at_top, met)

    def _next(
        self,
        state: WalkState,
        page: SessionPage,
        floor_ms: int | None,
        oldest: int | None,
        at_oldest: list[str],
        rows_at_top: int,
        met: set[str],
    ) -> WalkState:
        if state.pinned:
            if page.next_cursor is not None:
                return replace(state, cursor=page.next_cursor)
            # the millisecond is walked whole: go on below it
            return self._below(state.to_ms - 1 if state.to_ms is not None else None, floor_ms)
        if page.next_cursor is None:
            return replace(state, done=True, probe=False)
        if oldest is not None and (state.to_ms is None or oldest < state.to_ms):
            if floor_ms is not None and oldest < floor_ms:
                return replace(state, done=True, probe=False)  # the rest is below the floor
            return WalkState(to_ms=oldest, seen=tuple(at_oldest))
        seen_at_top = tuple(sorted(met)) if state.to_ms is not None else state.seen
        if rows_at_top >= self.listing.page_size:
            # a full page inside one millisecond: only the id orders it, so the cursor is exact
            return WalkState(state.to_ms, seen_at_top, page.next_cursor, pinned=True)
        # nothing tells where to go on (the status re-check emptied the page): ask unfiltered
        return WalkState(state.to_ms, seen_at_top, probe=True)

    def _below(self, to_ms: int | None, floor_ms: int | None) -> WalkState:
        if to_ms is None or (floor_ms is not None and to_ms < floor_ms):
            return WalkState(to_ms=to_ms, done=True)
        return WalkState(to_ms=to_ms)


def walk_listing(
    fetch: Callable[[dict[str, str]], SessionPage],
    listing: Listing,
    state: WalkState | None = None,
    floor: Callable[[], int | None] | None = None,
) -> Iterator[WalkedPage]:
    """Walk `listing` from `state` (None: from the newest) until it is exhausted.

    `floor` gives the current lower createdAt bound (a backfill window's rises when it is
    split); rows below it are left to whoever took that range.
    """
    strategy = KeysetWalk(listing)
    state = state or strategy.start()
    recent: deque[tuple[tuple[str, str], ...]] = deque(maxlen=_RECENT_REQUESTS)
    sent: set[tuple[tuple[str, str], ...]] = set()
    last_cursor: str | None = None
    while not state.done:
        floor_ms = floor() if floor is not None else listing.from_ms
        if floor_ms is not None and state.to_ms is not None and state.to_ms < floor_ms:
            return
        params = strategy.request(state, floor_ms)
        signature = tuple(sorted(params.items()))
        if signature in sent:
            where = "" if state.to_ms is None else f", createdAt <= {_iso(state.to_ms)}"
            raise CursorLoop(
                f"the walk stopped advancing: the API answered the same page again (cursor "
                f"{last_cursor!r}{where}); stopping instead of looping "
                "(is TRIGGER_API_URL a Trigger.dev sessions API?)"
            )
        if len(recent) == recent.maxlen:
            sent.discard(recent[0])
        recent.append(signature)
        sent.add(signature)
        page = fetch(params)
        last_cursor = page.next_cursor
        sessions, state = strategy.advance(state, page, floor_ms)
        typed = None if page.listed is None else {row.id: row for row in page.listed}
        yield WalkedPage(sessions, state, page.received_at_ms, typed)


_END = object()


def prefetched(items: Iterator[T], depth: int = 2) -> Iterator[T]:
    """Iterate `items` on a background thread, at most `depth` items ahead of the consumer.

    Errors raised by `items` surface in the consumer at the point they occurred; closing
    the returned generator stops the producer.
    """
    buffer: queue.Queue[tuple[object, BaseException | None]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(entry: tuple[object, BaseException | None]) -> bool:
        while not stop.is_set():
            try:
                buffer.put(entry, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put((item, None)):
                    return
            put((_END, None))
        except BaseException as error:  # noqa: BLE001 - handed to the consumer
            put((_END, error))

    worker = threading.Thread(target=produce, name="page-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            item, error = buffer.get()
            if error is not None:
                raise error
            if item is _END:
                return
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        worker.join(timeout=5)
