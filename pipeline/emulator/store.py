"""The sessions the emulator serves: sorted keys, per-value indexes, overrides and a cache.

Sessions live in one ascending array of keys (createdAt ms and cuid counter packed into an
int, see `cuid`) with a parallel array of slots. A list request is a keyset walk: bisect to
the cursor and the createdAt bounds, then step through the smallest matching index. No
request scans the whole store. Sessions changed through the API are kept whole in
`_overrides`; every other session is rebuilt from its slot by `SessionFactory`.
"""

from __future__ import annotations

import re
import sys
import threading
from array import array
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, overload

import orjson

from pipeline.emulator.bodies import NewSession, SessionPatch
from pipeline.emulator.cuid import (
    COUNTER_SPACE,
    ID_LENGTH,
    PUBLIC_PREFIX,
    cuid_for,
    key_of,
    mix64,
)
from pipeline.emulator.generate import Fate, Population, SessionFactory, generate_population
from pipeline.emulator.index import EMPTY_KEYS, build_indexes, contains
from pipeline.emulator.query import ListQuery
from pipeline.emulator.timestamps import iso_ms, now_ms, parse_iso_ms

_INFINITY = sys.maxsize
_BASE36 = re.compile(r"[0-9a-z]{8}")
DEFAULT_CACHE_SIZE = 65_536


class SessionConflict(Exception):
    """Create hit an existing externalId whose session can no longer start (409 upstream)."""


@dataclass(frozen=True)
class ListPage:
    rows: list[bytes]  # serialized sessions, newest first
    next_cursor: str | None
    previous_cursor: str | None


@dataclass(frozen=True)
class Created:
    session: dict[str, Any]
    created: bool  # False when an open session with that externalId was returned instead


@dataclass(frozen=True)
class _Override:
    """A session changed through the API: its whole current state."""

    session: dict[str, Any]
    closed: bool
    expires_ms: int | None
    updated_ms: int
    closed_ms: int | None = None  # when it was closed through the API (the replica lags)
    # (changed at ms, tags before the change): what a lagging replica still matches
    tag_history: tuple[tuple[int, frozenset[str]], ...] = field(default=())


@dataclass(frozen=True)
class _Plan:
    driver: Sequence[int]  # ascending keys the walk steps through
    on_main: bool  # driver is the main key array, so its index is a position
    others: tuple[array, ...]  # further index filters, checked by membership
    status: str | None
    lo: int  # inclusive key bound from createdAt filters
    hi: int  # exclusive
    tag: str | None = None
    replica_ms: int | None = None  # with a replication delay: the instant the replica shows


class _IdView(Sequence[str]):
    """The sorted cuids as a sequence, built on access, so a string cursor can be bisected."""

    def __init__(self, store: SessionStore) -> None:
        self._store = store

    def __len__(self) -> int:
        return len(self._store._keys)

    @overload
    def __getitem__(self, position: int) -> str: ...
    @overload
    def __getitem__(self, position: slice) -> Sequence[str]: ...
    def __getitem__(self, position: int | slice) -> str | Sequence[str]:
        if isinstance(position, slice):
            raise TypeError("slicing is not supported")
        store = self._store
        return store._cuid(store._keys[position], store._slots[position])


class SessionStore:
    """Thread-safe: the server thread and a test thread may use it at the same time."""

    def __init__(
        self,
        population: Population,
        *,
        cache_size: int = DEFAULT_CACHE_SIZE,
        id_skew_ms: int = 0,
        replication_delay_ms: int = 0,
    ) -> None:
        self._population = population
        self._skew = id_skew_ms
        self._delay_ms = replication_delay_ms
        self._factory = SessionFactory(population, id_skew_ms)
        self._keys = array("q", population.keys)
        self._slots = array("i", range(population.count))
        self._by_type, self._by_task, self._by_tag = build_indexes(population)
        self._overrides: dict[int, _Override] = {}
        self._created_keys: dict[int, int] = {}
        self._created_external_ids: dict[str, int] = {}
        self._next_slot = population.count
        self._counter = mix64(population.seed) % COUNTER_SPACE
        self._run_salt = mix64(population.seed + 0x5EED)
        self._cache: OrderedDict[int, bytes] = OrderedDict()
        self._cache_size = cache_size
        self._ids = _IdView(self)
        self._lock = threading.RLock()

    @classmethod
    def generate(
        cls,
        count: int,
        *,
        seed: int = 1,
        days: float = 30,
        anchor_ms: int | None = None,
        id_skew_ms: int = 0,
        replication_delay_ms: int = 0,
        same_ms_burst: int = 0,
    ) -> SessionStore:
        anchor = now_ms() if anchor_ms is None else anchor_ms
        return cls(
            generate_population(count, seed, days, anchor, same_ms_burst),
            id_skew_ms=id_skew_ms,
            replication_delay_ms=replication_delay_ms,
        )

    def __len__(self) -> int:
        return len(self._keys)

    @property
    def anchor_ms(self) -> int:
        return self._population.anchor_ms

    # -- reading ---------------------------------------------------------------------------

    def list_page(
        self, query: ListQuery, *, now: int | None = None, with_trigger_config: bool = False
    ) -> ListPage:
        now = now_ms() if now is None else now
        with self._lock:
            plan = self._plan(query, now)
            if self._skew or self._delay_ms:
                return self._list_ordered(query, plan, now, with_trigger_config)
            size = query.size
            if query.before is None:
                upper = plan.hi
                if query.after is not None:
                    upper = min(upper, self._bound(query.after, right=False))
                start = bisect_left(plan.driver, upper) - 1
                found = self._candidates(plan, start, -1, size + 1, plan.lo, upper)
                page = found[:size]
                next_cursor = self._cuid(*page[-1][:2]) if len(found) > size else None
                previous_cursor = None
                # Without a cursor the walk began at the newest match: nothing is newer.
                if (
                    query.after is not None
                    and page
                    and self._candidates(plan, page[0][2] + 1, 1, 1, plan.lo, plan.hi)
                ):
                    previous_cursor = self._cuid(*page[0][:2])
                newest_first = page
            else:
                lower = max(plan.lo, self._bound(query.before, right=True))
                start = bisect_left(plan.driver, lower)
                found = self._candidates(plan, start, 1, size + 1, lower, plan.hi)
                page = found[:size]
                previous_cursor = self._cuid(*page[-1][:2]) if len(found) > size else None
                next_cursor = None
                if page and self._candidates(plan, page[0][2] - 1, -1, 1, plan.lo, plan.hi):
                    next_cursor = self._cuid(*page[0][:2])
                newest_first = page[::-1]
            rows = [
                self._bytes(slot, key, with_trigger_config)
                for key, slot, _ in newest_first
                if query.status is None or self._status(slot, key, now) == query.status
            ]
        return ListPage(rows, next_cursor, previous_cursor)

    def get_bytes(self, ident: str) -> bytes | None:
        """The session by `session_…` id or externalId, with its triggerConfig, as JSON."""
        with self._lock:
            found = self._locate(ident)
            return None if found is None else self._bytes(found[0], found[1], True)

    def get(self, ident: str) -> dict[str, Any] | None:
        raw = self.get_bytes(ident)
        return None if raw is None else orjson.loads(raw)

    def session_lines(self, chunk_size: int = 1000) -> Iterator[list[bytes]]:
        """Every session's current full state as JSON, newest first, in chunks.

        The order is fixed when iteration starts; sessions created later are not included.
        """
        with self._lock:
            keys = array("q", self._keys)
            slots = array("i", self._slots)
        for end in range(len(keys), 0, -chunk_size):
            with self._lock:
                chunk = [
                    self._bytes(slots[position], keys[position], True, remember=False)
                    for position in range(end - 1, max(0, end - chunk_size) - 1, -1)
                ]
            yield chunk

    def iter_sessions(self) -> Iterator[dict[str, Any]]:
        """Every session in its current state, shaped exactly like the API JSON, newest first."""
        for chunk in self.session_lines():
            for line in chunk:
                yield orjson.loads(line)

    def cursor_at_rank(self, rank: int) -> str:
        """The bare cuid of the `rank`-th newest session (0 = newest): a valid page cursor."""
        with self._lock:
            position = len(self._keys) - 1 - rank
            return self._cuid(self._keys[position], self._slots[position])

    def _list_ordered(
        self, query: ListQuery, plan: _Plan, now: int, with_trigger_config: bool
    ) -> ListPage:
        """Upstream's query exactly: `ORDER BY created_at, session_id`, the cursor on the id.

        Used when ids may disagree with createdAt (an id skew) or the list lags (a
        replication delay); the default path relies on id order being key order.
        """
        size, forward = query.size, query.before is None
        cursor = query.after if forward else query.before
        lo, hi = plan.lo, plan.hi
        cursor_ms = _cuid_ms(cursor) if cursor is not None else None
        if cursor_ms is not None:  # id < cursor bounds createdAt to cursor time + skew
            if forward:
                hi = min(hi, (cursor_ms + self._skew + 1) * COUNTER_SPACE)
            else:
                lo = max(lo, (cursor_ms - self._skew) * COUNTER_SPACE)
        start = bisect_left(plan.driver, hi) - 1 if forward else bisect_left(plan.driver, lo)
        found: list[tuple[int, str, int, int]] = []  # (ms, cuid, key, slot)
        for key, slot, _ in self._matching(plan, start, -1 if forward else 1, lo, hi):
            ms = key // COUNTER_SPACE
            if len(found) > size and ms != found[-1][0]:
                break  # every row of the milliseconds collected so far is in: the order is set
            cuid = self._cuid(key, slot)
            if cursor is None or (cuid < cursor if forward else cuid > cursor):
                found.append((ms, cuid, key, slot))
        found.sort(key=lambda row: (row[0], row[1]), reverse=forward)
        page = found[:size]
        more = len(found) > size
        next_cursor = previous_cursor = None
        if forward:
            next_cursor = page[-1][1] if more else None
            previous_cursor = page[0][1] if cursor is not None and page else None
            newest_first = page
        else:
            previous_cursor = page[-1][1] if more else None
            next_cursor = page[0][1] if page else None
            newest_first = page[::-1]
        rows = [
            self._bytes(slot, key, with_trigger_config)
            for _, _, key, slot in newest_first
            if query.status is None or self._status(slot, key, now) == query.status
        ]
        return ListPage(rows, next_cursor, previous_cursor)

    # -- changing --------------------------------------------------------------------------

    def create(self, new: NewSession, *, now: int | None = None) -> Created:
        now = now_ms() if now is None else now
        with self._lock:
            if new.external_id:
                found = self._find_external_id(new.external_id)
                if found is not None:
                    return Created(self._upsert(*found, new, now), created=False)
            slot = self._next_slot
            self._next_slot += 1
            key = self._new_key(now)
            run_bits = mix64(self._run_salt + slot)
            run_key = key_of(now, (run_bits >> 20) % COUNTER_SPACE)
            session: dict[str, Any] = {
                "id": PUBLIC_PREFIX + self._factory.cuid(slot, key),
                "externalId": new.external_id,
                "type": new.type,
                "taskIdentifier": new.task_identifier,
            }
            if new.trigger_config is not None:
                session["triggerConfig"] = new.trigger_config
            session.update(
                currentRunId="run_" + cuid_for(run_key, run_bits),
                tags=list(new.tags),
                metadata=new.metadata,
                closedAt=None,
                closedReason=None,
                expiresAt=None if new.expires_ms is None else iso_ms(new.expires_ms),
                createdAt=iso_ms(now),
                updatedAt=iso_ms(now),
            )
            position = bisect_left(self._keys, key)
            self._keys.insert(position, key)
            self._slots.insert(position, slot)
            self._created_keys[slot] = key
            self._overrides[slot] = _Override(session, False, new.expires_ms, now)
            self._by_type.add((new.type,), key)
            self._by_task.add((new.task_identifier,), key)
            self._by_tag.add(set(new.tags), key)
            if new.external_id:
                self._created_external_ids[new.external_id] = slot
            return Created(_copy(session), created=True)

    def update(
        self, ident: str, patch: SessionPatch, *, now: int | None = None
    ) -> dict[str, Any] | None:
        now = now_ms() if now is None else now
        with self._lock:
            found = self._locate(ident)
            if found is None:
                return None
            slot, key = found
            current = self._current(slot, key)
            session = dict(current.session)
            history = current.tag_history
            if patch.tags is not None:
                old, new = set(session["tags"]), set(patch.tags)
                if self._delay_ms:  # the replica still matches the old tags for a while
                    history = (*history, (now, frozenset(old)))
                else:
                    self._by_tag.remove(old - new, key)
                self._by_tag.add(new - old, key)
                session["tags"] = list(patch.tags)
            if patch.metadata_set:
                session["metadata"] = patch.metadata
            return self._save(slot, current, session, now, tag_history=history)

    def close(
        self, ident: str, reason: str | None = None, *, now: int | None = None
    ) -> dict[str, Any] | None:
        """Close once; closing a closed session returns it unchanged, as upstream does."""
        now = now_ms() if now is None else now
        with self._lock:
            found = self._locate(ident)
            if found is None:
                return None
            slot, key = found
            current = self._current(slot, key)
            if current.closed:
                return _copy(current.session)
            session = dict(current.session)
            session.update(closedAt=iso_ms(now), closedReason=reason)  # currentRunId is kept
            return self._save(slot, current, session, now, closed=True)

    # -- internals -------------------------------------------------------------------------

    def _save(
        self,
        slot: int,
        current: _Override,
        session: dict[str, Any],
        now: int,
        *,
        closed: bool | None = None,
        tag_history: tuple[tuple[int, frozenset[str]], ...] | None = None,
    ) -> dict[str, Any]:
        # Strictly increasing even within one millisecond, so "latest version" is never a tie.
        updated = max(now, current.updated_ms + 1)
        session["updatedAt"] = iso_ms(updated)
        is_closed = current.closed if closed is None else closed
        closed_ms = now if closed and not current.closed else current.closed_ms
        self._overrides[slot] = _Override(
            session,
            is_closed,
            current.expires_ms,
            updated,
            closed_ms,
            current.tag_history if tag_history is None else tag_history,
        )
        self._cache.pop(slot * 2, None)
        self._cache.pop(slot * 2 + 1, None)
        return _copy(session)

    def _upsert(self, slot: int, key: int, new: NewSession, now: int) -> dict[str, Any]:
        """Create with a known externalId: upstream's upsert rewrites triggerConfig only."""
        fate = self._fate(slot, key)
        if fate.closed:
            raise SessionConflict(
                "Session is closed; use a different externalId to create a new session"
            )
        if fate.expires_ms is not None and fate.expires_ms < now:
            raise SessionConflict(
                "Session is expired; use a different externalId to create a new session"
            )
        current = self._current(slot, key)
        session = dict(current.session)
        session["triggerConfig"] = new.trigger_config
        return self._save(slot, current, session, now)

    def _new_key(self, now: int) -> int:
        counter = self._counter
        self._counter = (counter + 1) % COUNTER_SPACE
        key = key_of(now, counter)
        newest = self._keys[-1] if self._keys else -1
        if now == newest // COUNTER_SPACE and key <= newest:
            return newest + 1  # same millisecond as the newest: still sort first
        position = bisect_left(self._keys, key)
        while position < len(self._keys) and self._keys[position] == key:
            key += 1
            position += 1
        return key

    def _current(self, slot: int, key: int) -> _Override:
        override = self._overrides.get(slot)
        if override is not None:
            return override
        session = self._factory.build(slot, key, True)
        fate = self._factory.fate(slot, key // COUNTER_SPACE)
        return _Override(session, fate.closed, fate.expires_ms, parse_iso_ms(session["updatedAt"]))

    def _key_of_slot(self, slot: int) -> int:
        if slot < self._population.count:
            return self._population.keys[slot]
        return self._created_keys[slot]

    def _cuid(self, key: int, slot: int) -> str:
        return self._factory.cuid(slot, key)

    def _locate(self, ident: str) -> tuple[int, int] | None:
        """(slot, key) for a `session_…` id or, for anything else, an externalId."""
        if not ident.startswith(PUBLIC_PREFIX):
            return self._find_external_id(ident)
        cuid = ident[len(PUBLIC_PREFIX) :]
        id_ms = _cuid_ms(cuid) if len(cuid) == ID_LENGTH else None
        if id_ms is None:
            return None
        # the session's createdAt is within the skew of its id's time part
        first = bisect_left(self._keys, (id_ms - self._skew) * COUNTER_SPACE)
        last = bisect_left(self._keys, (id_ms + self._skew + 1) * COUNTER_SPACE)
        for position in range(first, last):
            if self._cuid(self._keys[position], self._slots[position]) == cuid:
                return self._slots[position], self._keys[position]
        return None

    def _find_external_id(self, external_id: str) -> tuple[int, int] | None:
        slot = self._created_external_ids.get(external_id)
        if slot is None:
            slot = self._factory.slot_for_external_id(external_id)
        return None if slot is None else (slot, self._key_of_slot(slot))

    def _bound(self, cursor: str, *, right: bool) -> int:
        """Key of the first session whose cuid is >= (or >, if `right`) the cursor string.

        Upstream compares ids as strings, so any string works as a cursor; a `session_…` id
        sorts after every cuid and therefore acts like no cursor at all.
        """
        position = (bisect_right if right else bisect_left)(self._ids, cursor)
        return self._keys[position] if position < len(self._keys) else _INFINITY

    def _plan(self, query: ListQuery, now: int) -> _Plan:
        lists: list[array] = []
        if query.type is not None:
            lists.append(self._by_type.keys_for(query.type))
        if query.task_identifier is not None:
            lists.append(self._by_task.keys_for(query.task_identifier))
        if query.tag is not None:
            lists.append(self._by_tag.keys_for(query.tag))
        if query.external_id is not None:
            found = self._find_external_id(query.external_id)
            lists.append(EMPTY_KEYS if found is None else array("q", [found[1]]))
        lo, hi = -_INFINITY, _INFINITY
        if query.created_from_ms is not None:
            lo = max(lo, query.created_from_ms * COUNTER_SPACE)
        if query.created_to_ms is not None:
            hi = min(hi, (query.created_to_ms + 1) * COUNTER_SPACE)
        if query.period_ms is not None:
            lo = max(lo, (now - query.period_ms) * COUNTER_SPACE)
        replica = now - self._delay_ms if self._delay_ms else None
        if not lists:
            return _Plan(self._keys, True, (), query.status, lo, hi, query.tag, replica)
        driver = min(lists, key=len)
        others = tuple(keys for keys in lists if keys is not driver)
        return _Plan(driver, False, others, query.status, lo, hi, query.tag, replica)

    def _candidates(
        self, plan: _Plan, index: int, step: int, limit: int, lo: int, hi: int
    ) -> list[tuple[int, int, int]]:
        """Up to `limit` (key, slot, driver index) matching every filter but true status.

        Status is matched here only by closed/not closed, the way upstream's stale first
        pass sees it; the caller re-checks the real status, so pages can come back short.
        """
        keys, slots = self._keys, self._slots
        unfiltered = plan.status is None and plan.replica_ms is None
        if plan.on_main and not plan.others and unfiltered:
            # Unfiltered: every position in the key range qualifies, so slice it directly.
            if step < 0:
                end = max(bisect_left(keys, lo) - 1, index - limit)
                return [(keys[i], slots[i], i) for i in range(index, end, -1)]
            end = min(bisect_left(keys, hi), index + limit)
            return [(keys[i], slots[i], i) for i in range(max(index, 0), end)]
        return list(islice(self._matching(plan, index, step, lo, hi), limit))

    def _matching(
        self, plan: _Plan, index: int, step: int, lo: int, hi: int
    ) -> Iterator[tuple[int, int, int]]:
        """(key, slot, driver index) of the rows the replica's first pass matches, in order."""
        driver, keys, slots, others = plan.driver, self._keys, self._slots, plan.others
        want_closed = None if plan.status is None else plan.status == "CLOSED"
        replica = plan.replica_ms
        first_created = self._population.count
        count = len(driver)
        while 0 <= index < count:
            key = driver[index]
            if key < lo or key >= hi:
                return
            index += step
            if others and not all(contains(other, key) for other in others):
                continue
            slot = slots[index - step] if plan.on_main else slots[bisect_left(keys, key)]
            if replica is not None:
                if slot >= first_created and key // COUNTER_SPACE > replica:
                    continue  # created through the API too recently: not replicated yet
                if plan.tag is not None and not self._replica_has_tag(slot, plan.tag, replica):
                    continue
            if want_closed is not None and self._replica_closed(slot, key, replica) != want_closed:
                continue
            yield key, slot, index - step

    def _replica_has_tag(self, slot: int, tag: str, replica_ms: int) -> bool:
        """Whether a replica lagging to `replica_ms` holds `tag` for the session (the index
        already matched its current tags, and keeps old ones while the replica lags)."""
        override = self._overrides.get(slot)
        if override is None:
            return True
        for changed_ms, before in override.tag_history:
            if changed_ms > replica_ms:
                return tag in before
        return tag in override.session["tags"]

    def _replica_closed(self, slot: int, key: int, replica_ms: int | None) -> bool:
        override = self._overrides.get(slot)
        if override is None or replica_ms is None or override.closed_ms is None:
            return self._fate(slot, key).closed
        return override.closed_ms <= replica_ms

    def _fate(self, slot: int, key: int) -> Fate:
        override = self._overrides.get(slot)
        if override is not None:
            return Fate(override.closed, override.expires_ms)
        return self._factory.fate(slot, key // COUNTER_SPACE)

    def _status(self, slot: int, key: int, now: int) -> str:
        fate = self._fate(slot, key)
        if fate.closed:
            return "CLOSED"
        if fate.expires_ms is not None and fate.expires_ms <= now:
            return "EXPIRED"
        return "ACTIVE"

    def _session(self, slot: int, key: int, with_trigger_config: bool) -> dict[str, Any]:
        override = self._overrides.get(slot)
        if override is None:
            return self._factory.build(slot, key, with_trigger_config)
        if with_trigger_config or "triggerConfig" not in override.session:
            return override.session
        return {name: v for name, v in override.session.items() if name != "triggerConfig"}

    def _bytes(
        self, slot: int, key: int, with_trigger_config: bool, remember: bool = True
    ) -> bytes:
        cache_key = slot * 2 + with_trigger_config
        raw = self._cache.get(cache_key)
        if raw is None:
            override = self._overrides.get(slot)
            if override is None:
                raw = self._factory.json(slot, key, with_trigger_config)
            else:
                # orjson hands back a ~4 KiB buffer shrunk in place; cached as is, each entry
                # would hold the whole block. An exact-size copy lets the block be reused.
                session = self._session(slot, key, with_trigger_config)
                raw = bytes(memoryview(orjson.dumps(session)))
            if remember:
                if len(self._cache) >= self._cache_size:
                    self._cache.popitem(last=False)
                self._cache[cache_key] = raw
        return raw


def _cuid_ms(text: str) -> int | None:
    """The time part (ms) of a cuid-shaped string, or None when it has none."""
    if len(text) < 9 or text[0] != "c" or not _BASE36.fullmatch(text, 1, 9):
        return None
    return int(text[1:9], 36)


def _copy(session: dict[str, Any]) -> dict[str, Any]:
    """A deep copy the caller may change freely (stored sessions share pooled values)."""
    return orjson.loads(orjson.dumps(session))
