"""The ``kvmesh-controller`` process with its HTTP flags: HTTPS and the token, called with curl."""
from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import console_script, free_port, running

from .test_http_auth import pki  # noqa: F401 - the module-scoped certificates fixture


def curl(*args: str) -> tuple[int, str]:
    """``curl`` with the HTTP status appended on its own last line."""
    tool = shutil.which("curl")
    if tool is None:
        pytest.fail("the curl CLI is needed for this test")
    proc = subprocess.run([tool, "-sS", "-w", "\n%{http_code}", *args], capture_output=True, text=True, timeout=30)
    body, _, status = proc.stdout.rpartition("\n")
    return int(status or 0), body


def test_https_and_token_flags(pki: Path, tmp_path: Path) -> None:  # noqa: F811
    token = secrets.token_urlsafe(32)
    token_file = tmp_path / "token"
    token_file.write_text(token + "\n")
    token_file.chmod(0o600)
    http_port, grpc_port = free_port(), free_port()
    args = [console_script("kvmesh-controller"), "--host", "127.0.0.1", "--port", str(http_port),
            "--monitor-port", str(grpc_port), "--auth-token-file", str(token_file),
            "--tls-cert", str(pki / "server.pem"), "--tls-key", str(pki / "server.key")]
    base = f"https://127.0.0.1:{http_port}"
    tls = ["--cacert", str(pki / "ca.pem")]
    log = tmp_path / "controller.log"
    with running(args, log=log) as proc:
        deadline = time.monotonic() + 60
        while curl(*tls, f"{base}/healthz")[0] != 200:
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        status, body = curl(*tls, "-X", "POST", f"{base}/query_worker_info", "-H", "Content-Type: application/json",
                            "-d", '{"instance_id": "all"}')
        assert status == 401 and json.loads(body)["code"] == "UNAUTHENTICATED"
        status, body = curl(*tls, "-X", "POST", f"{base}/query_worker_info", "-H", "Content-Type: application/json",
                            "-H", f"Authorization: Bearer {token}", "-d", '{"instance_id": "all"}')
        assert status == 200 and json.loads(body)["worker_infos"] == []
        status, body = curl(*tls, "-H", f"Authorization: Bearer {token}", f"{base}/metrics")
        assert status == 200 and "kvmesh_" in body
        status, _ = curl(*tls, f"{base}/metrics")
        assert status == 401
    assert token not in log.read_text()


def test_a_bad_token_file_stops_the_start_with_a_message(tmp_path: Path) -> None:
    empty = tmp_path / "token"
    empty.write_text("")
    proc = subprocess.run([console_script("kvmesh-controller"), "--host", "127.0.0.1", "--port", "0",
                           "--monitor-port", "0", "--auth-token-file", str(empty)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2  # a usage error, told before anything starts
    assert "auth token" in proc.stderr and "empty" in proc.stderr and "secrets.token_urlsafe" in proc.stderr
