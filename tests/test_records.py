"""The typed decoder of list bodies: what it accepts, and that anything else falls back."""

import typing

import msgspec
import orjson
import pytest

from pipeline.api.client import SessionPage, _parse_list_body
from pipeline.api.records import (
    UNSET,
    ListedSession,
    ListedTriggerConfig,
    decode_list_body,
    decode_list_keys,
    has_trigger_config,
)
from pipeline.dataset.schema import (
    KNOWN_TOP_LEVEL,
    KNOWN_TRIGGER_CONFIG,
    TOP_LEVEL_COLUMNS,
    TRIGGER_CONFIG,
    TRIGGER_CONFIG_COLUMNS,
)

SESSION = {
    "id": "session_a",
    "type": "chat.agent",
    "taskIdentifier": "t",
    "tags": ["x"],
    "externalId": None,
    "currentRunId": "run_1",
    "metadata": {"k": [1, "é"]},
    "createdAt": "2026-11-07T05:31:56.123Z",
    "updatedAt": "2026-11-07T05:31:56.123Z",
    "closedAt": None,
    "closedReason": None,
    "expiresAt": None,
    "triggerConfig": {"basePayload": {"p": 1}, "machine": "micro", "maxAttempts": 3},
}

# the struct field type each column kind needs
KIND_TYPES = {
    "string": str | None,
    "timestamp": str | None,
    "string_list": list[str] | None,
    "int32": int | None,
    "int64": int | None,
    "json": msgspec.Raw,
}


def body(*sessions, next_cursor="cur_1"):
    pagination = {} if next_cursor is None else {"next": next_cursor}
    return orjson.dumps({"data": list(sessions), "pagination": pagination})


@pytest.mark.parametrize(
    ("struct", "columns", "extra_fields"),
    [(ListedSession, TOP_LEVEL_COLUMNS, {TRIGGER_CONFIG}), (ListedTriggerConfig, TRIGGER_CONFIG_COLUMNS, set())],
)
def test_structs_mirror_the_schema(struct, columns, extra_fields):
    hints = typing.get_type_hints(struct)
    assert set(hints) == {c.source for c in columns} | extra_fields
    for column in columns:
        expected = str if not column.nullable else KIND_TYPES[column.kind]  # id, createdAt
        assert hints[column.source] == expected, column.name
    known = KNOWN_TOP_LEVEL if struct is ListedSession else KNOWN_TRIGGER_CONFIG
    assert set(hints) == known


def test_a_well_typed_page_decodes_into_structs():
    absent = {k: v for k, v in SESSION.items() if k != "triggerConfig"}
    listed, next_cursor = decode_list_body(
        body(SESSION, {**absent, "id": "session_b"}, {**SESSION, "id": "session_c", "triggerConfig": None})
    )
    assert next_cursor == "cur_1"
    assert [s.id for s in listed] == ["session_a", "session_b", "session_c"]
    assert bytes(listed[0].metadata) == b'{"k":[1,"\xc3\xa9"]}'
    assert listed[0].triggerConfig.maxAttempts == 3 and has_trigger_config(listed[0])
    assert listed[1].triggerConfig is UNSET and not has_trigger_config(listed[1])
    assert listed[2].triggerConfig is None and not has_trigger_config(listed[2])


def test_the_last_page_has_no_cursor():
    assert decode_list_body(body(SESSION, next_cursor=None))[1] is None
    assert decode_list_body(b'{"data":[]}') == ([], None)


@pytest.mark.parametrize(
    "change",
    [
        {"brandNew": 1},  # a field the schema does not name
        {"triggerConfig": {"basePayload": {}, "gpu": "h100"}},
        {"triggerConfig": "fast"},
        {"type": 7},  # string
        {"createdAt": 5},  # timestamp
        {"tags": "x"},  # list<string>
        {"tags": [1]},
        {"triggerConfig": {"basePayload": {}, "maxAttempts": "5"}},  # int32
        {"triggerConfig": {"basePayload": {}, "maxDuration": 5.5}},  # int64
        {"triggerConfig": {"basePayload": {}, "maxDuration": True}},
        {"id": None},
    ],
)
def test_anything_else_is_left_to_the_generic_path(change):
    assert decode_list_body(body({**SESSION, **change})) is None


def test_unusable_bodies_are_left_to_the_generic_path():
    assert decode_list_body(b'{"data":[{"id":"a","createdAt":"x"}') is None  # truncated
    assert decode_list_body(b'{"data":[],"pagination":{"next":""}}') is None
    assert decode_list_body(b'{"pagination":{}}') is None


def test_the_client_decodes_only_the_keys_and_the_rest_on_demand():
    content = body(SESSION)
    sessions, keys, raw, next_cursor = _parse_list_body(content)
    assert sessions is None and raw is content and next_cursor == "cur_1"
    assert [(k.id, k.createdAt, k.closedAt, k.expiresAt) for k in keys] == [
        ("session_a", "2026-11-07T05:31:56.123Z", None, None)
    ]
    page = SessionPage(sessions, next_cursor, 7, keys=keys, body=raw)
    assert page.listed == decode_list_body(content)[0]
    assert page.listed is page.listed  # decoded once
    assert page.sessions == [SESSION]
    assert page.sessions is page.sessions  # decoded once, so changes made to it stay


def test_a_row_only_the_keys_fit_is_written_from_dicts():
    odd = {**SESSION, "type": 7}
    sessions, keys, raw, _ = _parse_list_body(body(odd))
    assert sessions is None and [k.id for k in keys] == ["session_a"]
    page = SessionPage(sessions, None, 7, keys=keys, body=raw)
    assert page.listed is None and page.sessions == [odd]


def test_the_keys_decode_still_checks_the_whole_body():
    assert decode_list_keys(b'{"data":[{"id":"a","createdAt":"x","metadata":{"a":}}]}') is None
    assert decode_list_keys(b'{"data":[{"id":"a","createdAt":"x"}') is None  # truncated
    assert decode_list_keys(b'{"data":[{"id":"a","createdAt":1}]}') is None
    assert decode_list_keys(b'{"data":[],"pagination":{"next":""}}') is None
    keys, following = decode_list_keys(b'{"data":[{"id":"a","createdAt":"x","new":[1]}]}')
    assert [k.id for k in keys] == ["a"] and following is None


def test_the_client_falls_back_to_dicts_with_the_same_checks():
    odd = {**SESSION, "createdAt": 7}
    with pytest.raises(ValueError, match="session_a has no `createdAt`"):
        _parse_list_body(body(odd))
    with pytest.raises(ValueError, match="no string `id`"):
        _parse_list_body(body({**SESSION, "id": None}))
    with pytest.raises(ValueError, match="`pagination.next` is not a string"):
        _parse_list_body(b'{"data":[],"pagination":{"next":""}}')
    with pytest.raises(orjson.JSONDecodeError):
        _parse_list_body(b'{"data":[')
    with pytest.raises(orjson.JSONDecodeError):  # malformed where the keys decode skips
        _parse_list_body(b'{"data":[' + orjson.dumps(SESSION) + b'],"x":{"y":}}')


def test_a_page_needs_its_sessions_or_its_body():
    with pytest.raises(ValueError):
        SessionPage(None, None, 0)
