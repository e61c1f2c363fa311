"""The schema in code, the contract's table and the docs' table must agree."""

import re
from pathlib import Path

import pytest

from pipeline.dataset.schema import COLUMNS

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
