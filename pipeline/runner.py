"""The commands that do work, as library calls: `Settings` in, the parts built from them, the
job run, its outcome recorded and returned.

`sessions-export run` and `pipeline.export()` both call `run_export`; the CLI adds only the
terminal (a progress display, `echo`) and the mapping of errors to exit codes. Nothing here
imports click or changes process-wide state.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from pipeline.config import DEFAULT_SECRET_KEY_ENV, Settings, settings_for
from pipeline.errors import AuthError, UsageError
from pipeline.ops.logs import register_secret
from pipeline.store.state import StateStore
from pipeline.store.storage import Storage
from pipeline.timestamps import DURATION, parse_duration_ms, parse_time_ms

if TYPE_CHECKING:
    from pipeline.api.client import ClientSettings, TriggerClient
    from pipeline.dataset.delta import DeltaOutput
    from pipeline.jobs.core import RunSummary
    from pipeline.jobs.target import DatasetTarget

Echo = Callable[[str], Any]


def output_storage(settings: Settings) -> Storage:
    return Storage(settings.output)


def is_delta(settings: Settings) -> bool:
    """Whether the output is the Delta tables; a usage error when `table_format` names the
    other format than the one the output already holds (a Parquet `compact` would delete
    files a Delta log names; Delta commits beside Parquet files would hide them)."""
    delta = settings.table_format.lower() == "delta"
    sessions = output_storage(settings).child("sessions")
    holds_delta = any(
        sessions.read_bytes(f"_delta_log/{name}") is not None
        for name in ("_last_checkpoint", "00000000000000000000.json")
    )
    if holds_delta and not delta:
        raise UsageError(
            f"{sessions.uri} holds a Delta table: pass --table-format delta "
            '(table_format = "delta" in the config)'
        )
    if delta and not holds_delta and sessions.list_files():
        raise UsageError(
            f"{sessions.uri} holds Parquet files, not a Delta table: export Delta into another "
            "output, or drop --table-format delta"
        )
    return delta


def delta_output(settings: Settings) -> DeltaOutput:
    """The output's two Delta tables; a usage error (exit 2) naming the pip command when the
    `delta` extra is not installed."""
    from pipeline.dataset.delta import DeltaOutput, require_deltalake

    require_deltalake()
    return DeltaOutput.at(settings.output)


def dataset_target(settings: Settings) -> DatasetTarget:
    """Where an export job writes: Parquet files, or the Delta tables (`table_format`)."""
    if is_delta(settings):
        from pipeline.jobs.delta_target import DeltaTarget

        return DeltaTarget(delta_output(settings), output_storage(settings))
    from pipeline.jobs.target import ParquetTarget

    return ParquetTarget(output_storage(settings))


def state_store(settings: Settings) -> StateStore:
    if settings.state:
        return StateStore(Storage(settings.state))
    return StateStore(output_storage(settings).child("_state"))


def client_settings(settings: Settings, concurrency: int = 1) -> ClientSettings:
    """The client's options: `concurrency` walkers, plus the single-session fetches."""
    from pipeline.api.client import ClientSettings

    fetches = settings.enrich_concurrency if settings.enrich_trigger_config else 0
    # walkers plus single-session fetches: each needs its own pooled connection
    return settings_for(
        ClientSettings, settings, base_url=settings.api_url, concurrency=concurrency + fetches
    )


def make_client(settings: Settings, concurrency: int = 1) -> TriggerClient:
    """The API client, with the secret key read from the environment (never a setting)."""
    from pipeline.api.auth import read_secret_key
    from pipeline.api.client import TriggerClient

    key = read_secret_key(settings.secret_key_env, os.environ)
    register_secret(key.value)
    if not key.value and settings.secret_key_env != DEFAULT_SECRET_KEY_ENV:
        where = f" (environment {settings.environment})" if settings.environment else ""
        raise AuthError(f"{key.source} is not set: export the secret key{where}")
    return TriggerClient(client_settings(settings, concurrency), key.value, key_variable=key.source)


def run_export(
    settings: Settings,
    full_refresh: bool,
    compact_after: bool,
    display: Any = None,
    echo: Echo | None = None,
) -> RunSummary:
    """`run`: the incremental export, its metrics, and its `RunSummary`."""
    from pipeline.jobs.incremental import IncrementalRun, RunOptions
    from pipeline.ops.metrics import record_failure, record_success

    options = settings_for(
        RunOptions,
        settings,
        lookback_ms=parse_duration_ms(settings.lookback, "lookback"),
        rescan_ms=parse_duration_ms(settings.rescan, "rescan"),
        full_refresh=full_refresh,
    )
    try:
        state = state_store(settings)
        target = dataset_target(settings)
        summary = _drive(
            settings,
            lambda client: IncrementalRun(
                client, target.output, state, options, on_progress=display, target=target
            ),
            1,
            display,
            echo,
        )
        if compact_after and summary.files:
            compact_dataset(settings, touched_partitions(settings, summary.run_id), echo)
    except BaseException as error:
        record_failure(settings.metrics_file, settings.environment, error, settings.branch)
        raise
    record_success(settings.metrics_file, settings.environment, summary, settings.branch)
    return summary


def run_backfill(
    settings: Settings, restart: bool, display: Any = None, echo: Echo | None = None
) -> RunSummary:
    """`backfill`: export the createdAt range `since` .. `until` (default now)."""
    from pipeline.jobs.backfill import BackfillOptions, BackfillRun
    from pipeline.jobs.core import wall_clock_ms

    if not settings.since:
        raise UsageError("backfill needs --since (e.g. --since 2026-01-01 or --since 90d)")
    now = wall_clock_ms()
    since = parse_time_ms(settings.since, "--since", now)
    until = parse_time_ms(settings.until, "--until", now) if settings.until else now
    if since > until:
        raise UsageError(f"--since ({settings.since}) is after --until ({settings.until or 'now'})")
    # relative words (90d, "now") name the range as typed, so the same command resumes it
    basis = " .. ".join(
        (text or "now") if text is None or DURATION.match(text) else str(ms)
        for text, ms in ((settings.since, since), (settings.until, until))
    )
    options = settings_for(
        BackfillOptions,
        settings,
        range_basis=basis,
        since_ms=since,
        until_ms=until,
        restart=restart,
    )
    state_storage = state_store(settings).storage
    target = dataset_target(settings)
    return _drive(
        settings,
        lambda client: BackfillRun(
            client, target.output, state_storage, options, on_progress=display, target=target
        ),
        settings.concurrency,
        display,
        echo,
    )


def _drive(
    settings: Settings,
    job: Callable[[TriggerClient], Any],
    concurrency: int,
    display: Any,
    echo: Echo | None,
) -> RunSummary:
    """Execute the job made for a fresh client, close the display, report the summary."""
    from pipeline.ops.metrics import log_summary, summary_text

    try:
        with make_client(settings, concurrency) as client:
            summary: RunSummary = job(client).execute()
    finally:
        if display is not None:
            display.close()
    if echo is not None:
        echo(summary_text(summary, settings.branch))
    log_summary(summary, settings.environment, settings.branch)
    return summary


def touched_partitions(settings: Settings, run_id: str) -> list[str]:
    """The partitions a finished run wrote, from its manifest."""
    data = output_storage(settings).read_bytes(f"_runs/{run_id}.json")
    return list(json.loads(data)["partitions"]) if data else []


def compact_dataset(settings: Settings, only: list[str] | None, echo: Echo | None) -> None:
    """`compact`: every partition, or `only` those, under the run lock (a Delta output:
    OPTIMIZE, checkpoint and VACUUM of both tables)."""
    from pipeline.dataset.compact import compact

    if is_delta(settings):
        compact_delta_output(settings, only, echo)
        return
    from pipeline.jobs.core import new_run_id, wall_clock_ms
    from pipeline.store.lock import lock_holder

    with state_store(settings).lock(lock_holder()):
        summary = compact(output_storage(settings), new_run_id(wall_clock_ms()), only)
    if echo is not None:
        echo(summary.line())


def compact_delta_output(settings: Settings, only: list[str] | None, echo: Echo | None) -> None:
    """`compact` of a Delta output, under the run lock: first finish any flush a crash cut
    between its two commits, then OPTIMIZE (every partition, or the days in `only`),
    checkpoint and VACUUM both tables."""
    from datetime import timedelta

    from pipeline.dataset.delta import compact_delta, recover_all
    from pipeline.dataset.delta.maintain import check_retention
    from pipeline.store.lock import lock_holder

    output = delta_output(settings)
    retention = timedelta(milliseconds=parse_duration_ms(settings.retention, "retention"))
    check_retention(retention, settings.force)
    with state_store(settings).lock(lock_holder()):
        for app, recovery in recover_all(output).items():
            if recovery.remerged and echo is not None:
                echo(f"recovered: flushes {list(recovery.remerged)} of {app} re-merged")
        reports = compact_delta(output, retention, settings.force, only)
    if echo is not None:
        for report in reports:
            echo(report.line())
        if not reports:
            echo(f"compact: no Delta table under {output.uri}")
