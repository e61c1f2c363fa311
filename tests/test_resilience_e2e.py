"""Faults, rate limits, crashes and bad input: the real CLI against a misbehaving emulator."""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.api.client import TriggerClient
from pipeline.config import Settings
from pipeline.errors import ApiError, QueryRejected
from pipeline.runner import client_settings
from tests.conftest import (
    KEY,
    ROOT,
    api,
    assert_dataset_equals,
    emulator_sessions,
    emulator_stats,
    read_dataset,
    run_cli,
    spawn_cli,
)

FAST_RETRY = ("--backoff-initial", "0.01", "--backoff-max", "0.05")


def checkpoint_of(output: Path) -> dict | None:
    path = output / "_state" / "checkpoint.json"
    return json.loads(path.read_text()) if path.exists() else None


def test_faults_are_retried_and_the_data_is_exact(emulator, output):
    emu = emulator(sessions=3000, seed=31, fault_seed=5, fault_5xx=0.08, fault_reset=0.04,
                   fault_truncate=0.03, list_trigger_config="include")
    result = run_cli("run", "--output", str(output), "--flush-rows", "500", *FAST_RETRY,
                     "--max-attempts", "8", url=emu.url)
    assert result.returncode == 0, result.stderr
    stats = emulator_stats(emu.url)
    assert sum(stats["faults"].values()) > 0, stats
    manifest = json.loads(next((output / "_runs").glob("*.json")).read_text())
    assert manifest["retries"] > 0
    assert manifest["pages"] < manifest["requests"]
    assert_dataset_equals(output, emulator_sessions(emu.url))
    assert read_dataset(output).num_rows == 3000


@pytest.mark.slow
def test_stalled_responses_time_out_and_are_retried(emulator, output):
    emu = emulator(sessions=400, fault_seed=2, fault_stall=0.2, stall_seconds=5)
    result = run_cli("run", "--output", str(output), "--read-timeout", "0.5", *FAST_RETRY,
                     "--max-attempts", "10", url=emu.url)
    assert result.returncode == 0, result.stderr
    assert_dataset_equals(output, emulator_sessions(emu.url))


@pytest.mark.slow
def test_rate_limit_is_paced_with_few_429s(emulator, output):
    # 20-token bucket refilled 10 every 0.2 s (50 requests/s): 120 pages must wait for refills
    emu = emulator(sessions=12_000, rate_limit=True, rate_limit_burst=20, rate_limit_refill=10,
                   rate_limit_interval=0.2, list_trigger_config="include")
    started = time.monotonic()
    result = run_cli("run", "--output", str(output), url=emu.url)
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr
    stats = emulator_stats(emu.url)
    assert stats["rate_limited"] < 0.05 * stats["requests"], stats
    assert_dataset_equals(output, emulator_sessions(emu.url))
    assert elapsed > (120 - 20) / 50 * 0.8  # it really was throttled by the bucket


def test_429_from_a_bucket_shared_with_another_consumer_is_waited_out(emulator):
    emu = emulator(sessions=500, rate_limit=True, rate_limit_burst=3, rate_limit_refill=3,
                   rate_limit_interval=0.3)
    settings = client_settings(Settings(api_url=emu.url))
    with TriggerClient(settings, KEY) as ours, TriggerClient(settings, KEY) as other:
        for _ in range(4):
            ours.list_sessions({"page[size]": "100"})
            other.list_sessions({"page[size]": "100"})  # spends tokens ours cannot see
        assert ours.stats.rate_limited + other.stats.rate_limited > 0
        assert ours.stats.retries == other.stats.retries == 0  # 429 waits are not faults


@pytest.mark.slow
def test_retry_budget_exhausted_exits_4_and_the_next_run_resumes(emulator, output):
    emu = emulator(sessions=3000, seed=41, fault_seed=2, fault_5xx=0.3,
                   list_trigger_config="include")
    first = run_cli("run", "--output", str(output), "--flush-rows", "100", *FAST_RETRY,
                    "--max-attempts", "2", url=emu.url)
    assert first.returncode == 4, first.stderr
    assert "still failing" in first.stderr and "Traceback" not in first.stderr
    progress = checkpoint_of(output)["in_progress"]
    assert progress["flush_seq"] >= 1 and progress["walk"]
    second = run_cli("run", "--output", str(output), "--flush-rows", "100", *FAST_RETRY,
                     "--max-attempts", "30", url=emu.url)
    assert second.returncode == 0, second.stderr
    assert progress["run_id"] in second.stdout and "resumed" in second.stdout
    assert_dataset_equals(output, emulator_sessions(emu.url))
    assert read_dataset(output).num_rows == 3000


def test_x_should_retry_false_is_honoured(emulator):
    emu = emulator(sessions=50, fault_seed=1, fault_5xx=1.0, fault_header_should_retry=True)
    settings = client_settings(Settings(api_url=emu.url, max_attempts=50, backoff_initial=0.001))
    with TriggerClient(settings, KEY) as client, pytest.raises(ApiError):
        client.list_sessions({"page[size]": "100"})
    assert client.stats.requests < 50  # gave up on the first `x-should-retry: false`


def test_bad_request_fails_at_once_with_the_server_detail(emulator):
    emu = emulator(sessions=10)
    with TriggerClient(client_settings(Settings(api_url=emu.url)), KEY) as client:
        with pytest.raises(QueryRejected, match=r"page\.size"):
            client.list_sessions({"page[size]": "500"})
        assert client.stats.requests == 1


@pytest.mark.slow
def test_kill_9_five_times_then_a_clean_run_is_exact(emulator, output):
    emu = emulator(sessions=6000, seed=51, latency_ms=8, list_trigger_config="include")
    chance = random.Random(2026)
    for _ in range(5):
        process = spawn_cli("run", "--output", str(output), "--flush-rows", "300", url=emu.url)
        time.sleep(chance.uniform(0.4, 1.6))
        process.send_signal(signal.SIGKILL)
        process.wait()
    final = run_cli("run", "--output", str(output), "--flush-rows", "300", url=emu.url)
    assert final.returncode == 0, final.stderr
    assert_dataset_equals(output, emulator_sessions(emu.url))
    visible = [p for p in (output / "sessions").rglob("*") if p.is_file()]
    assert all(p.suffix == ".parquet" and not p.name.startswith((".", "_")) or
               p.name.startswith(".") for p in visible)
    assert run_cli("verify", "--output", str(output)).returncode == 0
    assert checkpoint_of(output)["in_progress"] is None


def _without_root_override() -> list[str]:
    """Root ignores file permissions; drop that capability so EACCES is real."""
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root without setpriv: cannot meet a permission error")
    caps = "-dac_override,-dac_read_search"
    return ["setpriv", f"--bounding-set={caps}", f"--inh-caps={caps}"]


def test_permission_denied_on_output_exits_5_and_keeps_the_checkpoint(emulator, tmp_path):
    emu = emulator(sessions=300)
    output = tmp_path / "read-only-output"
    output.mkdir()
    os.chmod(output, 0o555)
    state = tmp_path / "state"
    env = {**os.environ, "TRIGGER_SECRET_KEY": KEY, "TRIGGER_API_URL": emu.url}
    result = subprocess.run(
        [*_without_root_override(), sys.executable, "-m", "pipeline", "run", "--output",
         str(output), "--state", str(state)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 5, result.stderr
    assert "Permission denied" in result.stderr and "Traceback" not in result.stderr
    assert not (state / "checkpoint.json").exists()
    assert list(output.iterdir()) == []


def _file_size_limit():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, 20_000))


@pytest.mark.slow
def test_disk_error_mid_run_exits_5_without_advancing_the_checkpoint(emulator, output):
    emu = emulator(sessions=3000, seed=61, list_trigger_config="include")
    first = run_cli("run", "--output", str(output), "--flush-rows", "500", url=emu.url)
    assert first.returncode == 0
    before = checkpoint_of(output)
    for n in range(10):  # new sessions, incompressible enough to pass the file size limit
        api(emu.url, "POST", "", {"type": "chat.agent", "taskIdentifier": "t",
                                  "metadata": {"pad": os.urandom(12_000).hex(), "n": n}})
    env = {**os.environ, "TRIGGER_SECRET_KEY": KEY, "TRIGGER_API_URL": emu.url}
    result = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "--output", str(output)], env=env, cwd=ROOT,
        capture_output=True, text=True, preexec_fn=_file_size_limit, timeout=120,
    )
    assert result.returncode == 5, result.stderr
    assert "File too large" in result.stderr and "Traceback" not in result.stderr
    assert checkpoint_of(output) == before
    assert run_cli("run", "--output", str(output), url=emu.url).returncode == 0
    assert_dataset_equals(output, emulator_sessions(emu.url))


@pytest.fixture
def tiny_disk(tmp_path):
    mount = tmp_path / "tiny"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=128k", "tmpfs", str(mount)],
                          capture_output=True)
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here to fill a disk")
    yield mount
    subprocess.run(["umount", str(mount)], check=False)


def test_full_disk_exits_5_and_changes_nothing(emulator, tiny_disk, tmp_path):
    emu = emulator(sessions=4000, list_trigger_config="include")
    state = tmp_path / "state"
    result = run_cli("run", "--output", str(tiny_disk), "--state", str(state), url=emu.url)
    assert result.returncode == 5, result.stderr
    assert "No space left on device" in result.stderr
    assert not (state / "checkpoint.json").exists()
    leftovers = [p for p in tiny_disk.rglob("*") if p.is_file()]
    assert all(p.name.startswith(".") is False for p in leftovers)  # temp files cleaned up


def test_unreachable_api_exits_4_quickly_without_traceback(output):
    result = run_cli("run", "--output", str(output), "--api-url", "http://127.0.0.1:9",
                     *FAST_RETRY, "--max-attempts", "2")
    assert result.returncode == 4
    assert "ConnectError" in result.stderr and "Traceback" not in result.stderr
    assert checkpoint_of(output) is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--api-url", "not a url"), "not an http(s) URL"),
        (("--api-url", "http://api.example.com"), "refusing plain http"),
        (("--status", "OPEN"), "ACTIVE, CLOSED, EXPIRED"),
        (("--flush-rows", "0"), "flush_rows must be at least 1"),
        (("--lookback", "a while"), "lookback must be a duration"),
        (("--log-level", "loud"), "log_level"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(output, args, message):
    result = run_cli("run", "--output", str(output), *args, url="http://127.0.0.1:9")
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not output.exists()


def test_broken_config_file_names_file_line_and_key(tmp_path, output):
    config = tmp_path / "export.toml"
    config.write_text('output = "x"\nread_timeout = "soon"\n')
    result = run_cli("run", "--config", str(config), "--output", str(output))
    assert result.returncode == 2
    assert f"{config}:2: 'read_timeout' must be float" in result.stderr
    config.write_text("output = [\n")
    result = run_cli("run", "--config", str(config))
    assert result.returncode == 2 and "not valid TOML" in result.stderr
    missing = run_cli("run", "--config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr


@pytest.mark.slow
def test_key_never_appears_in_output_logs_or_files(emulator, output):
    secret = "tr_prod_" + "SuperSecretValue0123456789"  # split: not a real key
    emu = emulator(sessions=800, fault_seed=9, fault_5xx=0.1, fault_reset=0.05)
    result = run_cli("run", "--output", str(output), "--log-level", "debug", *FAST_RETRY,
                     "--max-attempts", "10", url=emu.url, key=secret)
    assert result.returncode == 0, result.stderr
    assert "retry" in result.stderr  # debug logs were really produced
    assert secret not in result.stdout + result.stderr
    rejected = emulator(sessions=5, api_keys=("tr_dev_other",))
    denied = run_cli("run", "--output", str(output / "x"), "--log-level", "debug",
                     url=rejected.url, key=secret)
    assert denied.returncode == 3
    assert secret not in denied.stdout + denied.stderr
    for path in output.rglob("*"):
        if path.is_file():
            assert secret.encode() not in path.read_bytes(), path
