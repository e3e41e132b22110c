"""The mesh's command-line clients with security on: the ``kvmesh`` CLI sends the token (and its TLS
files) it is given; the images' healthcheck reaches a TLS server with the process's own settings."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.controller.harness import ControllerThread
from tests.security.conftest import mtls
from tests.support import REPO


@pytest.fixture(scope="module")
def controller(certs: Path) -> Iterator[ControllerThread]:
    with ControllerThread(security=mtls(certs)) as c:
        yield c


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVMESH_")}
    env.update(extra)
    return env


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kvmesh.controller.cli", *args], capture_output=True, text=True,
                          timeout=60, env=env or _clean_env())


def test_cli_with_token_and_mtls(controller: ControllerThread, certs: Path, token_file: Path) -> None:
    target = f"localhost:{controller.server.grpc_port}"
    tls = ["--tls-ca", str(certs / "ca.crt"), "--tls-cert", str(certs / "client.crt"),
           "--tls-key", str(certs / "client.key")]
    ok = cli("--controller", target, "--auth-token-file", str(token_file), *tls, "events")
    assert ok.returncode == 0, ok.stderr
    # The same from the environment.
    env = _clean_env(KVMESH_AUTH_TOKEN_FILE=str(token_file), KVMESH_TLS_CA_FILE=str(certs / "ca.crt"),
                     KVMESH_TLS_CERT_FILE=str(certs / "client.crt"), KVMESH_TLS_KEY_FILE=str(certs / "client.key"))
    assert cli("--controller", target, "events", env=env).returncode == 0
    refused = cli("--controller", target, *tls, "events")
    assert refused.returncode == 1
    assert json.loads(refused.stderr)["error"]["code"] == "UNAUTHENTICATED", refused.stderr


def test_cli_with_an_unreadable_token_file(tmp_path: Path) -> None:
    bad = cli("--auth-token-file", str(tmp_path / "none"), "events")
    assert bad.returncode == 2 and "cannot read the auth token file" in json.loads(bad.stderr)["error"]["message"]


def test_healthcheck_over_mtls(controller: ControllerThread, certs: Path) -> None:
    script = [sys.executable, str(REPO / "deploy" / "docker" / "healthcheck.py")]
    target = f"grpc://localhost:{controller.server.grpc_port}"
    env = _clean_env(KVMESH_HEALTHCHECK=target, KVMESH_TLS_CA_FILE=str(certs / "ca.crt"),
                     KVMESH_TLS_CERT_FILE=str(certs / "server.crt"), KVMESH_TLS_KEY_FILE=str(certs / "server.key"))
    ok = subprocess.run(script, capture_output=True, text=True, timeout=60, env=env)
    assert ok.returncode == 0, ok.stderr
    plain = subprocess.run(script, capture_output=True, text=True, timeout=60,
                           env=_clean_env(KVMESH_HEALTHCHECK=target))
    assert plain.returncode == 1 and "UNAVAILABLE" in plain.stderr, plain.stderr
