"""``kvmesh-serve`` with a bearer token: every route (read from the server's own OpenAPI document, so a
new route is covered without editing this file) answers 401 in OpenAI's shape without the token or
with a wrong one, and serves with the right one; only the liveness ``/health`` stays open. The OpenAI
client's ``api_key`` is the token. Without a token the server refuses to bind beyond loopback."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from kvmesh.engine.__main__ import agent_config, parse_args
from tests.engine.serving import MODEL, agent_yaml, kvmesh_serve
from tests.support import console_script

TOKEN = "engine-test-token-0123456789abcdef"

# A valid body for every POST route; a route missing here fails test_every_route_needs_the_token.
BODIES: dict[str, dict[str, Any]] = {
    "/v1/completions": {"model": MODEL, "prompt": "Hello", "max_tokens": 1},
    "/v1/chat/completions": {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 1},
    "/tokenize": {"model": MODEL, "prompt": "Hello"},
    "/detokenize": {"model": MODEL, "tokens": [19556]},
}
OPEN = {"/health"}


@pytest.fixture(scope="module")
def token_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("token") / "token"
    path.write_text(TOKEN + "\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory, token_file: Path) -> Iterator[str]:
    with kvmesh_serve(tmp_path_factory.mktemp("auth"), ["--auth-token-file", str(token_file)]) as url:
        yield url


def call(method: str, url: str, body: Any = None, token: str | None = None) -> tuple[int, Any, Any]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            status, raw, hdrs = resp.status, resp.read(), resp.headers
    except urllib.error.HTTPError as err:
        status, raw, hdrs = err.code, err.read(), err.headers
    try:
        return status, json.loads(raw) if raw else None, hdrs
    except ValueError:
        return status, raw.decode(errors="replace"), hdrs


def operations(engine: str) -> list[tuple[str, str]]:
    status, doc, _ = call("GET", f"{engine}/openapi.json", token=TOKEN)
    assert status == 200
    ops = [(method.upper(), path) for path, item in doc["paths"].items() for method in item]
    return [*ops, ("GET", "/openapi.json")]


@pytest.mark.slow
def test_every_route_needs_the_token(engine: str) -> None:
    ops = operations(engine)
    assert {path for _, path in ops} >= {"/v1/completions", "/v1/chat/completions", "/tokenize", "/detokenize",
                                          "/v1/models", "/version", "/metrics", "/health"}
    for method, path in ops:
        body = BODIES.get(path) if method == "POST" else None
        assert method != "POST" or body is not None, f"add a valid body for {path} to BODIES"
        if path in OPEN:
            assert call(method, engine + path)[0] == 200, path
            continue
        for token in (None, "wrong-token-0123456789abcdef", TOKEN[:-1]):
            status, answer, headers = call(method, engine + path, body, token)
            assert status == 401, (method, path, token, status)
            assert answer["error"]["code"] == 401 and answer["error"]["type"] == "AuthenticationError"
            assert headers["WWW-Authenticate"] == "Bearer"
            assert TOKEN not in json.dumps(answer)
        status, answer, _ = call(method, engine + path, body, TOKEN)
        assert status == 200, (method, path, answer)


@pytest.mark.slow
def test_unknown_routes_and_bad_input_are_401_before_anything_else(engine: str) -> None:
    assert call("GET", f"{engine}/no/such/route")[0] == 401
    assert call("POST", f"{engine}/v1/completions", {"prompt": 5})[0] == 401
    assert call("GET", f"{engine}/no/such/route", token=TOKEN)[0] == 404
    assert call("POST", f"{engine}/v1/completions", {"prompt": 5}, token=TOKEN)[0] == 400
    # Another scheme, or the token without its scheme, is not the bearer token.
    req = urllib.request.Request(f"{engine}/v1/models", headers={"Authorization": f"Basic {TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as basic:
        urllib.request.urlopen(req, timeout=30)
    assert basic.value.code == 401


@pytest.mark.slow
def test_the_openai_clients_api_key_is_the_token(engine: str) -> None:
    with openai.OpenAI(base_url=f"{engine}/v1", api_key=TOKEN, max_retries=0,
                       http_client=httpx.Client(trust_env=False)) as client:
        answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                max_tokens=2, temperature=0)
        assert answer.usage.completion_tokens >= 1
        assert [m.id for m in client.models.list()] == [MODEL]
    with openai.OpenAI(base_url=f"{engine}/v1", api_key="not-the-token", max_retries=0,
                       http_client=httpx.Client(trust_env=False)) as wrong:
        with pytest.raises(openai.AuthenticationError) as err:
            wrong.models.list()
    assert err.value.status_code == 401


def _serve_fails(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """kvmesh-serve refuses before loading anything (seconds, not a model load)."""
    return subprocess.run([console_script("kvmesh-serve"), "--no-kv-cache", *args], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "KVMESH_AUTH_TOKEN_FILE": "", **env})


def test_refuses_a_non_loopback_host_without_a_token() -> None:
    proc = _serve_fails(["--host", "0.0.0.0", "--port", "0"], {})
    assert proc.returncode != 0
    assert "refusing to serve kvmesh-serve on '0.0.0.0' without an auth token" in proc.stderr
    assert "--auth-token-file" in proc.stderr and "--insecure" in proc.stderr


def test_a_bad_token_file_stops_the_start(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("abc")
    proc = _serve_fails(["--port", "0", "--auth-token-file", str(short)], {})
    assert proc.returncode == 1 and "too short" in proc.stderr and "abc" not in proc.stderr
    proc = _serve_fails(["--port", "0"], {"KVMESH_AUTH_TOKEN_FILE": str(tmp_path / "missing")})
    assert proc.returncode == 1 and "cannot read the auth token file" in proc.stderr


def test_the_token_file_goes_to_the_embedded_agent(tmp_path: Path, token_file: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KVMESH_AUTH_TOKEN_FILE", raising=False)
    config_file = str(agent_yaml(tmp_path / "agent.yaml"))
    args: argparse.Namespace = parse_args(["--config", config_file, "--auth-token-file", str(token_file)])
    assert agent_config(args).extra_config["auth_token_file"] == str(token_file)
    assert "auth_token_file" not in agent_config(parse_args(["--config", config_file])).extra_config
    monkeypatch.setenv("KVMESH_AUTH_TOKEN_FILE", str(token_file))
    assert agent_config(parse_args(["--config", config_file])).extra_config["auth_token_file"] == str(token_file)
    assert agent_config(parse_args(["--config", config_file, "--no-kv-cache"])) is None
