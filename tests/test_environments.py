"""Several environments at once, end to end: the real CLI runs each environment of a config
file in its own process against the real emulator over HTTP."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from tests.conftest import (
    KEY,
    ROOT,
    assert_dataset_equals,
    data_files,
    emulator_sessions,
    emulator_stats,
    read_dataset,
    run_cli,
)

KEYS = {
    "TRIGGER_ALPHA_KEY": "tr_dev_" + "AlphaKeyForTest0001",
    "TRIGGER_BETA_KEY": "tr_stg_" + "BetaKeyForTest0002",
    "TRIGGER_GAMMA_KEY": "tr_prod_" + "GammaKeyForTest0003",
    "TRIGGER_BAD_KEY": "tr_dev_" + "NotAcceptedKey0004",
}


def write_config(tmp_path: Path, url: str, tables: dict[str, dict[str, str]]) -> Path:
    lines = [f'api_url = "{url}"', "flush_rows = 40", ""]
    for name, values in tables.items():
        lines.append(f"[environments.{name}]")
        lines += [f'{key} = "{value}"' for key, value in values.items()]
    config = tmp_path / "environments.toml"
    config.write_text("\n".join(lines) + "\n")
    return config


def table_rows(stdout: str) -> dict[str, list[str]]:
    """The closing summary table, by environment (its header row first)."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["environment"])
    assert lines[start].split() == ["environment", "sessions", "requests", "seconds", "exit"]
    return {line.split()[0]: line.split()[1:] for line in lines[start + 1 :]}


def records(stderr: str, event: str) -> list[dict]:
    return [json.loads(line) for line in stderr.splitlines() if f'"{event}"' in line]


def test_environments_side_by_side_each_exact_one_rejected(emulator, tmp_path):
    good = (KEYS["TRIGGER_ALPHA_KEY"], KEYS["TRIGGER_BETA_KEY"])
    emu = emulator(sessions=400, seed=71, api_keys=good, list_trigger_config="include")
    config = write_config(tmp_path, emu.url, {
        "alpha": {"secret_key_env": "TRIGGER_ALPHA_KEY", "output": str(tmp_path / "alpha"),
                  "state": str(tmp_path / "alpha-state")},
        "beta": {"secret_key_env": "TRIGGER_BETA_KEY", "output": str(tmp_path / "beta")},
        "bad": {"secret_key_env": "TRIGGER_BAD_KEY", "output": str(tmp_path / "bad")},
    })
    result = run_cli("run", "--config", str(config), "--all-environments", "--parallel", "3",
                     "--log-format", "json", key=None, env_extra=KEYS)
    assert result.returncode == 3, result.stderr  # the worst: key rejected beats done
    truth = emulator_sessions(emu.url)
    for name in ("alpha", "beta"):
        assert_dataset_equals(tmp_path / name, truth)
    assert not (tmp_path / "bad" / "sessions").exists()
    # each environment's checkpoint and lock in its own state location
    assert (tmp_path / "alpha-state" / "checkpoint.json").exists()
    assert (tmp_path / "alpha-state" / "lock").exists()
    assert (tmp_path / "beta" / "_state" / "checkpoint.json").exists()
    assert not (tmp_path / "alpha" / "_state").exists()

    rows = table_rows(result.stdout)
    assert list(rows) == ["alpha", "beta", "bad"]  # the file's order, whatever ended first
    summaries = {r["environment"]: r for r in records(result.stderr, "run_summary")}
    assert set(summaries) == {"alpha", "beta"}
    stats = emulator_stats(emu.url)
    for name in ("alpha", "beta"):
        sessions, requests, _seconds, code = rows[name]
        assert int(sessions.replace(",", "")) == read_dataset(tmp_path / name).num_rows == 400
        assert int(requests.replace(",", "")) == summaries[name]["requests"]
        assert code == "0"
    assert rows["bad"][0] == rows["bad"][1] == "—" and rows["bad"][3] == "3"
    accepted = stats["requests"] - stats["by_status"].get("401", 0)
    assert accepted == sum(summaries[n]["requests"] for n in ("alpha", "beta"))

    per_environment = records(result.stderr, "environment_summary")
    assert [(r["environment"], r["sessions"], r["exit"]) for r in per_environment] == [
        ("alpha", 400, 0), ("beta", 400, 0), ("bad", None, 3)]
    assert all(r["requests"] == summaries[r["environment"]]["requests"]
               for r in per_environment[:2])
    # every line a child logged carries its environment; the rejection is one tagged line
    logged = [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]
    assert {r["environment"] for r in logged} == {"alpha", "beta", "bad"}
    (rejected,) = [line for line in result.stderr.splitlines() if "error" in line
                   and not line.startswith("{")]
    assert rejected.startswith("sessions-export: error: [bad] ")
    assert not any(key in result.stdout + result.stderr for key in KEYS.values())
    assert "\r" not in result.stderr and "\x1b[" not in result.stderr  # no bars off a terminal


@pytest.mark.slow
def test_a_held_lock_stops_only_its_own_environment(emulator, tmp_path):
    keys = (KEYS["TRIGGER_ALPHA_KEY"], KEYS["TRIGGER_BETA_KEY"])
    emu = emulator(sessions=150, seed=72, api_keys=keys)
    config = write_config(tmp_path, emu.url, {
        "alpha": {"secret_key_env": "TRIGGER_ALPHA_KEY", "output": str(tmp_path / "alpha")},
        "beta": {"secret_key_env": "TRIGGER_BETA_KEY", "output": str(tmp_path / "beta")},
    })
    lock = tmp_path / "alpha" / "_state" / "lock"
    lock.parent.mkdir(parents=True)
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another alpha run, still alive
        result = run_cli("run", "--config", str(config), "--all-environments",
                         "--log-format", "text", key=None, env_extra=KEYS)
    assert result.returncode == 75, result.stderr
    rows = table_rows(result.stdout)
    assert (rows["alpha"][3], rows["beta"][3]) == ("75", "0")
    assert not data_files(tmp_path / "alpha") and read_dataset(tmp_path / "beta").num_rows == 150
    # text log lines are tagged with their environment
    assert any("[beta] run " in line and "INFO" in line for line in result.stderr.splitlines())
    assert any(line.startswith("[beta] run ") for line in result.stdout.splitlines())

    # the other commands take --all-environments too: one child each, the worst code
    verify = run_cli("verify", "--config", str(config), "--all-environments", "--strict",
                     key=None)
    assert verify.returncode == 0, verify.stderr
    assert list(table_rows(verify.stdout)) == ["alpha", "beta"]
    compact = run_cli("compact", "--config", str(config), "--all-environments", "--parallel",
                      "1", key=None)
    assert compact.returncode == 0, compact.stderr
    assert [row[3] for row in table_rows(compact.stdout).values()] == ["0", "0"]

    backfill = run_cli("backfill", "--config", str(config), "--all-environments", "--since",
                       "40d", "--concurrency", "2", key=None, env_extra=KEYS)
    assert backfill.returncode == 0, backfill.stderr
    # alpha (locked out of the run above) gets all 150; beta holds them already: backfill
    # skips the versions a dataset holds, as run does
    assert [row[0] for row in table_rows(backfill.stdout).values()] == ["150", "0"]

    # loads into one warehouse file take turns (DuckDB lets one process write a file)
    again = run_cli("run", "--config", str(config), "--all-environments", key=None,
                    env_extra=KEYS)
    assert again.returncode == 0, again.stderr
    database = tmp_path / "warehouse.duckdb"
    loaded = run_cli("load", "duckdb", "--config", str(config), "--all-environments",
                     "--database", str(database), key=None)
    assert loaded.returncode == 0, loaded.stderr
    assert [row[3] for row in table_rows(loaded.stdout).values()] == ["0", "0"]
    import duckdb

    with duckdb.connect(str(database), read_only=True) as connection:
        assert connection.execute("select count(*) from sessions").fetchall() == [(150,)]


def test_two_environments_in_one_place_are_refused_before_anything_runs(emulator, tmp_path):
    emu = emulator(sessions=20)
    shared_output = write_config(tmp_path, emu.url, {  # two spellings of one directory
        "one": {"output": str(tmp_path / "out")},
        "two": {"output": f"file://{tmp_path}/x/../out/"},
    })
    refused = run_cli("run", "--config", str(shared_output), "--all-environments")
    assert refused.returncode == 2, refused.stderr
    assert "environments one and two have the same output" in refused.stderr
    assert not (tmp_path / "out").exists()

    # state defaults to <output>/_state: the same place as another's explicit state
    shared_state = write_config(tmp_path, emu.url, {
        "one": {"output": str(tmp_path / "a")},
        "two": {"output": str(tmp_path / "b"), "state": str(tmp_path / "a" / "_state")},
    })
    refused = run_cli("backfill", "--config", str(shared_state), "--all-environments",
                      "--since", "30d")
    assert refused.returncode == 2, refused.stderr
    assert "the same state" in refused.stderr
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    assert emulator_stats(emu.url)["requests"] == 0


def test_on_a_terminal_one_status_line_per_environment(emulator, tmp_path):
    emu = emulator(sessions=60, seed=73)
    config = write_config(tmp_path, emu.url, {
        "alpha": {"output": str(tmp_path / "alpha")},
        "beta": {"output": str(tmp_path / "beta")},
    })
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 120, 0, 0))
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIGGER_")}
    process = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", "--config", str(config), "--all-environments"],
        env={**env, "TRIGGER_SECRET_KEY": KEY}, stdout=subprocess.PIPE, stderr=secondary,
        text=True, cwd=ROOT)
    os.close(secondary)
    shown = b""
    while True:
        try:
            chunk = os.read(primary, 65536)
        except OSError:  # the terminal closed: every writer is gone
            break
        if not chunk:
            break
        shown += chunk
    stdout, _ = process.communicate(timeout=120)
    os.close(primary)
    assert process.returncode == 0, shown
    screen = shown.decode()
    # a status line per environment, redrawn in place; log lines whole, each tagged
    assert "[alpha] waiting" in screen or "[alpha] running" in screen
    assert "[beta]" in screen and "exit 0 after" in screen
    logged = [line for line in screen.replace("\r", "\n").splitlines() if " INFO " in line]
    assert any("[alpha] starting run" in line for line in logged)
    assert any("[beta] starting run" in line for line in logged)
    assert list(table_rows(stdout)) == ["alpha", "beta"]
