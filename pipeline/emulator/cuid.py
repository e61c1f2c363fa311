"""Cuid-like session ids whose lexicographic order equals (createdAt, counter) order.

A session's place in every index is its *key*: `createdAt_ms * COUNTER_SPACE + counter`.
The id is `c` + base36(ms, 8) + base36(counter, 4) + 12 random base36 characters, so
comparing two ids as strings compares their keys first, exactly like upstream's cuids.
"""

from __future__ import annotations

COUNTER_SPACE = 36**4
ID_LENGTH = 25
PUBLIC_PREFIX = "session_"

_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"
_CHUNK = 36**3
# Whole base36 groups by table lookup: ids are built for every row served, so divmods count.
_PAIRS = tuple(a + b for a in _DIGITS for b in _DIGITS)
_TRIPLES = tuple(a + b for a in _DIGITS for b in _PAIRS)
_MASK64 = (1 << 64) - 1
_RANDOM_SPACE = 36**12


def mix64(value: int) -> int:
    """SplitMix64 finaliser: a cheap, well-spread 64-bit hash of an integer."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def base36(number: int, width: int) -> str:
    """Zero-padded lowercase base36; `width` must be a multiple of 1..3 chunks as used here."""
    out = []
    while width >= 3:
        number, low = divmod(number, _CHUNK)
        out.append(_TRIPLES[low])
        width -= 3
    if width:
        out.append(_TRIPLES[number % (36**width)][3 - width :])
    return "".join(reversed(out))


def key_of(ms: int, counter: int) -> int:
    return ms * COUNTER_SPACE + counter


def ms_of(key: int) -> int:
    return key // COUNTER_SPACE


def random_part(bits: int) -> str:
    """12 base36 characters from a 64-bit hash."""
    return base36(bits % _RANDOM_SPACE, 12)


def cuid_for(key: int, bits: int) -> str:
    """The 25-character id: `c` + base36(ms, 8) + base36(counter, 4) + random_part(bits)."""
    ms, counter = divmod(key, COUNTER_SPACE)
    ms_high, ms_low = divmod(ms, _CHUNK)
    ms_top, ms_mid = divmod(ms_high, _CHUNK)
    counter_top, counter_low = divmod(counter, _CHUNK)
    rest, r4 = divmod(bits % _RANDOM_SPACE, _CHUNK)
    rest, r3 = divmod(rest, _CHUNK)
    r1, r2 = divmod(rest, _CHUNK)
    triples = _TRIPLES
    return (
        "c"
        + _PAIRS[ms_top % 1296]
        + triples[ms_mid]
        + triples[ms_low]
        + _DIGITS[counter_top]
        + triples[counter_low]
        + triples[r1]
        + triples[r2]
        + triples[r3]
        + triples[r4]
    )
