import json
import random
from datetime import UTC, datetime

import orjson
import pyarrow as pa
import pytest

from pipeline.api.client import SessionPage, _parse_list_body
from pipeline.dataset.flatten import (
    MalformedSession,
    flatten_listed,
    flatten_sessions,
    parse_timestamp_ms,
)
from pipeline.dataset.schema import SCHEMA
from pipeline.emulator.query import parse_list_query
from pipeline.emulator.store import SessionStore

FULL = {
    "id": "session_cabc",
    "type": "chat.agent",
    "taskIdentifier": "my-chat",
    "tags": ["chat:1", "ü"],
    "externalId": "chat_1234",
    "currentRunId": "run_def456",
    "metadata": {"a": {"b": [1, 2.5, None, True, "é😀"]}},
    "createdAt": "2026-11-07T05:31:56.123Z",
    "updatedAt": "2026-11-07T06:00:00.000Z",
    "closedAt": None,
    "closedReason": None,
    "expiresAt": "2026-12-07T05:31:56.123Z",
    "triggerConfig": {
        "basePayload": {"x": 1},
        "machine": "small-1x",
        "queue": "q",
        "tags": ["t1"],
        "maxAttempts": 5,
        "maxDuration": 3600,
        "lockToVersion": "20240523.1",
        "region": "eu",
        "idleTimeoutInSeconds": 1800,
    },
}


def test_full_session_maps_every_column():
    table = flatten_sessions([FULL], 1_700_000_000_123, "run-1")
    assert table.schema.equals(SCHEMA)
    row = table.to_pylist()[0]
    assert row["id"] == "session_cabc"
    assert row["tags"] == ["chat:1", "ü"]
    assert json.loads(row["metadata"]) == FULL["metadata"]
    assert row["created_at"] == datetime(2026, 11, 7, 5, 31, 56, 123000, tzinfo=UTC)
    assert row["closed_at"] is None
    assert json.loads(row["trigger_config_base_payload"]) == {"x": 1}
    assert row["trigger_config_max_attempts"] == 5
    assert row["trigger_config_max_duration"] == 3600
    assert row["trigger_config_idle_timeout_in_seconds"] == 1800
    assert row["trigger_config_tags"] == ["t1"]
    assert row["extra"] is None
    assert row["run_id"] == "run-1"
    assert row["extracted_at"] == datetime(2023, 11, 14, 22, 13, 20, 123000, tzinfo=UTC)


def test_missing_fields_and_trigger_config_become_nulls():
    table = flatten_sessions([{"id": "session_x", "createdAt": "2026-01-01T00:00:00Z"}], 0, "r")
    row = table.to_pylist()[0]
    assert row["metadata"] is None and row["tags"] is None
    assert all(row[c] is None for c in row if c.startswith("trigger_config_"))
    assert row["extra"] is None


def test_empty_metadata_object_stays_an_object_and_null_stays_null():
    rows = [
        {"id": "a", "createdAt": "2026-01-01T00:00:00Z", "metadata": {}},
        {"id": "b", "createdAt": "2026-01-01T00:00:00Z", "metadata": None},
    ]
    assert flatten_sessions(rows, 0, "r")["metadata"].to_pylist() == ["{}", None]


def test_unknown_fields_go_to_extra_top_level_and_in_trigger_config():
    session = {**FULL, "brandNew": {"k": [1]}, "triggerConfig": {**FULL["triggerConfig"], "gpu": "h100"}}
    row = flatten_sessions([session], 0, "r").to_pylist()[0]
    assert json.loads(row["extra"]) == {"brandNew": {"k": [1]}, "triggerConfig": {"gpu": "h100"}}
    assert row["trigger_config_machine"] == "small-1x"


def test_values_of_the_wrong_type_are_kept_in_extra_not_dropped():
    session = {**FULL, "type": 7, "tags": "not-a-list",
               "triggerConfig": {**FULL["triggerConfig"], "maxAttempts": "5"}}
    other = dict(FULL, id="session_ok")
    rows = flatten_sessions([session, other], 0, "r").to_pylist()
    assert rows[0]["type"] is None and rows[0]["tags"] is None
    assert rows[0]["trigger_config_max_attempts"] is None
    assert json.loads(rows[0]["extra"]) == {
        "type": 7, "tags": "not-a-list", "triggerConfig": {"maxAttempts": "5"}}
    assert rows[1]["type"] == "chat.agent" and rows[1]["trigger_config_max_attempts"] == 5


def test_timestamps_with_micros_offsets_or_no_fraction():
    rows = [
        {"id": "a", "createdAt": "2026-11-07T05:31:56Z"},
        {"id": "b", "createdAt": "2026-11-07T05:31:56.123456Z"},
        {"id": "c", "createdAt": "2026-11-07T07:31:56.5+02:00"},
    ]
    values = flatten_sessions(rows, 0, "r")["created_at"].cast(pa.int64()).to_pylist()
    base = parse_timestamp_ms("2026-11-07T05:31:56Z")
    assert values == [base, base + 123, base + 500]


def test_unparseable_created_at_is_malformed():
    with pytest.raises(MalformedSession):
        flatten_sessions([{"id": "a", "createdAt": "yesterday"}], 0, "r")


def test_unparseable_optional_timestamp_goes_to_extra():
    row = flatten_sessions(
        [{"id": "a", "createdAt": "2026-01-01T00:00:00Z", "closedAt": "soon"}], 0, "r"
    ).to_pylist()[0]
    assert row["closed_at"] is None and json.loads(row["extra"]) == {"closedAt": "soon"}


def test_huge_integers_in_metadata_survive():
    row = flatten_sessions(
        [{"id": "a", "createdAt": "2026-01-01T00:00:00Z", "metadata": {"n": 2**70}}], 0, "r"
    ).to_pylist()[0]
    assert json.loads(row["metadata"]) == {"n": 2**70}


def test_empty_page_gives_an_empty_table_with_the_schema():
    table = flatten_sessions([], 0, "r")
    assert table.num_rows == 0 and table.schema.equals(SCHEMA)


def test_fractional_numbers_are_not_truncated_into_int_columns():
    session = {**FULL, "triggerConfig": {**FULL["triggerConfig"], "maxDuration": 5.5}}
    row = flatten_sessions([session], 0, "r").to_pylist()[0]
    assert row["trigger_config_max_duration"] is None
    assert json.loads(row["extra"]) == {"triggerConfig": {"maxDuration": 5.5}}


# -- the typed fast path (list pages decoded by pipeline.api.records) ---------------------


def through_the_client(content: bytes, extracted_at_ms: int = 7, run_id: str = "r") -> pa.Table:
    """What a run makes of a list body: typed rows when they fit, else dicts."""
    received = client_page(content)
    if received.listed is not None:
        return flatten_listed(received.listed, extracted_at_ms, run_id)
    return flatten_sessions(received.sessions, extracted_at_ms, run_id)


def client_page(content: bytes) -> SessionPage:
    sessions, keys, raw, following = _parse_list_body(content)
    return SessionPage(sessions, following, 0, keys=keys, body=raw)


def the_old_way(content: bytes, extracted_at_ms: int = 7, run_id: str = "r") -> pa.Table:
    return flatten_sessions(orjson.loads(content)["data"], extracted_at_ms, run_id)


def page(*sessions) -> bytes:
    return orjson.dumps({"data": list(sessions), "pagination": {"next": "c"}})


def listed_of(content: bytes):
    return client_page(content).listed


def test_the_fast_path_is_taken_for_a_well_typed_page_and_matches():
    content = page(FULL, {"id": "b", "createdAt": "2026-01-01T00:00:00Z"})
    assert listed_of(content) is not None
    table = through_the_client(content)
    assert table.schema.equals(SCHEMA)
    assert table.equals(the_old_way(content))


# One value of the wrong type per column kind, top-level and inside triggerConfig: it is
# null in its column and kept, as received, in `extra`; the neighbouring row is untouched.
WRONG = [
    ("type", {"type": 7}, {"type": 7}),
    ("expires_at", {"expiresAt": 5}, {"expiresAt": 5}),
    ("expires_at", {"expiresAt": "soon"}, {"expiresAt": "soon"}),  # text, but no timestamp
    ("tags", {"tags": "not-a-list"}, {"tags": "not-a-list"}),
    ("tags", {"tags": ["a", 1]}, {"tags": ["a", 1]}),
    ("trigger_config_queue", {"queue": 9}, {"triggerConfig": {"queue": 9}}),
    ("trigger_config_tags", {"tags": "t"}, {"triggerConfig": {"tags": "t"}}),
    ("trigger_config_max_attempts", {"maxAttempts": "5"}, {"triggerConfig": {"maxAttempts": "5"}}),
    ("trigger_config_max_attempts", {"maxAttempts": 2**40}, {"triggerConfig": {"maxAttempts": 2**40}}),
    ("trigger_config_idle_timeout_in_seconds", {"idleTimeoutInSeconds": True},
     {"triggerConfig": {"idleTimeoutInSeconds": True}}),
    ("trigger_config_max_duration", {"maxDuration": 5.5}, {"triggerConfig": {"maxDuration": 5.5}}),
    ("trigger_config_max_duration", {"maxDuration": 2**63}, {"triggerConfig": {"maxDuration": 2**63}}),
    ("trigger_config_machine", {"machine": ["big"]}, {"triggerConfig": {"machine": ["big"]}}),
]


@pytest.mark.parametrize(("column", "change", "kept"), WRONG)
def test_a_wrong_typed_value_lands_in_extra_on_the_page_path(column, change, kept):
    if column.startswith("trigger_config_"):
        odd = {**FULL, "triggerConfig": {**FULL["triggerConfig"], **change}}
    else:
        odd = {**FULL, **change}
    content = page(odd, dict(FULL, id="session_ok"))
    table = through_the_client(content)
    assert table.equals(the_old_way(content))
    rows = table.to_pylist()
    assert rows[0][column] is None and json.loads(rows[0]["extra"]) == kept
    assert rows[1][column] is not None and rows[1]["extra"] is None


def test_trigger_config_of_the_wrong_type_lands_in_extra_on_the_page_path():
    content = page({**FULL, "triggerConfig": "fast"}, dict(FULL, id="session_ok"))
    rows = through_the_client(content).to_pylist()
    assert json.loads(rows[0]["extra"]) == {"triggerConfig": "fast"}
    assert all(rows[0][c] is None for c in rows[0] if c.startswith("trigger_config_"))
    assert rows[1]["trigger_config_machine"] == "small-1x"


@pytest.mark.parametrize(
    ("field", "column"), [("metadata", "metadata"), ("basePayload", "trigger_config_base_payload")]
)
@pytest.mark.parametrize("value", ["text", 5, [1, {"a": None}], True, {}])
def test_json_text_columns_take_any_json_value_and_keep_null_as_null(field, column, value):
    """A JSON-text column has no wrong type: any value is kept as its JSON text."""
    if field == "basePayload":
        odd = {**FULL, "triggerConfig": {**FULL["triggerConfig"], field: value}}
        empty = {**FULL, "triggerConfig": {**FULL["triggerConfig"], field: None}}
    else:
        odd, empty = {**FULL, field: value}, {**FULL, field: None}
    content = page(odd, dict(empty, id="session_null"))
    assert listed_of(content) is not None
    rows = through_the_client(content).to_pylist()
    assert json.loads(rows[0][column]) == value and rows[0]["extra"] is None
    assert rows[1][column] is None
    assert through_the_client(content).equals(the_old_way(content))


def test_timestamps_the_bulk_cast_refuses_take_the_exact_path():
    rows = [
        {"id": "a", "createdAt": "2026-11-07T05:31:56Z"},
        {"id": "b", "createdAt": "2026-11-07T05:31:56.123456Z", "updatedAt": "2026-11-07T05:31:57.9999Z"},
        {"id": "c", "createdAt": "2026-11-07T07:31:56.5+02:00"},
    ]
    content = page(*rows)
    assert listed_of(content) is not None
    assert through_the_client(content).equals(the_old_way(content))


def test_an_unparseable_created_at_is_malformed_on_the_page_path_too():
    with pytest.raises(MalformedSession):
        through_the_client(page({"id": "a", "createdAt": "yesterday"}))


def test_json_text_is_kept_as_the_api_sent_it():
    """The one difference from parsing and re-serialising: the API's own spelling of a
    JSON value (spacing, escapes) is kept; the value is the same."""
    content = (
        b'{"data":[{"id":"a","createdAt":"2026-01-01T00:00:00Z",'
        b'"metadata": { "k" : [1, "\\u00e9"] }}],"pagination":{}}'
    )
    row = through_the_client(content).to_pylist()[0]
    assert row["metadata"] == '{ "k" : [1, "\\u00e9"] }'
    assert json.loads(row["metadata"]) == json.loads(the_old_way(content)["metadata"][0].as_py())


def test_invalid_utf8_inside_json_text_is_malformed():
    content = b'{"data":[{"id":"a","createdAt":"2026-01-01T00:00:00Z","metadata":{"k":"\xff"}}]}'
    assert listed_of(content) is not None  # the typed decoder skips the subtree unchecked
    with pytest.raises(MalformedSession, match="UTF-8"):
        through_the_client(content)


def test_equivalence_on_the_emulators_generated_pages():
    """Pages as the emulator serves them (varied metadata, unicode, big and tiny numbers,
    sessions with and without triggerConfig): byte for byte the same table."""
    store = SessionStore.generate(3000, seed=11, days=3)
    params: dict[str, str] = {"page[size]": "100"}
    pages = 0
    while True:
        listing = store.list_page(parse_list_query(params), with_trigger_config=pages % 2 == 0)
        content = b'{"data":[' + b",".join(listing.rows) + b'],"pagination":{}}'
        assert listed_of(content) is not None
        fast = through_the_client(content, 1_700_000_000_000, "run-x")
        assert fast.equals(the_old_way(content, 1_700_000_000_000, "run-x")), pages
        pages += 1
        if listing.next_cursor is None:
            break
        params["page[after]"] = listing.next_cursor
    assert pages == 30


def random_session(rng: random.Random, index: int) -> dict:
    """A session whose every field is, now and then, absent, null or of another type."""

    def pick(good):
        roll = rng.random()
        if roll < 0.08:
            return rng.choice([None, 3, 2.5, True, "x", ["y"], {"z": 1}])
        return good() if roll > 0.04 else None

    def stamp() -> str:
        return f"2026-0{rng.randint(1, 9)}-1{rng.randint(0, 9)}T0{rng.randint(0, 9)}:1{rng.randint(0, 9)}:00.{rng.randint(0, 999):03d}Z"

    def text() -> str:
        return rng.choice(["a", "ü", "😀", "", "x y", 'q"b'])

    def tags() -> list[str]:
        return [text() for _ in range(rng.randint(0, 3))]

    def number() -> int:
        return rng.choice([1, 10, 2**31 - 1, 2**31, -(2**31), 2**40, 0])

    def payload() -> object:
        return rng.choice([{}, {"n": rng.random()}, [1, "é", None], "s", 1e21, None])
    session = {
        "id": f"session_{index}",
        "createdAt": stamp(),
        "type": pick(text),
        "taskIdentifier": pick(text),
        "tags": pick(tags),
        "externalId": pick(text),
        "currentRunId": pick(text),
        "metadata": payload(),
        "updatedAt": pick(stamp),
        "closedAt": pick(stamp),
        "closedReason": pick(text),
        "expiresAt": pick(stamp),
    }
    for name in list(session)[2:]:
        if rng.random() < 0.05:
            del session[name]
    if rng.random() < 0.8:
        config = {
            "basePayload": payload(),
            "machine": pick(text),
            "queue": pick(text),
            "tags": pick(tags),
            "maxAttempts": pick(number),
            "maxDuration": pick(number),
            "lockToVersion": pick(text),
            "region": pick(text),
            "idleTimeoutInSeconds": pick(number),
        }
        session["triggerConfig"] = {k: v for k, v in config.items() if rng.random() > 0.1}
    if rng.random() < 0.02:
        session["brandNew"] = {"k": index}
    return session


def test_equivalence_on_generated_sessions_of_every_shape():
    rng = random.Random(20261129)
    fast_pages = 0
    for number in range(120):
        size = rng.choice([1, 5, 100])
        # mostly well typed (the fast path), some pages with one odd value somewhere
        well_typed = number % 3 != 0
        sessions = []
        for index in range(size):
            session = random_session(rng, number * 1000 + index)
            if well_typed:
                session = {k: v for k, v in session.items() if k != "brandNew"}
                for key in ("type", "taskIdentifier", "externalId", "currentRunId", "closedReason"):
                    if key in session and not isinstance(session[key], str | None):
                        session[key] = None
                for key in ("updatedAt", "closedAt", "expiresAt", "tags"):
                    if key in session and isinstance(session[key], int | float | dict | bool):
                        session[key] = None
            sessions.append(session)
        content = page(*sessions)
        fast_pages += listed_of(content) is not None
        table = through_the_client(content)
        assert table.equals(the_old_way(content)), (number, table.to_pylist())
    assert fast_pages >= 20  # both paths were exercised


def test_rows_of_several_pages_keep_the_time_each_page_arrived():
    rows = [{"id": name, "createdAt": "2026-01-01T00:00:00Z"} for name in "abc"]
    listed = listed_of(page(*rows))
    for table in (
        flatten_listed(listed, [(2, 1_000), (0, 1_500), (1, 2_000)], "r"),
        flatten_sessions(rows, [(2, 1_000), (0, 1_500), (1, 2_000)], "r"),
    ):
        assert table["extracted_at"].cast(pa.int64()).to_pylist() == [1_000, 1_000, 2_000]
    with pytest.raises(ValueError, match="cover 2 rows, not 3"):
        flatten_sessions(rows, [(2, 1_000)], "r")


def test_the_runs_of_kept_rows():
    from pipeline.jobs.core import _runs_of

    assert _runs_of([(2, 10), (3, 20)], [True, False, False, True, True]) == [(1, 10), (2, 20)]
    assert _runs_of([(2, 10)], None) == [(2, 10)] and _runs_of(5, [False]) == 5
