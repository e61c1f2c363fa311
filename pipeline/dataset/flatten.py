"""Flatten API session objects into Arrow tables of the `sessions` schema, column by column.

Values are gathered per column and converted in bulk by Arrow; only a column whose bulk
conversion fails takes the per-value path, where a value of the wrong type becomes null in
its column and is kept, as received, in `extra` — nothing is dropped and nothing crashes.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import orjson
import pyarrow as pa

from pipeline.dataset.schema import (
    KNOWN_TOP_LEVEL,
    KNOWN_TRIGGER_CONFIG,
    SCHEMA,
    TIMESTAMP,
    TOP_LEVEL_COLUMNS,
    TRIGGER_CONFIG,
    TRIGGER_CONFIG_COLUMNS,
    Column,
)

Session = dict[str, Any]
Extras = list[dict[str, Any] | None]


class MalformedSession(ValueError):
    """A session the API returned lacks what every row needs (`id`, a valid `createdAt`)."""


def dumps_json(value: Any) -> str:
    """Compact JSON text; falls back to the stdlib for what orjson refuses (huge ints)."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def parse_timestamp_ms(text: str) -> int:
    """ISO-8601 text to epoch milliseconds (UTC when no offset is given)."""
    parsed = datetime.fromisoformat(text)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    delta = parsed - datetime(1970, 1, 1, tzinfo=UTC)
    return delta.days * 86_400_000 + delta.seconds * 1000 + delta.microseconds // 1000


def flatten_sessions(sessions: list[Session], extracted_at_ms: int, run_id: str) -> pa.Table:
    """Build one table with exactly `SCHEMA` from a list of session objects."""
    count = len(sessions)
    extras: Extras = [None] * count
    configs = _trigger_configs(sessions, extras)

    arrays: list[pa.Array] = []
    for column in TOP_LEVEL_COLUMNS:
        values = [s.get(column.source) for s in sessions]
        arrays.append(_build(column, values, extras))
    has_config = any(c is not None for c in configs)
    for column in TRIGGER_CONFIG_COLUMNS:
        if not has_config:
            arrays.append(pa.nulls(count, column.type))
            continue
        values = [c.get(column.source) if c is not None else None for c in configs]
        arrays.append(_build(column, values, extras))

    arrays.append(pa.array([None if e is None else dumps_json(e) for e in extras], pa.string()))
    arrays.append(pa.repeat(pa.scalar(extracted_at_ms, TIMESTAMP), count))
    arrays.append(pa.repeat(pa.scalar(run_id, pa.string()), count))
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


def _trigger_configs(sessions: list[Session], extras: Extras) -> list[Session | None]:
    """Each session's triggerConfig (or None), moving unknown fields into `extras`."""
    configs: list[Session | None] = []
    for index, session in enumerate(sessions):
        unknown = session.keys() - KNOWN_TOP_LEVEL
        if unknown:
            extras[index] = {key: session[key] for key in unknown}
        config = session.get(TRIGGER_CONFIG)
        if config is not None and not isinstance(config, dict):
            _keep(extras, index, TRIGGER_CONFIG, config)
            config = None
        elif config is not None:
            unknown_config = config.keys() - KNOWN_TRIGGER_CONFIG
            if unknown_config:
                for key in unknown_config:
                    _keep(extras, index, TRIGGER_CONFIG, config[key], key)
        configs.append(config)
    return configs


def _keep(extras: Extras, index: int, key: str, value: Any, sub_key: str | None = None) -> None:
    """Record a value no column can hold, under its API name (nested for triggerConfig)."""
    extra = extras[index]
    if extra is None:
        extra = extras[index] = {}
    if sub_key is None:
        extra[key] = value
    else:
        nested = extra.setdefault(key, {})
        if isinstance(nested, dict):
            nested[sub_key] = value


def _build(column: Column, values: list[Any], extras: Extras) -> pa.Array:
    if column.kind == "json":
        return pa.array([None if v is None else dumps_json(v) for v in values], pa.string())
    exact = _EXACT_TYPES.get(column.kind)
    if exact is not None and not all(v is None or type(v) is exact for v in values):
        # Arrow would split a string into characters, or truncate 5.5 to 5
        return _build_slowly(column, values, extras)
    try:
        if column.kind == "timestamp":
            return pa.array(values, pa.string()).cast(TIMESTAMP)
        return pa.array(values, column.type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
        return _build_slowly(column, values, extras)


def _build_slowly(column: Column, values: list[Any], extras: Extras) -> pa.Array:
    converted: list[Any] = []
    for index, value in enumerate(values):
        good = _convert(column, value)
        if good is _BAD:
            if not column.nullable:
                raise MalformedSession(
                    f"session field {column.source_label!r} is invalid: {value!r}"
                )
            if column.in_trigger_config:
                _keep(extras, index, TRIGGER_CONFIG, value, column.source)
            else:
                _keep(extras, index, column.source or column.name, value)
            good = None
        converted.append(good)
    return pa.array(converted, column.type)


_BAD = object()
_EXACT_TYPES = {"string_list": list, "int32": int, "int64": int}
_INT_RANGES = {"int32": 2**31, "int64": 2**63}


def _convert(column: Column, value: Any) -> Any:
    if value is None:
        return _BAD if not column.nullable else None
    kind = column.kind
    if kind == "string":
        return value if isinstance(value, str) else _BAD
    if kind == "timestamp":
        if not isinstance(value, str):
            return _BAD
        try:
            return parse_timestamp_ms(value)
        except ValueError:
            return _BAD
    if kind == "string_list":
        ok = isinstance(value, list) and all(isinstance(v, str) for v in value)
        return value if ok else _BAD
    limit = _INT_RANGES[kind]
    if isinstance(value, int) and not isinstance(value, bool) and -limit <= value < limit:
        return value
    return _BAD
