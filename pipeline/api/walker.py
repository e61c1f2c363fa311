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
import re
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from typing import Any, TypeVar

from pipeline.api.client import PAGE_SIZE, SessionPage
from pipeline.api.records import ListedSession
from pipeline.errors import ApiError, CursorLoop
from pipeline.timestamps import format_timestamp_ms, parse_timestamp_ms, parse_timestamps_ms

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
    """One page of a walk: which of its rows are new to the walk inside the listing.

    The rows stay as the page holds them (typed structs, or dicts when the body did not fit
    them); `keep` indexes the new ones, `ids` and `created` (epoch ms) describe them.
    """

    page: SessionPage
    keep: list[int]  # indices into the page's rows
    ids: list[str]  # of the kept rows
    stamps: list[str]  # createdAt of the kept rows, as the API wrote it
    state: WalkState  # the walk after this page: what a checkpoint stores

    @cached_property
    def created(self) -> list[int]:
        """createdAt (epoch ms) of the kept rows, parsed on first use (off the walk's
        thread: the walk itself compares the texts)."""
        return _parse_created(self.stamps, self.ids)

    @property
    def received_at_ms(self) -> int:
        return self.page.received_at_ms

    @property
    def count(self) -> int:
        return len(self.keep)

    @property
    def typed(self) -> list[ListedSession] | None:
        """The kept rows as typed structs, or None when the page's body did not fit them."""
        listed = self.page.listed
        if listed is None:
            return None
        if len(self.keep) == len(listed):
            return listed
        return [listed[i] for i in self.keep]

    @property
    def sessions(self) -> list[Session]:
        """The kept rows as plain dicts (decoded from the body on first use)."""
        rows = self.page.sessions
        if len(self.keep) == len(rows):
            return rows
        return [rows[i] for i in self.keep]

    def only(self, wanted: set[str]) -> WalkedPage:
        """The same page keeping only the rows whose id is in `wanted`."""
        return self._narrowed([n for n, sid in enumerate(self.ids) if sid in wanted])

    def since(self, from_ms: int) -> WalkedPage:
        """The same page keeping only the rows created at or after `from_ms`."""
        return self._narrowed([n for n, ms in enumerate(self.created) if ms >= from_ms])

    def _narrowed(self, positions: list[int]) -> WalkedPage:
        return replace(
            self,
            keep=[self.keep[n] for n in positions],
            ids=[self.ids[n] for n in positions],
            stamps=[self.stamps[n] for n in positions],
        )


# createdAt as the API writes it (JavaScript's toISOString): one fixed width, so for texts
# of this shape the text order is the time order and the walk compares them as they are
_ISO_MS_WIDTH = 24
_ISO_MS_TEXTS = re.compile(r"(?:\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z)*")


def _iso_ms_text(epoch_ms: int | None) -> str | None:
    """`epoch_ms` in the API's createdAt shape, or None when it has none (no bound, or a
    year outside 0001-9999)."""
    if epoch_ms is None:
        return None
    try:
        return format_timestamp_ms(epoch_ms)
    except OverflowError:
        return None


def _in_text_order(stamps: list[str]) -> bool:
    """Whether every stamp has the API's fixed-width createdAt shape (digits checked)."""
    return (
        all(len(stamp) == _ISO_MS_WIDTH for stamp in stamps)
        and _ISO_MS_TEXTS.fullmatch("".join(stamps)) is not None
    )


def _parse_created(stamps: list[str], ids: list[str]) -> list[int]:
    """createdAt texts to epoch ms: one Arrow cast (the flatten's), else one by one."""
    created = parse_timestamps_ms(stamps) if stamps else []
    if created is not None:
        return created
    return [_created_ms(stamp, sid) for stamp, sid in zip(stamps, ids, strict=True)]


def _created_ms(stamp: object, session_id: object) -> int:
    """`createdAt` in epoch ms (the API writes ISO-8601 UTC with milliseconds)."""
    try:
        return parse_timestamp_ms(stamp)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ApiError(f"session {session_id!r} has an unusable createdAt {stamp!r}") from None


def derived_status(session: Session, now_ms: int) -> str:
    """The status the server derives: closed, else expired by now, else active."""
    return status_of(session.get("closedAt"), session.get("expiresAt"), now_ms)


def status_of(closed_at: object, expires_at: object, now_ms: int) -> str:
    """`derived_status` from a row's `closedAt` and `expiresAt` as the API sent them."""
    if closed_at is not None:
        return "CLOSED"
    if isinstance(expires_at, str):
        try:
            if parse_timestamp_ms(expires_at) <= now_ms:
                return "EXPIRED"
        except ValueError:
            pass
    return "ACTIVE"


def _row_keys(page: SessionPage) -> tuple[list[str], list[str]]:
    """Each row's id and createdAt text, from the row keys when the page has them (no dict
    is built), else from the dicts (the generic decode checked both are strings)."""
    if page.keys is not None:
        return [row.id for row in page.keys], [row.createdAt for row in page.keys]
    sessions = page.sessions
    return [s["id"] for s in sessions], [s["createdAt"] for s in sessions]


def _comparable(
    ids: list[str], stamps: list[str], top_ms: int | None, floor_ms: int | None
) -> tuple[list[Any], Any, Any]:
    """The rows' createdAt and the two bounds in one comparable form: the texts as they are
    when they all have the API's fixed-width shape (nothing parsed), else epoch ms."""
    if _in_text_order(stamps):
        top, floor = _iso_ms_text(top_ms), _iso_ms_text(floor_ms)
        if (top is None) == (top_ms is None) and (floor is None) == (floor_ms is None):
            return stamps, top, floor
    return _parse_created(stamps, ids), top_ms, floor_ms


def _row_status(page: SessionPage, index: int, now_ms: int) -> str:
    if page.keys is not None:
        row = page.keys[index]
        return status_of(row.closedAt, row.expiresAt, now_ms)
    return derived_status(page.sessions[index], now_ms)


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
    ) -> tuple[WalkedPage, WalkState]:
        """The rows of `page` new to the walk, and the state for the next request."""
        met = set(state.seen)
        ids, stamps = _row_keys(page)
        created, top, floor = _comparable(ids, stamps, state.to_ms, floor_ms)
        keep: list[int] = []
        oldest: Any = None  # in the form `_comparable` gives, epoch ms after the loop
        at_oldest: list[str] = []
        rows_at_top = 0
        unfiltered = state.probe and self.status is not None
        for index, (sid, stamp) in enumerate(zip(ids, created, strict=True)):
            if top is not None and stamp >= top:
                if stamp > top:
                    continue  # outside what was asked: not part of this listing
                rows_at_top += 1
            if oldest is None or stamp < oldest:
                oldest, at_oldest = stamp, [sid]
            elif stamp == oldest:
                at_oldest.append(sid)
            if sid in met or (floor is not None and stamp < floor):
                continue
            met.add(sid)
            if unfiltered and _row_status(page, index, page.received_at_ms) != self.status:
                continue
            keep.append(index)
        if isinstance(oldest, str):
            oldest = _created_ms(oldest, at_oldest[0])
        following = self._next(state, page, floor_ms, oldest, at_oldest, rows_at_top, met)
        walked = WalkedPage(
            page, keep, [ids[i] for i in keep], [stamps[i] for i in keep], following
        )
        return walked, following

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
            bound = state.to_ms
            where = "" if bound is None else f", createdAt <= {format_timestamp_ms(bound)}"
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
        walked, state = strategy.advance(state, page, floor_ms)
        yield walked


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
        except BaseException as error:  # handed to the consumer
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
