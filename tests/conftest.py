"""Suite-wide settings. Each test folder keeps its own fixtures in its own conftest.py."""
from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True, scope="session")
def _kvmesh_state_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Controllers started by tests keep their default event database in a temporary folder, not in
    the user's ~/.local/state/kvmesh."""
    previous = os.environ.get("KVMESH_STATE_DIR")
    os.environ["KVMESH_STATE_DIR"] = str(tmp_path_factory.mktemp("kvmesh-state"))
    yield
    if previous is None:
        os.environ.pop("KVMESH_STATE_DIR", None)
    else:
        os.environ["KVMESH_STATE_DIR"] = previous
