"""The orchestrator recipes in examples/, run in process against the emulator."""

from __future__ import annotations

import dagster as dg
import polars as pl
import pytest

from tests.conftest import KEY, emulator_sessions


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> str:
    for name in ("TRIGGER_API_URL", "TRIGGER_SECRET_KEY_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TRIGGER_SECRET_KEY", KEY)
    return KEY


def day_counts(sessions: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for session in sessions:
        counts[session["createdAt"][:10]] = counts.get(session["createdAt"][:10], 0) + 1
    return counts


def test_dagster_materializes_the_export_and_the_day_counts(emulator, output, key):
    from examples.dagster_assets import SessionsExport, daily_sessions, sessions

    emu = emulator(sessions=300, seed=61)
    resource = SessionsExport(output=str(output), options={"api_url": emu.url})
    result = dg.materialize([sessions, daily_sessions], resources={"sessions_export": resource})
    assert result.success
    exported = result.asset_materializations_for_node("sessions")[0].metadata
    assert exported["sessions"].value == 300
    counts = result.output_for_node("daily_sessions")
    expected = day_counts(emulator_sessions(emu.url))
    assert {str(day): n for day, n in zip(counts["created_date"], counts["sessions"], strict=True)} \
        == expected
    assert counts["sessions"].sum() == 300 and counts.schema["open"] == pl.UInt32


def test_dagster_failure_carries_the_exit_code_and_the_line(emulator, output, key):
    from examples.dagster_assets import SessionsExport, daily_sessions, sessions

    emu = emulator(sessions=10, api_keys=("tr_dev_SomeOtherKey000001",))
    resource = SessionsExport(output=str(output), options={"api_url": emu.url})
    result = dg.materialize([sessions, daily_sessions], resources={"sessions_export": resource},
                            raise_on_error=False)
    assert not result.success
    failure = result.get_step_failure_events()[0].step_failure_data
    assert failure.user_failure_data.metadata["exit_code"].value == 3
    message = failure.user_failure_data.metadata["message"].value
    assert failure.user_failure_data.description == f"sessions-export exited 3: {message}"
    assert "\n" not in message and KEY not in message
    assert not output.exists() or not list(output.rglob("*.parquet"))
