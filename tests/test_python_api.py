"""The Python API: `export()` runs the real export in-process against the emulator over
HTTP, `scan_sessions()` reads the result back with polars (latest view, every version,
partition pruning, local and S3)."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import date

import polars as pl
import pyarrow.parquet as pq
import pytest

from pipeline import ExportError, export, scan_sessions
from tests.conftest import (
    KEY,
    ROOT,
    api,
    assert_row_matches,
    data_files,
    emulator_sessions,
    keys,
    s3_cli,
)


def test_import_pipeline_stays_cheap():
    code = "import sys, pipeline; print(sorted(m for m in ('polars', 'pyarrow', 'httpx', 'click') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out


def test_the_library_loads_no_cli_and_changes_no_process_wide_state(tmp_path):
    # a real export() that fails fast (nothing listens on port 9) with click made
    # unimportable (httpx alone tries it, for its own CLI, and does without)
    code = f"""
import os, sys, pyarrow

class NoClick:
    def find_spec(self, name, path=None, target=None):
        if name == "click" or name.startswith("click."):
            raise ImportError("click is the CLI's")

sys.meta_path.insert(0, NoClick())
pool = pyarrow.default_memory_pool().backend_name
import pipeline
try:
    pipeline.export(output={str(tmp_path / "out")!r}, api_url="http://127.0.0.1:9", max_attempts=1,
                    log_level="warning")
except pipeline.ExportError as error:
    print("exit", error.exit_code)
pipeline.scan_sessions({str(tmp_path / "out")!r})
print(sorted(m for m in ("click", "pipeline.cli", "pipeline.__main__") if m in sys.modules))
print(os.environ.get("ARROW_DEFAULT_MEMORY_POOL"), pyarrow.default_memory_pool().backend_name == pool)
"""
    env = {k: v for k, v in os.environ.items() if k != "ARROW_DEFAULT_MEMORY_POOL"}
    env["TRIGGER_SECRET_KEY"] = KEY
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env)
    assert out.stdout.split("\n")[:3] == ["exit 4", "[]", "None True"], out


@pytest.mark.slow
def test_export_then_scan_sessions_after_changes(emulator, tmp_path, monkeypatch):
    emu = emulator(sessions=1200, seed=31, days=10)
    monkeypatch.setenv("TRIGGER_SECRET_KEY", KEY)
    out = tmp_path / "out"
    first = export(output=str(out), api_url=emu.url, log_level="warning")
    assert first.rows == 1200 and first.mode == "incremental"

    live = [s for s in emulator_sessions(emu.url) if not s["closedAt"]][:40]
    for session in live[:20]:
        api(emu.url, "POST", f"/{session['id']}/close", {"reason": "done"})
    for session in live[20:]:
        api(emu.url, "PATCH", f"/{session['id']}", {"metadata": {"edited": True}})
    config = tmp_path / "export.toml"
    config.write_text(f'output = "{out}"\napi_url = "{emu.url}"\n')
    second = export(config=config)  # from a config file, like `run --config`
    assert second.rows >= 40

    truth = {s["id"]: s for s in emulator_sessions(emu.url)}
    latest = scan_sessions(out).collect()
    assert latest.columns[-1] == "created_date" and latest.schema["created_date"] == pl.Date
    assert latest.height == len(truth) == latest["id"].n_unique()
    for row in latest.with_columns(pl.col("created_date").cast(pl.String)).iter_rows(named=True):
        assert_row_matches(row, truth[row["id"]])

    stored = sum(pq.read_metadata(path).num_rows for path in data_files(out))
    every = scan_sessions(str(out) + "/", latest=False).collect()
    assert every.height == stored > latest.height

    # a filter on created_date reads only those partitions: a broken file elsewhere is not read
    days = sorted(latest["created_date"].unique().to_list())
    day, other = days[-1], days[0]
    broken = out / "sessions" / f"created_date={other.isoformat()}" / "part-broken-00000.parquet"
    broken.write_bytes(b"not parquet at all")
    one_day = scan_sessions(out).filter(pl.col("created_date") == day).collect()
    assert set(one_day["id"]) == {i for i, s in truth.items() if s["createdAt"][:10] == str(day)}
    with pytest.raises(pl.exceptions.PolarsError):
        scan_sessions(out).collect()


def test_scan_sessions_of_an_empty_output_is_empty(tmp_path):
    frame = scan_sessions(tmp_path / "nothing").collect()
    assert frame.height == 0 and frame.schema["created_date"] == pl.Date


def test_export_failures_raise_one_type_carrying_the_cli_exit_code(emulator, tmp_path, monkeypatch):
    emu = emulator(sessions=10, api_keys=("tr_dev_the_only_good_key",))
    monkeypatch.setenv("TRIGGER_SECRET_KEY", "tr_dev_not_the_right_key")
    with pytest.raises(ExportError) as rejected:
        export(output=str(tmp_path / "out"), api_url=emu.url)
    assert rejected.value.exit_code == 3
    assert "tr_dev_not_the_right_key" not in str(rejected.value)
    with pytest.raises(ExportError) as unknown:
        export(output=str(tmp_path / "out"), colour="blue")
    assert unknown.value.exit_code == 2
    with pytest.raises(ExportError) as bad_value:
        export(output=str(tmp_path / "out"), flush_rows=0)
    assert bad_value.value.exit_code == 2


@pytest.mark.slow
def test_scan_sessions_reads_s3(emulator, s3):
    emu = emulator(sessions=300, seed=32, days=5)
    bucket = s3.new_bucket()
    result = s3_cli("run", "--output", f"s3://{bucket}/p", url=emu.url, aws=s3.env)
    assert result.returncode == 0, result.stderr
    day = keys(s3, bucket, "p/sessions/")[0].split("/")[2]
    for hidden in (".part-x.parquet.tmp", "_temporary.parquet", ".part-y.parquet"):
        s3.client().put_object(Bucket=bucket, Key=f"p/sessions/{day}/{hidden}", Body=b"partial")
    every = scan_sessions(f"s3://{bucket}/p", latest=False).collect()
    assert every.height == 300
    options = {"aws_access_key_id": "testing", "aws_secret_access_key": "testing",
               "aws_region": "us-east-1"}
    today = scan_sessions(f"s3://{bucket}/p", storage_options=options).filter(
        pl.col("created_date") >= date.fromisoformat(min(every["created_date"]).isoformat())
    ).collect()
    assert sorted(today["id"]) == sorted(every["id"])
