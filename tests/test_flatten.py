import json
from datetime import UTC, datetime

import pyarrow as pa
import pytest

from pipeline.dataset.flatten import MalformedSession, flatten_sessions, parse_timestamp_ms
from pipeline.dataset.schema import SCHEMA

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
