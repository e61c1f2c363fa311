"""The `sessions-export` command line: parse options, build the parts, map errors to exits.

Every expected failure is an `ExportError` printed as one line; exit codes follow the
contract (0 done, 2 usage, 3 key, 4 API, 5 storage, 75 locked, 1 bug).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from typing import Any

import click

from pipeline.config import DEFAULT_API_URL, OPTIONS, Settings, load_settings, parse_duration_ms
from pipeline.errors import ExportError
from pipeline.ops.logs import redact, register_secret, setup_logging
from pipeline.store.state import StateStore
from pipeline.store.storage import Storage

log = logging.getLogger("pipeline")

SECRET_ENV = "TRIGGER_SECRET_KEY"
API_URL_ENV = "TRIGGER_API_URL"
EXIT_VERIFY_FAILED = 6

_COMMON = ("output", "state", "log_level", "log_format")
_API = (
    "api_url",
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
_FILTERS = {
    "type": "only sessions of this type (one value)",
    "task_identifier": "only sessions of this task (one value)",
    "tags": "only sessions carrying this tag (one value)",
    "external_id": "only the session with this externalId",
    "status": "only ACTIVE, CLOSED or EXPIRED sessions (one value)",
}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


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
            filter_flags = {n: kwargs.pop(n) for n in _FILTERS} if filters else {}

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
            option = next(o for o in OPTIONS if o.name == name)
            if option.type is bool:
                flag = _flag(name)[2:]
                wrapper = click.option(
                    f"--{flag}/--no-{flag}",
                    name,
                    default=None,
                    help=f"{option.help} [default: {'on' if option.default else 'off'}]",
                )(wrapper)
            else:
                wrapper = click.option(
                    _flag(name),
                    name,
                    type=option.type,
                    default=None,
                    help=f"{option.help} [default: {option.default}]"
                    if option.default is not None
                    else option.help,
                )(wrapper)
        if filters:
            for name, text in reversed(_FILTERS.items()):
                wrapper = click.option(_flag(name), name, default=None, help=text)(wrapper)
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
    from pipeline.api.client import ClientSettings, TriggerClient

    key = os.environ.get(settings.secret_key_env, "")
    register_secret(key)
    if not key and settings.secret_key_env != SECRET_ENV:
        from pipeline.errors import AuthError

        where = f" (environment {settings.environment})" if settings.environment else ""
        raise AuthError(f"{settings.secret_key_env} is not set: export the secret key{where}")
    client_settings = ClientSettings(
        base_url=settings.api_url or os.environ.get(API_URL_ENV) or DEFAULT_API_URL,
        connect_timeout=settings.connect_timeout,
        read_timeout=settings.read_timeout,
        max_attempts=settings.max_attempts,
        backoff_initial=settings.backoff_initial,
        backoff_max=settings.backoff_max,
        allow_insecure_http=bool(settings.allow_insecure_http),
        # walkers plus single-session fetches: each needs its own pooled connection
        concurrency=concurrency
        + (settings.enrich_concurrency if settings.enrich_trigger_config else 0),
    )
    return TriggerClient(client_settings, key, key_variable=settings.secret_key_env)


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
def cli() -> None:
    """Export Trigger.dev sessions into hive-partitioned Parquet.

    The key is read from TRIGGER_SECRET_KEY (never a flag); the API from TRIGGER_API_URL
    or --api-url. Exit codes: 0 done, 2 bad usage or config, 3 key rejected, 4 API still
    failing after retries (the next run resumes), 5 storage failed, 6 verify found
    problems, 75 another run holds the lock, 1 a bug.
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
    from pipeline.dataset.sink import use_lean_memory_pool
    from pipeline.jobs.incremental import IncrementalRun, RunOptions

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
    from pipeline.ops.metrics import log_summary, record_failure, record_success

    try:
        state = state_store(settings)
        from pipeline.ops.progress import RunProgressDisplay

        display = RunProgressDisplay()
        try:
            with make_client(settings) as client:
                summary = IncrementalRun(
                    client, output_storage(settings), state, options, on_progress=display
                ).execute()
        finally:
            display.close()
        click.echo(summary.line())
        log_summary(summary, settings.environment)
        if compact_after and summary.files:
            _compact(settings, only=_touched_partitions(settings, summary.run_id))
    except BaseException as error:
        record_failure(settings.metrics_file, settings.environment, error)
        raise
    record_success(settings.metrics_file, settings.environment, summary)


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
    from pipeline.jobs.incremental import wall_clock_ms
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
    click.echo(summary.line())
    from pipeline.ops.metrics import log_summary

    log_summary(summary, settings.environment)


def _touched_partitions(settings: Settings, run_id: str) -> list[str]:
    data = output_storage(settings).read_bytes(f"_runs/{run_id}.json")
    return list(json.loads(data)["partitions"]) if data else []


@cli.command()
@with_options(*_COMMON)
def compact(settings: Settings) -> None:
    """Rewrite partitions so that each holds one row per session id, the latest version."""
    _compact(settings, only=None)


def _compact(settings: Settings, only: list[str] | None) -> None:
    from pipeline.dataset.compact import compact as run_compact
    from pipeline.jobs.incremental import new_run_id, wall_clock_ms
    from pipeline.store.lock import lock_holder

    with state_store(settings).lock(lock_holder()):
        summary = run_compact(output_storage(settings), new_run_id(wall_clock_ms()), only)
    click.echo(summary.line())


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
        sys.exit(EXIT_VERIFY_FAILED)


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
@with_options(*_COMMON)
def state_show(settings: Settings) -> None:
    """Print the checkpoint as JSON."""
    store = state_store(settings)
    checkpoint = store.load()
    click.echo(checkpoint.to_json().decode())


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
        sys.exit(130)
    except click.ClickException as error:
        error.show()
        sys.exit(2 if isinstance(error, click.UsageError) else error.exit_code)
    except ExportError as error:
        click.echo(f"sessions-export: error: {redact(str(error))}", err=True)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted; the next run resumes from the last checkpoint", err=True)
        sys.exit(130)
    except Exception as error:  # noqa: BLE001 - the last line of defence
        log.debug("unexpected error", exc_info=True)
        click.echo(
            f"sessions-export: unexpected error (a bug, please report it): "
            f"{type(error).__name__}: {redact(str(error))}; rerun with --log-level debug "
            "for the traceback",
            err=True,
        )
        sys.exit(1)
    sys.exit(0)
