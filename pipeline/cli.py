"""The `sessions-export` command line: parse flags, set up the terminal, map errors to exits.

The work is `pipeline.runner`'s (and the dataset modules'). Every expected failure is an
`ExportError` printed as one line; exit codes are `pipeline.errors.ExitCode`. Each command's
flags are the options whose `commands` name it (`pipeline.config`).
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from datetime import date
from typing import TYPE_CHECKING, Any

import click

from pipeline.api.filters import FILTERS
from pipeline.config import Option, Settings, load_settings, options_of
from pipeline.errors import ExitCode, ExportError, exit_codes_line
from pipeline.ops.logs import redact, register_secret, setup_logging
from pipeline.runner import delta_output, is_delta, output_storage, state_store

if TYPE_CHECKING:
    from pipeline.dataset.load import LoadSummary, LoadTarget

log = logging.getLogger("pipeline")


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


# read-only commands whose --all-environments reads each environment here, one after another
READ_IN_TURN = ("state show",)


def _every_environment(
    command_name: str,
    config: str | None,
    flags: dict[str, Any],
    filter_flags: dict[str, Any],
    invoke: Callable[[str | None], Any],
) -> int:
    """`--all-environments`: a read-only command reads each environment here in turn; the
    others run each in a child process, `--parallel` at a time. The worst exit code."""
    from pipeline.config import environment_names
    from pipeline.ops.environments import run_all_environments, run_in_turn

    if command_name in READ_IN_TURN:
        return run_in_turn(environment_names(config), invoke)
    return run_all_environments(click.get_current_context(), config, flags, filter_flags)


def with_options(command_name: str, filters: bool = False) -> Callable[[Callable], Callable]:
    """Add `--config`, `--environment` and the options that `command_name` takes (each
    option's `commands`) as flags; pass the merged `Settings` on. A command that takes
    `parallel` also takes `--all-environments`, which runs every environment."""
    names = [o.name for o in options_of(command_name)]
    each_environment = "parallel" in names or command_name in READ_IN_TURN

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
            if environment:
                raise click.UsageError("give --environment NAME or --all-environments, not both")
            sys.exit(_every_environment(command_name, config, flags, filter_flags, invoke))

        for option in reversed(options_of(command_name)):
            wrapper = option_flag(option)(wrapper)
        if filters:
            for filter_ in reversed(FILTERS):
                wrapper = click.option(filter_.flag, filter_.name, default=None, help=filter_.help)(
                    wrapper
                )
        if each_environment:
            wrapper = click.option(
                "--all-environments",
                is_flag=True,
                help="run every [environments.NAME] of the config file, --parallel at a "
                "time; exit with the worst outcome",
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
@with_options("run", filters=True)
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
    from pipeline.runner import run_export

    _use_lean_memory_pool()
    run_export(settings, full_refresh, compact_after, RunProgressDisplay(), echo=click.echo)


@cli.command()
@with_options("backfill", filters=True)
@click.option("--restart", is_flag=True, help="export the range again although it completed")
def backfill(settings: Settings, restart: bool) -> None:
    """One-off export of a createdAt range (--since, --until; default until now), walked in
    concurrent windows that share one rate limiter. Resumable: run the same command again
    and only unfinished windows continue (relative times such as 90d keep meaning the range
    of the first attempt). It never moves the incremental checkpoint
    (the high-water mark `run` starts from); its own state is _state/backfill-<key>.json."""
    from pipeline.ops.progress import BackfillProgress
    from pipeline.runner import run_backfill

    _use_lean_memory_pool()
    run_backfill(settings, restart, BackfillProgress(), echo=click.echo)


@cli.command()
@with_options("compact")
def compact(settings: Settings) -> None:
    """Rewrite partitions so that each holds one row per session id, the latest version.
    Delta: OPTIMIZE (bin-pack each partition), a checkpoint, then VACUUM (--retention)."""
    from pipeline.runner import compact_dataset

    _use_lean_memory_pool()
    compact_dataset(settings, None, click.echo)


@cli.command()
@with_options("verify")
@click.option("--strict", is_flag=True, help="also fail when a session has several versions")
def verify(settings: Settings, strict: bool) -> None:
    """Read the dataset back: schema, partition keys, duplicates, unreadable or stray files.
    Delta: the logs are whole and name only present files, one row per id in `sessions`,
    equal to the newest version in `sessions_versions`."""
    from pipeline.dataset.verify import verify as run_verify

    if is_delta(settings):
        from pipeline.dataset.delta import verify_delta

        report: Any = verify_delta(delta_output(settings))
    else:
        report = run_verify(output_storage(settings), strict=strict)
    for line in report.lines():
        click.echo(line)
    if not report.ok:
        sys.exit(ExitCode.VERIFY_FAILED)


@cli.command()
@with_options("stats")
def stats(settings: Settings) -> None:
    """A per-day table of the dataset: sessions, versions, active/closed/expired (by each
    session's latest version) and the top types, read from the files (never the API)."""
    from pipeline.dataset.delta.tables import VERSIONS_DIR
    from pipeline.dataset.layout import day_of
    from pipeline.dataset.stats import daily_stats, render
    from pipeline.errors import UsageError
    from pipeline.jobs.core import wall_clock_ms
    from pipeline.timestamps import parse_time_ms

    now = wall_clock_ms()
    since, until = (
        date.fromisoformat(day_of(parse_time_ms(text, flag, now))) if text else None
        for text, flag in ((settings.since, "--since"), (settings.until, "--until"))
    )
    if since and until and since > until:
        raise UsageError(f"--since ({settings.since}) is after --until ({settings.until})")
    output = output_storage(settings)  # opened first: a bad URI is a usage or storage error
    if is_delta(settings) and not delta_output(settings).exists(VERSIONS_DIR):
        rows = []  # nothing exported yet, as for an empty Parquet output
    else:
        rows = daily_stats(output.uri, since, until, now, table_format=settings.table_format)
    click.echo(render(rows, settings.format))


@cli.group()
def load() -> None:
    """Load the dataset into a warehouse: the latest version of each session."""


@load.command("duckdb")
@with_options("load duckdb")
def load_duckdb(settings: Settings) -> None:
    """Upsert the latest version of every session into the `sessions` table of a DuckDB
    file. Runs already loaded are skipped (see sessions_export_loads), so loading twice
    changes nothing and a load after new runs applies only theirs. Delta: the latest table,
    once per table version."""
    from pipeline.dataset.load_duckdb import DuckDBTarget
    from pipeline.errors import UsageError

    if not settings.database:
        raise UsageError('load duckdb needs --database FILE (or database = "…" in the config)')
    click.echo(_load(settings, lambda: DuckDBTarget(settings.database)).line())


@load.command("postgres")
@with_options("load postgres")
def load_postgres(settings: Settings) -> None:
    """Upsert the latest version of every session into a PostgreSQL table (created if
    missing; id is its primary key). The connection comes from PGHOST, PGPORT, PGDATABASE,
    PGUSER, PGPASSWORD, PGSERVICE (or ~/.pgpass), or --dsn without a password. Runs already
    loaded are skipped (see <table>_export_loads); the whole load is one transaction."""
    from pipeline.dataset.load_postgres import PostgresTarget

    register_secret(os.environ.get("PGPASSWORD"))  # never in an error line, whatever quotes it
    target = functools.partial(PostgresTarget, settings.dsn, settings.schema, settings.table)
    click.echo(_load(settings, target).line())


def _load(settings: Settings, target: Callable[[], LoadTarget]) -> LoadSummary:
    """The load plan for the output's format: run manifests, or the Delta latest table. The
    target is made after the output's reader is found: without the `delta` extra, that is
    the first package to install."""
    from pipeline.dataset.load import load, load_delta

    if is_delta(settings):
        return load_delta(delta_output(settings), target())
    return load(output_storage(settings), target())


@cli.group()
def state() -> None:
    """Show or clear the incremental checkpoint."""


@state.command("show")
@with_options("state show")
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

    text = render(read_state(store, wall_clock_ms(), settings.environment))
    if is_delta(settings):
        from pipeline.dataset.delta import delta_status

        text += "".join(f"\n  delta {s.line()}" for s in delta_status(delta_output(settings)))
    click.echo(text)


@state.command("reset")
@with_options("state reset")
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


def _use_lean_memory_pool() -> None:
    """The export commands' Arrow pool: set here, by the CLI, never by the library."""
    from pipeline.dataset.sink import use_lean_memory_pool

    use_lean_memory_pool()


def main(argv: list[str] | None = None) -> None:
    """The `sessions-export` entry point: run one command, exit with its code."""
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
    except Exception as error:
        log.debug("unexpected error", exc_info=True)
        click.echo(
            f"sessions-export: unexpected error (a bug, please report it): "
            f"{type(error).__name__}: {redact(str(error))}; rerun with --log-level debug "
            "for the traceback",
            err=True,
        )
        sys.exit(ExitCode.BUG)
    sys.exit(ExitCode.DONE)
