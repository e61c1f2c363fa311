import threading
import time

from pipeline.api.pacing import RateLimiter


class Clock:
    def __init__(self, start: float = 1_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def headers(remaining: int, reset_ms: int, limit: int = 10) -> dict[str, str]:
    return {"x-ratelimit-limit": str(limit), "x-ratelimit-remaining": str(remaining),
            "x-ratelimit-reset": str(reset_ms)}


def test_without_headers_it_never_waits():
    limiter = RateLimiter()
    for _ in range(100):
        limiter.acquire()
        limiter.observe({})
    assert limiter.waits == 0


def test_spends_what_remains_then_waits_for_the_reset():
    clock = Clock()
    limiter = RateLimiter(clock)
    reset = int(clock.now * 1000) + 250
    limiter.acquire()
    limiter.observe(headers(2, reset))
    limiter.acquire()
    limiter.acquire()
    blocked = threading.Event()

    def third():
        limiter.acquire()
        blocked.set()

    worker = threading.Thread(target=third)
    worker.start()
    assert not blocked.wait(0.1)  # no tokens left before the reset
    clock.now += 0.3  # past the reset: the refill is unknown, so one probe may go
    assert blocked.wait(1.0)
    worker.join()


def test_learns_refill_and_interval_from_headers():
    clock = Clock()
    limiter = RateLimiter(clock)
    base = int(clock.now * 1000)
    limiter.acquire()
    limiter.observe(headers(0, base + 250))
    clock.now += 0.26
    limiter.acquire()  # probe after the reset
    limiter.observe(headers(9, base + 500))  # refill of 10, minus the probe itself
    assert limiter.interval_ms == 250 and limiter.refill == 10
    for used in range(9):
        limiter.acquire()
        limiter.observe(headers(8 - used, base + 500))
    clock.now += 0.25  # next refill: the model adds 10 tokens without probing
    start = time.monotonic()
    for _ in range(10):
        limiter.acquire()
    assert time.monotonic() - start < 0.5
    assert limiter.available == 0


def test_delay_after_429_waits_until_the_reset():
    limiter = RateLimiter()
    delay = limiter.delay_after_429(headers(0, 10_500), received_ms=10_000)
    assert 0.5 <= delay < 0.6
    assert limiter.available == 0


def test_the_refill_is_learned_under_concurrency_and_not_from_a_full_bucket():
    clock = Clock()
    limiter = RateLimiter(clock)
    base = int(clock.now * 1000)
    first = limiter.acquire()
    limiter.observe(headers(40, base + 500, limit=50), ticket=first)
    # the bucket refills 20 to a full 50 while 5 requests are out: a full bucket says only
    # "at least 15", so nothing is learned from it
    tickets = [limiter.acquire() for _ in range(5)]
    clock.now += 0.51
    limiter.observe(headers(45, base + 1000, limit=50), ticket=tickets[-1])
    for _ in tickets[:-1]:
        limiter.release()  # their answers never came
    assert limiter.interval_ms == 500 and limiter.refill is None
    # drained to 10, then a refill of 20 seen by the 8th of 8 requests sent meanwhile:
    # 10 + 20 - 8 = 22 remaining, and the refill is 20 (not 22 - 10 + 1 = 13)
    last = limiter.acquire()
    limiter.observe(headers(10, base + 1000, limit=50), ticket=last)
    tickets = [limiter.acquire() for _ in range(8)]
    clock.now += 0.5
    limiter.observe(headers(22, base + 1500, limit=50), ticket=tickets[-1])
    assert limiter.refill == 20
    # a response to an earlier request, arriving later, teaches nothing
    limiter.observe(headers(30, base + 2000, limit=50), ticket=tickets[0])
    assert limiter.refill == 20
