"""Several environments at once: `--all-environments` runs the command for each
[environments.NAME] table of the config file, up to `--parallel N` at a time, and exits
with the worst outcome.

Each environment runs in a child process of its own,
`python -m pipeline <command> --config FILE --environment NAME <the same flags> --log-format json`,
not in a thread. What a process keeps for itself and a thread would share:

- the logging setup and the secret-redaction registry are process-wide: one environment's
  handler or key list would leak into another's lines;
- Arrow's memory pool is process-wide, and one environment that runs out of memory or
  crashes would take the others with it; a child dies alone and its code is reported;
- the GIL: on a 2-core machine the walks' parsing and flattening would queue on one lock.

A child costs its start (about 0.3 s) and its own memory (about 110 MB at peak), which is
why `parallel` defaults to 4: each environment's walk mostly waits on its own rate-limit
bucket, so 4 side by side take about as long as one, and 4 children fit a small machine.
Ctrl-C stops every child at its last checkpoint (the next run resumes it); SIGTERM sent
to the parent is passed on to the children.

So each environment keeps its own key, rate limiter, output, lock and checkpoint, and one
failing never stops or corrupts another. The parent reads every child's stderr line by
line: JSON records are shown tagged with the environment (as text lines `[NAME] …`, or as
JSON with an `environment` field), progress records become one status line per
environment on a terminal (none elsewhere), and the `run_summary` record gives the
environment's sessions and requests for the closing table.

Two environments whose output or state is the same place are refused before anything
starts: they would share one lock, and the second would wait or corrupt the first's
checkpoint. Loads of several environments into one DuckDB file or one PostgreSQL table
take turns.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import IO, Any

import click

from pipeline.config import Settings, environment_names, load_settings
from pipeline.errors import ExitCode, ExportError, UsageError
from pipeline.ops.logs import redact, setup_logging
from pipeline.store.storage import location

log = logging.getLogger("pipeline.environments")

# least to most in need of a person: done, lock busy (next cron run retries), API down
# (resumes), storage, key rejected, bad config, a bug
SEVERITY = (
    ExitCode.DONE,
    ExitCode.LOCK_HELD,
    ExitCode.API_FAILING,
    ExitCode.STORAGE,
    ExitCode.KEY_REJECTED,
    ExitCode.USAGE,
    ExitCode.VERIFY_FAILED,
    ExitCode.BUG,
)
ERROR_PREFIX = "sessions-export: error: "
INTERRUPT_GRACE_S = 1.0
# the parent's own choices, never passed on to a child
_NOT_FORWARDED = frozenset({"config", "environment", "all_environments", "parallel", "log_format"})


def worst_exit(codes: Iterable[int]) -> int:
    def rank(code: int) -> int:
        return SEVERITY.index(code) if code in SEVERITY else len(SEVERITY)

    return max(codes, key=rank, default=0)


@dataclass(frozen=True)
class EnvironmentResult:
    """How one environment's command ended; sessions and requests when it reported them."""

    name: str
    exit_code: int
    seconds: float
    sessions: int | None = None
    requests: int | None = None

    def fields(self) -> dict[str, Any]:
        return {
            "event": "environment_summary",
            "environment": self.name,
            "sessions": self.sessions,
            "requests": self.requests,
            "seconds": round(self.seconds, 3),
            "exit": self.exit_code,
        }


def run_in_turn(names: list[str], run_one: Callable[[str], object]) -> int:
    """Call `run_one` for each environment in this process, one after another (a read-only
    command such as `state show`); one failing does not stop the rest; the worst exit code."""
    codes = []
    for name in names:
        try:
            run_one(name)
            codes.append(0)
        except ExportError as error:
            click.echo(f"sessions-export: error: [{name}] {redact(str(error))}", err=True)
            codes.append(error.exit_code)
        except Exception as error:
            log.debug("unexpected error in environment %s", name, exc_info=True)
            click.echo(
                f"sessions-export: unexpected error (a bug, please report it) in [{name}]: "
                f"{type(error).__name__}: {redact(str(error))}",
                err=True,
            )
            codes.append(ExitCode.BUG)
    return worst_exit(codes)


def run_all_environments(
    ctx: click.Context,
    config: str | None,
    flags: Mapping[str, Any],
    filter_flags: Mapping[str, str | None],
) -> int:
    """Run the current command for every environment of `config`; the worst exit code."""
    names = environment_names(config)
    shared = load_settings(config, flags, filter_flags)
    setup_logging(shared.log_level, shared.log_format)
    as_json = shared.log_format == "json" or (
        shared.log_format == "auto" and not sys.stderr.isatty()
    )
    results: dict[str, EnvironmentResult] = {}
    runnable: dict[str, Settings] = {}
    for name in names:
        try:
            runnable[name] = load_settings(config, flags, filter_flags, name)
        except ExportError as error:  # a bad table fails its own environment only
            click.echo(f"{ERROR_PREFIX}[{name}] {redact(str(error))}", err=True)
            results[name] = EnvironmentResult(name, error.exit_code, 0.0)
    check_locations(runnable)
    base = [*command_path(ctx), *forwarded_flags(ctx)]
    if config:
        base += ["--config", config]
    board = Board(list(runnable), as_json, sys.stderr.isatty())
    try:
        results.update(
            run_children(
                {n: [*base, "--environment", n, "--log-format", "json"] for n in runnable},
                shared.parallel,
                board,
                {n: load_target(command_path(ctx), s) for n, s in runnable.items()},
            )
        )
    finally:
        board.close()
    ordered = [results[n] for n in names]
    click.echo(summary_table(ordered))
    if as_json:
        for result in ordered:
            log.info("environment %s done", result.name, extra={"fields": result.fields()})
    return worst_exit(r.exit_code for r in ordered)


def check_locations(environments: Mapping[str, Settings]) -> None:
    """Refuse two environments that write the same output or keep state in one place."""
    seen: dict[tuple[str, str], str] = {}
    for name, settings in environments.items():
        output = location(settings.output)
        state = location(settings.state) if settings.state else f"{output}/_state"
        for what, where in (("output", output), ("state", state)):
            other = seen.setdefault((what, where), name)
            if other != name:
                raise UsageError(
                    f"environments {other} and {name} have the same {what} ({where}): give "
                    f"each its own {what} in its [environments.NAME] table"
                )


def command_path(ctx: click.Context) -> list[str]:
    """The subcommand words of `ctx`, as typed: `["load", "duckdb"]`."""
    words: list[str] = []
    while ctx.parent is not None:
        words.append(str(ctx.info_name))
        ctx = ctx.parent
    return words[::-1]


def forwarded_flags(ctx: click.Context) -> list[str]:
    """The options given on this command line, written back as flags for a child."""
    args: list[str] = []
    for param in ctx.command.params:
        value = ctx.params.get(param.name or "")
        if not isinstance(param, click.Option) or param.name in _NOT_FORWARDED or value is None:
            continue
        if param.is_flag and param.secondary_opts:  # --x/--no-x
            args.append(param.opts[0] if value else param.secondary_opts[0])
        elif param.is_flag:
            args += [param.opts[0]] if value else []
        else:
            args += [param.opts[0], str(value)]
    return args


def load_target(words: list[str], settings: Settings) -> str | None:
    """The warehouse table a `load` writes, for environments that share one: DuckDB lets
    one process write a file, and two upserts into one table would wait on each other."""
    if words == ["load", "duckdb"] and settings.database:
        return f"duckdb {location(settings.database)}"
    if words == ["load", "postgres"]:
        return f"postgres {settings.dsn or '(PG* variables)'} {settings.schema}.{settings.table}"
    return None


def run_children(
    commands: Mapping[str, list[str]],
    parallel: int,
    board: Board,
    targets: Mapping[str, str | None] | None = None,
) -> dict[str, EnvironmentResult]:
    """Run `python -m pipeline <args>` per environment, `parallel` at a time; those with
    the same target (`load_target`) one after another."""
    stopping = threading.Event()
    live: dict[str, subprocess.Popen[str]] = {}
    turns = {t: threading.Lock() for t in (targets or {}).values() if t is not None}

    def one(name: str) -> EnvironmentResult:
        target = (targets or {}).get(name)
        with turns[target] if target is not None else contextlib.nullcontext():
            if stopping.is_set():
                return EnvironmentResult(name, ExitCode.INTERRUPTED, 0.0)
            return _run_child(name, commands[name], board, live)

    def pass_on(signum: int, _frame: object = None) -> None:
        for process in list(live.values()):
            if process.poll() is None:
                process.send_signal(signum)

    # an orchestrator stops the parent with SIGTERM: the children stop with it
    main = threading.current_thread() is threading.main_thread()  # where handlers can go
    previous = signal.signal(signal.SIGTERM, pass_on) if main else None
    pool = ThreadPoolExecutor(max_workers=max(1, parallel))
    try:
        futures = {name: pool.submit(one, name) for name in commands}
        return {name: future.result() for name, future in futures.items()}
    except KeyboardInterrupt:
        stopping.set()
        # Ctrl-C on a terminal reached every child already; a signal sent to the parent
        # alone is passed on to those still running after a moment
        time.sleep(INTERRUPT_GRACE_S)
        pass_on(signal.SIGINT)
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        if main:
            signal.signal(signal.SIGTERM, previous)


def _run_child(
    name: str, args: list[str], board: Board, live: dict[str, subprocess.Popen[str]]
) -> EnvironmentResult:
    started = time.monotonic()
    board.status(name, "running")
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        errors="replace",
        env={**os.environ, "PYTHONUNBUFFERED": "1"},  # lines as they happen, not at exit
    )
    live[name] = process
    summary: dict[str, Any] = {}
    stdout = threading.Thread(target=_relay_stdout, args=(name, process.stdout, board))
    stdout.start()
    assert process.stderr is not None
    for line in process.stderr:
        record = board.stderr_line(name, line.rstrip("\n"))
        if record is not None and record.get("event") == "run_summary":
            summary = record
    stdout.join()
    code = process.wait()
    live.pop(name, None)
    if code < 0:  # killed by a signal: stopped on purpose, or the OOM killer's 9 (a bug)
        board.write(f"{ERROR_PREFIX}[{name}] stopped by signal {-code}", err=True)
        stopped = -code in (signal.SIGINT, signal.SIGTERM)
        code = ExitCode.INTERRUPTED if stopped else ExitCode.BUG
    seconds = time.monotonic() - started
    board.status(name, f"exit {code} after {seconds:.1f} s")
    return EnvironmentResult(
        name,
        code,
        seconds,
        _int_or_none(summary.get("sessions")),
        _int_or_none(summary.get("requests")),
    )


def _relay_stdout(name: str, stream: IO[str] | None, board: Board) -> None:
    assert stream is not None
    for line in stream:
        board.write(f"[{name}] {line.rstrip()}", err=False)


def _int_or_none(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


class Board:
    """The parent's output: every child's lines tagged with its environment, and on a
    terminal one status line per environment that the lines never garble."""

    def __init__(self, names: list[str], as_json: bool, interactive: bool) -> None:
        self.as_json = as_json
        self._lock = threading.Lock()
        self._bars: dict[str, Any] = {}
        self._labels: dict[str, str] = {}
        if interactive and names:
            from tqdm import tqdm

            width = max(len(n) for n in names) + 2
            for position, name in enumerate(names):
                self._labels[name] = f"[{name}]".ljust(width)
                self._bars[name] = tqdm(
                    desc=f"{self._labels[name]} waiting",
                    bar_format="{desc}",
                    position=position,
                    file=sys.stderr,
                    leave=False,
                )

    def write(self, text: str, err: bool) -> None:
        with self._lock:
            if self._bars:
                from tqdm import tqdm

                tqdm.write(text, file=sys.stderr if err else sys.stdout)
            else:
                click.echo(text, err=err)

    def status(self, name: str, text: str) -> None:
        bar = self._bars.get(name)
        if bar is not None:
            with self._lock:
                bar.set_description_str(f"{self._labels[name]} {text}")

    def stderr_line(self, name: str, line: str) -> dict[str, Any] | None:
        """Show one line of a child's stderr; its JSON record, if it is one."""
        record = _record(line)
        if not line.strip():
            return None
        if record is None:  # an error line or a traceback: plain text, tagged
            tail = line.removeprefix(ERROR_PREFIX)
            self.write(
                f"{ERROR_PREFIX}[{name}] {tail}" if tail != line else f"[{name}] {line}", True
            )
            return None
        if self._bars and record.get("logger") == "pipeline.ops.progress":
            self.status(name, str(record.get("message", "")))
            return record
        if self.as_json:
            self.write(json.dumps({**record, "environment": name}, ensure_ascii=False), True)
        else:
            clock = str(record.get("ts", ""))[11:19]
            level = str(record.get("level", "info")).upper()
            self.write(f"{clock} {level:<7} [{name}] {record.get('message', '')}", True)
            for trace in str(record.get("exception") or "").splitlines():  # --log-level debug
                self.write(f"[{name}] {trace}", True)
        return record

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()


def _record(line: str) -> dict[str, Any] | None:
    if not line.startswith("{"):
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def summary_table(results: list[EnvironmentResult]) -> str:
    """One row per environment: sessions, requests, seconds, exit."""
    header = ("environment", "sessions", "requests", "seconds", "exit")
    rows = [
        (
            r.name,
            "—" if r.sessions is None else f"{r.sessions:,}",
            "—" if r.requests is None else f"{r.requests:,}",
            f"{r.seconds:.1f}",
            str(r.exit_code),
        )
        for r in results
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in (header, *rows)
    )
