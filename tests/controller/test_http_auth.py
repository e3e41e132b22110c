"""HTTP auth and HTTPS of the gateway, against a real controller on loopback.

Every route of the route table (read from the gateway, so a new route is covered without editing
this file), plus /metrics and /openapi.json, is tried without a token, with a wrong one and with the
right one; only /healthz stays open.
"""
from __future__ import annotations

import http.client
import json
import secrets
import shutil
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmesh.controller.__main__ import main as controller_main
from kvmesh.core.auth import TokenFileError
from kvmesh.core.security import SecuritySettings

from .harness import ControllerThread

TOKEN = secrets.token_urlsafe(32)
EXTRA_PATHS = [("GET", "/metrics"), ("GET", "/openapi.json"), ("POST", "/no-such-route")]


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ControllerThread]:
    token_file = tmp_path_factory.mktemp("auth") / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    with ControllerThread(security=SecuritySettings.load(token_file=token_file)) as c:
        yield c


def all_routes(c: ControllerThread) -> list[tuple[str, str]]:
    assert c.server is not None
    routes = [(verb, template.replace("{event_id}", "Nope0")) for verb, template, _ in c.server.gateway.routes]
    assert len(routes) >= 14, routes
    return routes + EXTRA_PATHS


def call(c: ControllerThread, verb: str, path: str, auth: str | None) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", c.http_port, timeout=30)
    try:
        headers = {"Content-Type": "application/json"}
        if auth is not None:
            headers["Authorization"] = auth
        conn.request(verb, path, body=b"{}" if verb == "POST" else None, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


@pytest.mark.parametrize("auth", [None, "Bearer wrong-token-of-enough-length", f"Basic {TOKEN}", f"Bearer {TOKEN}x",
                                  "Bearer", ""])
def test_every_route_refuses_a_missing_or_wrong_token(secured: ControllerThread, auth: str | None) -> None:
    for verb, path in all_routes(secured):
        status, headers, body = call(secured, verb, path, auth)
        assert status == 401, (verb, path, auth, status, body)
        assert headers["www-authenticate"].startswith("Bearer")
        doc = json.loads(body)
        assert doc["code"] == "UNAUTHENTICATED" and doc["error"]["status"] == "UNAUTHENTICATED"
        assert "Authorization: Bearer" in doc["error"]["message"]
        assert TOKEN not in body.decode()


def test_every_route_accepts_the_right_token(secured: ControllerThread) -> None:
    for verb, path in all_routes(secured):
        status, _, body = call(secured, verb, path, f"Bearer {TOKEN}")
        # Past auth: the route's own answer (a domain 4xx for the empty request, or 200).
        assert status in (200, 400, 404), (verb, path, status, body)
        if path == "/no-such-route":
            assert status == 404 and b"no route" in body
    status, _, body = call(secured, "GET", "/metrics", f"bearer   {TOKEN}  ")  # scheme is case-insensitive
    assert status == 200 and b"kvmesh_" in body


def test_healthz_is_open(secured: ControllerThread) -> None:
    status, _, body = call(secured, "GET", "/healthz", None)
    assert status == 200 and json.loads(body) == {"status": "ok"}
    assert call(secured, "POST", "/healthz", f"Bearer {TOKEN}")[0] == 405


def test_no_token_configured_leaves_routes_open(controller: ControllerThread) -> None:
    assert controller.http("GET", "/events").status == 200
    assert controller.http("GET", "/healthz").body == {"status": "ok"}


def test_an_unusable_token_file_is_a_clear_error(tmp_path: Path) -> None:
    short = tmp_path / "short"
    short.write_text("abc")
    with pytest.raises(TokenFileError, match="too short"):
        SecuritySettings.load(token_file=short)
    with pytest.raises(SystemExit) as stopped:  # a usage error: argparse's exit status 2, with the message
        controller_main(["--host", "127.0.0.1", "--port", "0", "--monitor-port", "0",
                         "--auth-token-file", str(tmp_path / "missing")])
    assert stopped.value.code == 2


def test_tls_settings_go_together(pki: Path) -> None:
    with pytest.raises(ValueError, match="key"):
        SecuritySettings.load(tls_cert=str(pki / "server.pem"))
    with pytest.raises(ValueError):
        SecuritySettings.load(tls_ca=str(pki / "ca.pem"), tls_key=str(pki / "server.key"))


# -- HTTPS -------------------------------------------------------------------------------------

def openssl(*args: str, cwd: Path) -> None:
    tool = shutil.which("openssl")
    if tool is None:
        pytest.fail("the openssl CLI is needed to make test certificates")
    subprocess.run([tool, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 signed by it, a client certificate signed by it, and a
    client certificate from another CA."""
    d = tmp_path_factory.mktemp("pki")
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    for ca in ("ca", "other-ca"):
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
                "-keyout", f"{ca}.key", "-out", f"{ca}.pem", "-days", "2", "-subj", f"/CN=kvmesh test {ca}", cwd=d)
    for name, ca, ext in (("server", "ca", ["-extfile", "san.ext"]), ("client", "ca", []),
                          ("stranger", "other-ca", [])):
        openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-keyout",
                f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
                "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", *ext, cwd=d)
    return d


def https_get(port: int, path: str, ctx: ssl.SSLContext, token: str | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=ctx, timeout=30)
    try:
        conn.request("GET", path, headers={"Authorization": f"Bearer {token}"} if token else {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def client_context(pki: Path, cert: str | None = None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    if cert is not None:
        ctx.load_cert_chain(str(pki / f"{cert}.pem"), str(pki / f"{cert}.key"))
    return ctx


def test_https_serves_with_a_token(pki: Path, tmp_path: Path) -> None:
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN)
    with ControllerThread(security=SecuritySettings.load(
            tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"), token_file=token_file)) as c:
        ctx = client_context(pki)
        assert https_get(c.http_port, "/healthz", ctx) == (200, b'{"status":"ok"}')
        assert https_get(c.http_port, "/events", ctx)[0] == 401
        status, body = https_get(c.http_port, "/events", ctx, TOKEN)
        assert status == 200 and json.loads(body) == {"events": []}
        # Plain HTTP on the HTTPS port gets no answer from the app.
        conn = http.client.HTTPConnection("127.0.0.1", c.http_port, timeout=10)
        try:
            with pytest.raises((ConnectionError, http.client.HTTPException)):
                conn.request("GET", "/healthz")
                conn.getresponse().read()
        finally:
            conn.close()
        # A client that does not trust the certificate refuses the server.
        with pytest.raises(ssl.SSLCertVerificationError):
            https_get(c.http_port, "/healthz", ssl.create_default_context())


def test_mutual_tls_needs_a_client_certificate_from_the_ca(pki: Path) -> None:
    with ControllerThread(security=SecuritySettings.load(
            tls_cert=str(pki / "server.pem"), tls_key=str(pki / "server.key"), tls_ca=str(pki / "ca.pem"))) as c:
        assert https_get(c.http_port, "/healthz", client_context(pki, "client"))[0] == 200
        for cert in (None, "stranger"):
            with pytest.raises((ssl.SSLError, ConnectionError)):
                https_get(c.http_port, "/healthz", client_context(pki, cert))
