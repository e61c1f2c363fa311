"""The key, the branch and the route to the API: pure functions, no network."""

from __future__ import annotations

import pytest

from pipeline.api.auth import SecretKey, check_branch, check_secret_key, read_secret_key
from pipeline.api.client import proxy_for, tls_verification
from pipeline.errors import AuthError, UsageError

PREVIEW = "tr_preview_" + "abc123"
DEV = "tr_dev_" + "abc123"


def test_key_from_the_variable_else_its_file(tmp_path):
    secret = tmp_path / "key"
    secret.write_text(f"\n {DEV} \n")
    assert read_secret_key("TRIGGER_SECRET_KEY", {"TRIGGER_SECRET_KEY": PREVIEW}).value == PREVIEW
    from_file = read_secret_key("TRIGGER_SECRET_KEY", {"TRIGGER_SECRET_KEY_FILE": str(secret)})
    assert from_file.value == DEV and str(secret) in from_file.source
    assert DEV not in repr(from_file)
    named = read_secret_key("PROD_KEY", {"PROD_KEY_FILE": str(secret)})
    assert named.value == DEV and named.source.startswith("PROD_KEY_FILE")
    assert read_secret_key("TRIGGER_SECRET_KEY", {}) == SecretKey("", "TRIGGER_SECRET_KEY")


def test_key_file_problems_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="does not exist"):
        read_secret_key("K", {"K_FILE": str(tmp_path / "missing")})
    with pytest.raises(UsageError, match="cannot be read"):
        read_secret_key("K", {"K_FILE": str(tmp_path)})
    empty = tmp_path / "empty"
    empty.write_text("\n")
    with pytest.raises(UsageError, match="which is empty"):
        read_secret_key("K", {"K_FILE": str(empty)})
    binary = tmp_path / "binary"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(UsageError, match="cannot be read"):
        read_secret_key("K", {"K_FILE": str(binary)})


def test_key_shapes_and_the_preview_branch_rule():
    for key in (DEV, "tr_stg_x", "tr_prod_x", PREVIEW):
        assert check_secret_key(key) == key
    with pytest.raises(AuthError, match="does not look like") as error:
        check_secret_key("sk_live_nope", "TRIGGER_SECRET_KEY_FILE (/run/secrets/k)")
    assert "sk_live_nope" not in str(error.value) and "/run/secrets/k" in str(error.value)
    with pytest.raises(AuthError, match="not set"):
        check_secret_key("")
    with pytest.raises(UsageError, match="preview key.*--branch.*TRIGGER_PREVIEW_BRANCH"):
        check_branch(PREVIEW, None)
    check_branch(PREVIEW, "feature-x")
    check_branch(DEV, None)
    with pytest.raises(UsageError, match="ASCII"):
        check_branch(PREVIEW, "fonctionnalité")


def test_proxies_by_the_standard_variables(monkeypatch):
    for name in ("HTTPS_PROXY", "HTTP_PROXY", "ALL_PROXY", "NO_PROXY", "https_proxy",
                 "http_proxy", "all_proxy", "no_proxy", "REQUEST_METHOD"):
        monkeypatch.delenv(name, raising=False)
    assert proxy_for("https://api.trigger.dev") is None
    monkeypatch.setenv("HTTPS_PROXY", "http://user:pw@proxy.internal:3128")
    assert proxy_for("https://api.trigger.dev") == "http://user:pw@proxy.internal:3128"
    assert proxy_for("https://127.0.0.1:8443") is None  # loopback: always direct
    monkeypatch.setenv("NO_PROXY", "internal,.trigger.dev")
    assert proxy_for("https://api.trigger.dev") is None
    monkeypatch.setenv("HTTP_PROXY", "proxy.internal:3128")
    assert proxy_for("http://localhost:8787") is None
    with pytest.raises(UsageError, match="refusing plain http to trigger.example through the "
                       "proxy proxy.internal") as error:
        proxy_for("http://trigger.example")
    assert "pw" not in str(error.value)  # proxy credentials are not printed
    assert proxy_for("http://api.trigger.dev") is None  # NO_PROXY: direct, never the proxy
    monkeypatch.setenv("HTTPS_PROXY", "socks5://proxy.internal:1080")
    with pytest.raises(UsageError, match="socks5://, which is not supported"):
        proxy_for("https://api.example.com")


def test_ca_bundle_must_be_a_pem_file(tmp_path):
    assert tls_verification(None) is True
    with pytest.raises(UsageError, match="does not exist"):
        tls_verification(str(tmp_path / "none.pem"))
    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(UsageError, match="not a readable PEM file"):
        tls_verification(str(junk))
