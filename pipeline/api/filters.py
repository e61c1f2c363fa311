"""The list filters, declared once: name, API parameter, help, and how a value is checked.

The CLI's flags, the config file's `[filters]` table and the list requests all come from
`FILTERS`. The API takes one value per filter: it neither splits commas nor keeps more than
the last of repeated keys, so a comma-joined value is refused instead of silently narrowed.
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.errors import UsageError

STATUSES = ("ACTIVE", "CLOSED", "EXPIRED")


@dataclass(frozen=True)
class Filter:
    name: str  # as in the config file and the flag (`--task-identifier`)
    param: str  # the query parameter the API reads
    help: str
    choices: tuple[str, ...] = ()  # upper-case values the API accepts; empty: any string

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


FILTERS: tuple[Filter, ...] = (
    Filter("type", "filter[type]", "only sessions of this type (one value)"),
    Filter("task_identifier", "filter[taskIdentifier]", "only sessions of this task (one value)"),
    Filter("tags", "filter[tags]", "only sessions carrying this tag (one value)"),
    Filter("external_id", "filter[externalId]", "only the session with this externalId"),
    Filter(
        "status", "filter[status]", "only ACTIVE, CLOSED or EXPIRED sessions (one value)", STATUSES
    ),
)
FILTER_BY_NAME = {f.name: f for f in FILTERS}
FILTER_PARAMS = {f.name: f.param for f in FILTERS}


def check_filter(name: str, value: str, where: str) -> str:
    """The value to send for filter `name`; `where` prefixes the error (flag or file:line)."""
    if not value.strip():
        raise UsageError(f"{where} is empty")
    if "," in value:
        raise UsageError(
            f"{where} has a comma ({value!r}): the API takes one value per filter and would "
            "treat it as one literal value; run once per value instead"
        )
    choices = FILTER_BY_NAME[name].choices
    if choices:
        upper = value.upper()
        if upper not in choices:
            raise UsageError(f"{where} must be one of {', '.join(choices)}, got {value!r}")
        return upper
    return value
