"""`export()`: `sessions-export run` for Python callers (Airflow, Dagster, notebooks).

Options are the config file's keys (`output="s3://…"`, `lookback="1h"`, `type="chat"` for
a filter); they win over `config`, like flags. Nothing is printed and logging is left as
the caller set it up. Every failure is an `ExportError` carrying the CLI's exit code.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.errors import ExportError

if TYPE_CHECKING:
    from pipeline.jobs.core import RunSummary


def export(
    config: str | Path | None = None,
    *,
    environment: str | None = None,
    full_refresh: bool = False,
    compact: bool = False,
    **options: Any,
) -> RunSummary:
    """Run the incremental export once and return its `RunSummary`."""
    from pipeline.config import Settings
    from pipeline.runner import run_export

    try:
        settings = Settings.build(str(config) if config else None, environment, **options)
        return run_export(settings, full_refresh, compact)
    except ExportError:
        raise
    except Exception as error:  # a bug: still the one type callers catch, exit code 1
        raise ExportError(f"unexpected error (a bug): {type(error).__name__}: {error}") from error
