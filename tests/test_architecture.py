"""Which part of kvmesh may import which: the import-linter contracts of ``.importlinter``, and the
controller's process loading no torch.

import-linter finds modules by walking the root package's folder, but kvmesh's folders map into the
namespace through setup.py (``controller/`` -> ``kvmesh.controller``, ...). So the sources are copied
into a temporary ``kvmesh/`` laid out as installed, and ``lint-imports`` runs once on that copy; each
contract is one test.
"""
from __future__ import annotations

import ast
import configparser
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import REPO

CONFIG = REPO / ".importlinter"


def _roots() -> dict[str, str]:
    """setup.py's ROOTS (package -> folder), read without running setup.py."""
    tree = ast.parse((REPO / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "ROOTS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("setup.py has no ROOTS mapping")


def _contracts() -> dict[str, str]:
    """contract id -> its name, from .importlinter."""
    parser = configparser.ConfigParser()
    parser.read(CONFIG)
    prefix = "importlinter:contract:"
    return {s[len(prefix):]: parser[s]["name"] for s in parser.sections() if s.startswith(prefix)}


@pytest.fixture(scope="module")
def lint_report(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The output of one ``lint-imports`` run over the installed layout of the sources."""
    root = tmp_path_factory.mktemp("layout")
    for package, folder in sorted(_roots().items()):
        dest = root.joinpath(*package.split("."))
        shutil.copytree(REPO / folder, dest, dirs_exist_ok=True,
                        ignore=lambda d, names: [n for n in names if n == "__pycache__" or
                                                 (not n.endswith((".py", ".pyi")) and not (Path(d) / n).is_dir())])
    proc = subprocess.run(
        [sys.executable, "-c", "import sys; from importlinter.cli import lint_imports_command; "
                               "sys.exit(lint_imports_command())",
         "--config", str(CONFIG), "--no-cache", "--verbose"],
        cwd=root, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert "Contracts:" in out or "KEPT" in out or "BROKEN" in out, f"lint-imports did not run:\n{out}"
    # The copy, not the editable install, was analysed (otherwise controller & co. are invisible).
    assert "kvmesh.controller" in out or proc.returncode in (0, 1), out
    return out


def _verdict(report: str, name: str) -> str:
    m = re.search(rf"^{re.escape(name)}\s+(KEPT|BROKEN)\s*$", report, re.MULTILINE)
    assert m, f"contract {name!r} is missing from the lint-imports report:\n{report}"
    return m.group(1)


CONTRACTS = _contracts()
@pytest.mark.parametrize("contract", list(CONTRACTS))
def test_import_contract_is_kept(lint_report: str, contract: str) -> None:
    name = CONTRACTS[contract]
    assert _verdict(lint_report, name) == "KEPT", f"{name}: BROKEN\n{lint_report}"


def test_the_contracts_cover_the_agreed_rules() -> None:
    assert {"codecs-standalone", "controller-no-torch", "core-bottom", "agent-not-controller",
            "engine-not-controller"} <= set(CONTRACTS)


def test_the_copy_holds_every_part(lint_report: str) -> None:
    """A layout mistake would make every contract trivially kept: the graph must hold every part."""
    counts = re.search(r"Analyzed (\d+) files, (\d+) dependencies", lint_report)
    assert counts, lint_report
    assert int(counts.group(1)) > 60, lint_report


def test_the_controller_process_loads_no_torch() -> None:
    code = ("import sys; import kvmesh.controller.__main__, kvmesh.controller.server, kvmesh.controller.cli; "
            "bad = sorted(m for m in ('torch', 'triton', 'kvmesh.codecs', 'kvmesh.instance_agent.agent') "
            "if m in sys.modules); print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"the controller loaded {proc.stdout.strip()} {proc.stderr[-2000:]}"
