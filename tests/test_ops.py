"""Operations: the summary log line, JSON logs without the key, the metrics file, and
several environments in one config file."""

from __future__ import annotations

import fcntl
import json
import re
from pathlib import Path

import pytest

from pipeline.config import environment_names, load_settings
from pipeline.errors import UsageError
from pipeline.ops.environments import worst_exit
from pipeline.ops.metrics import (
    RunOutcome,
    after_failure,
    after_success,
    parse,
    render,
    series_labels,
)
from pipeline.store.state import Counters
from tests.conftest import ROOT, run_cli

SECRET = "tr_prod_" + "SecretForTest123456"  # split: not a real key
SUMMARY_FIELDS = {"run_id", "window_from", "window_to", "sessions", "files", "requests",
                  "retries", "rate_limited", "seconds"}


def metrics(path: Path) -> dict[tuple[str, str], float]:
    samples = {}
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            assert re.match(r"^# (HELP|TYPE) sessions_export_\w+ .+$", line), line
            continue
        match = re.match(r'^sessions_export_(\w+)\{environment="([^"]*)"\} (\S+)$', line)
        assert match, f"not a Prometheus sample: {line!r}"
        samples[(match.group(1), match.group(2))] = float(match.group(3))
    return samples


@pytest.mark.slow
def test_json_logs_parse_end_in_a_summary_and_never_hold_the_key(emulator, tmp_path):
    emu = emulator(sessions=400, seed=51, api_keys=(SECRET,), list_trigger_config="include")
    output = tmp_path / "out"
    result = run_cli("run", "--output", str(output), "--log-format", "json", "--log-level",
                     "debug", url=emu.url, key=SECRET)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stderr.splitlines()]  # every line is JSON
    assert lines and all({"ts", "level", "message"} <= set(line) for line in lines)
    summary = lines[-1]
    assert summary["event"] == "run_summary" and set(summary) >= SUMMARY_FIELDS
    assert summary["sessions"] == 400 and summary["requests"] >= 4
    assert summary["window_from"] is None and summary["window_to"].endswith("Z")
    assert summary["run_id"] in result.stdout
    assert SECRET not in result.stdout + result.stderr
    for path in tmp_path.rglob("*"):  # nor in the checkpoint, manifests or data
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path

    rejected = run_cli("run", "--output", str(output), "--log-format", "json", url=emu.url,
                       key="tr_prod_" + "WrongKeyForTest98765")
    assert rejected.returncode == 3
    assert "tr_prod_" + "WrongKeyForTest98765" not in rejected.stderr + rejected.stdout


def test_metrics_file_after_success_failure_and_a_busy_lock(emulator, tmp_path):
    emu = emulator(sessions=300, seed=52, api_keys=(SECRET,), list_trigger_config="include")
    output, prom = tmp_path / "out", tmp_path / "textfile" / "sessions_export.prom"
    prom.parent.mkdir()
    ok = run_cli("run", "--output", str(output), "--metrics-file", str(prom), url=emu.url,
                 key=SECRET)
    assert ok.returncode == 0, ok.stderr
    first = metrics(prom)
    env = "default"
    assert first[("last_exit_code", env)] == 0
    assert first[("last_run_sessions", env)] == 300
    assert first[("last_run_requests", env)] >= 3
    assert first[("last_run_retries", env)] == 0 and first[("last_run_rate_limited", env)] == 0
    assert first[("last_run_files", env)] >= 1
    assert first[("last_run_duration_seconds", env)] > 0
    assert first[("runs_total", env)] == 1 and first[("failures_total", env)] == 0
    assert first[("last_success_timestamp_seconds", env)] > 1.7e9
    assert not [p for p in prom.parent.iterdir() if p != prom]  # written aside, renamed

    bad = run_cli("run", "--output", str(output), "--metrics-file", str(prom), url=emu.url,
                  key="tr_prod_" + "NotTheRightKey000")
    assert bad.returncode == 3
    second = metrics(prom)
    assert second[("last_exit_code", env)] == 3 and second[("failures_total", env)] == 1
    assert second[("last_success_timestamp_seconds", env)] == \
        first[("last_success_timestamp_seconds", env)]  # the last good run is remembered
    assert second[("last_failure_timestamp_seconds", env)] >= \
        first[("last_success_timestamp_seconds", env)]

    lock = output / "_state" / "lock"
    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        busy = run_cli("run", "--output", str(output), "--metrics-file", str(prom), url=emu.url,
                       key=SECRET)
    assert busy.returncode == 75
    third = metrics(prom)
    assert third[("last_exit_code", env)] == 75 and third[("lock_held_total", env)] == 1
    assert third[("failures_total", env)] == 1  # a busy lock is not a failure to alert on


def test_metrics_keep_other_environments_and_round_trip():
    counts = Counters(rows=5, requests=3, retries=1, rate_limited=4)
    outcome = RunOutcome(counts, files=2, seconds=1.5)
    samples = after_success({}, series_labels("prod"), outcome, 1_800_000_000.0)
    samples = after_failure(samples, series_labels("dev"), 4, 1_800_000_100.0)
    text = render(samples)
    assert parse(text) == samples
    assert 'sessions_export_last_run_rate_limited{environment="prod"} 4' in text
    assert 'sessions_export_failures_total{environment="dev"} 1' in text
    assert text.count("# TYPE sessions_export_failures_total counter") == 1


def write_config(tmp_path: Path, dev_url: str, prod_url: str) -> Path:
    config = tmp_path / "envs.toml"
    config.write_text(f"""
flush_rows = 5000
metrics_file = "{tmp_path / 'metrics.prom'}"

[environments.dev]
secret_key_env = "TRIGGER_DEV_KEY"
api_url = "{dev_url}"
output = "{tmp_path / 'dev'}"

[environments.prod]
secret_key_env = "TRIGGER_PROD_KEY"
api_url = "{prod_url}"
output = "{tmp_path / 'prod'}"
state = "{tmp_path / 'prod-state'}"
flush_rows = 100

[environments.prod.filters]
type = "chat.agent"
""")
    return config


@pytest.mark.slow
def test_environments_run_one_or_all_with_their_own_keys(emulator, tmp_path):
    dev_key, prod_key = "tr_dev_DevKeyForTest0001", SECRET
    dev = emulator(sessions=120, seed=53, api_keys=(dev_key,), list_trigger_config="include")
    prod = emulator(sessions=150, seed=54, api_keys=(prod_key,), list_trigger_config="include")
    config = write_config(tmp_path, dev.url, prod.url)
    keys = {"TRIGGER_DEV_KEY": dev_key, "TRIGGER_PROD_KEY": prod_key}

    one = run_cli("run", "--config", str(config), "--environment", "prod", key=None,
                  env_extra=keys)
    assert one.returncode == 0, one.stderr
    assert (tmp_path / "prod" / "sessions").is_dir() and not (tmp_path / "dev").exists()
    assert (tmp_path / "prod-state" / "checkpoint.json").exists()
    assert "chat.agent" in json.loads(
        next((tmp_path / "prod" / "_runs").glob("*.json")).read_text())["filters"]["type"]

    both = run_cli("run", "--config", str(config), "--all-environments", "--log-format", "json",
                   key=None, env_extra=keys)
    assert both.returncode == 0, both.stderr
    summaries = [json.loads(line) for line in both.stderr.splitlines()
                 if '"run_summary"' in line]
    # side by side now: in the order they finished
    assert sorted(s["environment"] for s in summaries) == ["dev", "prod"]
    assert {s["environment"]: s for s in summaries}["dev"]["sessions"] == 120
    assert dev_key not in both.stderr + both.stdout and prod_key not in both.stderr + both.stdout
    prom = metrics(tmp_path / "metrics.prom")
    assert prom[("runs_total", "dev")] == 1 and prom[("runs_total", "prod")] == 2

    # one environment failing does not stop the next; the worst code wins
    partial = run_cli("run", "--config", str(config), "--all-environments",
                      key=None, env_extra={"TRIGGER_PROD_KEY": prod_key})
    assert partial.returncode == 3
    assert "[dev] TRIGGER_DEV_KEY is not set" in partial.stderr
    assert metrics(tmp_path / "metrics.prom")[("runs_total", "prod")] == 3

    unknown = run_cli("run", "--config", str(config), "--environment", "prd", key=None,
                      env_extra=keys)
    assert unknown.returncode == 2 and "did you mean 'prod'" in unknown.stderr
    state = run_cli("state", "show", "--json", "--config", str(config), "--environment", "prod", key=None)
    assert state.returncode == 0 and json.loads(state.stdout)["last_run_id"]


def test_environment_tables_layer_over_the_file_and_under_flags(tmp_path):
    config = write_config(tmp_path, "http://127.0.0.1:1", "http://127.0.0.1:2")
    prod = load_settings(str(config), {"flush_rows": None}, {}, "prod")
    assert (prod.flush_rows, prod.secret_key_env, prod.environment) == (100, "TRIGGER_PROD_KEY",
                                                                       "prod")
    assert prod.filters == {"type": "chat.agent"}
    dev = load_settings(str(config), {"flush_rows": 7}, {}, "dev")
    assert dev.flush_rows == 7 and dev.filters == {} and dev.api_url == "http://127.0.0.1:1"
    plain = load_settings(str(config), {}, {})
    assert plain.secret_key_env == "TRIGGER_SECRET_KEY" and plain.output == "output/"

    bad = tmp_path / "bad.toml"
    bad.write_text('output = "x"\n\n[environments.prod]\nflush_rowz = 1\n')
    with pytest.raises(UsageError, match=r"bad.toml:4: unknown key 'flush_rowz'"):
        load_settings(str(bad), {}, {}, "prod")


def test_secret_key_env_refuses_a_key_without_echoing_it(tmp_path):
    config = tmp_path / "c.toml"
    config.write_text(f'secret_key_env = "{SECRET}"\n')
    with pytest.raises(UsageError) as error:
        load_settings(str(config), {}, {})
    assert SECRET not in str(error.value) and "never the key itself" in str(error.value)


def test_worst_exit_code_ranks_what_needs_a_person_highest():
    assert worst_exit([0, 0]) == 0
    assert worst_exit([0, 75]) == 75
    assert worst_exit([75, 4, 0]) == 4
    assert worst_exit([5, 3]) == 3
    assert worst_exit([3, 1, 2]) == 1


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "configs").glob("*.toml")))
def test_example_configs_load(name):
    path = str(ROOT / "configs" / name)
    load_settings(path, {}, {})
    if "[environments." in (ROOT / "configs" / name).read_text():
        for environment in environment_names(path):
            assert load_settings(path, {}, {}, environment).secret_key_env != "TRIGGER_SECRET_KEY"
