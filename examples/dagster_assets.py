"""Dagster: one asset exports an environment's sessions, a downstream asset counts them per day.

    dagster dev -f examples/dagster_assets.py

The key comes from the environment's key variable (TRIGGER_SECRET_KEY unless the config
file names another), never from Dagster's config. A failed export fails the asset with
the CLI's exit code and its one-line message, so alerts read the same as from cron.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import dagster as dg
import polars as pl

import pipeline
from pipeline.errors import ExitCode

if TYPE_CHECKING:
    from pipeline.jobs.core import RunSummary


class SessionsExport(dg.ConfigurableResource):
    """Where one environment's sessions go; `options` are the config file's keys."""

    output: str
    config_file: str | None = None
    environment: str | None = None
    options: dict[str, str] = {}

    def export(self) -> RunSummary:
        return pipeline.export(
            self.config_file, environment=self.environment, output=self.output, **self.options
        )

    def scan(self) -> pl.LazyFrame:
        return pipeline.scan_sessions(self.output)


@dg.asset(description="New and changed Trigger.dev sessions, exported into Parquet")
def sessions(sessions_export: SessionsExport) -> dg.MaterializeResult:
    try:
        summary = sessions_export.export()
    except pipeline.ExportError as error:
        # another run holding the lock, or the API failing, is worth a retry; the rest is not
        raise dg.Failure(
            description=f"sessions-export exited {int(error.exit_code)}: {error}",
            metadata={"exit_code": int(error.exit_code), "message": str(error)},
            allow_retries=error.exit_code in (ExitCode.LOCK_HELD, ExitCode.API_FAILING),
        ) from error
    return dg.MaterializeResult(
        metadata={
            "run_id": summary.run_id,
            "sessions": summary.rows,
            "requests": summary.requests,
            "files": summary.files,
            "seconds": summary.seconds,
        }
    )


@dg.asset(deps=[sessions], description="Sessions per day of creation, latest versions")
def daily_sessions(sessions_export: SessionsExport) -> pl.DataFrame:
    return (
        sessions_export.scan()
        .group_by("created_date")
        .agg(pl.len().alias("sessions"), pl.col("closed_at").is_null().sum().alias("open"))
        .sort("created_date")
        .collect()
    )


defs = dg.Definitions(
    assets=[sessions, daily_sessions],
    resources={
        "sessions_export": SessionsExport(
            output=os.environ.get("SESSIONS_OUTPUT", "output"),
            config_file=os.environ.get("SESSIONS_CONFIG"),
            environment=os.environ.get("SESSIONS_ENVIRONMENT"),
        )
    },
)
