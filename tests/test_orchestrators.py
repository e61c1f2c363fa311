"""The orchestrator recipes in examples/, run in process against the emulator."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import dagster as dg
import polars as pl
import pytest

from tests.conftest import KEY, ROOT, emulator_sessions


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


# -- Airflow: the task bodies alone, then the DAG itself through `dag.test()` ---------------

AIRFLOW_RUN = """
import json
from examples.airflow_dag import dag_object
run = dag_object.test()
print(json.dumps({ti.task_id: [str(ti.state), ti.xcom_pull(task_ids=ti.task_id)]
                  for ti in run.get_task_instances()}))
"""


def test_airflow_task_bodies_export_and_count(emulator, output, key):
    from examples.airflow_dag import ExportFailed, count_by_day, export_sessions

    emu = emulator(sessions=250, seed=62)
    exported = export_sessions(str(output), api_url=emu.url)
    assert exported["output"] == str(output) and exported["sessions"] == 250
    assert count_by_day(exported["output"]) == day_counts(emulator_sessions(emu.url))

    refused = emulator(sessions=5, api_keys=("tr_dev_SomeOtherKey000001",))
    with pytest.raises(ExportFailed) as failed:
        export_sessions(str(output.parent / "refused"), api_url=refused.url)
    assert failed.value.exit_code == 3
    assert str(failed.value).startswith("sessions-export exited 3: the API rejected the key")


@pytest.mark.slow
def test_airflow_dag_runs_against_the_emulator(emulator, output, tmp_path):
    emu = emulator(sessions=200, seed=63)
    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "airflow_dag.py").symlink_to(ROOT / "examples" / "airflow_dag.py")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRIGGER_", "AIRFLOW"))}
    env.update(AIRFLOW_HOME=str(tmp_path / "airflow"), AIRFLOW__CORE__DAGS_FOLDER=str(dags),
               AIRFLOW__CORE__LOAD_EXAMPLES="False", TRIGGER_SECRET_KEY=KEY,
               TRIGGER_API_URL=emu.url, SESSIONS_OUTPUT=str(output), PYTHONPATH=str(ROOT))
    migrate = subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=env,
                             cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert migrate.returncode == 0, migrate.stderr[-2000:]
    run = subprocess.run([sys.executable, "-c", AIRFLOW_RUN], env=env, cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    tasks = json.loads(run.stdout.strip().splitlines()[-1])
    assert tasks["export"][0] == "success" and tasks["export"][1]["sessions"] == 200
    assert tasks["daily_sessions"] == ["success", day_counts(emulator_sessions(emu.url))]


def test_docs_show_the_recipes_as_they_are():
    page = (ROOT / "docs" / "orchestrators.md").read_text()
    for recipe in ("dagster_assets.py", "airflow_dag.py"):
        text = (ROOT / "examples" / recipe).read_text()
        assert f"(../examples/{recipe})" in page and f"```python\n{text}```" in page, recipe
