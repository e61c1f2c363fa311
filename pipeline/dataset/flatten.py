"""Flatten API sessions into Arrow tables of the `sessions` schema, column by column.

Two inputs, one table: `flatten_sessions` takes sessions as plain dicts (any shape the API
sends), `flatten_listed` takes the typed rows of a list page (`pipeline.api.records`),
whose values already have their column's type and whose JSON subtrees are still the text
the API sent. Values are gathered per column and converted in bulk by Arrow; only a column
whose bulk conversion fails takes the per-value path, where a value of the wrong type (or
out of range) becomes null in its column and is kept, as received, in `extra` — nothing is
dropped and nothing crashes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from operator import attrgetter
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


def flatten_listed(listed: Sequence[Any], extracted_at_ms: int, run_id: str) -> pa.Table:
    """The same table as `flatten_sessions`, from typed list rows (attributes named as the
    API's fields, `metadata` and `basePayload` as raw JSON text, triggerConfig a struct or
    anything else when absent)."""
    count = len(listed)
    if not count:
        return SCHEMA.empty_table()
    extras: Extras = [None] * count
    arrays: list[pa.Array] = []
    columns = zip(*map(_TOP_LEVEL_VALUES, listed), strict=True)
    for column, values in zip(TOP_LEVEL_COLUMNS, columns, strict=True):
        arrays.append(_build_typed(column, values, extras))
    configs = [s.triggerConfig for s in listed]
    present = [c for c in configs if hasattr(c, "basePayload")]
    if not present:
        arrays.extend(pa.nulls(count, c.type) for c in TRIGGER_CONFIG_COLUMNS)
    else:
        rows = [_CONFIG_VALUES(c) if hasattr(c, "basePayload") else _NO_CONFIG for c in configs]
        for column, values in zip(TRIGGER_CONFIG_COLUMNS, zip(*rows, strict=True), strict=True):
            arrays.append(_build_typed(column, values, extras))
    if any(e is not None for e in extras):
        arrays.append(pa.array([None if e is None else dumps_json(e) for e in extras], pa.string()))
    else:
        arrays.append(pa.nulls(count, pa.string()))
    arrays.append(pa.repeat(pa.scalar(extracted_at_ms, TIMESTAMP), count))
    arrays.append(pa.repeat(pa.scalar(run_id, pa.string()), count))
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


_TOP_LEVEL_VALUES = attrgetter(*(c.source for c in TOP_LEVEL_COLUMNS))
_CONFIG_VALUES = attrgetter(*(c.source for c in TRIGGER_CONFIG_COLUMNS))
_NO_CONFIG = (None,) * len(TRIGGER_CONFIG_COLUMNS)
_JSON_NULL = b"null"


def _build_typed(column: Column, values: Sequence[Any], extras: Extras) -> pa.Array:
    """A column of typed values: JSON text is kept as sent, the rest converted in bulk."""
    if column.kind == "json":
        texts = [None if v is None or (text := bytes(v)) == _JSON_NULL else text for v in values]
        try:
            return pa.array(texts, pa.string())
        except pa.ArrowInvalid:
            raise MalformedSession(f"session field {column.source_label!r} is not UTF-8") from None
    try:
        if column.kind == "timestamp":
            return pa.array(values, pa.string()).cast(TIMESTAMP)
        return pa.array(values, column.type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
        # a timestamp Arrow cannot cast, an int out of the column's range
        return _build_slowly(column, list(values), extras)


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
