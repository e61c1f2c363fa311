"""The `emulator` command as a parent process sees it: one announce line, then HTTP."""

from __future__ import annotations

import subprocess
import sys

import httpx
from click.testing import CliRunner

from pipeline.emulator.cli import emulator_command


def test_announces_the_real_port_and_serves() -> None:
    command = [sys.executable, "-m", "pipeline.emulator", "--port", "0", "--sessions", "50"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        line = process.stdout.readline().strip()
        assert line.startswith("emulator listening on http://127.0.0.1:")
        assert line.endswith("(50 sessions)")
        url = line.split()[3]
        response = httpx.get(
            url + "/api/v1/sessions",
            params={"page[size]": "100"},
            headers={"Authorization": "Bearer tr_dev_cli"},
        )
        assert response.status_code == 200
        assert len(response.json()["data"]) == 50
    finally:
        process.terminate()
        process.wait(timeout=10)
    assert process.stdout.read() == ""  # nothing but the one line


def test_refuses_a_non_loopback_host_without_allow_remote() -> None:
    result = CliRunner().invoke(emulator_command, ["--host", "0.0.0.0", "--port", "0"])
    assert result.exit_code == 2
    assert "--allow-remote" in result.output


def test_rejects_fault_probabilities_above_one_in_total() -> None:
    arguments = ["--port", "0", "--fault-5xx", "0.6", "--fault-truncate", "0.6"]
    result = CliRunner().invoke(emulator_command, arguments)
    assert result.exit_code == 2
    assert "at most 1" in result.output
