"""The schema in code, the contract's table and the README's table must agree."""

import re
from pathlib import Path

import pytest

from pipeline.dataset.schema import COLUMNS, SCHEMA

ROOT = Path(__file__).resolve().parents[1]
CONTRACT = ROOT.parent / "shared" / "CONTRACT.md"


def schema_rows(markdown: str) -> list[tuple[str, str]]:
    """Rows of the table headed `| column | Arrow type | from |`."""
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| column | Arrow type"))
    rows = []
    for line in lines[start + 2 :]:
        match = re.match(r"^\| `([a-z_]+)` \| ([^|]+) \|", line)
        if not match:
            break
        rows.append((match.group(1), match.group(2).strip()))
    return rows


def expected_type(column) -> str:
    text = {"list<item: string>": "list<string>"}.get(str(column.type), str(column.type))
    return text + (", not null" if not column.nullable else "")


@pytest.mark.parametrize("document", ["README.md", "CONTRACT"])
def test_documented_schema_matches_code(document):
    path = CONTRACT if document == "CONTRACT" else ROOT / document
    if not path.exists():
        pytest.skip(f"{path} not present")
    rows = schema_rows(path.read_text())
    assert [name for name, _ in rows] == [c.name for c in COLUMNS]
    for (name, documented), column in zip(rows, COLUMNS, strict=True):
        documented = documented.replace(" (JSON text)", "")
        assert documented == expected_type(column), name


def test_schema_is_built_from_columns():
    assert SCHEMA.names == [c.name for c in COLUMNS]
