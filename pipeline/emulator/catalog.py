"""The vocabularies and value pools that generated sessions draw from.

Pools are built once per seed; each session picks entries by index, which keeps generation
cheap while the data still covers the shapes an exporter must survive (unicode, emoji,
deep nesting, large integers, commas inside values, absent `triggerConfig`...).
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

# (type, taskIdentifier, weight): a few types, each bound to a handful of tasks.
TYPE_TASKS: tuple[tuple[str, str, int], ...] = (
    ("chat.agent", "my-chat", 30),
    ("chat.agent", "support-agent", 15),
    ("chat.agent", "sales-assistant", 8),
    ("chat.human", "helpdesk-handoff", 12),
    ("chat.human", "concierge", 5),
    ("workflow", "nightly-report", 10),
    ("workflow", "invoice-sync", 8),
    ("workflow", "onboarding-flow", 7),
    ("voice.agent", "phone-triage", 5),
)

TAG_VOCABULARY: tuple[str, ...] = (
    "chat:1234",
    "env:prod",
    "env:staging",
    "priority:high",
    "priority,high",
    "a,b",
    "user:alice",
    "user:bob",
    "team:growth",
    "beta",
    "vip",
    "trial",
    "region:eu-west-1",
    "lang:fr",
    "🔥hot",
    "ünïcødé",
    "日本語タグ",
    "with space",
    "x",
    "campaign:2026-q1",
    "source:api",
    "source:web",
    "model:gpt-4o",
    "agent:v2",
    "flagged",
    "long-tag-" + "abcdefghij" * 5,
)
TAG_COUNT_WEIGHTS = (25, 25, 20, 15, 10, 5)  # 0..5 tags

# (prefix, suffix) around a 6-character token; index 0 means "no externalId".
EXTERNAL_ID_TEMPLATES: tuple[tuple[str, str], ...] = (
    ("", ""),
    ("chat_", ""),
    ("user-", "@example.com"),
    ("会话-", ""),
    ("thread:", ":ünï"),
    ("🚀 launch ", ""),
    ("order,", ""),
)
EXTERNAL_ID_WEIGHTS = (35, 30, 10, 8, 7, 5, 5)

CLOSED_REASONS: tuple[str, ...] = (
    "completed",
    "user_closed",
    "idle_timeout",
    "max_duration_exceeded",
    "Fermé par l'utilisateur ✋",
    "agent requested handoff",
    "error: upstream model unavailable",
    "会话结束",
)

MACHINES: tuple[str, ...] = (
    "micro",
    "small-1x",
    "small-2x",
    "medium-1x",
    "medium-2x",
    "large-1x",
    "large-2x",
)
REGIONS: tuple[str, ...] = ("us-east-1", "eu-central-1", "ap-southeast-1", "eu-west-2")
TRIGGER_CONFIG_OPTIONAL = (
    "machine",
    "queue",
    "tags",
    "maxAttempts",
    "maxDuration",
    "lockToVersion",
    "region",
    "idleTimeoutInSeconds",
)

_WORDS = (
    "alpha",
    "beta",
    "café",
    "naïve",
    "Ωmega",
    "日本",
    "🚀",
    "👩‍💻",
    "🇫🇷",
    "مرحبا",
    "line1\nline2",
    'quote " and backslash \\',
    "tab\tchar",
    "",
    "   padded   ",
)
_KEYS = (
    "userId",
    "plan",
    "score",
    "locale",
    "clé",
    "ключ",
    "emoji🎉",
    "nested",
    "flags",
    "count",
    "ratio",
    "note",
    "id",
    "with space",
    "dotted.key",
)
_NUMBERS: tuple[int | float, ...] = (
    0,
    1,
    -1,
    42,
    2**31,
    -(2**31),
    9007199254740993,  # 2**53 + 1: loses precision if parsed as a double
    2**63 - 1,
    3.14159,
    -0.5,
    1e-7,
    1e21,
    0.1,
)

METADATA_POOL_SIZE = 1024
TRIGGER_CONFIG_POOL_SIZE = 256
TAG_COMBO_POOL_SIZE = 512


@dataclass(frozen=True)
class Pools:
    """Shared, read-only values that sessions reference by index."""

    metadata: tuple[Any, ...]
    trigger_configs: tuple[dict[str, Any], ...]
    tag_combos: tuple[tuple[str, ...], ...]


def build_pools(rng: random.Random) -> Pools:
    return Pools(
        metadata=tuple(_metadata(rng) for _ in range(METADATA_POOL_SIZE)),
        trigger_configs=tuple(_trigger_config(rng) for _ in range(TRIGGER_CONFIG_POOL_SIZE)),
        tag_combos=tuple(_tag_combo(rng) for _ in range(TAG_COMBO_POOL_SIZE)),
    )


def _tag_combo(rng: random.Random) -> tuple[str, ...]:
    count = rng.choices(range(len(TAG_COUNT_WEIGHTS)), TAG_COUNT_WEIGHTS)[0]
    return tuple(rng.sample(TAG_VOCABULARY, count))


def _scalar(rng: random.Random) -> Any:
    roll = rng.random()
    if roll < 0.4:
        return rng.choice(_WORDS)
    if roll < 0.75:
        return rng.choice(_NUMBERS)
    if roll < 0.9:
        return rng.random() < 0.5
    return None


def _array(rng: random.Random, depth: int) -> list[Any]:
    items: list[Any] = [_scalar(rng) for _ in range(rng.randint(0, 4))]
    if depth > 0 and rng.random() < 0.5:
        items.append(_flat(rng))
    return items


def _flat(rng: random.Random) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key in rng.sample(_KEYS, rng.randint(1, 6)):
        out[key] = _array(rng, 0) if rng.random() < 0.15 else _scalar(rng)
    return out


def _nested(rng: random.Random, depth: int) -> dict[str, Any]:
    node = _flat(rng)
    if depth > 0:
        node[f"level{depth}"] = _nested(rng, depth - 1)
        if rng.random() < 0.4:
            node["items"] = _array(rng, depth)
    return node


def _metadata(rng: random.Random) -> Any:
    roll = rng.random()
    if roll < 0.1:
        return None
    if roll < 0.2:
        return {}
    if roll < 0.7:
        return _flat(rng)
    return _nested(rng, rng.randint(5, 7))


def _trigger_config(rng: random.Random) -> dict[str, Any]:
    roll = rng.random()
    if roll < 0.2:
        return {"basePayload": {}}  # the column is NOT NULL upstream: always a config
    base: dict[str, Any] = {} if rng.random() < 0.3 else _flat(rng)
    config: dict[str, Any] = {"basePayload": base}
    wanted = (
        TRIGGER_CONFIG_OPTIONAL
        if roll >= 0.5
        else tuple(rng.sample(TRIGGER_CONFIG_OPTIONAL, rng.randint(0, 4)))
    )
    for name in TRIGGER_CONFIG_OPTIONAL:
        if name in wanted:
            config[name] = _option(rng, name)
    return config


def _option(rng: random.Random, name: str) -> Any:
    if name == "machine":
        return rng.choice(MACHINES)
    if name == "queue":
        return rng.choice(("chat", "default", "priority-queue", "file-ünïcødé", "q" * 128))
    if name == "tags":
        return rng.sample(TAG_VOCABULARY, rng.randint(0, 5))
    if name == "maxAttempts":
        return rng.randint(1, 10)
    if name == "maxDuration":
        return rng.choice((1, 2, 60, 300, 3600, 86_400, 604_800))
    if name == "lockToVersion":
        return f"2024{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}.{rng.randint(1, 9)}"
    if name == "region":
        return rng.choice(REGIONS)
    return rng.choice((1, 30, 300, 1800, 3600))  # idleTimeoutInSeconds
