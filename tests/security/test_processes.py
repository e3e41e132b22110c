"""``kvmesh-controller`` and ``kvmesh-agent`` as real processes with the token and mTLS from their
flags: the agent registers with the controller, every call needs the token, health stays open;
and ``kvmesh-agent`` refuses a public bind without a token."""
from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmesh.api.agent.v1 import agent_pb2, agent_pb2_grpc
from kvmesh.api.controller.v1 import controller_pb2 as pb
from kvmesh.api.controller.v1 import controller_pb2_grpc
from kvmesh.core.channels import channel
from kvmesh.core.security import SecuritySettings
from tests.security.conftest import mtls, poll
from tests.support import REPO, console_script, free_port, running

pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("KVMESH_", "LMCACHE_"))}


def _wait_serving(target: str, security: SecuritySettings, proc: subprocess.Popen, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    with channel(target, security) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"the process exited with {proc.returncode}"
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=2).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise AssertionError(f"{target} not SERVING after {timeout}s")


def test_controller_and_agent_processes_with_token_and_mtls(tmp_path: Path, certs: Path, token_file: Path) -> None:
    c_port, a_port = free_port(), free_port()
    tls = ["--tls-cert", str(certs / "server.crt"), "--tls-key", str(certs / "server.key"),
           "--tls-ca", str(certs / "ca.crt")]
    yaml = tmp_path / "agent.yaml"
    yaml.write_text(f"chunk_size: 4\nmax_local_cpu_size: 0.01\nlmcache_instance_id: sec_proc\n"
                    f"lmcache_worker_ports: {a_port}\nenable_controller: true\n"
                    f"controller_pull_url: localhost:{c_port}\nlmcache_worker_heartbeat_time: 0.5\n"
                    f"extra_config:\n  auth_token_file: {token_file}\n")
    operator = mtls(certs, who="client")
    with running([console_script("kvmesh-controller"), "--port", "0", "--monitor-port", str(c_port),
                  "--auth-token-file", str(token_file), "--min-chunk-size", "4", *tls], env=_env(),
                 log=tmp_path / "c.log") as ctl, \
         running([console_script("kvmesh-agent"), "--config", str(yaml), "--metrics-port", "-1", *tls],
                 env=_env(), log=tmp_path / "a.log") as agent:
        _wait_serving(f"localhost:{c_port}", mtls(certs, who="client", token=None), ctl)
        _wait_serving(f"localhost:{a_port}", mtls(certs, who="client", token=None), agent)
        with channel(f"localhost:{c_port}", operator) as ch:
            stub = controller_pb2_grpc.ControllerStub(ch)

            def registered() -> bool:
                try:
                    return bool(stub.QueryWorkerInfo(pb.QueryWorkerInfoRequest(instance_id="sec_proc"),
                                                     timeout=5).worker_infos)
                except grpc.RpcError as err:
                    assert err.code() == grpc.StatusCode.NOT_FOUND, err
                    return False

            poll("the agent process registers over mTLS with its token", registered, timeout=60)
            assert stub.Health(pb.HealthRequest(instance_id="sec_proc"), timeout=10).healthy
        with channel(f"localhost:{a_port}", operator) as ch:
            assert agent_pb2_grpc.InstanceAgentStub(ch).Stats(agent_pb2.StatsRequest(), timeout=10).instance_id == \
                "sec_proc"
        with channel(f"localhost:{a_port}", mtls(certs, who="client", token=None)) as ch:
            with pytest.raises(grpc.RpcError) as info:
                agent_pb2_grpc.InstanceAgentStub(ch).Stats(agent_pb2.StatsRequest(), timeout=10)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    for log in ("c.log", "a.log"):
        text = (tmp_path / log).read_text()
        assert token_file.read_text().strip() not in text, f"the token leaked into {log}"


def test_agent_process_refuses_a_public_bind_without_token(tmp_path: Path) -> None:
    proc = subprocess.run([console_script("kvmesh-agent"), "--config", str(REPO / "example.yaml"), "--host", "0.0.0.0",
                           "--metrics-port", "-1"], env={**_env(), "LMCACHE_ENABLE_CONTROLLER": "false",
                                                         "LMCACHE_LMCACHE_WORKER_PORTS": str(free_port())},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "without an auth token" in proc.stderr and "secrets.token_urlsafe" in proc.stderr, proc.stderr
