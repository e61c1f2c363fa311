"""The keyset walk as plain functions: a model of upstream's query feeds it pages."""

import threading

import pytest

from pipeline.api.client import SessionPage
from pipeline.api.walker import KeysetWalk, Listing, WalkState, prefetched, walk_listing
from pipeline.errors import CursorLoop

BASE = 1_800_000_000_000


def iso(ms: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")[:-6] + "Z"


def upstream(rows, size=3, hide=frozenset(), spell=iso):
    """`WHERE created in [from, to] AND id < cursor ORDER BY created DESC, id DESC LIMIT size+1`,
    then rows in `hide` dropped (the status re-check) when filter[status] is sent. `spell`
    writes createdAt (the API's own shape by default)."""

    def fetch(params):
        low = int(params.get("filter[createdAt][from]", 0))
        high = int(params.get("filter[createdAt][to]", 10**15))
        after = params.get("page[after]")
        found = sorted(
            (r for r in rows if low <= r[1] <= high and (after is None or r[0] < after)),
            key=lambda r: (r[1], r[0]),
            reverse=True,
        )[: size + 1]
        page = found[:size]
        nxt = page[-1][0] if len(found) > size else None
        shown = [r for r in page if "filter[status]" not in params or r[0] not in hide]
        data = [{"id": i, "createdAt": spell(c), "closedAt": None,
                 "expiresAt": iso(BASE) if i in hide else None} for i, c in shown]
        return SessionPage(data, nxt, BASE + 10**9)

    return fetch


def walked(fetch, listing, state=None):
    return [s["id"] for page in walk_listing(fetch, listing, state) for s in page.sessions]


# ids whose order disagrees with createdAt: "z" is oldest but has the largest id
SKEWED = [("a", BASE + 9), ("b", BASE + 8), ("c", BASE + 7), ("z", BASE + 6), ("d", BASE + 5),
          ("e", BASE + 4), ("f", BASE + 3)]


def test_a_cursor_walk_loses_the_row_the_keyset_walk_finds():
    fetch = upstream(SKEWED)
    cursor_walk, params = [], {"page[size]": "3"}
    while True:
        page = fetch(params)
        cursor_walk += [s["id"] for s in page.sessions]
        if page.next_cursor is None:
            break
        params = {"page[size]": "3", "page[after]": page.next_cursor}
    assert "z" not in cursor_walk
    assert sorted(walked(fetch, Listing(page_size=3))) == sorted(i for i, _ in SKEWED)


def test_more_than_a_page_in_one_millisecond_is_walked_by_cursor_inside_it():
    rows = [(f"m{n:02d}", BASE + 5) for n in range(10)] + [("new", BASE + 9), ("old", BASE + 1)]
    got = walked(upstream(rows, size=3), Listing(page_size=3))
    assert sorted(got) == sorted(i for i, _ in rows) and len(got) == len(rows)


def test_pages_emptied_by_the_status_recheck_still_advance():
    rows = [(f"r{n:02d}", BASE + n) for n in range(20)]
    hide = frozenset(f"r{n:02d}" for n in range(3, 17))  # expired: listed by the stale pass
    listing = Listing({"filter[status]": "ACTIVE"}, page_size=3)
    got = walked(upstream(rows, size=3, hide=hide), listing)
    assert sorted(got) == sorted(i for i, _ in rows if i not in hide)


def test_a_resumed_walk_continues_exactly():
    rows = [(f"r{n:02d}", BASE + n // 3) for n in range(30)]
    fetch = upstream(rows, size=4)
    listing = Listing(page_size=4)
    pages = list(walk_listing(fetch, listing))
    for cut in range(len(pages)):
        before = [s["id"] for p in pages[: cut + 1] for s in p.sessions]
        state = WalkState.from_dict(pages[cut].state.to_dict())
        after = walked(fetch, listing, state)
        assert sorted(before + after) == sorted(i for i, _ in rows)


def test_a_server_repeating_its_cursor_stops_the_walk():
    def fetch(params):
        return SessionPage([{"id": "x", "createdAt": iso(BASE)}], params.get("page[after]", "c1"),
                           BASE)

    with pytest.raises(CursorLoop, match="c1"):
        list(walk_listing(fetch, Listing(page_size=1)))


def test_a_server_ignoring_the_window_stops_the_walk():
    def fetch(params):
        data = [{"id": f"s{n}", "createdAt": iso(BASE + n)} for n in range(3)]
        return SessionPage(data, "cnext", BASE)

    with pytest.raises(CursorLoop):
        list(walk_listing(fetch, Listing(page_size=3)))


def test_requests_shape():
    walk = KeysetWalk(Listing({"filter[type]": "t"}, 5, 9, page_size=100))
    assert walk.request(walk.start(), 5) == {
        "page[size]": "100", "filter[createdAt][from]": "5", "filter[createdAt][to]": "9",
        "filter[type]": "t"}
    pinned = WalkState(to_ms=7, cursor="cx", pinned=True)
    assert walk.request(pinned, 5)["filter[createdAt][from]"] == "7"
    assert walk.request(pinned, 5)["page[after]"] == "cx"


def test_prefetched_keeps_order_and_surfaces_errors():
    def numbers():
        yield from range(50)
        raise ValueError("boom")

    seen = []
    with pytest.raises(ValueError, match="boom"):
        for n in prefetched(numbers()):
            seen.append(n)
    assert seen == list(range(50))


def test_prefetched_stops_its_producer_when_the_consumer_stops():
    produced = []

    def endless():
        n = 0
        while True:
            produced.append(n)
            yield n
            n += 1

    stream = prefetched(endless(), depth=2)
    assert next(stream) == 0
    stream.close()
    count = len(produced)
    threading.Event().wait(0.3)
    assert len(produced) == count <= 4


def test_the_page_parse_of_timestamps_agrees_with_the_one_by_one_parse():
    from pipeline.timestamps import parse_timestamp_ms, parse_timestamps_ms

    texts = ["2026-11-29T18:20:57.123Z", "1969-12-31T23:59:59.999Z", "2026-11-29T18:20:57Z",
             "2026-11-29T18:20:57.123+02:00", "0001-01-01T00:00:00.000Z"]
    assert parse_timestamps_ms(texts) == [parse_timestamp_ms(t) for t in texts]
    # what Arrow refuses (no offset, sub-millisecond digits, not a time) is left to the
    # one-by-one parse, as the flatten leaves it
    for odd in ("2026-11-29T18:20:57.123", "2026-11-29T18:20:57.123456Z", "yesterday"):
        assert parse_timestamps_ms([texts[0], odd]) is None


def _offset_spelling(ms: int) -> str:
    """The same instant as `iso`, in a shape the API does not write (walked as epoch ms)."""
    return iso(ms)[:-1] + "+00:00"


@pytest.mark.parametrize("listing", [
    Listing(page_size=3),
    Listing(page_size=3, from_ms=BASE + 2, to_ms=BASE + 80),
    Listing({"filter[status]": "ACTIVE"}, page_size=3),
])
def test_createdat_compared_as_text_walks_as_parsed(listing):
    # the API's fixed-width createdAt is compared as text; any other spelling is parsed: the
    # two walks must be the same page for page, state for state
    rows = [(f"m{n:02d}", BASE + 50) for n in range(8)] + [
        (f"r{n:02d}", BASE + 10 + 3 * n) for n in range(30)] + SKEWED
    hide = frozenset({"r24", "r25", "r26", "m03", "r11"})
    walks = []
    for spell in (iso, _offset_spelling):
        fetch, sent = upstream(rows, size=3, hide=hide, spell=spell), []

        def counted(params, fetch=fetch, sent=sent):
            sent.append(params)
            if params.get("filter[createdAt][from]") != params.get("filter[createdAt][to]"):
                # the floor is left out (not a pinned millisecond): the walk must apply it
                params = {k: v for k, v in params.items() if k != "filter[createdAt][from]"}
            return fetch(params)

        def rising_floor(sent=sent):  # as a backfill's split raises it while pages are out
            return BASE + 40 if len(sent) >= 4 else listing.from_ms

        pages = walk_listing(counted, listing, floor=rising_floor)
        walks.append([(p.ids, p.created, p.state) for p in pages])
    assert walks[0] == walks[1]
    assert len({sid for ids, _, _ in walks[0] for sid in ids}) == sum(
        len(ids) for ids, _, _ in walks[0])


def test_the_text_order_is_taken_only_for_the_api_shape():
    from pipeline.api.walker import _in_text_order, _iso_ms_text
    from pipeline.timestamps import parse_timestamp_ms

    good = ["2026-11-29T18:20:57.123Z", "0001-01-01T00:00:00.000Z", "1969-12-31T23:59:59.999Z"]
    assert _in_text_order(good) and _in_text_order([])
    for odd in ("2026-11-29T18:20:57.123+00:00", "2026-11-29T18:20:57Z",
                "2026-11-29T18:20:57.1234Z", "2026-11-29T18:2a:57.123Z", "2026-11-29 18:20:57.123Z"):
        assert not _in_text_order([good[0], odd]), odd
    for text in good:
        assert _iso_ms_text(parse_timestamp_ms(text)) == text
    assert _iso_ms_text(None) is None and _iso_ms_text(10**18) is None
