"""The README and docs/ hold to the code: links resolve, and the environment variables and
the `run_summary` fields they list are the ones the code reads and writes."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path

from pipeline import config
from pipeline.api.auth import FILE_SUFFIX
from pipeline.jobs.core import RunSummary
from pipeline.ops.metrics import summary_fields
from pipeline.store import storage

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"  # the environment table
SUMMARY_DOC = ROOT / "docs" / "operations.md"  # the `run_summary` field table
LINKED = [README, ROOT / "bench" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# read by the libraries the export hands them to (the AWS SDK and pyarrow, httpx, the
# Google client, libpq), not by our code
LIBRARY_VARIABLES = {
    "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE",
    "AWS_REGION", "AWS_DEFAULT_REGION", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY",
    "GOOGLE_APPLICATION_CREDENTIALS", "PGHOST", "PGPORT", "PGDATABASE", "PGUSER",
    "PGPASSWORD", "PGSERVICE",
}
_READ = re.compile(r"""(?:environ(?:\.get|\.setdefault)?\(?\[?|getenv\()\s*["']([A-Z][A-Z0-9_]+)["']""")


def table_cells(markdown: str, header: str) -> list[str]:
    """The first cell of each row of the table whose header line starts with `header`."""
    table = markdown[markdown.index(header) :].split("\n\n", 1)[0]
    return [row.split(" | ")[0].lstrip("| ").strip() for row in table.splitlines()[2:]]


def variables_the_code_reads() -> set[str]:
    """Our own reads: the options' variables, the key's, the stores', and literal reads."""
    found = {v for option in config.OPTIONS for v in option.env}
    found |= {config.DEFAULT_SECRET_KEY_ENV, config.DEFAULT_SECRET_KEY_ENV + FILE_SUFFIX}
    found |= {*storage.ENDPOINT_ENVS, storage.GCS_EMULATOR_ENV}
    for path in (ROOT / "pipeline").rglob("*.py"):
        if "emulator" not in path.parts and path.name != "demo.py":  # not the export's
            found |= set(_READ.findall(path.read_text()))
    return found


def test_readme_is_short_and_names_the_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 250
    assert "make demo" in text and "make test" in text


def test_environment_table_lists_what_the_code_reads():
    documented = set()
    for cell in table_cells(README.read_text(), "| variable | meaning |"):
        documented |= set(re.findall(r"`([A-Z][A-Z0-9_]+)`", cell))
    read = variables_the_code_reads()
    assert read - documented == set()
    assert documented - read - LIBRARY_VARIABLES == set()


def _sample(cls: type) -> typing.Any:
    """An instance of a dataclass with every field filled, whatever its shape."""
    values = {}
    for field in dataclasses.fields(cls):
        hint = typing.get_type_hints(cls)[field.name]
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
            hint = next(a for a in typing.get_args(hint) if a is not type(None))
        if dataclasses.is_dataclass(hint):
            values[field.name] = _sample(hint)
        else:
            values[field.name] = {str: "r", bool: False, int: 1, float: 1.0}.get(hint, 1)
    return cls(**values)


def test_run_summary_table_lists_the_fields_it_carries():
    documented = set()
    for cell in table_cells(SUMMARY_DOC.read_text(), "| field | meaning |"):
        documented |= set(re.findall(r"`([a-z_]+)`", cell))
    assert documented == set(summary_fields(_sample(RunSummary), "prod", "main"))


_LINK = re.compile(r"\]\(([^)\s]+)\)")


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a page's headings."""
    found = set()
    for line in markdown.splitlines():
        if line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


def test_every_relative_link_points_to_an_existing_file_and_heading():
    broken = []
    for page in LINKED:
        text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
        for target in _LINK.findall(text):
            if re.match(r"^[a-z]+:", target):
                continue  # https:, mailto:
            path, _, anchor = target.partition("#")
            resolved = (page.parent / path).resolve() if path else page
            if not resolved.exists():
                broken.append(f"{page.name}: {target}")
            elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved.read_text()):
                broken.append(f"{page.name}: {target} (no such heading)")
    assert broken == []
