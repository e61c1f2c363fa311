"""The schema in code, the contract's table and the docs' table must agree."""

import re
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline.dataset.schema import COLUMNS, SCHEMA

ROOT = Path(__file__).resolve().parents[1]
SCHEMA_DOC = ROOT / "docs" / "output.md"  # the schema table of the docs
# beside the repository, or beside the folder of worktrees
CONTRACT = next(
    (p / "shared" / "CONTRACT.md" for p in (ROOT.parent, ROOT.parent.parent)
     if (p / "shared" / "CONTRACT.md").exists()),
    ROOT.parent / "shared" / "CONTRACT.md",
)
DOCUMENTS = {"docs": SCHEMA_DOC, "CONTRACT": CONTRACT}


def schema_rows(markdown: str) -> list[tuple[str, str, str]]:
    """Rows (column, Arrow type, from) of the table headed `| column | Arrow type | from |`."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| column | Arrow type"))
    rows = []
    for line in lines[start + 2 :]:
        match = re.match(r"^\| `([a-z_]+)` \| ([^|]+) \| (.*) \|$", line)
        if not match:
            break
        rows.append((match.group(1), match.group(2).strip(), match.group(3).strip()))
    return rows


def expected_type(column) -> str:
    text = {"list<item: string>": "list<string>"}.get(str(column.type), str(column.type))
    return text + (", not null" if not column.nullable else "")


def read(document: str) -> str:
    path = DOCUMENTS[document]
    if not path.exists():
        pytest.skip(f"{path} not present")
    return path.read_text()


@pytest.mark.parametrize("document", list(DOCUMENTS))
def test_documented_schema_matches_code(document):
    rows = schema_rows(read(document))
    assert [name for name, _, _ in rows] == [c.name for c in COLUMNS]
    for (name, documented, _), column in zip(rows, COLUMNS, strict=True):
        assert documented.replace(" (JSON text)", "") == expected_type(column), name


@pytest.mark.parametrize("document", list(DOCUMENTS))
def test_documented_sources_and_json_columns_match_code(document):
    for (name, documented, source), column in zip(schema_rows(read(document)), COLUMNS, strict=True):
        assert ("(JSON text)" in documented) == (column.kind == "json"), name
        if column.source is not None:
            assert source.startswith(f"`{column.source_label}`"), name


STRING, MS = pa.string(), pa.timestamp("ms", tz="UTC")
# the contract's table written out by hand, so that a column moved, renamed, retyped or made
# nullable in the code fails here even where the contract file is absent
CONTRACT_SCHEMA = pa.schema([
    pa.field("id", STRING, nullable=False),
    ("type", STRING),
    ("task_identifier", STRING),
    ("tags", pa.list_(STRING)),
    ("external_id", STRING),
    ("current_run_id", STRING),
    ("metadata", STRING),
    pa.field("created_at", MS, nullable=False),
    ("updated_at", MS),
    ("closed_at", MS),
    ("closed_reason", STRING),
    ("expires_at", MS),
    ("trigger_config_base_payload", STRING),
    ("trigger_config_machine", STRING),
    ("trigger_config_queue", STRING),
    ("trigger_config_tags", pa.list_(STRING)),
    ("trigger_config_max_attempts", pa.int32()),
    ("trigger_config_max_duration", pa.int64()),
    ("trigger_config_lock_to_version", STRING),
    ("trigger_config_region", STRING),
    ("trigger_config_idle_timeout_in_seconds", pa.int32()),
    ("extra", STRING),
    pa.field("extracted_at", MS, nullable=False),
    pa.field("run_id", STRING, nullable=False),
])


def test_the_written_schema_is_the_contracts():
    assert SCHEMA.names == CONTRACT_SCHEMA.names
    for field, expected in zip(SCHEMA, CONTRACT_SCHEMA, strict=True):
        assert (field.type, field.nullable) == (expected.type, expected.nullable), field.name
