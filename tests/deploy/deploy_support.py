"""Paths and tool look-ups the deploy tests share."""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"


def tool(name: str) -> str:
    """Path of a command-line tool (on PATH or beside the running Python), or skip saying so."""
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        pytest.skip(f"{name} is not installed (scripts/setup.sh installs it)")
    return path
