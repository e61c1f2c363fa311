"""The Delta layer on object storage: S3 (moto's server, conditional puts) and GCS
(fake-gcs-server), flushes, a cut flush recovered, verify and compact."""

from __future__ import annotations

import subprocess

import pytest
from deltalake import DeltaTable

from pipeline.dataset.delta import (
    LATEST_DIR,
    VERSIONS_DIR,
    DeltaOutput,
    compact_delta,
    recover,
    scan_delta_sessions,
    verify_delta,
)
from pipeline.dataset.delta.commit import apply_versions
from pipeline.dataset.delta.tables import to_delta_rows
from pipeline.dataset.flatten import flatten_sessions
from pipeline.errors import StorageError
from tests.conftest import gcs_cli
from tests.delta_worker import batch, extracted, run, truth

APP = "sessions-export"


def _flow(output: str) -> None:
    """Flushes, a flush cut between its two commits, recovery, resume, verify, compact."""
    run(output, APP, seed=21, batches=4)
    out = DeltaOutput.at(output)
    rows = to_delta_rows(flatten_sessions(batch(21, 4), extracted(4), "run-21"))
    apply_versions(out, rows, APP, 5, {"next_batch": 5})
    assert recover(out, APP).remerged == (5,)
    run(output, APP, seed=21, batches=7)
    latest, versions = truth(21, 7)
    report = verify_delta(out)
    assert report.ok, report.lines()
    assert (report.sessions, report.versions) == (len(latest), len(versions))
    assert {r.table for r in compact_delta(out)} == {LATEST_DIR, VERSIONS_DIR}
    assert verify_delta(out).ok
    frame = scan_delta_sessions(output).collect()
    assert sorted(frame["id"].to_list()) == sorted(latest)
    table = DeltaTable(out.table_uri(VERSIONS_DIR), storage_options=out.options)
    assert table.transaction_version(APP) == 7


@pytest.mark.slow
def test_delta_on_s3_with_conditional_puts(s3) -> None:
    bucket = s3.new_bucket()
    _flow(f"s3://{bucket}/exports/delta")
    keys = s3.client().list_objects_v2(Bucket=bucket, Prefix="exports/delta/sessions/_delta_log/")
    assert any(k["Key"].endswith(".checkpoint.parquet") for k in keys["Contents"])


def test_delta_on_gcs(gcs, monkeypatch: pytest.MonkeyPatch) -> None:
    """delta-rs (object_store 0.13) speaks GCS's XML API. fake-gcs-server (1.54 bundled, and
    its main branch) serves the XML list, GET, HEAD and DELETE (on `-public-host`) but no XML
    PUT: `PUT /{bucket}/{object}` lands in its JSON `insertObject`, which answers 400
    "invalid uploadType" without an `uploadType` query, so nothing can be written (upstream
    issue 331, open). Reads are checked; the flow runs in full once the emulator takes the PUT."""
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", gcs.endpoint)
    bucket = gcs.new_bucket()
    output = f"gs://{bucket}/exports/delta"
    assert not DeltaOutput.at(output).exists(LATEST_DIR)  # the XML list and GET answer
    try:
        _flow(output)
    except (OSError, StorageError) as error:
        message = " ".join(str(error).split())
        # the PUT itself reached the emulator (no token was asked of a metadata server) and got 400
        if "Error performing PUT" not in message or "400 Bad Request" not in message:
            raise
        pytest.xfail(f"fake-gcs-server has no XML-API PUT object: {message[:300]}")


def test_the_read_commands_on_gcs(gcs) -> None:
    """The CLI's Delta reads go through delta-rs to the emulator (STORAGE_EMULATOR_HOST alone)."""
    output = f"gs://{gcs.new_bucket()}/exports/delta"

    def on_gcs(*args: str) -> subprocess.CompletedProcess[str]:
        return gcs_cli(*args, "--output", output, "--table-format", "delta", url=None, gcs=gcs)

    verified = on_gcs("verify")
    assert verified.returncode == 6, verified.stderr
    assert f"problem: {output}/{LATEST_DIR} is not a Delta table" in verified.stdout
    shown = on_gcs("state", "show")
    assert shown.returncode == 0, shown.stderr
    assert f"  delta {LATEST_DIR}: no Delta table yet" in shown.stdout.splitlines()
    compacted = on_gcs("compact", "--force")
    assert compacted.stdout.strip() == f"compact: no Delta table under {output}", compacted
