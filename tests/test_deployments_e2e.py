"""Real deployments, end to end with the real CLI: preview and dev branches, the key from a
file, a self-hosted server over TLS with a private CA behind a path prefix, and a real
forward proxy (proxy.py, started here on 127.0.0.1) that must never read the key."""

from __future__ import annotations

import json
import os
import socket
import ssl
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
import trustme

from tests.conftest import (
    KEY,
    ROOT,
    emulator_stats,
    free_port,
    read_dataset,
    run_cli,
    start_server,
)

PREVIEW_KEY = "tr_preview_" + "test_key_0123456789"
API_HOST = "api.trigger.test"  # not loopback: only the proxy knows where it is


# -- preview and dev branches ------------------------------------------------------------


def test_preview_key_sends_its_branch_on_every_request(emulator, tmp_path):
    emu = emulator(sessions=120)
    out, metrics = tmp_path / "out", tmp_path / "export.prom"
    result = run_cli("run", "--output", str(out), "--metrics-file", str(metrics),
                     "--log-format", "json", url=emu.url, key=PREVIEW_KEY,
                     env_extra={"TRIGGER_PREVIEW_BRANCH": "feature-x",
                                "VERCEL_GIT_COMMIT_REF": "not-this-one"})
    assert result.returncode == 0, result.stderr
    stats = emulator_stats(emu.url)
    assert stats["by_branch"] == {"feature-x": stats["requests"]} and stats["requests"] > 1
    assert read_dataset(out).num_rows == 120
    assert "branch feature-x" in result.stdout
    summary = [json.loads(line) for line in result.stderr.splitlines() if "run_summary" in line]
    assert summary[-1]["branch"] == "feature-x"
    (manifest,) = (out / "_runs").glob("*.json")
    assert json.loads(manifest.read_text())["branch"] == "feature-x"
    assert ('sessions_export_runs_total{environment="default",branch="feature-x"} 1'
            in metrics.read_text())
    assert PREVIEW_KEY not in result.stdout + result.stderr


def test_branch_from_vercel_then_the_flag_wins(emulator, tmp_path):
    emu = emulator(sessions=5)
    vercel = run_cli("run", "--output", str(tmp_path / "a"), url=emu.url, key=PREVIEW_KEY,
                     env_extra={"VERCEL_GIT_COMMIT_REF": "from-vercel"})
    assert vercel.returncode == 0, vercel.stderr
    flag = run_cli("run", "--output", str(tmp_path / "b"), "--branch", "from-flag", url=emu.url,
                   key=PREVIEW_KEY, env_extra={"VERCEL_GIT_COMMIT_REF": "from-vercel"})
    assert flag.returncode == 0, flag.stderr
    assert set(emulator_stats(emu.url)["by_branch"]) == {"from-vercel", "from-flag"}


def test_preview_key_without_a_branch_stops_before_any_request(emulator, tmp_path):
    emu = emulator(sessions=5)
    result = run_cli("run", "--output", str(tmp_path / "out"), url=emu.url, key=PREVIEW_KEY)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "preview key" in line and "--branch" in line and "TRIGGER_PREVIEW_BRANCH" in line
    assert PREVIEW_KEY not in line
    assert emulator_stats(emu.url)["requests"] == 0


def test_emulator_wants_the_branch_header_for_preview_keys(emulator):
    emu = emulator(sessions=3)
    url = f"{emu.url}/api/v1/sessions"
    bare = httpx.get(url, headers={"Authorization": f"Bearer {PREVIEW_KEY}"})
    assert bare.status_code == 401
    assert bare.json() == {"error": "x-trigger-branch header required for preview env"}
    with_branch = httpx.get(url, headers={"Authorization": f"Bearer {PREVIEW_KEY}",
                                          "x-trigger-branch": "b"})
    assert with_branch.status_code == 200 and len(with_branch.json()["data"]) == 3
    assert httpx.get(url, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200


def test_a_branch_per_environment_from_the_config_file(emulator, tmp_path):
    emu = emulator(sessions=4)
    config = tmp_path / "envs.toml"
    config.write_text(f'[environments.one]\nbranch = "one"\noutput = "{tmp_path / "one"}"\n'
                      f'[environments.two]\nbranch = "two"\noutput = "{tmp_path / "two"}"\n')
    result = run_cli("run", "--config", str(config), "--all-environments", url=emu.url,
                     key=PREVIEW_KEY)
    assert result.returncode == 0, result.stderr
    assert set(emulator_stats(emu.url)["by_branch"]) == {"one", "two"}


# -- the key from a file -------------------------------------------------------------------


def test_key_from_a_secrets_file(emulator, tmp_path):
    emu = emulator(sessions=30)
    secret = tmp_path / "trigger-key"
    secret.write_text(f"  {KEY}\n")
    result = run_cli("run", "--output", str(tmp_path / "out"), "--log-level", "debug",
                     url=emu.url, key=None, env_extra={"TRIGGER_SECRET_KEY_FILE": str(secret)})
    assert result.returncode == 0, result.stderr
    assert read_dataset(tmp_path / "out").num_rows == 30
    assert KEY not in result.stdout + result.stderr


def test_key_file_missing_or_unreadable_is_a_usage_error(emulator, tmp_path):
    emu = emulator(sessions=3)
    for path, words in ((tmp_path / "nope", "does not exist"), (tmp_path, "cannot be read")):
        result = run_cli("run", "--output", str(tmp_path / "out"), url=emu.url, key=None,
                         env_extra={"TRIGGER_SECRET_KEY_FILE": str(path)})
        assert result.returncode == 2, result.stderr
        (line,) = result.stderr.strip().splitlines()
        assert "TRIGGER_SECRET_KEY_FILE" in line and words in line
    assert emulator_stats(emu.url)["requests"] == 0


def test_the_variable_wins_over_the_file_and_a_file_key_is_redacted(emulator, tmp_path):
    emu = emulator(sessions=3, api_keys=(KEY,))
    wrong = "tr_dev_" + "wrong_key_from_the_file"
    secret = tmp_path / "key"
    secret.write_text(wrong)
    ok = run_cli("run", "--output", str(tmp_path / "a"), url=emu.url,
                 env_extra={"TRIGGER_SECRET_KEY_FILE": str(secret)})
    assert ok.returncode == 0, ok.stderr
    rejected = run_cli("run", "--output", str(tmp_path / "b"), "--log-level", "debug",
                       url=emu.url, key=None, env_extra={"TRIGGER_SECRET_KEY_FILE": str(secret)})
    assert rejected.returncode == 3, rejected.stderr
    assert "TRIGGER_SECRET_KEY_FILE" in rejected.stderr
    assert wrong not in rejected.stdout + rejected.stderr


# -- a self-hosted server: TLS with a private CA, a path prefix ----------------------------


@dataclass(frozen=True)
class PrivateCA:
    bundle: Path  # the CA certificate, as a user would get it from their ops team
    cert: Path
    key: Path


@pytest.fixture(scope="module")
def private_ca(tmp_path_factory) -> PrivateCA:
    where = tmp_path_factory.mktemp("ca")
    ca = trustme.CA()
    issued = ca.issue_cert(API_HOST, "localhost", "127.0.0.1")
    bundle, cert, key = where / "ca.pem", where / "server.pem", where / "server.key"
    ca.cert_pem.write_to_path(str(bundle))
    issued.private_key_pem.write_to_path(str(key))
    for blob in issued.cert_chain_pems:
        blob.write_to_path(str(cert), append=True)
    return PrivateCA(bundle, cert, key)


def _tls_emulator(emulator, ca: PrivateCA, **overrides):
    return emulator(tls_cert=str(ca.cert), tls_key=str(ca.key), **overrides)


def _private(emu, path: str, ca: PrivateCA) -> dict:
    base = emu.url.removesuffix(emu.config.path_prefix)
    return httpx.get(f"{base}{path}", verify=ssl.create_default_context(cafile=ca.bundle)).json()


def test_self_hosted_over_tls_with_a_private_ca_and_a_path_prefix(emulator, private_ca, tmp_path):
    emu = _tls_emulator(emulator, private_ca, sessions=40, path_prefix="/trigger")
    url = emu.url.replace("127.0.0.1", "localhost")
    assert url.startswith("https://localhost:") and url.endswith("/trigger")
    out = tmp_path / "out"
    result = run_cli("run", "--output", str(out), "--ca-bundle", str(private_ca.bundle), url=url)
    assert result.returncode == 0, result.stderr
    assert read_dataset(out).num_rows == 40
    # SSL_CERT_FILE is honoured the same way
    again = run_cli("run", "--output", str(tmp_path / "again"), url=url,
                    env_extra={"SSL_CERT_FILE": str(private_ca.bundle)})
    assert again.returncode == 0, again.stderr
    assert read_dataset(tmp_path / "again").num_rows == 40


def test_an_untrusted_certificate_is_one_line_and_not_retried(emulator, private_ca, tmp_path):
    emu = _tls_emulator(emulator, private_ca, sessions=3)
    result = run_cli("run", "--output", str(tmp_path / "out"), url=emu.url,
                     env_extra={"SSL_CERT_FILE": ""})
    assert result.returncode == 2, result.stderr
    (line,) = [x for x in result.stderr.splitlines() if "error" in x]
    assert "not trusted" in line and "ca_bundle" in line
    missing = run_cli("run", "--output", str(tmp_path / "out"), "--ca-bundle",
                      str(tmp_path / "none.pem"), url=emu.url)
    assert missing.returncode == 2 and "ca_bundle" in missing.stderr
    assert _private(emu, "/_emulator/stats", private_ca)["requests"] == 0


# -- a real forward proxy ------------------------------------------------------------------


@dataclass(frozen=True)
class ForwardProxy:
    url: str
    record: Path

    def seen(self) -> bytes:
        return self.record.read_bytes() if self.record.exists() else b""

    def forget(self) -> None:
        self.record.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def forward_proxy(tmp_path_factory) -> Iterator[ForwardProxy]:
    record = tmp_path_factory.mktemp("proxy") / "seen.bin"
    port = free_port()
    env = {**os.environ, "PROXY_RECORD": str(record), "PYTHONPATH": str(ROOT)}
    process = start_server(
        [sys.executable, "-m", "proxy", "--hostname", "127.0.0.1", "--port", str(port),
         "--num-acceptors", "1", "--plugins", "tests.proxy_recorder.RecordingResolver",
         "--log-level", "WARNING"],
        lambda: socket.create_connection(("127.0.0.1", port), timeout=1).close(), "proxy.py",
        env=env, cwd=ROOT,
    )
    try:
        yield ForwardProxy(f"http://127.0.0.1:{port}", record)
    finally:
        process.terminate()
        process.wait(timeout=10)


def test_the_recorder_sees_what_a_proxy_reads_in_clear(forward_proxy, emulator):
    """The check below can fail: a plain-http request through this proxy is recorded whole."""
    emu = emulator(sessions=1)
    forward_proxy.forget()
    port = emu.url.rsplit(":", 1)[1]
    with httpx.Client(proxy=forward_proxy.url) as client:
        response = client.get(f"http://{API_HOST}:{port}/_emulator/stats",
                              headers={"x-marker": "visible-in-clear"})
    assert response.status_code == 200
    assert b"visible-in-clear" in forward_proxy.seen()


def test_https_through_the_proxy_only_shows_it_a_tunnel(emulator, private_ca, forward_proxy,
                                                        tmp_path):
    emu = _tls_emulator(emulator, private_ca, sessions=25, path_prefix="/trigger")
    port = emu.url.split(":")[2].split("/")[0]
    url = f"https://{API_HOST}:{port}/trigger"
    forward_proxy.forget()
    out = tmp_path / "out"
    result = run_cli("run", "--output", str(out), "--ca-bundle", str(private_ca.bundle),
                     url=url, env_extra={"HTTPS_PROXY": forward_proxy.url})
    assert result.returncode == 0, result.stderr
    assert read_dataset(out).num_rows == 25
    seen = forward_proxy.seen()
    assert seen.startswith(b"CONNECT ") and f"Host: {API_HOST}:{port}".encode() in seen
    assert all(chunk.startswith(b"CONNECT ") for chunk in seen.split(b"\r\n\r\n\n") if chunk)
    assert KEY.encode() not in seen and b"Bearer" not in seen
    # NO_PROXY sends it around the proxy (here: to a name only the proxy could resolve)
    forward_proxy.forget()
    direct = run_cli("run", "--output", str(tmp_path / "direct"), "--ca-bundle",
                     str(private_ca.bundle), "--max-attempts", "1", "--connect-timeout", "3",
                     url=url, env_extra={"HTTPS_PROXY": forward_proxy.url, "NO_PROXY": ".test"})
    assert direct.returncode == 4, direct.stderr
    assert forward_proxy.seen() == b""


def test_plain_http_is_never_sent_through_a_proxy(emulator, forward_proxy, tmp_path):
    emu = emulator(sessions=3)
    port = emu.url.rsplit(":", 1)[1]
    forward_proxy.forget()
    result = run_cli("run", "--output", str(tmp_path / "out"), "--allow-insecure-http",
                     url=f"http://{API_HOST}:{port}",
                     env_extra={"HTTP_PROXY": forward_proxy.url, "ALL_PROXY": forward_proxy.url})
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.strip().splitlines()
    assert "refusing plain http" in line and "proxy" in line
    assert forward_proxy.seen() == b""
    assert emulator_stats(emu.url)["requests"] == 0
    # a loopback API is reached directly, whatever the proxy variables say
    local = run_cli("run", "--output", str(tmp_path / "local"), url=emu.url,
                    env_extra={"HTTP_PROXY": forward_proxy.url, "ALL_PROXY": forward_proxy.url})
    assert local.returncode == 0, local.stderr
    assert forward_proxy.seen() == b""


def test_each_preview_branch_has_its_own_rate_limit_bucket(emulator):
    emu = emulator(sessions=2, rate_limit=True, rate_limit_burst=2, rate_limit_refill=1,
                   rate_limit_interval=600)
    url = f"{emu.url}/api/v1/sessions"

    def status(branch: str) -> int:
        headers = {"Authorization": f"Bearer {PREVIEW_KEY}", "x-trigger-branch": branch}
        return httpx.get(url, headers=headers).status_code

    assert [status("a"), status("a"), status("a")] == [200, 200, 429]
    assert [status("b"), status("b"), status("b")] == [200, 200, 429]
