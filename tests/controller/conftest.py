"""Fixtures of the controller tests: a real controller on loopback (ports 0)."""
from __future__ import annotations

from collections.abc import Iterator

import pytest

from .harness import ControllerThread


@pytest.fixture
def controller() -> Iterator[ControllerThread]:
    with ControllerThread(max_tokens=1000, max_body_bytes=256 * 1024) as c:
        yield c
