"""The `sessions-export` command line: parse options, build the parts, map errors to exits.

Every expected failure is an `ExportError` printed as one line; exit codes are
`pipeline.errors.ExitCode`. Flags come from the options declared in `pipeline.config`.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from datetime import date
from typing import TYPE_CHECKING, Any

import click

from pipeline.api.filters import FILTERS
from pipeline.config import (
    DEFAULT_SECRET_KEY_ENV,
    OPTION_BY_NAME,
    Option,
    Settings,
    load_settings,
    parse_duration_ms,
)
from pipeline.errors import ExitCode, ExportError, exit_codes_line
from pipeline.ops.logs import redact, register_secret, setup_logging
from pipeline.store.state import StateStore
from pipeline.store.storage import Storage

if TYPE_CHECKING:
    from pipeline.jobs.core import RunSummary

log = logging.getLogger("pipeline")

_COMMON = ("output", "state", "log_level", "log_format")
_API = (
    "api_url",
    "branch",
    "ca_bundle",
    "connect_timeout",
    "read_timeout",
    "max_attempts",
    "backoff_initial",
    "backoff_max",
    "allow_insecure_http",
    "flush_rows",
    "flush_bytes",
    "secret_key_env",
)


def option_flag(option: Option) -> Callable[[Callable], Callable]:
    """The click flag of one declared option; `None` when not given, so lower layers win."""
    tail = f" [env: {', '.join(option.env)}]" if option.env else ""
    if option.type is bool:
        name = option.flag[2:]
        return click.option(
            f"--{name}/--no-{name}",
            option.name,
            default=None,
            help=f"{option.help} [default: {option.shown_default()}]{tail}",
        )
    default = "" if option.default is None and option.shown is None else option.shown_default()
    return click.option(
        option.flag,
        option.name,
        type=option.type,  # choices are checked with the file's values: one line
        default=None,
        help=f"{option.help}{f' [default: {default}]' if default else ''}{tail}",
    )


def with_options(
    *names: str, filters: bool = False, each_environment: bool = False
) -> Callable[[Callable], Callable]:
    """Add `--config`, `--environment` and the named settings as flags; pass the merged
    `Settings` on. With `each_environment`, `--all-environments` runs every environment."""

    def decorate(command: Callable) -> Callable:
        @functools.wraps(command)
        def wrapper(
            config: str | None, environment: str | None, all_environments: bool = False, **kwargs
        ) -> Any:
            flags = {n: kwargs.pop(n) for n in names}
            filter_flags = {f.name: kwargs.pop(f.name) for f in FILTERS} if filters else {}

            def invoke(name: str | None) -> Any:
                settings = load_settings(config, flags, filter_flags, name)
                setup_logging(settings.log_level, settings.log_format)
                return command(settings, **kwargs)

            if not all_environments:
                return invoke(environment)
            from pipeline.config import environment_names
            from pipeline.ops.environments import run_each

            if environment:
                raise click.UsageError("give --environment NAME or --all-environments, not both")
            sys.exit(run_each(environment_names(config), invoke))

        for name in reversed(names):
            wrapper = option_flag(OPTION_BY_NAME[name])(wrapper)
        if filters:
            for filter_ in reversed(FILTERS):
                wrapper = click.option(filter_.flag, filter_.name, default=None, help=filter_.help)(
                    wrapper
                )
        if each_environment:
            wrapper = click.option(
                "--all-environments",
                is_flag=True,
                help="run every [environments.NAME] of the config file in turn; exit with "
                "the worst outcome",
            )(wrapper)
        wrapper = click.option(
            "--environment",
            "environment",
            metavar="NAME",
            help="apply the config file's [environments.NAME] table (its own key variable, "
            "output and state)",
        )(wrapper)
        return click.option(
            "--config",
            "config",
            type=click.Path(dir_okay=False),
            help="TOML config file (see configs/); flags win over it",
        )(wrapper)

    return decorate


def output_storage(settings: Settings) -> Storage:
    return Storage(settings.output)


def state_store(settings: Settings) -> StateStore:
    if settings.state:
        return StateStore(Storage(settings.state))
    return StateStore(output_storage(settings).child("_state"))


def make_client(settings: Settings, concurrency: int = 1):  # noqa: ANN201
    from pipeline.api.auth import read_secret_key
    from pipeline.api.client import ClientSettings, TriggerClient

    key = read_secret_key(settings.secret_key_env, os.environ)
    register_secret(key.value)
    if not key.value and settings.secret_key_env != DEFAULT_SECRET_KEY_ENV:
        from pipeline.errors import AuthError

        where = f" (environment {settings.environment})" if settings.environment else ""
        raise AuthError(f"{key.source} is not set: export the secret key{where}")
    client_settings = ClientSettings(
        base_url=settings.api_url,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        max_attempts=settings.max_attempts,
        backoff_initial=settings.backoff_initial,
        backoff_max=settings.backoff_max,
        allow_insecure_http=settings.allow_insecure_http,
        # walkers plus single-session fetches: each needs its own pooled connection
        concurrency=concurrency
        + (settings.enrich_concurrency if settings.enrich_trigger_config else 0),
        branch=settings.branch,
        ca_bundle=settings.ca_bundle,
    )
    return TriggerClient(client_settings, key.value, key_variable=key.source)


def _with_epilog(command: Callable) -> Callable:
    command.__doc__ = f"{command.__doc__}\n\nExit codes: {exit_codes_line().replace('`', '')}."
    return command


class _Commands(click.Group):
    """Loads the emulator (and its web server) only when it is asked for: exports stay lean."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted([*super().list_commands(ctx), "emulator"])

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name == "emulator":
            from pipeline.emulator.cli import emulator_command

            return emulator_command
        return super().get_command(ctx, name)


@click.group(
    cls=_Commands,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(package_name="trigger-sessions-export")
@_with_epilog
def cli() -> None:
    """Export Trigger.dev sessions into hive-partitioned Parquet.

    The key is read from TRIGGER_SECRET_KEY or the file TRIGGER_SECRET_KEY_FILE names
    (never a flag); the API from TRIGGER_API_URL or --api-url.
    """


@cli.command()
@with_options(
    *_COMMON,
    *_API,
    "lookback",
    "rescan",
    "track_active",
    "enrich_trigger_config",
    "enrich_concurrency",
    "metrics_file",
    filters=True,
    each_environment=True,
)
@click.option(
    "--full-refresh",
    is_flag=True,
    help="re-walk the whole history, catching changes to old closed sessions (weekly)",
)
@click.option(
    "--compact", "compact_after", is_flag=True, help="compact the partitions this run touched"
)
def run(settings: Settings, full_refresh: bool, compact_after: bool) -> None:
    """Incremental export: resume an interrupted run, else export everything created since
    the checkpoint's high-water mark minus the lookback. The first run exports all history."""
    from pipeline.ops.progress import RunProgressDisplay

    run_export(settings, full_refresh, compact_after, RunProgressDisplay(), echo=click.echo)


def run_export(
    settings: Settings,
    full_refresh: bool,
    compact_after: bool,
    display: Any = None,
    echo: Callable[[str], Any] | None = None,
) -> RunSummary:
    """`run` without the terminal: the same export, its metrics, and its `RunSummary`."""
    from pipeline.dataset.sink import use_lean_memory_pool
    from pipeline.jobs.incremental import IncrementalRun, RunOptions
    from pipeline.ops.metrics import log_summary, record_failure, record_success, summary_text

    use_lean_memory_pool()
    options = RunOptions(
        filters=settings.filters,
        lookback_ms=parse_duration_ms(settings.lookback, "lookback"),
        rescan_ms=parse_duration_ms(settings.rescan, "rescan"),
        track_active=settings.track_active,
        enrich_trigger_config=settings.enrich_trigger_config,
        enrich_concurrency=settings.enrich_concurrency,
        flush_rows=settings.flush_rows,
        flush_bytes=settings.flush_bytes,
        full_refresh=full_refresh,
    )
    try:
        state = state_store(settings)
        try:
            with make_client(settings) as client:
                summary = IncrementalRun(
                    client, output_storage(settings), state, options, on_progress=display
                ).execute()
        finally:
            if display is not None:
                display.close()
        if echo is not None:
            echo(summary_text(summary, settings.branch))
        log_summary(summary, settings.environment, settings.branch)
        if compact_after and summary.files:
            _compact(settings, only=_touched_partitions(settings, summary.run_id), echo=echo)
    except BaseException as error:
        record_failure(settings.metrics_file, settings.environment, error, settings.branch)
        raise
    record_success(settings.metrics_file, settings.environment, summary, settings.branch)
    return summary


@cli.command()
@with_options(
    *_COMMON,
    *_API,
    "concurrency",
    "since",
    "until",
    "enrich_trigger_config",
    "enrich_concurrency",
    filters=True,
)
@click.option("--restart", is_flag=True, help="export the range again although it completed")
def backfill(settings: Settings, restart: bool) -> None:
    """One-off export of a createdAt range (--since, --until; default until now), walked in
    concurrent windows that share one rate limiter. Resumable: run the same command again
    and only unfinished windows continue (relative times such as 90d keep meaning the range
    of the first attempt). It never moves the incremental checkpoint
    (the high-water mark `run` starts from); its own state is _state/backfill-<key>.json."""
    from pipeline.config import DURATION, parse_time_ms
    from pipeline.dataset.sink import use_lean_memory_pool
    from pipeline.errors import UsageError
    from pipeline.jobs.backfill import BackfillOptions, BackfillRun
    from pipeline.jobs.core import wall_clock_ms
    from pipeline.ops.progress import BackfillProgress

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
    options = BackfillOptions(
        range_basis=basis,
        since_ms=since,
        until_ms=until,
        filters=settings.filters,
        concurrency=settings.concurrency,
        flush_rows=settings.flush_rows,
        flush_bytes=settings.flush_bytes,
        restart=restart,
        enrich_trigger_config=settings.enrich_trigger_config,
        enrich_concurrency=settings.enrich_concurrency,
    )
    use_lean_memory_pool()
    progress = BackfillProgress()
    state_storage = state_store(settings).storage
    try:
        with make_client(settings, concurrency=settings.concurrency) as client:
            run_ = BackfillRun(
                client, output_storage(settings), state_storage, options, on_progress=progress
            )
            summary = run_.execute()
    finally:
        progress.close()
    from pipeline.ops.metrics import log_summary, summary_text

    click.echo(summary_text(summary, settings.branch))

    log_summary(summary, settings.environment, settings.branch)


def _touched_partitions(settings: Settings, run_id: str) -> list[str]:
    data = output_storage(settings).read_bytes(f"_runs/{run_id}.json")
    return list(json.loads(data)["partitions"]) if data else []


@cli.command()
@with_options(*_COMMON)
def compact(settings: Settings) -> None:
    """Rewrite partitions so that each holds one row per session id, the latest version."""
    _compact(settings, only=None)


def _compact(
    settings: Settings, only: list[str] | None, echo: Callable[[str], Any] | None = click.echo
) -> None:
    from pipeline.dataset.compact import compact as run_compact
    from pipeline.dataset.sink import use_lean_memory_pool
    from pipeline.jobs.core import new_run_id, wall_clock_ms
    from pipeline.store.lock import lock_holder

    use_lean_memory_pool()

    with state_store(settings).lock(lock_holder()):
        summary = run_compact(output_storage(settings), new_run_id(wall_clock_ms()), only)
    if echo is not None:
        echo(summary.line())


@cli.command()
@with_options(*_COMMON)
@click.option("--strict", is_flag=True, help="also fail when a session has several versions")
def verify(settings: Settings, strict: bool) -> None:
    """Read the dataset back: schema, partition keys, duplicates, unreadable or stray files."""
    from pipeline.dataset.verify import verify as run_verify

    report = run_verify(output_storage(settings), strict=strict)
    for line in report.lines():
        click.echo(line)
    if not report.ok:
        sys.exit(ExitCode.VERIFY_FAILED)


@cli.command()
@with_options(*_COMMON, "since", "until", "format")
def stats(settings: Settings) -> None:
    """A per-day table of the dataset: sessions, versions, active/closed/expired (by each
    session's latest version) and the top types, read from the files (never the API)."""
    from pipeline.config import parse_time_ms
    from pipeline.dataset.layout import day_of
    from pipeline.dataset.stats import daily_stats, render
    from pipeline.errors import UsageError
    from pipeline.jobs.core import wall_clock_ms

    now = wall_clock_ms()
    since, until = (
        date.fromisoformat(day_of(parse_time_ms(text, flag, now))) if text else None
        for text, flag in ((settings.since, "--since"), (settings.until, "--until"))
    )
    if since and until and since > until:
        raise UsageError(f"--since ({settings.since}) is after --until ({settings.until})")
    output = output_storage(settings)  # opened first: a bad URI is a usage or storage error
    rows = daily_stats(output.uri, since, until, now)
    click.echo(render(rows, settings.format))


@cli.group()
def load() -> None:
    """Load the dataset into a warehouse: the latest version of each session."""


@load.command("duckdb")
@with_options(*_COMMON, "database")
def load_duckdb(settings: Settings) -> None:
    """Upsert the latest version of every session into the `sessions` table of a DuckDB
    file. Runs already loaded are skipped (see sessions_export_loads), so loading twice
    changes nothing and a load after new runs applies only theirs."""
    from pipeline.dataset.load import load as run_load
    from pipeline.dataset.load_duckdb import DuckDBTarget
    from pipeline.errors import UsageError

    if not settings.database:
        raise UsageError('load duckdb needs --database FILE (or database = "…" in the config)')
    click.echo(run_load(output_storage(settings), DuckDBTarget(settings.database)).line())


@load.command("postgres")
@with_options(*_COMMON, "dsn", "schema", "table")
def load_postgres(settings: Settings) -> None:
    """Upsert the latest version of every session into a PostgreSQL table (created if
    missing; id is its primary key). The connection comes from PGHOST, PGPORT, PGDATABASE,
    PGUSER, PGPASSWORD, PGSERVICE (or ~/.pgpass), or --dsn without a password. Runs already
    loaded are skipped (see <table>_export_loads); the whole load is one transaction."""
    from pipeline.dataset.load import load as run_load
    from pipeline.dataset.load_postgres import PostgresTarget

    register_secret(os.environ.get("PGPASSWORD"))  # never in an error line, whatever quotes it
    target = PostgresTarget(settings.dsn, settings.schema, settings.table)
    click.echo(run_load(output_storage(settings), target).line())


@cli.group()
def state() -> None:
    """Show or clear the incremental checkpoint."""


@state.command("show")
@with_options(*_COMMON, each_environment=True)
@click.option("--json", "as_json", is_flag=True, help="print the checkpoint as JSON instead")
def state_show(settings: Settings, as_json: bool) -> None:
    """Where the export stands: the high-water mark and its age, the last successful run,
    an interrupted run's position, active sessions watched, backfills in progress and who
    holds the lock. --json prints the checkpoint itself."""
    store = state_store(settings)
    if as_json:
        click.echo(store.load().to_json().decode())
        return
    from pipeline.jobs.core import wall_clock_ms
    from pipeline.ops.state_view import read_state, render

    click.echo(render(read_state(store, wall_clock_ms(), settings.environment)))


@state.command("reset")
@with_options(*_COMMON)
@click.option("--yes", is_flag=True, help="do not ask for confirmation")
def state_reset(settings: Settings, yes: bool) -> None:
    """Clear the checkpoint: the next run exports the whole history again."""
    from pipeline.store.lock import lock_holder

    store = state_store(settings)
    if not yes and sys.stdin.isatty():
        click.confirm(f"clear the checkpoint in {store.storage.uri}?", abort=True)
    with store.lock(lock_holder()):
        store.reset()
    click.echo(f"checkpoint cleared in {store.storage.uri}")


def main(argv: list[str] | None = None) -> None:
    try:
        cli.main(args=argv, prog_name="sessions-export", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(ExitCode.INTERRUPTED)
    except click.ClickException as error:
        error.show()
        sys.exit(ExitCode.USAGE if isinstance(error, click.UsageError) else error.exit_code)
    except ExportError as error:
        click.echo(f"sessions-export: error: {redact(str(error))}", err=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted; the next run resumes from the last checkpoint", err=True)
        sys.exit(ExitCode.INTERRUPTED)
    except Exception as error:  # noqa: BLE001 - the last line of defence
        log.debug("unexpected error", exc_info=True)
        click.echo(
            f"sessions-export: unexpected error (a bug, please report it): "
            f"{type(error).__name__}: {redact(str(error))}; rerun with --log-level debug "
            "for the traceback",
            err=True,
        )
        sys.exit(ExitCode.BUG)
    sys.exit(ExitCode.DONE)
