"""Settings: defaults, then the TOML config file, then command-line flags (flags win).

Every option is declared once in `OPTIONS` with its type, default and help text; the CLI
builds its flags' help from it and the README's configuration table is checked against it.
Errors name the file, the line and the key.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pipeline.errors import UsageError

DEFAULT_API_URL = "https://api.trigger.dev"
FILTER_NAMES = ("type", "task_identifier", "tags", "external_id", "status")
STATUSES = ("ACTIVE", "CLOSED", "EXPIRED")


@dataclass(frozen=True)
class Option:
    name: str
    type: type
    default: Any
    help: str


OPTIONS: tuple[Option, ...] = (
    Option(
        "api_url", str, None, "API base URL (else $TRIGGER_API_URL, else https://api.trigger.dev)"
    ),
    Option("output", str, "output/", "where the dataset goes: a directory, s3://… or gs://…"),
    Option("state", str, None, "where the checkpoint and lock live (default <output>/_state/)"),
    Option("flush_rows", int, 10_000, "rows buffered before a flush and its checkpoint"),
    Option("flush_bytes", int, 64 * 1024 * 1024, "buffered Arrow bytes that also force a flush"),
    Option(
        "lookback",
        str,
        "15m",
        "incremental runs re-read sessions created this long before the high-water mark",
    ),
    Option(
        "rescan",
        str,
        "24h",
        "each run re-reads sessions created this long before the high-water mark and writes "
        "the versions that changed (0s turns it off)",
    ),
    Option(
        "track_active",
        bool,
        True,
        "keep the ids of ACTIVE sessions; each run lists ACTIVE sessions and reads the final "
        "state of those that closed or expired since",
    ),
    Option(
        "enrich_trigger_config",
        bool,
        True,
        "fill triggerConfig with GET /api/v1/sessions/{id} when list rows omit it (once each)",
    ),
    Option("enrich_concurrency", int, 8, "single-session fetches in flight at once"),
    Option("connect_timeout", float, 10.0, "seconds to establish a connection"),
    Option("read_timeout", float, 60.0, "seconds to wait for a response"),
    Option(
        "max_attempts",
        int,
        6,
        "attempts per request on faults (5xx, resets, timeouts); 429 waits do not count",
    ),
    Option(
        "backoff_initial", float, 0.5, "first retry delay scale, seconds (exponential, full jitter)"
    ),
    Option("backoff_max", float, 30.0, "cap of one retry delay, seconds"),
    Option("allow_insecure_http", bool, False, "allow plain http:// to a non-loopback API host"),
    Option("concurrency", int, 8, "backfill: windows walked at once"),
    Option("since", str, None, "backfill: oldest createdAt (ISO date/datetime, or 90d back)"),
    Option(
        "until",
        str,
        None,
        "backfill: newest createdAt (ISO date/datetime, or 6h back; default now)",
    ),
    Option("log_level", str, "info", "debug, info, warning or error"),
    Option(
        "log_format", str, "auto", "text, json, or auto (text on a terminal, JSON lines otherwise)"
    ),
    Option(
        "metrics_file",
        str,
        None,
        "write each run's outcome here for Prometheus' textfile collector (e.g. …/export.prom)",
    ),
    Option(
        "secret_key_env",
        str,
        "TRIGGER_SECRET_KEY",
        "the environment variable that holds the secret key (its name, never the key)",
    ),
    Option("database", str, None, "load duckdb: the DuckDB database file to upsert into"),
)
OPTION_BY_NAME = {o.name: o for o in OPTIONS}


@dataclass(frozen=True)
class Settings:
    values: dict[str, Any]
    filters: dict[str, str] = field(default_factory=dict)
    source: str | None = None  # the config file, if any
    environment: str | None = None  # the [environments.NAME] table applied, if any

    def __getattr__(self, name: str) -> Any:
        try:
            return self.values[name]
        except KeyError:
            raise AttributeError(name) from None


def load_settings(
    config_file: str | None,
    flags: dict[str, Any],
    filter_flags: dict[str, str | None],
    environment: str | None = None,
) -> Settings:
    """Merge defaults < config file < its [environments.NAME] table < flags; validate all."""
    values = {o.name: o.default for o in OPTIONS}
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
            filters[name] = check_filter(name, value, "--" + name.replace("_", "-"))
    _check_values(values)
    return Settings(values, filters, config_file, environment)


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


def check_filter(name: str, value: str, where: str) -> str:
    """One value per filter: the API neither splits commas nor accepts repeated keys."""
    if not value.strip():
        raise UsageError(f"{where} is empty")
    if "," in value:
        raise UsageError(
            f"{where} has a comma ({value!r}): the API takes one value per filter and would "
            "treat it as one literal value; run once per value instead"
        )
    if name == "status":
        upper = value.upper()
        if upper not in STATUSES:
            raise UsageError(f"{where} must be one of {', '.join(STATUSES)}, got {value!r}")
        return upper
    return value


def _check_values(values: dict[str, Any]) -> None:
    positive = ("flush_rows", "flush_bytes", "max_attempts", "concurrency", "enrich_concurrency")
    for name in positive:
        if values[name] < 1:
            raise UsageError(f"{name} must be at least 1, got {values[name]}")
    for name in ("connect_timeout", "read_timeout", "backoff_initial", "backoff_max"):
        if values[name] <= 0:
            raise UsageError(f"{name} must be positive, got {values[name]}")
    parse_duration_ms(values["lookback"], "lookback")
    parse_duration_ms(values["rescan"], "rescan")
    if values["log_level"].lower() not in ("debug", "info", "warning", "error"):
        raise UsageError(
            f"log_level must be debug, info, warning or error, got {values['log_level']!r}"
        )
    key_env = values["secret_key_env"]
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key_env) or key_env.startswith("tr_"):
        # the value is not echoed: it may be a key pasted by mistake
        raise UsageError(
            "secret_key_env must name an environment variable (like TRIGGER_PROD_KEY) "
            "that holds the key, never the key itself"
        )
    if values["log_format"] not in ("auto", "text", "json"):
        raise UsageError(f"log_format must be auto, text or json, got {values['log_format']!r}")


DURATION = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
_UNIT_MS = {"s": 1000, "m": 60_000, "h": 3_600_000, "d": 86_400_000, "w": 604_800_000}


def parse_duration_ms(text: str, what: str) -> int:
    match = DURATION.match(str(text))
    if not match:
        raise UsageError(f"{what} must be a duration like 15m, 6h or 90d, got {text!r}")
    return int(match.group(1)) * _UNIT_MS[match.group(2)]


def parse_time_ms(text: str, what: str, now_ms: int) -> int:
    """ISO-8601 date or datetime (UTC unless an offset is given), or a duration back from now."""
    if DURATION.match(text):
        return now_ms - parse_duration_ms(text, what)
    try:
        moment = datetime.fromisoformat(text.strip())
    except ValueError:
        raise UsageError(
            f"{what} {text!r} is not a time: use 2026-01-31, 2026-01-31T12:00:00Z or 90d"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return (moment - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
