"""Fixtures of the core tests: certificates from scripts/make_certs.sh."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.security.certs import make_certs


@pytest.fixture(scope="session")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_certs(tmp_path_factory.mktemp("certs"))
