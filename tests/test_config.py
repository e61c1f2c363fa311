import dataclasses
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from pipeline.api.filters import FILTERS
from pipeline.config import COMMANDS, OPTIONS, Settings, load_settings, options_of
from pipeline.errors import (
    DOCUMENTED,
    ApiError,
    AuthError,
    ExitCode,
    LockHeld,
    StorageError,
    UsageError,
    exit_codes_line,
)
from pipeline.timestamps import parse_duration_ms, parse_time_ms

NOW = 1_800_000_000_000


def write(tmp_path, text):
    path = tmp_path / "export.toml"
    path.write_text(text)
    return str(path)


def test_defaults_then_file_then_flags(tmp_path):
    config = write(tmp_path, 'output = "from-file"\nflush_rows = 10\n[filters]\ntype = "chat.agent"\n')
    settings = load_settings(config, {"output": "from-flag", "flush_rows": None}, {"status": "closed"})
    assert settings.output == "from-flag"
    assert settings.flush_rows == 10
    assert settings.read_timeout == 60.0
    assert settings.filters == {"type": "chat.agent", "status": "CLOSED"}


def test_unknown_key_names_file_line_and_suggests(tmp_path):
    config = write(tmp_path, 'output = "x"\n\nflush_rowz = 5\n')
    with pytest.raises(UsageError, match=r"export.toml:3: unknown key 'flush_rowz' \(did you mean 'flush_rows'\?\)"):
        load_settings(config, {}, {})


def test_wrong_type_names_file_line_and_key(tmp_path):
    config = write(tmp_path, 'read_timeout = "slow"\n')
    with pytest.raises(UsageError, match=r"export.toml:1: 'read_timeout' must be float"):
        load_settings(config, {}, {})


def test_broken_toml_and_missing_file(tmp_path):
    with pytest.raises(UsageError, match="not valid TOML.*line 1"):
        load_settings(write(tmp_path, "output = \n"), {}, {})
    with pytest.raises(UsageError, match="does not exist"):
        load_settings(str(tmp_path / "nope.toml"), {}, {})


def test_comma_joined_filter_is_rejected(tmp_path):
    with pytest.raises(UsageError, match="one value per filter"):
        load_settings(None, {}, {"tags": "a,b"})
    with pytest.raises(UsageError, match=r"export.toml:2: filter 'status'"):
        load_settings(write(tmp_path, '[filters]\nstatus = "ACTIVE,CLOSED"\n'), {}, {})


def test_unknown_status_and_filter(tmp_path):
    with pytest.raises(UsageError, match="ACTIVE, CLOSED, EXPIRED"):
        load_settings(None, {}, {"status": "open"})
    with pytest.raises(UsageError, match="unknown filter 'colour'"):
        load_settings(write(tmp_path, '[filters]\ncolour = "red"\n'), {}, {})


def test_bad_values_are_usage_errors():
    with pytest.raises(UsageError, match="flush_rows"):
        load_settings(None, {"flush_rows": 0}, {})
    with pytest.raises(UsageError, match="lookback"):
        load_settings(None, {"lookback": "soon"}, {})


def test_times_and_durations():
    assert parse_duration_ms("15m", "x") == 900_000
    assert parse_time_ms("6h", "since", NOW) == NOW - 6 * 3_600_000
    assert parse_time_ms("90d", "since", NOW) == NOW - 90 * 86_400_000
    assert parse_time_ms("1970-01-02", "since", NOW) == 86_400_000
    assert parse_time_ms("1970-01-01T01:00:00+01:00", "since", NOW) == 0
    assert parse_time_ms("1970-01-01T00:00:01.5Z", "since", NOW) == 1500
    with pytest.raises(UsageError, match="not a time"):
        parse_time_ms("last tuesday", "--since", NOW)


# -- options declared once ------------------------------------------------------------

ROOT = Path(__file__).resolve().parents[1]
OPTIONS_DOC = ROOT / "docs" / "configuration.md"  # the option and filter tables
EXIT_CODES_DOC = ROOT / "README.md"  # the exit-code line


def table_rows(markdown: str, header: str) -> list[list[str]]:
    lines = markdown.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("| `"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split(" | ")])
    return rows


def documented_commands(cell: str) -> set[str]:
    """`run`, `backfill` -> {"run", "backfill"}; `all` -> every command but the emulator."""
    from pipeline.cli import cli

    if cell == "all":
        return set(command_params(cli))
    return {name.strip().strip("`") for name in cell.split(",")}


def command_params(group, prefix: str = "") -> dict[str, set[str]]:
    """Each leaf command's full name and the names of its parameters."""
    import click

    found: dict[str, set[str]] = {}
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            found.update(command_params(command, f"{prefix}{name} "))
        else:
            found[prefix + name] = {p.name for p in command.params if p.name}
    return found


def test_documented_option_table_matches_the_declarations():
    from pipeline.cli import cli

    rows = table_rows(OPTIONS_DOC.read_text(), "| option | default | environment variable |")
    assert [r[0] for r in rows] == [f"`{o.name}`" for o in OPTIONS]
    params = command_params(cli)
    for row, option in zip(rows, OPTIONS, strict=True):
        default = option.shown_default()
        assert row[1] == ("—" if default == "—" else f"`{default}`"), option.name
        assert row[2] == (", ".join(f"`{e}`" for e in option.env) or "—"), option.name
        takes = {name for name, names in params.items() if option.name in names}
        assert documented_commands(row[3]) == takes, option.name
        assert row[4], option.name


def test_documented_filter_table_matches_the_declarations():
    rows = table_rows(OPTIONS_DOC.read_text(), "| filter | flag | API parameter |")
    assert [r[0] for r in rows] == [f"`{f.name}`" for f in FILTERS]
    for row, filter_ in zip(rows, FILTERS, strict=True):
        assert row[1] == f"`{filter_.flag}`"
        assert row[2].startswith(f"`{filter_.param}`")


def leaf_commands(group, prefix=""):
    """Every runnable command of the CLI as `sessions-export <path>` names it."""
    import click

    for name, command in group.commands.items():
        path = f"{prefix}{name}"
        if isinstance(command, click.Group):
            yield from leaf_commands(command, path + " ")
        else:
            yield path, command


def test_each_command_takes_exactly_its_options_as_flags():
    from pipeline.cli import cli

    commands = dict(leaf_commands(cli))
    for option in OPTIONS:
        assert option.commands and set(option.commands) <= set(COMMANDS), option.name
    assert set(COMMANDS) == set(commands)  # every command takes options (emulator is apart)
    for path, command in commands.items():
        params = {p.name: p for p in command.params}
        flags = {name for name in params if name in {o.name for o in OPTIONS}}
        assert flags == {o.name for o in options_of(path)}, path
        for option in options_of(path):
            param = params[option.name]
            assert param.default is None, option.name  # unset flags never hide the file
            assert option.flag in param.opts, option.name
            if option.type is not bool:
                assert param.type.name == {str: "text", int: "integer", float: "float"}[option.type]
    assert {"branch", "ca_bundle", "api_url", "status", "type"} <= {p.name for p in commands["run"].params}


def test_ranges_live_on_the_options():
    ranged = [o for o in OPTIONS if o.at_least is not None or o.above is not None]
    assert {"flush_rows", "concurrency", "read_timeout"} <= {o.name for o in ranged}
    for option in ranged:
        bound = option.at_least if option.at_least is not None else option.above
        too_small = option.type(bound - 1 if option.at_least is not None else bound)
        with pytest.raises(UsageError, match=rf"^{option.name} must be"):
            load_settings(None, {option.name: too_small}, {})
        assert getattr(load_settings(None, {option.name: option.type(bound + 1)}, {}), option.name) == bound + 1


def test_jobs_and_client_options_take_their_defaults_from_settings():
    from pipeline.api.client import ClientSettings
    from pipeline.jobs.backfill import BackfillOptions
    from pipeline.jobs.incremental import RunOptions
    from pipeline.runner import client_settings

    names = {o.name for o in OPTIONS} | {"base_url"}
    for cls in (RunOptions, BackfillOptions, ClientSettings):
        for spec in dataclasses.fields(cls):
            redeclared = spec.default is not dataclasses.MISSING or spec.default_factory is not dataclasses.MISSING
            assert not (spec.name in names and redeclared), f"{cls.__name__}.{spec.name}"
    settings = Settings.build(read_timeout=5, api_url="https://x.example", enrich_trigger_config=False)
    client = client_settings(settings, concurrency=3)
    assert (client.base_url, client.read_timeout, client.max_attempts, client.concurrency) == (
        "https://x.example", 5.0, Settings().max_attempts, 3)


def test_table_format_is_parquet_or_delta(tmp_path):
    assert Settings().table_format == "parquet"
    assert load_settings(None, {"table_format": "parquet"}, {}).table_format == "parquet"
    assert Settings.build(table_format="delta").table_format == "delta"
    assert load_settings(write(tmp_path, 'table_format = "delta"\n'), {}, {}).table_format == "delta"
    with pytest.raises(UsageError, match="table_format must be parquet, delta"):
        load_settings(write(tmp_path, 'table_format = "orc"\n'), {}, {})
    out = subprocess.run([sys.executable, "-m", "pipeline", "verify", "--output", str(tmp_path / "o"),
                          "--table-format", "orc"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2, out


def test_retention_is_a_duration(tmp_path):
    assert Settings().retention == "7d" and Settings().force is False
    with pytest.raises(UsageError, match="retention must be a duration"):
        Settings.build(retention="a week")


def test_settings_are_typed_fields_not_a_lookup():
    hints = typing.get_type_hints(Settings)
    assert hints["flush_rows"] is int and hints["branch"] == str | None
    assert not hasattr(Settings, "__getattr__")
    with pytest.raises(AttributeError):
        _ = Settings().nonsense


def test_environment_variables_sit_under_the_file_and_flags(tmp_path):
    environ = {"TRIGGER_PREVIEW_BRANCH": "from-preview", "VERCEL_GIT_COMMIT_REF": "from-vercel",
               "TRIGGER_API_URL": "https://env.example"}
    assert load_settings(None, {}, {}, environ=environ).branch == "from-preview"
    assert load_settings(None, {}, {}, environ={"VERCEL_GIT_COMMIT_REF": "v"}).branch == "v"
    assert load_settings(None, {}, {}, environ={"TRIGGER_DEV_BRANCH": "d"}).branch == "d"
    assert load_settings(None, {}, {}, environ={}).branch is None
    config = write(tmp_path, 'branch = "from-file"\napi_url = "https://file.example"\n')
    settings = load_settings(config, {}, {}, environ=environ)
    assert (settings.branch, settings.api_url) == ("from-file", "https://file.example")
    assert load_settings(config, {"branch": "from-flag"}, {}, environ=environ).branch == "from-flag"
    assert load_settings(None, {}, {}, environ={"SSL_CERT_FILE": "/ca.pem"}).ca_bundle == "/ca.pem"


def test_build_from_keyword_options(tmp_path):
    config = write(tmp_path, 'flush_rows = 10\n[environments.prod]\noutput = "prod-out"\n')
    settings = Settings.build(config=config, environment="prod", read_timeout=5, status="closed")
    assert (settings.flush_rows, settings.output, settings.read_timeout) == (10, "prod-out", 5.0)
    assert isinstance(settings.read_timeout, float) and settings.filters == {"status": "CLOSED"}
    with pytest.raises(UsageError, match=r"unknown option 'flush_rowz' \(did you mean 'flush_rows'\?\)"):
        Settings.build(flush_rowz=1)
    with pytest.raises(UsageError, match="option flush_rows must be int"):
        Settings.build(flush_rows="many")
    with pytest.raises(UsageError, match="must be at least 1"):
        Settings.build(flush_rows=0)


def test_exit_codes_are_the_contracts():
    documented = " ".join(exit_codes_line().split())
    assert documented in " ".join(EXIT_CODES_DOC.read_text().split())
    contract = ROOT.parent / "shared" / "CONTRACT.md"
    if contract.exists():
        assert documented in " ".join(contract.read_text().split())
    assert {int(c) for c in ExitCode} - {int(c) for c in DOCUMENTED} == {130}
    assert (UsageError.exit_code, AuthError.exit_code, ApiError.exit_code, StorageError.exit_code,
            LockHeld.exit_code) == (2, 3, 4, 5, 75)


@pytest.mark.parametrize("option", [o for o in OPTIONS if o.duration], ids=lambda o: o.name)
def test_every_duration_option_refuses_what_is_not_a_duration(option):
    Settings.build(**{option.name: "90m"})
    with pytest.raises(UsageError, match=f"{option.name} must be a duration"):
        Settings.build(**{option.name: "a week"})
