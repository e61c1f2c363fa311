"""Pacing from the `x-ratelimit-*` headers: a local model of the server's token bucket.

Trigger.dev limits each environment key with a token bucket (by default 750 tokens, 250
added every 10 s; organisations differ) and reports `limit`, `remaining` and `reset` (epoch
ms of the next refill) on every response. The limiter spends the tokens it believes are
left, then waits for the next refill instead of running into 429s. It learns the refill
size and interval from how `remaining` and `reset` move, so nothing is hard-coded; one
instance is shared by every request made with one key, across threads.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping

WallClock = Callable[[], float]

_SAFETY_MS = 5  # wait a little past the server's reset instant


class RateLimiter:
    def __init__(self, clock: WallClock = time.time) -> None:
        self._clock = clock
        self._cond = threading.Condition()
        self.limit: int | None = None
        self.available: int | None = None  # tokens we believe we may still spend
        self.reset_ms: int | None = None  # the server's next refill instant
        self.refill: int | None = None  # tokens per refill, once learned
        self.interval_ms: int | None = None  # time between refills, once learned
        self.in_flight = 0
        self.waits = 0
        self.sent = 0  # requests let through so far: each one's ticket
        self._last_remaining: int | None = None
        self._last_ticket: int | None = None  # the request whose response said _last_remaining
        self._server_reset: int | None = None  # the newest reset a response carried
        self._probed_reset: int | None = None

    def _now_ms(self) -> int:
        return int(self._clock() * 1000)

    def acquire(self) -> int:
        """Block until a request may be sent, then count it as in flight; its ticket (the
        how-many-th request it is) goes back to `observe` with its response."""
        with self._cond:
            while True:
                now = self._now_ms()
                self._advance(now)
                if self.available is None or self.available >= 1:
                    if self.available is not None:
                        self.available -= 1
                    self.in_flight += 1
                    self.sent += 1
                    return self.sent
                if self.reset_ms is None:  # never saw a reset: nothing to wait for
                    self.available = None
                    continue
                self.waits += 1
                until_reset = (self.reset_ms + _SAFETY_MS - now) / 1000
                # past the reset but refill unknown: a probe is out; its response notifies
                self._cond.wait(timeout=until_reset if until_reset > 0 else 0.05)

    def release(self) -> None:
        """A request ended without a response (transport error)."""
        with self._cond:
            self.in_flight = max(0, self.in_flight - 1)
            self._cond.notify_all()

    def observe(
        self,
        headers: Mapping[str, str],
        received_ms: int | None = None,
        ticket: int | None = None,
    ) -> None:
        """Update the model from one response's headers (`ticket`: its request's, from
        `acquire`)."""
        limit = _int_header(headers, "x-ratelimit-limit")
        remaining = _int_header(headers, "x-ratelimit-remaining")
        reset = _int_header(headers, "x-ratelimit-reset")
        with self._cond:
            self.in_flight = max(0, self.in_flight - 1)
            if remaining is None or reset is None:
                self._cond.notify_all()
                return
            self.limit = limit if limit is not None else self.limit
            others = self.in_flight  # sent by us, perhaps not yet counted by the server
            if self._server_reset is not None and reset > self._server_reset:
                self._learn(reset - self._server_reset, remaining, ticket)
            if self._server_reset is None or reset >= self._server_reset:
                self._server_reset = reset
                self._last_remaining, self._last_ticket = remaining, ticket
            if self.reset_ms is None or reset > self.reset_ms:
                self.reset_ms = reset
                self.available = max(0, remaining - others)
            elif reset == self.reset_ms and self.available is not None:
                self.available = max(0, min(self.available, remaining - others))
            self._cond.notify_all()

    def delay_after_429(self, headers: Mapping[str, str], received_ms: int) -> float:
        """Seconds to wait before retrying a 429: until the reset instant."""
        reset = _int_header(headers, "x-ratelimit-reset")
        with self._cond:
            self.available = 0
            if reset is not None:
                self.reset_ms = max(self.reset_ms or 0, reset)
            target = self.reset_ms
        if target is None:
            return 1.0
        return max(0.05, (target + _SAFETY_MS - received_ms) / 1000)

    def _learn(self, step: int, remaining: int, ticket: int | None) -> None:
        """Learn the refill interval and size from the server's bucket entering a new period
        (`step` ms after the last one seen). Every period is a sample: the smallest step is
        the interval, the largest refill seen over one interval is the refill size."""
        if self.interval_ms is None or step < self.interval_ms:
            self.interval_ms = step
        if self._last_remaining is None or step != self.interval_ms:
            return
        # the server spent a token on every request sent after the last one observed, up to
        # this one (under concurrency, more than this request's own): not counting them
        # would learn the refill short, and leave part of the bucket unused
        spent = 1
        if ticket is not None and self._last_ticket is not None:
            if ticket <= self._last_ticket:
                return  # answered out of order: says nothing sure about the refill
            spent = ticket - self._last_ticket
        gained = remaining - self._last_remaining + spent
        if self.limit is not None and remaining + spent >= self.limit and self._last_remaining:
            return  # the refill filled the bucket: it is at least `gained`, not known
        if gained > 0 and (self.refill is None or gained > self.refill):
            self.refill = gained

    def _advance(self, now_ms: int) -> None:
        """Apply the refills that the server has made since the last known reset."""
        if self.reset_ms is None or now_ms < self.reset_ms + _SAFETY_MS:
            return
        if self.refill is None or self.interval_ms is None:
            # unknown refill: let one request through to read the new `remaining`
            # (again, if the probe's answer carried no headers: nothing else would wake us)
            if self._probed_reset != self.reset_ms or self.in_flight == 0:
                self._probed_reset = self.reset_ms
                self.available = max(1, self.available or 0)
            return
        periods = 1 + (now_ms - self.reset_ms - _SAFETY_MS) // self.interval_ms
        cap = self.limit if self.limit is not None else 10**9
        self.available = min(cap, (self.available or 0) + periods * self.refill)
        self.reset_ms += periods * self.interval_ms


def _int_header(headers: Mapping[str, str], name: str) -> int | None:
    value = headers.get(name)
    if value is None:
        return None
    try:
        return int(float(value))
    except ValueError:
        return None
