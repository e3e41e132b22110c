"""The committed generated code matches a fresh generation from the .proto files."""
from __future__ import annotations

import subprocess
import sys

from .support import REPO


def test_generated_protos_are_up_to_date() -> None:
    proc = subprocess.run([sys.executable, "scripts/gen_protos.py", "--check"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "up to date" in proc.stdout
