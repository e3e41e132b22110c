"""Paths and tool look-ups the deploy tests share."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def tool(name: str) -> str:
    """Path of a command-line tool (the repository's .tools/bin, beside the running Python, or on PATH),
    or skip saying so."""
    path = (shutil.which(name, path=str(REPO / ".tools" / "bin"))
            or shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name))
    if path is None:
        pytest.skip(f"{name} is not installed (scripts/setup.sh installs it)")
    return path
