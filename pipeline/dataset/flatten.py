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
from itertools import accumulate
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
from pipeline.timestamps import parse_timestamp_ms

Session = dict[str, Any]
Extras = list[dict[str, Any] | None]
# when rows were received: one epoch-ms time for all, or (rows, epoch ms) runs in row order
Extracted = int | Sequence[tuple[int, int]]


class MalformedSession(ValueError):
    """A session the API returned lacks what every row needs (`id`, a valid `createdAt`)."""


def dumps_json(value: Any) -> str:
    """Compact JSON text; falls back to the stdlib for what orjson refuses (huge ints)."""
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def flatten_sessions(sessions: list[Session], extracted_at_ms: Extracted, run_id: str) -> pa.Table:
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
    arrays.append(_extracted(extracted_at_ms, count))
    arrays.append(pa.repeat(pa.scalar(run_id, pa.string()), count))
    return pa.Table.from_arrays(arrays, schema=SCHEMA)


def flatten_listed(listed: Sequence[Any], extracted_at_ms: Extracted, run_id: str) -> pa.Table:
    """The same table as `flatten_sessions`, from typed list rows: attributes named as the
    API's fields, values already of their column's type, `metadata` and `basePayload` the
    raw JSON text the API sent (kept as is), `triggerConfig` an object or absent. Arrow's
    conversions cost about as much per call as per hundred rows: several pages at once
    flatten for about half the CPU of one call each."""
    count = len(listed)
    if not count:
        return SCHEMA.empty_table()
    extras: Extras = [None] * count
    built = _TOP_LEVEL.build(listed, extras)
    configs = [s.triggerConfig for s in listed]
    if any(hasattr(c, _BASE_PAYLOAD) for c in configs):
        present = [c if hasattr(c, _BASE_PAYLOAD) else None for c in configs]
        built.update(_TRIGGER_CONFIG.build(present, extras))
    else:
        built.update((c.name, pa.nulls(count, c.type)) for c in TRIGGER_CONFIG_COLUMNS)
    if any(e is not None for e in extras):
        built["extra"] = pa.array([None if e is None else dumps_json(e) for e in extras])
    else:
        built["extra"] = pa.nulls(count, pa.string())
    built["extracted_at"] = _extracted(extracted_at_ms, count)
    built["run_id"] = pa.repeat(pa.scalar(run_id, pa.string()), count)
    return pa.Table.from_arrays([built[name] for name in SCHEMA.names], schema=SCHEMA)


def _extracted(extracted_at_ms: Extracted, count: int) -> pa.Array:
    """The `extracted_at` column: one time for every row, or (rows, time) runs of pages
    received at different times."""
    if isinstance(extracted_at_ms, int):
        return pa.repeat(pa.scalar(extracted_at_ms, TIMESTAMP), count)
    values = [ms for rows, ms in extracted_at_ms for _ in range(rows)]
    if len(values) != count:
        raise ValueError(f"extracted_at runs cover {len(values)} rows, not {count}")
    return pa.array(values, pa.int64()).cast(TIMESTAMP)


class _TypedGroup:
    """Columns read from one kind of typed object (a session, or its triggerConfig), built
    with a few bulk conversions per page instead of one or two per column."""

    def __init__(self, columns: Sequence[Column]) -> None:
        self.plain = [c for c in columns if c.kind != "json"]
        self.json = [c for c in columns if c.kind == "json"]
        self.values = attrgetter(*(c.source for c in self.plain))
        # timestamps stay text here: one cast for all of them afterwards
        self.struct = pa.struct(
            [(c.name, pa.string() if c.kind == "timestamp" else c.type) for c in self.plain]
        )

    def build(self, objects: Sequence[Any | None], extras: Extras) -> dict[str, pa.Array]:
        rows = [None if o is None else self.values(o) for o in objects]
        built: dict[str, pa.Array] = {}
        try:
            children = pa.array(rows, self.struct).flatten()
        except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
            # an int out of its column's range: column by column, the culprit into `extra`
            for index, column in enumerate(self.plain):
                values = [None if r is None else r[index] for r in rows]
                built[column.name] = _build_typed(column, values, extras)
        else:
            stamps = [
                (c, a) for c, a in zip(self.plain, children, strict=True) if c.kind == "timestamp"
            ]
            built.update((c.name, a) for c, a in zip(self.plain, children, strict=True))
            built.update(_cast_timestamps(stamps, extras))
        for column in self.json:
            source = attrgetter(column.source)
            raws = [_NULL_TEXT if o is None else source(o) for o in objects]
            built[column.name] = _json_texts(column, raws)
        return built


def _cast_timestamps(
    stamps: list[tuple[Column, pa.Array]], extras: Extras
) -> list[tuple[str, pa.Array]]:
    """ISO-8601 text columns to timestamps: one cast for all, else column by column."""
    if not stamps:
        return []
    try:
        joined = pa.concat_arrays([a for _, a in stamps]).cast(TIMESTAMP)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        return [(c.name, _build_typed(c, a.to_pylist(), extras)) for c, a in stamps]
    length = len(stamps[0][1])
    return [(c.name, joined.slice(i * length, length)) for i, (c, _) in enumerate(stamps)]


def _json_texts(column: Column, raws: list[Any]) -> pa.Array:
    """Raw JSON texts (buffers) as one string array, JSON null as a null: one copy, no
    per-value conversion."""
    offsets = pa.array(list(accumulate(map(len, raws), initial=0)), pa.int32()).buffers()[1]
    data = pa.py_buffer(b"".join(raws))
    texts = pa.StringArray.from_buffers(len(raws), offsets, data)
    try:
        texts.validate(full=True)  # UTF-8, which the typed decoder leaves unchecked
    except pa.ArrowInvalid:
        raise MalformedSession(f"session field {column.source_label!r} is not UTF-8") from None
    valid = pa.array([len(r) != 4 or bytes(r) != _NULL_TEXT for r in raws]).buffers()[1]
    return pa.StringArray.from_buffers(len(raws), offsets, data, valid)


def _build_typed(column: Column, values: Sequence[Any], extras: Extras) -> pa.Array:
    """One column of typed values in bulk; what Arrow refuses takes the per-value path."""
    try:
        if column.kind == "timestamp":
            return pa.array(values, pa.string()).cast(TIMESTAMP)
        return pa.array(values, column.type)
    except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError, ValueError, OverflowError):
        # a timestamp Arrow cannot cast, an int out of the column's range
        return _build_slowly(column, list(values), extras)


_BASE_PAYLOAD = "basePayload"
_NULL_TEXT = b"null"
_TOP_LEVEL = _TypedGroup(TOP_LEVEL_COLUMNS)
_TRIGGER_CONFIG = _TypedGroup(TRIGGER_CONFIG_COLUMNS)


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
