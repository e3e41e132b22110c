"""deploy/docker: the Dockerfiles pass hadolint and kvmesh's own rules (pinned, multi-stage, small,
non-root, health-checked); the entrypoint and the healthcheck behave (against the real mesh).
No Docker engine runs here: the images are linted, their build is documented in deploy/README.md."""
from __future__ import annotations

import fnmatch
import importlib.util
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.deploy.mesh import Mesh
from tests.deploy.deploy_support import DEPLOY, REPO, tool
from tests.support import free_port

DOCKER = DEPLOY / "docker"
DOCKERFILES = ["Dockerfile.cpu", "Dockerfile.cuda"]
BUILD_TOOLS = {"gcc", "g++", "build-essential", "make", "git", "cmake", "clang", "curl", "wget"}


@dataclass
class Instruction:
    line: int
    op: str
    args: str


def instructions(path: Path) -> list[Instruction]:
    """The Dockerfile's instructions, continuation lines joined and comments dropped."""
    out: list[Instruction] = []
    pending, start = "", 0
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if not pending:
            start = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        text = pending + line
        pending = ""
        op, _, args = text.partition(" ")
        out.append(Instruction(start, op.upper(), args.strip()))
    return out


def stages(path: Path) -> list[list[Instruction]]:
    out: list[list[Instruction]] = []
    for ins in instructions(path):
        if ins.op == "FROM":
            out.append([])
        if out:
            out[-1].append(ins)
    return out


@pytest.mark.parametrize("name", DOCKERFILES)
def test_hadolint(name: str) -> None:
    hadolint = tool("hadolint")
    out = subprocess.run([hadolint, "--no-color", str(DOCKER / name)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("name", DOCKERFILES)
def test_base_images_are_pinned_and_multi_stage(name: str) -> None:
    froms = [i for i in instructions(DOCKER / name) if i.op == "FROM"]
    assert len(froms) >= 2, "multi-stage: build tools stay in the build stage"
    stage_names = set()
    for ins in froms:
        image, *rest = ins.args.split()
        if image in stage_names:
            continue
        repo, _, tag = image.partition(":")
        assert tag and tag != "latest" and re.search(r"\d+\.\d+", tag), f"line {ins.line}: {image} is not pinned"
        if rest:
            assert rest[0].upper() == "AS"
            stage_names.add(rest[1])


@pytest.mark.parametrize("name", DOCKERFILES)
def test_final_stage_is_small_unprivileged_and_healthchecked(name: str) -> None:
    all_ins = instructions(DOCKER / name)
    final = stages(DOCKER / name)[-1]
    ops = [i.op for i in final]
    users = [i.args for i in final if i.op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the final stage runs as a non-root user"
    assert "HEALTHCHECK" in ops and "ENTRYPOINT" in ops
    assert next(i for i in final if i.op == "ENTRYPOINT").args == '["kvmesh-entrypoint"]'
    assert not any(i.op == "ADD" for i in all_ins), "COPY, not ADD (no remote URLs, no auto-extraction)"
    for ins in all_ins:
        if ins.op == "RUN" and re.search(r"\bpip3? install\b", ins.args):
            assert "--no-cache-dir" in ins.args, f"line {ins.line}: pip without --no-cache-dir"
        if ins.op == "RUN" and "apt-get install" in ins.args:
            assert "--no-install-recommends" in ins.args and "rm -rf /var/lib/apt/lists" in ins.args, ins.line
    installed = {w.split("=")[0] for i in final if i.op == "RUN" and "apt-get install" in i.args
                 for w in i.args.split("apt-get install", 1)[1].split() if not w.startswith("-")}
    # The CUDA image keeps gcc for Triton's launcher builds (said in the Dockerfile); nothing else builds.
    allowed = {"gcc"} if name == "Dockerfile.cuda" else set()
    assert not (installed & BUILD_TOOLS) - allowed, f"build tools in the final stage: {installed & BUILD_TOOLS}"
    assert not any(i.op == "RUN" and "pip install" in i.args for i in final), "pip runs in the build stage only"


def test_torch_is_pinned_per_image() -> None:
    cpu = " ".join(i.args for i in instructions(DOCKER / "Dockerfile.cpu") if i.op == "RUN")
    assert re.search(r"--index-url https://download\.pytorch\.org/whl/cpu torch==2\.13\.0\b", cpu)
    cuda = " ".join(i.args for i in instructions(DOCKER / "Dockerfile.cuda") if i.op == "RUN")
    assert re.search(r"\bvllm==\d+\.\d+\.\d+\b", cuda), "vLLM (and with it its CUDA torch) is pinned"
    assert "download.pytorch.org/whl/cpu" not in cuda


@pytest.mark.parametrize("name", DOCKERFILES)
def test_copied_files_exist_and_pass_the_dockerignore(name: str) -> None:
    ignore = [ln.strip() for ln in (DOCKER / f"{name}.dockerignore").read_text().splitlines()
              if ln.strip() and not ln.startswith("#")]

    def included(path: str) -> bool:
        keep = True
        for pattern in ignore:
            negate = pattern.startswith("!")
            pat = pattern.lstrip("!").rstrip("/")
            if pat == "**" or fnmatch.fnmatch(path, pat) or path.startswith(pat + "/") or path == pat:
                keep = negate
        return keep

    for ins in instructions(DOCKER / name):
        if ins.op != "COPY" or "--from=" in ins.args:
            continue
        sources = [w for w in ins.args.split() if not w.startswith("--")][:-1]
        for src in sources:
            assert (REPO / src).exists(), f"line {ins.line}: {src} is not in the repository"
            assert included(src.rstrip("/")), f"line {ins.line}: {src} is excluded by the .dockerignore"


def test_entrypoint_runs_the_named_process_or_a_command(tmp_path: Path) -> None:
    entrypoint = str(DOCKER / "entrypoint.sh")
    assert subprocess.run(["sh", "-n", entrypoint], timeout=10).returncode == 0
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "TMPDIR": str(tmp_path)}
    out = subprocess.run(["sh", entrypoint, "controller", "--help"], capture_output=True, text=True,
                         env=env, timeout=60)
    assert out.returncode == 0 and "kvmesh-controller" in out.stdout, out.stderr
    assert (tmp_path / "kvmesh-role").read_text().strip() == "controller"
    out = subprocess.run(["sh", entrypoint, "echo", "passed", "through"], capture_output=True, text=True,
                         env=env, timeout=10)
    assert out.stdout.strip() == "passed through"


def test_entrypoint_stops_on_an_unreadable_secret(tmp_path: Path) -> None:
    entrypoint = str(DOCKER / "entrypoint.sh")
    token = tmp_path / "token"
    token.write_text("a-token-long-enough-for-kvmesh\n")
    base = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin", "TMPDIR": str(tmp_path)}
    ok = subprocess.run(["sh", entrypoint, "echo", "started"], capture_output=True, text=True, timeout=10,
                        env={**base, "KVMESH_AUTH_TOKEN_FILE": str(token), "KVMESH_TLS_CA_FILE": str(token)})
    assert ok.returncode == 0 and ok.stdout.strip() == "started", ok.stderr
    for var in ("KVMESH_AUTH_TOKEN_FILE", "KVMESH_TLS_CERT_FILE", "KVMESH_TLS_KEY_FILE", "KVMESH_TLS_CA_FILE"):
        out = subprocess.run(["sh", entrypoint, "echo", "started"], capture_output=True, text=True, timeout=10,
                             env={**base, var: str(tmp_path / "missing")})
        assert out.returncode == 2 and not out.stdout, var
        assert f"{var} names {tmp_path / 'missing'}, which is missing" in out.stderr, out.stderr


def _healthcheck_module():
    spec = importlib.util.spec_from_file_location("kvmesh_healthcheck", DOCKER / "healthcheck.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_healthcheck_targets_follow_the_role(tmp_path: Path) -> None:
    hc = _healthcheck_module()
    assert hc.targets_from_env({"KVMESH_HEALTHCHECK": "grpc://a:1, http://b:2/health"}) == \
        ["grpc://a:1", "http://b:2/health"]
    assert hc.targets_from_env({"TMPDIR": str(tmp_path)}) == ["http://127.0.0.1:8000/health"]
    for role, port in (("controller", 9001), ("agent", 8001)):
        (tmp_path / "kvmesh-role").write_text(role + "\n")
        assert hc.targets_from_env({"TMPDIR": str(tmp_path)}) == [f"grpc://127.0.0.1:{port}"]


def test_healthcheck_against_the_running_mesh(mesh: Mesh) -> None:
    script = [sys.executable, str(DOCKER / "healthcheck.py")]
    # The open routes (gRPC health, /healthz) and, with the process's token, a protected one (/metrics).
    healthy = (f"grpc://127.0.0.1:{mesh.grpc_port},grpc://127.0.0.1:{mesh.agent_port},"
               f"http://127.0.0.1:{mesh.http_port}/healthz,http://127.0.0.1:{mesh.http_port}/metrics")
    token = {"KVMESH_AUTH_TOKEN_FILE": str(mesh.token_file)}
    out = subprocess.run(script, env={"KVMESH_HEALTHCHECK": healthy, **token}, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0, out.stderr
    # Without the token the protected route is refused, the open ones are not.
    out = subprocess.run(script, env={"KVMESH_HEALTHCHECK": healthy}, capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and f"{mesh.http_port}/metrics: HTTP Error 401" in out.stderr, out.stderr
    assert out.stderr.count("unhealthy:") == 1, out.stderr
    closed = free_port()
    out = subprocess.run(script, env={"KVMESH_HEALTHCHECK": f"{healthy},grpc://127.0.0.1:{closed}", **token},
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and f"127.0.0.1:{closed}: UNAVAILABLE" in out.stderr, out.stderr
    out = subprocess.run(script, env={"KVMESH_HEALTHCHECK": f"http://127.0.0.1:{mesh.http_port}/no-such-page",
                                      **token}, capture_output=True, text=True, timeout=30)
    assert out.returncode == 1 and "404" in out.stderr, out.stderr
