"""Certificates for the deploy tests, in the layout scripts/make_certs.sh writes and the deploy files
name (ca.crt, server.crt/.key: serverAuth + clientAuth, client.crt/.key: clientAuth), made with the
openssl CLI; and a second CA's client certificate, which servers must refuse."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]


def _openssl(*args: str, cwd: Path) -> None:
    tool = shutil.which("openssl")
    if tool is None:
        pytest.fail("the openssl CLI is needed to make test certificates (apt-get install openssl)")
    subprocess.run([tool, *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _leaf(out: Path, name: str, ca: str, eku: str, san: str | None) -> None:
    ext = out / f"{name}.ext"
    ext.write_text("basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
                   f"extendedKeyUsage={eku}\n" + (f"subjectAltName={san}\n" if san else ""))
    _openssl("req", *EC, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=out)
    _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
             "-out", f"{name}.crt", "-days", "2", "-extfile", ext.name, cwd=out)


def make_certs(out: Path) -> Path:
    """A CA and the mesh's, a client's and a stranger's (other CA) certificates in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    for ca in ("ca", "other-ca"):
        _openssl("req", "-x509", *EC, "-keyout", f"{ca}.key", "-out", f"{ca}.crt", "-days", "2",
                 "-subj", f"/CN=kvmesh test {ca}", "-addext", "basicConstraints=critical,CA:TRUE",
                 "-addext", "keyUsage=critical,keyCertSign,cRLSign", cwd=out)
    _leaf(out, "server", "ca", "serverAuth,clientAuth", "DNS:localhost,DNS:controller,IP:127.0.0.1")
    _leaf(out, "client", "ca", "clientAuth", None)
    _leaf(out, "stranger", "other-ca", "clientAuth", None)
    return out
