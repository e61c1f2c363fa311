"""Airflow: a TaskFlow DAG that exports one environment's sessions, then counts them per day.

Copy this file into the dags folder and set SESSIONS_OUTPUT (and SESSIONS_CONFIG,
SESSIONS_ENVIRONMENT for a config file's [environments.NAME]). The key comes from the
environment's key variable on the worker (TRIGGER_SECRET_KEY unless the config names
another), never from Airflow's variables. A failed export fails the task with the CLI's
exit code and its one-line message; only a held lock or a failing API is retried.

The task bodies are plain functions (`export_sessions`, `count_by_day`), so they run and
are tested without Airflow.
"""

from __future__ import annotations

import os
from datetime import datetime
from typing import Any

import pipeline
from pipeline.errors import ExitCode

RETRIED = (ExitCode.LOCK_HELD, ExitCode.API_FAILING)


class ExportFailed(Exception):
    """A failed export as the orchestrator shows it: exit code, then the one-line message."""

    def __init__(self, error: pipeline.ExportError) -> None:
        self.exit_code = int(error.exit_code)
        super().__init__(f"sessions-export exited {self.exit_code}: {error}")


def export_sessions(
    output: str, config: str | None = None, environment: str | None = None, **options: Any
) -> dict[str, Any]:
    """Run the incremental export once; what it did, as a small JSON-able dict (an XCom)."""
    try:
        summary = pipeline.export(config, environment=environment, output=output, **options)
    except pipeline.ExportError as error:
        raise ExportFailed(error) from error
    return {"output": output, "run_id": summary.run_id, "sessions": summary.rows}


def count_by_day(output: str) -> dict[str, int]:
    """Sessions per day of creation, latest versions, read from the dataset."""
    import polars as pl

    counts = (
        pipeline.scan_sessions(output)
        .group_by("created_date")
        .agg(pl.len().alias("sessions"))
        .sort("created_date")
        .collect()
    )
    return {str(day): n for day, n in counts.iter_rows()}


def build_dag(
    output: str, config: str | None = None, environment: str | None = None, **options: Any
) -> Any:
    """The DAG for one environment (an `airflow.sdk.DAG`): export, then the day's counts."""
    from airflow.exceptions import AirflowException, AirflowFailException
    from airflow.sdk import dag, task

    @dag(
        dag_id=f"sessions_export_{environment or 'default'}",
        schedule="@hourly",
        start_date=datetime(2026, 1, 1),
        catchup=False,
        max_active_runs=1,  # the run lock would refuse a second one anyway (exit 75)
        default_args={"retries": 2},
    )
    def sessions_export() -> None:
        @task
        def export() -> dict[str, Any]:
            try:
                return export_sessions(output, config, environment, **options)
            except ExportFailed as failure:
                if failure.exit_code in RETRIED:
                    raise AirflowException(str(failure)) from failure
                raise AirflowFailException(str(failure)) from failure  # no retry can fix it

        @task
        def daily_sessions(exported: dict[str, Any]) -> dict[str, int]:
            return count_by_day(exported["output"])

        daily_sessions(export())

    return sessions_export()


if os.environ.get("SESSIONS_OUTPUT"):  # Airflow imports the file to find the DAG
    dag_object = build_dag(
        os.environ["SESSIONS_OUTPUT"],
        os.environ.get("SESSIONS_CONFIG"),
        os.environ.get("SESSIONS_ENVIRONMENT"),
    )
