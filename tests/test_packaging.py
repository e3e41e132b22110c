"""The distribution: the wheel holds every package folder, mapped into the kvmesh namespace."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.support import REPO

ROOTS = {
    "protos/kvmesh": "kvmesh",
    "controller": "kvmesh/controller",
    "instance_agent": "kvmesh/instance_agent",
    "codecs": "kvmesh/codecs",
    "engine": "kvmesh/engine",
}


def _source_packages() -> set[str]:
    """Every folder with an __init__.py, as the path it must have inside the wheel."""
    found = set()
    for folder, target in ROOTS.items():
        for init in (REPO / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO / folder)
            found.add("/".join((target, *rel.parts)))
    return found


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(REPO)],
        check=True,
        cwd=out,
    )
    (whl,) = out.glob("kvmesh-*.whl")
    return whl


def test_wheel_holds_every_package(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    packages = {n.rsplit("/", 1)[0] for n in names if n.endswith("/__init__.py")}
    missing = _source_packages() - packages
    assert not missing, f"packages missing from the wheel: {sorted(missing)}"
    assert "kvmesh/api/controller/v1/controller_pb2.py" in names
    assert "kvmesh/api/controller/v1/controller.proto" in names
    assert not any(n.startswith(("codecs/", "controller/", "tests/")) for n in names), "a folder escaped the kvmesh namespace"


def test_wheel_declares_console_scripts(wheel: Path) -> None:
    zf = zipfile.ZipFile(wheel)
    (entry_points,) = [n for n in zf.namelist() if n.endswith(".dist-info/entry_points.txt")]
    text = zf.read(entry_points).decode()
    for script in ("kvmesh-controller", "kvmesh-agent", "kvmesh-serve", "kvmesh ="):
        assert script in text, f"{script} missing from entry points:\n{text}"


def test_wheel_installs_and_imports(wheel: Path, tmp_path: Path) -> None:
    """A regular (non-editable) install of the wheel imports kvmesh.codecs, not the stdlib's codecs."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)], check=True)
    code = (
        "import sys; sys.path.insert(0, %r); "
        "import kvmesh, kvmesh.codecs, kvmesh.controller, kvmesh.instance_agent.keys, kvmesh.api.agent.v1.agent_pb2 as a; "
        "import codecs; assert codecs.__file__.startswith(sys.base_prefix) or 'lib/python' in codecs.__file__; "
        "assert kvmesh.__file__.startswith(%r), kvmesh.__file__; print('ok')"
    ) % (str(target), str(target))
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
