"""Deterministic sessions: compact per-session keys built at startup, full sessions on demand.

Startup draws, for every session, only what the indexes need (createdAt key, type/task
pair, tag combination, externalId template) into flat arrays. Everything else about a
session is a pure function of (seed, slot): a 64-bit hash picks pool entries and offsets,
so a session can be rebuilt identically at any time without being kept in memory.
"""

from __future__ import annotations

import random
from array import array
from bisect import bisect_left
from dataclasses import dataclass
from typing import Any

from pipeline.emulator.catalog import (
    CLOSED_REASONS,
    EXTERNAL_ID_TEMPLATES,
    EXTERNAL_ID_WEIGHTS,
    TYPE_TASKS,
    Pools,
    build_pools,
)
from pipeline.emulator.cuid import (
    COUNTER_SPACE,
    PUBLIC_PREFIX,
    base36,
    cuid_for,
    key_of,
    mix64,
)
from pipeline.emulator.timestamps import DAY_MS, iso_ms

CLUSTER_PROBABILITY = 0.01  # a session starts a run of 2-5 sharing its exact millisecond
MIDNIGHT_CLUSTER_PROBABILITY = 0.5  # per UTC midnight inside the range
_TOKEN_SPACE = 36**6
_TOKEN_MULTIPLIER = 1_000_003  # odd and not a multiple of 3: invertible modulo 36**6
_TOKEN_INVERSE = pow(_TOKEN_MULTIPLIER, -1, _TOKEN_SPACE)
_HOUR_MS = 3_600_000


@dataclass(frozen=True)
class Population:
    """What startup produces: one entry per generated session, index = slot = age rank."""

    seed: int
    anchor_ms: int
    keys: array  # 'q', strictly ascending
    pair_codes: array  # 'B', index into TYPE_TASKS
    combo_codes: array  # 'H', index into pools.tag_combos
    external_codes: array  # 'B', index into EXTERNAL_ID_TEMPLATES (0 = none)
    pools: Pools

    @property
    def count(self) -> int:
        return len(self.keys)


def generate_population(count: int, seed: int, days: float, anchor_ms: int) -> Population:
    rng = random.Random(f"trigger-sessions-emulator:{seed}")
    pools = build_pools(rng)
    start_ms = anchor_ms - int(days * DAY_MS)
    keys = _keys(rng, _created_times(rng, count, start_ms, anchor_ms))
    draw = rng.random
    pair_table = _weighted_table([weight for *_, weight in TYPE_TASKS])
    external_table = _weighted_table(list(EXTERNAL_ID_WEIGHTS))
    combos = len(pools.tag_combos)
    pair_codes = array("B", [pair_table[int(draw() * 100)] for _ in range(count)])
    combo_codes = array("H", [int(draw() * combos) for _ in range(count)])
    external_codes = array("B", [external_table[int(draw() * 100)] for _ in range(count)])
    return Population(seed, anchor_ms, keys, pair_codes, combo_codes, external_codes, pools)


def _weighted_table(weights: list[int]) -> tuple[int, ...]:
    """100 slots filled in proportion to `weights`: a weighted draw is one lookup."""
    total = sum(weights)
    table: list[int] = []
    for code, weight in enumerate(weights):
        table.extend([code] * round(100 * weight / total))
    table.extend([table[-1]] * (100 - len(table)))
    return tuple(table[:100])


def _created_times(rng: random.Random, count: int, start_ms: int, end_ms: int) -> list[int]:
    """Ascending createdAt values spread over [start, end], with same-millisecond clusters."""
    draw = rng.random
    step = (end_ms - start_ms + 1) / max(count, 1)
    # One uniform draw inside each of `count` equal strata: ascending without a sort.
    times = [start_ms + int((index + draw()) * step) for index in range(count)]
    index = 0
    while index < count:
        if draw() < CLUSTER_PROBABILITY:
            size = 2 + int(draw() * 4)
            first = times[index]
            for other in range(index + 1, min(count, index + size)):
                times[other] = first  # lowering a later value keeps the list sorted
            index += size
        else:
            index += 1
    midnight = (start_ms // DAY_MS + 1) * DAY_MS
    first_midnight = True
    while midnight <= end_ms and count:
        # Always one cluster on a UTC day boundary, then about every other midnight.
        if first_midnight or draw() < MIDNIGHT_CLUSTER_PROBABILITY:
            position = bisect_left(times, midnight)
            for other in range(position, min(count, position + 2 + int(draw() * 4))):
                times[other] = midnight
            first_midnight = False
        midnight += DAY_MS
    return times


def _keys(rng: random.Random, times: list[int]) -> array:
    """Keys from a counter that increments per session, as cuid's counter does."""
    first = rng.randrange(COUNTER_SPACE)
    space = COUNTER_SPACE
    keys = [ms * space + (first + index) % space for index, ms in enumerate(times)]
    # Order can only break where the counter wraps to 0 inside one millisecond.
    for index in range((space - first) % space or space, len(keys), space):
        while 0 < index < len(keys) and keys[index] <= keys[index - 1]:
            keys[index] = keys[index - 1] + 1
            index += 1
    return array("q", keys)


@dataclass(frozen=True)
class Fate:
    """The status-relevant facts of a session, cheap enough to check row by row."""

    closed: bool
    expires_ms: int | None


class SessionFactory:
    """Builds the full, API-shaped state of any generated session from its slot."""

    def __init__(self, population: Population) -> None:
        self._population = population
        self._anchor = population.anchor_ms
        self._fate_salt = mix64(population.seed * 0x10001 + 1)
        self._id_salt = mix64(population.seed * 0x10001 + 2)
        self._token_offset = mix64(population.seed * 0x10001 + 3) % _TOKEN_SPACE

    def id_bits(self, slot: int) -> int:
        """Hash behind the random part of a slot's cuid (also used for created slots)."""
        return mix64(self._id_salt + slot)

    def fate(self, slot: int, created_ms: int) -> Fate:
        bits = mix64(self._fate_salt + slot)
        return Fate((bits & 0xFF) < 64, self._expiry(bits, created_ms))

    def _expiry(self, bits: int, created_ms: int) -> int | None:
        kind = (bits >> 8) & 0xFF
        offset = (bits >> 16) & 0xFF_FFFF_FFFF
        if kind < 90:
            return None
        if kind < 150:  # expired: somewhere between creation and the anchor
            return created_ms + offset % (max(0, self._anchor - created_ms) + 1)
        return self._anchor + _HOUR_MS + offset % (90 * DAY_MS)

    def external_id(self, slot: int) -> str | None:
        code = self._population.external_codes[slot]
        if not code:
            return None
        prefix, suffix = EXTERNAL_ID_TEMPLATES[code]
        token = (slot * _TOKEN_MULTIPLIER + self._token_offset) % _TOKEN_SPACE
        return prefix + base36(token, 6) + suffix

    def slot_for_external_id(self, text: str) -> int | None:
        """Invert `external_id` so lookups need no dictionary of a million strings."""
        for code in range(1, len(EXTERNAL_ID_TEMPLATES)):
            prefix, suffix = EXTERNAL_ID_TEMPLATES[code]
            if len(text) != len(prefix) + 6 + len(suffix) or not text.startswith(prefix):
                continue
            if not text.endswith(suffix):
                continue
            token = text[len(prefix) : len(prefix) + 6]
            try:
                number = int(token, 36)
            except ValueError:
                continue
            slot = ((number - self._token_offset) * _TOKEN_INVERSE) % _TOKEN_SPACE
            if slot < self._population.count and self.external_id(slot) == text:
                return slot
        return None

    def build(self, slot: int, key: int, with_trigger_config: bool) -> dict[str, Any]:
        population = self._population
        pools = population.pools
        created = key // COUNTER_SPACE
        fate_bits = mix64(self._fate_salt + slot)
        closed = (fate_bits & 0xFF) < 64
        expires = self._expiry(fate_bits, created)
        choice_bits = mix64(fate_bits)
        time_bits = mix64(choice_bits)
        room = max(0, self._anchor - created)
        first_fraction = (time_bits & 0xFFFF_FFFF) / 4_294_967_296
        second_fraction = (time_bits >> 32) / 4_294_967_296
        run_id = None
        closed_at = closed_reason = None
        if closed:
            closed_ms = created + int(first_fraction * min(room, 3 * DAY_MS))
            later = max(0, min(self._anchor - closed_ms, _HOUR_MS))
            updated = closed_ms + int(second_fraction * later)
            closed_at = iso_ms(closed_ms)
            closed_reason = CLOSED_REASONS[(choice_bits >> 18) & 0x7]
        else:
            updated = created
            if (choice_bits >> 25) & 0x3:  # three in four sessions were touched after creation
                updated += int(first_fraction * min(room, 7 * DAY_MS))
            if ((choice_bits >> 21) & 0xF) < 11:
                run_bits = mix64(time_bits)
                run_ms = created + (run_bits >> 48) % 5000
                run_key = key_of(run_ms, (run_bits >> 20) % COUNTER_SPACE)
                run_id = "run_" + cuid_for(run_key, run_bits)
        pair = TYPE_TASKS[population.pair_codes[slot]]
        session: dict[str, Any] = {
            "id": PUBLIC_PREFIX + cuid_for(key, self.id_bits(slot)),
            "externalId": self.external_id(slot),
            "type": pair[0],
            "taskIdentifier": pair[1],
        }
        if with_trigger_config:
            trigger_config = pools.trigger_configs[(choice_bits >> 10) & 0xFF]
            if trigger_config is not None:
                session["triggerConfig"] = trigger_config
        session["currentRunId"] = run_id
        session["tags"] = list(pools.tag_combos[population.combo_codes[slot]])
        session["metadata"] = pools.metadata[choice_bits & 0x3FF]
        session["closedAt"] = closed_at
        session["closedReason"] = closed_reason
        session["expiresAt"] = None if expires is None else iso_ms(expires)
        session["createdAt"] = iso_ms(created)
        session["updatedAt"] = iso_ms(updated)
        return session
