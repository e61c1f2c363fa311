import threading

import pytest

from pipeline.api.client import SessionPage
from pipeline.api.walker import prefetched, walk_pages
from pipeline.errors import CursorLoop


def pages_from(chain):
    def fetch(cursor):
        return SessionPage([{"id": f"s{cursor}"}], chain.get(cursor), 0)
    return fetch


def test_follows_next_until_absent():
    fetch = pages_from({None: "a", "a": "b", "b": None})
    assert [p.sessions[0]["id"] for p in walk_pages(fetch)] == ["sNone", "sa", "sb"]


def test_resumes_from_a_cursor():
    fetch = pages_from({None: "a", "a": "b", "b": None})
    assert [p.sessions[0]["id"] for p in walk_pages(fetch, "a")] == ["sa", "sb"]


def test_repeated_cursor_stops_instead_of_looping():
    fetch = pages_from({None: "a", "a": "b", "b": "a"})
    with pytest.raises(CursorLoop):
        list(walk_pages(fetch))


def test_page_pointing_at_itself_stops():
    with pytest.raises(CursorLoop):
        list(walk_pages(pages_from({"a": "a"}), "a"))


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
