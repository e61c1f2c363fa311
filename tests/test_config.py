import pytest

from pipeline.config import load_settings, parse_duration_ms, parse_time_ms
from pipeline.errors import UsageError

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
