"""The `sessions` table: the single source of truth for its columns.

Each column names where it comes from in the API's session JSON and what kind of value it
holds; `flatten` builds the Arrow arrays from this table, the README's schema table is
checked against it by a test, and `verify` compares every file with `SCHEMA`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pyarrow as pa

from pipeline.timestamps import UTC_MS

Kind = Literal["string", "json", "timestamp", "string_list", "int32", "int64", "meta"]

TIMESTAMP = UTC_MS  # one definition, shared with the walker's parse
TRIGGER_CONFIG = "triggerConfig"

_ARROW_TYPES: dict[str, pa.DataType] = {
    "string": pa.string(),
    "json": pa.string(),
    "timestamp": TIMESTAMP,
    "string_list": pa.list_(pa.string()),
    "int32": pa.int32(),
    "int64": pa.int64(),
}


@dataclass(frozen=True)
class Column:
    """One output column: its name, the API field it is read from, and its kind."""

    name: str
    kind: Kind
    source: str | None  # API field name; None for columns the export adds itself
    in_trigger_config: bool = False
    nullable: bool = True
    arrow_type: pa.DataType | None = None

    @property
    def type(self) -> pa.DataType:
        return self.arrow_type if self.arrow_type is not None else _ARROW_TYPES[self.kind]

    @property
    def field(self) -> pa.Field:
        return pa.field(self.name, self.type, nullable=self.nullable)

    @property
    def source_label(self) -> str:
        if self.source is None:
            return ""
        return f"{TRIGGER_CONFIG}.{self.source}" if self.in_trigger_config else self.source


def _tc(name: str, kind: Kind, source: str) -> Column:
    return Column(name, kind, source, in_trigger_config=True)


COLUMNS: tuple[Column, ...] = (
    Column("id", "string", "id", nullable=False),
    Column("type", "string", "type"),
    Column("task_identifier", "string", "taskIdentifier"),
    Column("tags", "string_list", "tags"),
    Column("external_id", "string", "externalId"),
    Column("current_run_id", "string", "currentRunId"),
    Column("metadata", "json", "metadata"),
    Column("created_at", "timestamp", "createdAt", nullable=False),
    Column("updated_at", "timestamp", "updatedAt"),
    Column("closed_at", "timestamp", "closedAt"),
    Column("closed_reason", "string", "closedReason"),
    Column("expires_at", "timestamp", "expiresAt"),
    _tc("trigger_config_base_payload", "json", "basePayload"),
    _tc("trigger_config_machine", "string", "machine"),
    _tc("trigger_config_queue", "string", "queue"),
    _tc("trigger_config_tags", "string_list", "tags"),
    _tc("trigger_config_max_attempts", "int32", "maxAttempts"),
    _tc("trigger_config_max_duration", "int64", "maxDuration"),
    _tc("trigger_config_lock_to_version", "string", "lockToVersion"),
    _tc("trigger_config_region", "string", "region"),
    _tc("trigger_config_idle_timeout_in_seconds", "int32", "idleTimeoutInSeconds"),
    Column("extra", "json", None),
    Column("extracted_at", "meta", None, nullable=False, arrow_type=TIMESTAMP),
    Column("run_id", "meta", None, nullable=False, arrow_type=pa.string()),
)

SCHEMA: pa.Schema = pa.schema([c.field for c in COLUMNS])

TOP_LEVEL_COLUMNS = tuple(c for c in COLUMNS if c.source and not c.in_trigger_config)
TRIGGER_CONFIG_COLUMNS = tuple(c for c in COLUMNS if c.in_trigger_config)

# Fields the table names; anything else in a session goes to `extra`.
KNOWN_TOP_LEVEL = frozenset(c.source for c in TOP_LEVEL_COLUMNS) | {TRIGGER_CONFIG}
KNOWN_TRIGGER_CONFIG = frozenset(c.source for c in TRIGGER_CONFIG_COLUMNS)

PARTITION_KEY = "created_date"
