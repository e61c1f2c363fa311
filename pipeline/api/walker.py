"""The cursor walk over one listing: follow `pagination.next` exactly, refuse to loop.

`walk_pages` is a plain generator over a `fetch(cursor)` function; `prefetched` runs any
iterator one step ahead on a thread so that the next request is on the wire while the
current page is flattened and written.
"""

from __future__ import annotations

import queue
import threading
from collections import deque
from collections.abc import Callable, Iterator
from typing import TypeVar

from pipeline.api.client import SessionPage
from pipeline.errors import CursorLoop

T = TypeVar("T")

_RECENT_CURSORS = 1024  # how many recent cursors the loop guard remembers


def walk_pages(
    fetch: Callable[[str | None], SessionPage], start_cursor: str | None = None
) -> Iterator[SessionPage]:
    """Yield pages from `start_cursor` (None = the newest) until `next` is absent."""
    recent: deque[str] = deque(maxlen=_RECENT_CURSORS)
    seen: set[str] = set()
    cursor = start_cursor
    if cursor is not None:
        recent.append(cursor)
        seen.add(cursor)
    while True:
        page = fetch(cursor)
        yield page
        following = page.next_cursor
        if following is None:
            return
        if following in seen:
            raise CursorLoop(
                f"the API returned cursor {following!r} again; stopping instead of looping "
                "(is TRIGGER_API_URL a Trigger.dev sessions API?)"
            )
        if len(recent) == recent.maxlen:
            seen.discard(recent[0])
        recent.append(following)
        seen.add(following)
        cursor = following


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
