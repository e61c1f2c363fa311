"""`export()`: `sessions-export run` for Python callers (Airflow, Dagster, notebooks).

Options are the config file's keys (`output="s3://…"`, `lookback="1h"`, `type="chat"` for
a filter); they win over `config`, like flags. Nothing is printed and logging is left as
the caller set it up. Every failure is an `ExportError` carrying the CLI's exit code.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import FILTER_NAMES, OPTION_BY_NAME, load_settings
from pipeline.errors import ExportError, UsageError

if TYPE_CHECKING:
    from pipeline.jobs.incremental import RunSummary


def export(
    config: str | Path | None = None,
    *,
    environment: str | None = None,
    full_refresh: bool = False,
    compact: bool = False,
    **options: Any,
) -> RunSummary:
    """Run the incremental export once and return its `RunSummary`."""
    from pipeline.cli import run_export

    flags = {name: None for name in OPTION_BY_NAME}
    filters: dict[str, str | None] = {}
    for key, value in options.items():
        name = key.replace("-", "_")
        if name in FILTER_NAMES:
            filters[name] = value
        elif name in OPTION_BY_NAME:
            flags[name] = value
        else:
            raise UsageError(f"export() got an unknown option {key!r}")
    try:
        settings = load_settings(str(config) if config else None, flags, filters, environment)
        return run_export(settings, full_refresh, compact)
    except ExportError:
        raise
    except Exception as error:  # a bug: still the one type callers catch, exit code 1
        raise ExportError(f"unexpected error (a bug): {type(error).__name__}: {error}") from error
