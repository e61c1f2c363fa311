"""Cuid-like session ids whose lexicographic order equals (createdAt, counter) order.

A session's place in every index is its *key*: `createdAt_ms * COUNTER_SPACE + counter`.
The id is `c` + base36(ms, 8) + base36(counter, 4) + 12 random base36 characters, so
comparing two ids as strings compares their keys first, exactly like upstream's cuids.
"""

from __future__ import annotations

import random

COUNTER_SPACE = 36**4
ID_LENGTH = 25
RANDOM_LENGTH = 12
PUBLIC_PREFIX = "session_"

_DIGITS = "0123456789abcdefghijklmnopqrstuvwxyz"
# Two digits per lookup; a 1,296-entry table stays in CPU cache, a bigger one would not.
PAIRS = tuple((a + b).encode() for a in _DIGITS for b in _DIGITS)
_MASK64 = (1 << 64) - 1
_RANDOM_SPACE = 36**RANDOM_LENGTH
# Random bytes map onto digits by value modulo 36 (a slight skew nobody can observe).
_TO_DIGIT = bytes(_DIGITS.encode()[value % 36] for value in range(256))


def mix64(value: int) -> int:
    """SplitMix64 finaliser: a cheap, well-spread 64-bit hash of an integer."""
    value = (value + 0x9E3779B97F4A7C15) & _MASK64
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def base36(number: int, width: int) -> bytes:
    """Zero-padded lowercase base36 of `number` modulo 36**width; `width` must be even."""
    out = []
    for _ in range(width // 2):
        number, low = divmod(number, 1296)
        out.append(PAIRS[low])
    return b"".join(reversed(out))


def key_of(ms: int, counter: int) -> int:
    return ms * COUNTER_SPACE + counter


def ms_of(key: int) -> int:
    return key // COUNTER_SPACE


def random_parts(rng: random.Random, count: int) -> bytes:
    """`count` random 12-character parts in one block: slot i owns bytes [12i, 12i + 12)."""
    return rng.randbytes(RANDOM_LENGTH * count).translate(_TO_DIGIT)


def random_part(bits: int) -> bytes:
    """12 base36 characters from a 64-bit hash."""
    return base36(bits % _RANDOM_SPACE, RANDOM_LENGTH)


def cuid_bytes(key: int, random12: bytes) -> bytes:
    """The 25-character id: `c` + base36(ms, 8) + base36(counter, 4) + the random part."""
    ms, counter = divmod(key, COUNTER_SPACE)
    rest, p4 = divmod(ms, 1296)
    rest, p3 = divmod(rest, 1296)
    p1, p2 = divmod(rest, 1296)
    c1, c2 = divmod(counter, 1296)
    pairs = PAIRS
    return b"".join(
        (b"c", pairs[p1 % 1296], pairs[p2], pairs[p3], pairs[p4], pairs[c1], pairs[c2], random12)
    )


def cuid_for(key: int, bits: int) -> str:
    return cuid_bytes(key, random_part(bits)).decode()
