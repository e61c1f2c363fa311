"""Deterministic sessions: compact per-session keys built at startup, full sessions on demand.

Startup draws, for every session, a few numbers into flat arrays: its createdAt key, the
codes the indexes need (type/task pair, tag combination, externalId template), 12 random
id characters and two words of random bits (~60 bytes a session in all). Everything else
is a pure function of those: the bits pick pool entries, status and time offsets, so a
session is rebuilt identically whenever it is served, without being kept in memory.
"""

from __future__ import annotations

import random
from array import array
from bisect import bisect_left
from dataclasses import dataclass
from typing import Any

import orjson

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
    PAIRS,
    RANDOM_LENGTH,
    cuid_bytes,
    key_of,
    mix64,
    random_part,
    random_parts,
)
from pipeline.emulator.timestamps import DAY_MS, iso_bytes

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
    # Random bits drawn at startup rather than hashed from the slot: hashing in Python costs
    # ~0.5 µs a call, and every served row would need several.
    random_parts: bytes  # 12 base36 characters per slot: the random tail of its cuid
    fate_bits: array  # 'Q', closed or not, expiry
    detail_bits: array  # 'Q', pool picks and time offsets
    pools: Pools

    @property
    def count(self) -> int:
        return len(self.keys)


def generate_population(
    count: int, seed: int, days: float, anchor_ms: int, same_ms_burst: int = 0
) -> Population:
    rng = random.Random(f"trigger-sessions-emulator:{seed}")
    pools = build_pools(rng)
    start_ms = anchor_ms - int(days * DAY_MS)
    times = _created_times(rng, count, start_ms, anchor_ms)
    if same_ms_burst > 1 and count:
        middle = max(0, count // 2 - same_ms_burst // 2)
        for other in range(middle + 1, min(count, middle + same_ms_burst)):
            times[other] = times[middle]  # lowering later values keeps the list sorted
    keys = _keys(rng, times)
    draw = rng.random
    pair_table = _weighted_table([weight for *_, weight in TYPE_TASKS])
    external_table = _weighted_table(list(EXTERNAL_ID_WEIGHTS))
    combos = len(pools.tag_combos)
    pair_codes = array("B", [pair_table[int(draw() * 100)] for _ in range(count)])
    combo_codes = array("H", [int(draw() * combos) for _ in range(count)])
    external_codes = array("B", [external_table[int(draw() * 100)] for _ in range(count)])
    bits = rng.getrandbits
    return Population(
        seed=seed,
        anchor_ms=anchor_ms,
        keys=keys,
        pair_codes=pair_codes,
        combo_codes=combo_codes,
        external_codes=external_codes,
        random_parts=random_parts(rng, count),
        fate_bits=array("Q", [bits(64) for _ in range(count)]),
        detail_bits=array("Q", [bits(64) for _ in range(count)]),
        pools=pools,
    )


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


def _json(value: Any) -> bytes:
    return orjson.dumps(value)


@dataclass(frozen=True)
class Fate:
    """The status-relevant facts of a session, cheap enough to check row by row."""

    closed: bool
    expires_ms: int | None


class SessionFactory:
    """Builds the full, API-shaped state of any generated session from its slot."""

    def __init__(self, population: Population, id_skew_ms: int = 0) -> None:
        self._population = population
        self._skew = id_skew_ms
        self._skew_salt = mix64(population.seed * 0x10001 + 5)
        self._anchor = population.anchor_ms
        self._id_salt = mix64(population.seed * 0x10001 + 2)
        self._token_offset = mix64(population.seed * 0x10001 + 3) % _TOKEN_SPACE
        pools = population.pools
        self._pair_json = tuple(
            b'"type":%b,"taskIdentifier":%b,' % (_json(kind), _json(task))
            for kind, task, _ in TYPE_TASKS
        )
        self._tags_json = tuple(_json(list(combo)) for combo in pools.tag_combos)
        self._metadata_json = tuple(_json(value) for value in pools.metadata)
        self._trigger_json = tuple(
            b'"triggerConfig":%b,' % _json(config) for config in pools.trigger_configs
        )
        self._reason_json = tuple(_json(reason) for reason in CLOSED_REASONS)
        self._external_json = tuple(
            (_json(prefix)[:-1], _json(suffix)[1:]) for prefix, suffix in EXTERNAL_ID_TEMPLATES
        )

    def random_part(self, slot: int) -> bytes:
        """The random tail of a slot's cuid; created slots hash theirs from the slot."""
        if slot < self._population.count:
            return self._population.random_parts[RANDOM_LENGTH * slot : RANDOM_LENGTH * (slot + 1)]
        return random_part(mix64(self._id_salt + slot))

    def id_key(self, slot: int, key: int) -> int:
        """The key an id is made from: its time part off createdAt by up to the skew.

        Upstream makes ids on the app server before the insert stamps createdAt, so the two
        orders can disagree; with no skew the id's order is exactly the key's.
        """
        if not self._skew:
            return key
        offset = mix64(self._skew_salt + slot) % (2 * self._skew + 1) - self._skew
        return key + offset * COUNTER_SPACE

    def cuid(self, slot: int, key: int) -> str:
        return cuid_bytes(self.id_key(slot, key), self.random_part(slot)).decode()

    def fate(self, slot: int, created_ms: int) -> Fate:
        bits = self._population.fate_bits[slot]
        return Fate((bits & 0xFF) < 64, self._expiry(bits, created_ms))

    def _expiry(self, bits: int, created_ms: int) -> int | None:
        kind = (bits >> 8) & 0xFF
        offset = (bits >> 16) & 0xFF_FFFF_FFFF
        if kind < 90:
            return None
        if kind < 150:  # expired: somewhere between creation and the anchor
            return created_ms + offset % (max(0, self._anchor - created_ms) + 1)
        return self._anchor + _HOUR_MS + offset % (90 * DAY_MS)

    def _token(self, slot: int) -> bytes:
        high, low = divmod((slot * _TOKEN_MULTIPLIER + self._token_offset) % _TOKEN_SPACE, 1296)
        top, middle = divmod(high, 1296)
        return PAIRS[top] + PAIRS[middle] + PAIRS[low]

    def external_id(self, slot: int) -> str | None:
        code = self._population.external_codes[slot]
        if not code:
            return None
        prefix, suffix = EXTERNAL_ID_TEMPLATES[code]
        return prefix + self._token(slot).decode() + suffix

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
        return orjson.loads(self.json(slot, key, with_trigger_config))

    def json(self, slot: int, key: int, with_trigger_config: bool) -> bytes:
        """The session serialized exactly as orjson would write its dict (tests check this).

        Joining pre-serialized pool pieces costs a fraction of building a dict and
        serializing it, and a cold walk through a million sessions does this for every row.
        """
        population = self._population
        created = key // COUNTER_SPACE
        fate_bits = population.fate_bits[slot]
        detail = population.detail_bits[slot]
        expires = self._expiry(fate_bits, created)
        room = max(0, self._anchor - created)
        offset_bits = detail >> 27
        run_id = closed_at = closed_reason = b"null"
        if ((detail >> 21) & 0xF) < 11:
            # The run started a few ms to seconds after the session; its random tail is
            # borrowed from another slot, which is as unpredictable and costs no hashing.
            # Closing keeps it, as upstream does.
            run_key = key_of(created + (fate_bits >> 56) * 19, (detail >> 40) % COUNTER_SPACE)
            other = (slot * 7 + 3) % population.count
            run_id = b'"run_%b"' % cuid_bytes(
                run_key, population.random_parts[12 * other : 12 * other + 12]
            )
        if (fate_bits & 0xFF) < 64:  # closed
            closed_ms = created + offset_bits % (min(room, 3 * DAY_MS) + 1)
            later = max(0, min(self._anchor - closed_ms, _HOUR_MS))
            updated = closed_ms + (offset_bits // 7919) % (later + 1)
            closed_at = b'"%b"' % iso_bytes(closed_ms)
            closed_reason = self._reason_json[(detail >> 18) & 0x7]
        else:
            updated = created
            if (detail >> 25) & 0x3:  # three in four sessions were touched after creation
                updated += offset_bits % (min(room, 7 * DAY_MS) + 1)
        created_at = iso_bytes(created)
        code = population.external_codes[slot]
        if code:
            before, after = self._external_json[code]
            external_id = before + self._token(slot) + after
        else:
            external_id = b"null"
        return b"".join(
            (
                b'{"id":"session_',
                cuid_bytes(
                    self.id_key(slot, key), population.random_parts[12 * slot : 12 * slot + 12]
                ),
                b'","externalId":',
                external_id,
                b",",
                self._pair_json[population.pair_codes[slot]],
                self._trigger_json[(detail >> 10) & 0xFF] if with_trigger_config else b"",
                b'"currentRunId":',
                run_id,
                b',"tags":',
                self._tags_json[population.combo_codes[slot]],
                b',"metadata":',
                self._metadata_json[detail & 0x3FF],
                b',"closedAt":',
                closed_at,
                b',"closedReason":',
                closed_reason,
                b',"expiresAt":',
                b"null" if expires is None else b'"%b"' % iso_bytes(expires),
                b',"createdAt":"',
                created_at,
                b'","updatedAt":"',
                created_at if updated == created else iso_bytes(updated),
                b'"}',
            )
        )
