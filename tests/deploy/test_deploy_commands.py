"""The commands the manifests and the compose file run are ones the real console scripts accept, and
the vLLM connector they name exists."""
from __future__ import annotations

import ast
import functools
import re
import subprocess

import pytest
import yaml

from tests.deploy.deploy_support import DEPLOY, REPO
from tests.deploy.kustomize import pod_containers, render
from tests.support import console_script

ROLES = {"controller": "kvmesh-controller", "agent": "kvmesh-agent", "serve": "kvmesh-serve"}


@functools.cache
def help_text(script: str) -> str:
    out = subprocess.run([console_script(script), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return out.stdout


def commands() -> list[tuple[str, list[str]]]:
    """(where, entrypoint arguments) of every kvmesh container in the overlays and the compose file."""
    out = []
    for overlay in ("cpu", "gpu-vllm"):
        for res in render(DEPLOY / "kubernetes" / "overlays" / overlay):
            for c in pod_containers(res):
                if c["image"].startswith("kvmesh/"):  # not third-party images (Redis)
                    out.append((f"{overlay}: {res['kind']} {res['metadata']['name']}", c["args"]))
    compose = yaml.safe_load((DEPLOY / "compose" / "compose.yaml").read_text())
    for name, svc in compose["services"].items():
        if svc["image"].startswith("kvmesh/"):
            out.append((f"compose: {name}", svc["command"]))
    return out


@pytest.mark.parametrize("where,args", commands(), ids=[w for w, _ in commands()])
def test_flags_are_accepted_by_the_real_cli(where: str, args: list[str]) -> None:
    if args[0] not in ROLES:
        assert args[:2] == ["vllm", "serve"], f"{where}: unknown command {args}"
        pytest.skip("vLLM is not installed here: its flags are vLLM's own (documented in deploy/README.md)")
    text = help_text(ROLES[args[0]])
    for flag in (a for a in args[1:] if a.startswith("--")):
        assert re.search(rf"(^|\s){re.escape(flag)}\b", text), f"{where}: {ROLES[args[0]]} has no {flag}"


def test_the_vllm_connector_named_by_the_gpu_overlay_exists() -> None:
    path = REPO / "engine" / "vllm_connector.py"
    if not path.exists():
        pytest.skip("engine/vllm_connector.py (kvmesh.engine.vllm_connector) does not exist yet; "
                    "the gpu-vllm overlay and the CUDA image name it")
    classes = {n.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ClassDef)}
    assert "KVMeshConnector" in classes
