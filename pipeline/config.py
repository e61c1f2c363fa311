"""Settings: defaults, then environment variables, then the TOML config file, then flags.

Every option is declared once, as a field of `Settings` made with `option(...)`: its name,
type (the annotation), default, environment variables, allowed values or range, the
commands that take it as a flag, and help text. From that one place come the CLI's flags,
the config file's keys (errors name the file, the line and the key), the validation, the
README's option table (checked by a test) and the typed options the jobs and the client
receive (`settings_for`).

A new option is one field in `Settings` plus its row in the README's table:

    dsn: str | None = option(None, "a libpq connection string", commands=("load postgres",))

`OPTIONS` lists them as `Option` records, for the CLI and the docs.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pipeline.api.filters import FILTER_BY_NAME, check_filter
from pipeline.errors import UsageError
from pipeline.timestamps import parse_duration_ms

DEFAULT_API_URL = "https://api.trigger.dev"
DEFAULT_SECRET_KEY_ENV = "TRIGGER_SECRET_KEY"
# as the SDK reads them: the preview branch, then Vercel's; dev branches use the same header
BRANCH_ENVS = ("TRIGGER_PREVIEW_BRANCH", "VERCEL_GIT_COMMIT_REF", "TRIGGER_DEV_BRANCH")
LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("auto", "text", "json")
STATS_FORMATS = ("table", "json", "csv")
TABLE_FORMATS = ("parquet", "delta")

# the commands that take options as flags, as `sessions-export <command>` names them
COMMANDS = (
    "run",
    "backfill",
    "compact",
    "verify",
    "stats",
    "load duckdb",
    "load postgres",
    "state show",
    "state reset",
)
EXPORTS = ("run", "backfill")  # the commands that call the API and write the dataset
# the commands that take --all-environments (and so --parallel)
EACH_ENVIRONMENT = ("run", "backfill", "compact", "verify", "load duckdb", "load postgres")
_T = TypeVar("_T")


def option(
    default: Any,
    help: str,  # the word every CLI library uses
    *,
    commands: tuple[str, ...],
    env: tuple[str, ...] = (),
    choices: tuple[str, ...] = (),
    at_least: float | None = None,
    above: float | None = None,
    duration: bool = False,
    shown: str | None = None,
) -> Any:
    """A `Settings` field that is a user-facing option.

    `commands`: those of `COMMANDS` that take it as a flag (the config file takes every
    option). `env`: variables read, first set wins, when neither a flag nor the file gives
    a value. `choices`: the allowed values of a string option. `at_least`, `above`: the
    range of a number. `duration`: a string that must read as a duration (`15m`, `7d`).
    `shown`: the default as documented, when it is computed elsewhere (`<output>/_state/`).
    """
    meta = {
        "help": help,
        "commands": commands,
        "env": env,
        "choices": choices,
        "at_least": at_least,
        "above": above,
        "duration": duration,
        "shown": shown,
    }
    return field(default=default, metadata={"option": meta})


@dataclass(frozen=True)
class Settings:
    """Every option, typed, as one run sees it; build with `load_settings` or `Settings.build`."""

    api_url: str = option(
        DEFAULT_API_URL,
        "API base URL; may carry a path prefix",
        commands=EXPORTS,
        env=("TRIGGER_API_URL",),
    )
    branch: str | None = option(
        None,
        "the preview or dev branch, sent as x-trigger-branch (needed with a tr_preview_ key)",
        commands=EXPORTS,
        env=BRANCH_ENVS,
    )
    ca_bundle: str | None = option(
        None,
        "PEM file of the CAs to trust for the API (a self-hosted server's private CA)",
        commands=EXPORTS,
        env=("SSL_CERT_FILE",),
    )
    output: str = option(
        "output/", "where the dataset goes: a directory, s3://… or gs://…", commands=COMMANDS
    )
    state: str | None = option(
        None, "where the checkpoint and lock live", commands=COMMANDS, shown="<output>/_state/"
    )
    table_format: str = option(
        "parquet",
        "the dataset's format: parquet or delta",
        commands=COMMANDS,
        choices=TABLE_FORMATS,
    )
    flush_rows: int = option(
        10_000, "rows buffered before a flush and its checkpoint", commands=EXPORTS, at_least=1
    )
    flush_bytes: int = option(
        64 * 1024 * 1024,
        "buffered Arrow bytes that also force a flush",
        commands=EXPORTS,
        at_least=1,
    )
    lookback: str = option(
        "15m",
        "incremental runs re-read sessions created this long before the high-water mark",
        commands=("run",),
        duration=True,
    )
    rescan: str = option(
        "24h",
        "each run re-reads sessions created this long before the high-water mark and writes "
        "the versions that changed (0s turns it off)",
        commands=("run",),
        duration=True,
    )
    track_active: bool = option(
        True,
        "keep the ids of ACTIVE sessions; each run lists ACTIVE sessions and reads the final "
        "state of those that closed or expired since",
        commands=("run",),
    )
    enrich_trigger_config: bool = option(
        True,
        "fill triggerConfig with GET /api/v1/sessions/{id} when list rows omit it "
        "(each new version)",
        commands=EXPORTS,
    )
    enrich_concurrency: int = option(
        8, "single-session fetches in flight at once", commands=EXPORTS, at_least=1
    )
    connect_timeout: float = option(
        10.0, "seconds to establish a connection", commands=EXPORTS, above=0
    )
    read_timeout: float = option(60.0, "seconds to wait for a response", commands=EXPORTS, above=0)
    max_attempts: int = option(
        6,
        "attempts per request on faults (5xx, resets, timeouts); 429 waits do not count",
        commands=EXPORTS,
        at_least=1,
    )
    backoff_initial: float = option(
        0.5,
        "first retry delay scale, seconds (exponential, full jitter)",
        commands=EXPORTS,
        above=0,
    )
    backoff_max: float = option(30.0, "cap of one retry delay, seconds", commands=EXPORTS, above=0)
    allow_insecure_http: bool = option(
        False,
        "allow plain http:// to a non-loopback API host (never through a proxy)",
        commands=EXPORTS,
    )
    concurrency: int = option(
        8, "backfill: windows walked at once", commands=("backfill",), at_least=1
    )
    # each environment has its own rate-limit bucket, so 4 walks wait on the API side by
    # side; 4 child processes of ~110 MB each stay within a small machine's cores and memory
    parallel: int = option(
        4,
        "--all-environments: environments run at once, each in its own process",
        commands=EACH_ENVIRONMENT,
        at_least=1,
    )
    since: str | None = option(
        None,
        "backfill, stats: oldest createdAt (ISO date/datetime, or 90d back)",
        commands=("backfill", "stats"),
    )
    until: str | None = option(
        None,
        "backfill, stats: newest createdAt (ISO date/datetime, or 6h back; default now)",
        commands=("backfill", "stats"),
        shown="now",
    )
    retention: str = option(
        "7d",
        "compact, delta: VACUUM removes files unreferenced for longer than this (under 1h "
        "needs --force)",
        commands=("compact",),
        duration=True,
    )
    force: bool = option(
        False, "compact, delta: allow a VACUUM retention under 1h", commands=("compact",)
    )
    format: str = option(
        "table", "stats: table, json or csv", commands=("stats",), choices=STATS_FORMATS
    )
    log_level: str = option(
        "info", "debug, info, warning or error", commands=COMMANDS, choices=LOG_LEVELS
    )
    log_format: str = option(
        "auto",
        "text, json, or auto (text on a terminal, JSON lines otherwise)",
        commands=COMMANDS,
        choices=LOG_FORMATS,
    )
    metrics_file: str | None = option(
        None,
        "write each run's outcome here for Prometheus' textfile collector (e.g. …/export.prom)",
        commands=("run",),
    )
    secret_key_env: str = option(
        DEFAULT_SECRET_KEY_ENV,
        "the environment variable that holds the secret key (its name, never the key); "
        "<name>_FILE names a file holding it",
        commands=EXPORTS,
    )
    database: str | None = option(
        None, "load duckdb: the DuckDB database file to upsert into", commands=("load duckdb",)
    )
    dsn: str | None = option(
        None,
        "load postgres: a libpq connection string or URI without a password "
        "(default: the PG* environment variables)",
        commands=("load postgres",),
    )
    schema: str = option(
        "public", "load postgres: the schema that holds the table", commands=("load postgres",)
    )
    table: str = option(
        "sessions", "load postgres: the table to upsert into", commands=("load postgres",)
    )

    # not options: where the values came from
    filters: dict[str, str] = field(default_factory=dict)
    source: str | None = None  # the config file, if any
    environment: str | None = None  # the [environments.NAME] table applied, if any

    @classmethod
    def build(
        cls,
        config: str | None = None,
        environment: str | None = None,
        filters: Mapping[str, str] | None = None,
        **options: Any,
    ) -> Settings:
        """Settings from keyword options (the Python API): the same rules as the flags.

        `filters` or filter names as keywords (`status="CLOSED"`); unknown keywords are a
        `UsageError` naming the closest option.
        """
        flags: dict[str, Any] = {}
        filter_flags: dict[str, str | None] = dict(filters or {})
        for key, value in options.items():
            if key in FILTER_BY_NAME:
                filter_flags[key] = value
            elif key in OPTION_BY_NAME:
                if value is not None:
                    flags[key] = _coerce(OPTION_BY_NAME[key], value, f"option {key}")
            else:
                names = [*OPTION_BY_NAME, *FILTER_BY_NAME]
                raise UsageError(f"unknown option {key!r}{_suggest(key, names)}")
        for key in filter_flags:
            if key not in FILTER_BY_NAME:
                raise UsageError(f"unknown filter {key!r}{_suggest(key, FILTER_BY_NAME)}")
        return load_settings(config, flags, filter_flags, environment)


@dataclass(frozen=True)
class Option:
    """One option as the CLI and the docs see it; made from a `Settings` field."""

    name: str
    type: type  # str, int, float or bool
    default: Any
    help: str
    commands: tuple[str, ...]
    env: tuple[str, ...] = ()
    choices: tuple[str, ...] = ()
    at_least: float | None = None
    above: float | None = None
    duration: bool = False
    shown: str | None = None

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def shown_default(self) -> str:
        """The default as the README's table writes it."""
        if self.shown is not None:
            return self.shown
        if self.default is None:
            return "—"
        if isinstance(self.default, bool):
            return "true" if self.default else "false"
        return str(self.default)


def _base_type(hint: Any) -> type:
    """`int` for `int`, `str` for `str | None`."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        (inner,) = [a for a in typing.get_args(hint) if a is not type(None)]
        return inner
    return hint


def _options() -> tuple[Option, ...]:
    hints = typing.get_type_hints(Settings)
    found = []
    for spec in dataclasses.fields(Settings):
        meta = spec.metadata.get("option")
        if meta is not None:
            found.append(Option(spec.name, _base_type(hints[spec.name]), spec.default, **meta))
    return tuple(found)


OPTIONS: tuple[Option, ...] = _options()
OPTION_BY_NAME = {o.name: o for o in OPTIONS}


def options_of(command: str) -> tuple[Option, ...]:
    """The options `sessions-export <command>` takes as flags, in declaration order."""
    if command not in COMMANDS:
        raise ValueError(f"{command!r} is not one of {COMMANDS}")
    return tuple(o for o in OPTIONS if command in o.commands)


def settings_for(cls: type[_T], settings: Settings, **values: Any) -> _T:
    """A `cls` (a job's or the client's options dataclass) from the `Settings` fields of the
    same names, plus `values` for the fields that are derived (`lookback_ms`) or not options."""
    wanted = {f.name for f in dataclasses.fields(cls)} - values.keys()  # type: ignore[arg-type]
    shared = wanted & {f.name for f in dataclasses.fields(Settings)}
    return cls(**{name: getattr(settings, name) for name in shared}, **values)


FILTER_NAMES = tuple(FILTER_BY_NAME)


def load_settings(
    config_file: str | None,
    flags: Mapping[str, Any],
    filter_flags: Mapping[str, str | None],
    environment: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> Settings:
    """Merge defaults < environment variables < config file < its [environments.NAME]
    table < flags; validate all."""
    values = {o.name: o.default for o in OPTIONS}
    values.update(_from_environ(os.environ if environ is None else environ))
    filters: dict[str, str] = {}
    if config_file:
        file_values, file_filters = read_config_file(Path(config_file))
        values.update(file_values)
        filters.update(file_filters)
    if environment:
        env_values, env_filters = read_environment(config_file, environment)
        values.update(env_values)
        filters.update(env_filters)
    values.update({k: v for k, v in flags.items() if v is not None})
    for name, value in filter_flags.items():
        if value is not None:
            filters[name] = check_filter(name, value, FILTER_BY_NAME[name].flag)
    _check_values(values)
    return Settings(**values, filters=filters, source=config_file, environment=environment)


def _from_environ(environ: Mapping[str, str]) -> dict[str, Any]:
    """Options whose variables are set (first set one wins), as typed values."""
    values: dict[str, Any] = {}
    for option_ in OPTIONS:
        for variable in option_.env:
            text = environ.get(variable, "").strip()
            if text:
                values[option_.name] = _parse_text(option_, text, f"${variable}")
                break
    return values


def _parse_text(option_: Option, text: str, where: str) -> Any:
    """A variable's text as the option's type."""
    try:
        if option_.type is bool:
            lowered = text.lower()
            if lowered not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
                raise ValueError(text)
            return lowered in ("1", "true", "yes", "on")
        return option_.type(text)
    except ValueError:
        raise UsageError(f"{where} must be {option_.type.__name__}, got {text!r}") from None


def _read_toml(path: Path) -> tuple[str, dict[str, Any]]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"cannot read config file {path}: {error}") from None
    try:
        return text, tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise UsageError(f"config file {path} is not valid TOML: {error}") from None


def read_config_file(path: Path) -> tuple[dict[str, Any], dict[str, str]]:
    text, raw = _read_toml(path)
    environments = raw.pop("environments", {})
    if not isinstance(environments, dict) or not all(
        isinstance(table, dict) for table in environments.values()
    ):
        where = f"{path}:{_line_of(text, 'environments')}"
        raise UsageError(f"{where}: environments must be tables like [environments.prod]")
    return _read_options(raw, text, path, 0)


def environment_names(config_file: str | None) -> list[str]:
    """The [environments.NAME] tables of a config file, in file order."""
    if not config_file:
        raise UsageError("environments are defined in a config file: pass --config FILE")
    environments = _read_toml(Path(config_file))[1].get("environments")
    if not isinstance(environments, dict) or not environments:
        raise UsageError(f"{config_file} defines no [environments.NAME] table")
    return list(environments)


def read_environment(config_file: str | None, name: str) -> tuple[dict[str, Any], dict[str, str]]:
    """The options of one [environments.NAME] table, checked like the top level."""
    names = environment_names(config_file)
    if name not in names:
        raise UsageError(
            f"{config_file} has no [environments.{name}] table "
            f"(it has: {', '.join(names)}){_suggest(name, names)}"
        )
    path = Path(str(config_file))
    text, raw = _read_toml(path)
    header = re.compile(rf"^\s*\[\s*environments\.[\"']?{re.escape(name)}[\"']?\s*\]")
    start = next((n for n, line in enumerate(text.splitlines()) if header.match(line)), 0)
    return _read_options(raw["environments"][name], text, path, start)


def _read_options(
    raw: dict[str, Any], text: str, path: Path, start: int
) -> tuple[dict[str, Any], dict[str, str]]:
    """Option values and filters of one table; `start` is the line its keys follow."""
    values: dict[str, Any] = {}
    filters: dict[str, str] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        where = f"{path}:{_line_of(text, key, start)}"
        if name == "filters":
            if not isinstance(value, dict):
                raise UsageError(f"{where}: [filters] must be a table")
            for fkey, fvalue in value.items():
                fname = fkey.replace("-", "_")
                fwhere = f"{path}:{_line_of(text, fkey, start)}"
                if fname not in FILTER_NAMES:
                    raise UsageError(
                        f"{fwhere}: unknown filter {fkey!r}{_suggest(fname, FILTER_NAMES)}"
                    )
                if not isinstance(fvalue, str):
                    raise UsageError(f"{fwhere}: filter {fkey!r} takes one string value")
                filters[fname] = check_filter(fname, fvalue, f"{fwhere}: filter {fkey!r}")
            continue
        option = OPTION_BY_NAME.get(name)
        if option is None:
            raise UsageError(f"{where}: unknown key {key!r}{_suggest(name, OPTION_BY_NAME)}")
        values[name] = _coerce(option, value, f"{where}: {key!r}")
    return values, filters


def _coerce(option: Option, value: Any, where: str) -> Any:
    if option.type is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if option.type is int and isinstance(value, bool):
        raise UsageError(f"{where} must be an integer, got {value!r}")
    if not isinstance(value, option.type):
        raise UsageError(f"{where} must be {option.type.__name__}, got {value!r}")
    return value


def _line_of(text: str, key: str, start: int = 0) -> int | str:
    pattern = re.compile(rf"^\s*[\"']?{re.escape(key)}[\"']?\s*=|^\s*\[\s*{re.escape(key)}\s*\]")
    for number, line in enumerate(text.splitlines()[start:], start=start + 1):
        if pattern.search(line):
            return number
    return "?"


def _suggest(name: str, choices: Any) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _check_values(values: dict[str, Any]) -> None:
    for option_ in OPTIONS:
        name, value = option_.name, values[option_.name]
        if option_.at_least is not None and value < option_.at_least:
            raise UsageError(f"{name} must be at least {option_.at_least}, got {value}")
        if option_.above is not None and value <= option_.above:
            bound = "positive" if option_.above == 0 else f"above {option_.above}"
            raise UsageError(f"{name} must be {bound}, got {value}")
        if option_.duration:
            parse_duration_ms(value, name)
        if option_.choices and str(value).lower() not in option_.choices:
            raise UsageError(f"{name} must be {', '.join(option_.choices)}, got {value!r}")
    key_env = values["secret_key_env"]
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key_env) or key_env.startswith("tr_"):
        # the value is not echoed: it may be a key pasted by mistake
        raise UsageError(
            "secret_key_env must name an environment variable (like TRIGGER_PROD_KEY) "
            "that holds the key, never the key itself"
        )
    branch = values["branch"]
    if branch is not None and (not branch.strip() or not branch.isprintable()):
        raise UsageError(f"branch must be a branch name, got {branch!r}")
