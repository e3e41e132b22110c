"""SecuritySettings from flags, environment and the agent's yaml; TLS file checks; bind refusal."""
from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from kvmesh.core.auth import BindRefused, TokenFileError, bearer_ok, check_bind_allowed
from kvmesh.core.security import SecuritySettings
from kvmesh.core.tls import TlsConfigError
from kvmesh.instance_agent.config import AgentConfig, ConfigError, config_from_dict

TOKEN = "s3cret-token-0123456789abcdef"


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


def test_no_token_anywhere_means_no_auth() -> None:
    s = SecuritySettings.load(env={})
    assert s.token is None and s.grpc_metadata() == () and s.http_headers() == {}
    assert s.server_credentials() is None and s.channel_credentials() is None


def test_token_from_env_then_flag_wins(token_file: Path, tmp_path: Path) -> None:
    other = tmp_path / "other"
    other.write_text("another-token-abcdefghijkl")
    assert SecuritySettings.load(env={"KVMESH_AUTH_TOKEN_FILE": str(token_file)}).token == TOKEN
    s = SecuritySettings.load(token_file=other, env={"KVMESH_AUTH_TOKEN_FILE": str(token_file)})
    assert s.token == "another-token-abcdefghijkl" and s.token_file == str(other)
    assert s.grpc_metadata() == (("authorization", "Bearer another-token-abcdefghijkl"),)


def test_flags(token_file: Path, certs: Path) -> None:
    p = argparse.ArgumentParser()
    SecuritySettings.add_arguments(p)
    args = p.parse_args(["--auth-token-file", str(token_file), "--tls-cert", str(certs / "server.crt"),
                         "--tls-key", str(certs / "server.key"), "--tls-ca", str(certs / "ca.crt"), "--insecure"])
    s = SecuritySettings.from_args(args, env={})
    assert (s.token, s.insecure, s.tls.mutual, s.tls.server_enabled) == (TOKEN, True, True, True)
    assert s.server_credentials() is not None and s.channel_credentials() is not None


def test_client_flags_have_no_insecure() -> None:
    p = argparse.ArgumentParser()
    SecuritySettings.add_arguments(p, server=False)
    with pytest.raises(SystemExit):
        p.parse_args(["--insecure"])
    assert SecuritySettings.from_args(p.parse_args([]), env={}).insecure is False


def test_the_token_is_never_in_a_repr(token_file: Path) -> None:
    s = SecuritySettings.load(token_file=token_file, env={})
    assert TOKEN not in repr(s) and TOKEN not in str(s)


def test_agent_yaml_keys_and_env(token_file: Path, certs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVMESH_AUTH_TOKEN_FILE", raising=False)
    cfg = config_from_dict({"extra_config": {"auth_token_file": str(token_file),
                                             "tls_cert_file": str(certs / "server.crt"),
                                             "tls_key_file": str(certs / "server.key"),
                                             "tls_ca_file": str(certs / "ca.crt")}}, env={})
    assert cfg.security.token == TOKEN and cfg.security.tls.mutual
    monkeypatch.setenv("KVMESH_AUTH_TOKEN_FILE", str(token_file))
    assert AgentConfig().security.token == TOKEN


def test_agent_yaml_bad_token_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="auth token file"):
        AgentConfig(extra_config={"auth_token_file": str(tmp_path / "missing")})
    short = tmp_path / "short"
    short.write_text("abc")
    with pytest.raises(ConfigError, match="too short"):
        AgentConfig(extra_config={"auth_token_file": str(short)})


def test_unreadable_token_file(tmp_path: Path) -> None:
    with pytest.raises(TokenFileError, match="cannot read the auth token file"):
        SecuritySettings.load(token_file=tmp_path / "nope", env={})


def test_tls_needs_cert_and_key_together(certs: Path) -> None:
    with pytest.raises(TlsConfigError, match="certificate file was given without its key"):
        SecuritySettings(tls_cert=str(certs / "server.crt"))
    with pytest.raises(TlsConfigError, match="key file was given without its certificate"):
        SecuritySettings(tls_key=str(certs / "server.key"))


def test_tls_files_are_checked_at_load(tmp_path: Path, certs: Path) -> None:
    with pytest.raises(TlsConfigError, match="cannot read the TLS CA file"):
        SecuritySettings(tls_ca=str(tmp_path / "missing.crt"))
    junk = tmp_path / "junk.crt"
    junk.write_text("not a certificate")
    with pytest.raises(TlsConfigError, match="is not PEM"):
        SecuritySettings(tls_cert=str(junk), tls_key=str(certs / "server.key"))


def test_client_with_only_a_ca_is_tls_without_mutual(certs: Path) -> None:
    s = SecuritySettings(tls_ca=str(certs / "ca.crt"))
    assert s.tls.client_enabled and not s.tls.server_enabled and not s.tls.mutual
    assert s.channel_credentials() is not None and s.server_credentials() is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.0.0.5", "kvmesh-controller", ""])
def test_bind_beyond_loopback_needs_a_token(host: str) -> None:
    with pytest.raises(BindRefused) as info:
        check_bind_allowed(host, None, what="the test server")
    msg = str(info.value)
    assert "without an auth token" in msg and "secrets.token_urlsafe" in msg and "--auth-token-file" in msg
    assert isinstance(info.value, OSError)  # every main reports it as a failed start
    check_bind_allowed(host, TOKEN)
    check_bind_allowed(host, None, insecure=True)


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "127.3.2.1", "::1", "[::1]"])
def test_loopback_needs_no_token(host: str) -> None:
    check_bind_allowed(host, None)


def test_bearer_ok() -> None:
    assert bearer_ok(f"Bearer {TOKEN}", TOKEN) and bearer_ok(f"bearer {TOKEN}".encode(), TOKEN)
    assert not bearer_ok(None, TOKEN) and not bearer_ok(TOKEN, TOKEN) and not bearer_ok("Bearer x", TOKEN)
    assert not bearer_ok(f"Basic {TOKEN}", TOKEN)
    assert bearer_ok(None, None)


def test_the_old_import_paths_still_work() -> None:
    import kvmesh.core.errors
    import kvmesh.core.keys
    import kvmesh.errors
    import kvmesh.instance_agent.keys

    for name in ("KVMeshError", "NotFound", "TooBusy", "Unauthenticated", "from_grpc_error", "HTTP_STATUS_BY_GRPC_CODE"):
        assert getattr(kvmesh.errors, name) is getattr(kvmesh.core.errors, name), name
    for name in ("chunk_spans", "validate_tokens", "ChunkSpan", "chain_key", "ROOT_KEY"):
        assert getattr(kvmesh.instance_agent.keys, name) is getattr(kvmesh.core.keys, name), name
