"""Certificates for tests, made by the repository's own scripts/make_certs.sh (the openssl CLI)."""
from __future__ import annotations

import subprocess
from pathlib import Path

from tests.support import REPO


def make_certs(folder: Path) -> Path:
    """A CA with server and client certificates in ``folder/certs``; returns that folder."""
    out = folder / "certs"
    proc = subprocess.run(["bash", str(REPO / "scripts" / "make_certs.sh"), str(out)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    for name in ("ca.crt", "server.crt", "server.key", "client.crt", "client.key"):
        assert (out / name).is_file(), name
    assert (out / "server.key").stat().st_mode & 0o077 == 0, "keys must be private (0600)"
    return out
