"""Every RPC of the Controller and InstanceAgent services, enumerated from their descriptors (a new
RPC is covered without editing this file), called on real servers on loopback: with no token and
with a wrong one UNAUTHENTICATED, with the right one anything else. Health stays open; a caller
without the token changes nothing; controller and agents reach each other with the token; a bind
beyond loopback without a token is refused at start with the how-to message."""
from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvmesh.api.agent.v1 import agent_pb2, agent_pb2_grpc
from kvmesh.api.common.v1 import common_pb2
from kvmesh.api.controller.v1 import controller_pb2 as pb
from kvmesh.api.controller.v1 import controller_pb2_grpc
from kvmesh.controller.server import ControllerServer
from kvmesh.controller.settings import ControllerSettings
from kvmesh.core.auth import BindRefused
from kvmesh.core.channels import channel
from kvmesh.core.security import SecuritySettings
from tests.controller.harness import ControllerThread
from tests.security.conftest import (AGENT_SERVICE, CONTROLLER_SERVICE, TOKEN, WRONG_TOKEN, AgentThread,
                                     agent_config, bearer, call_code, poll)

RIGHT = SecuritySettings(token=TOKEN)


@pytest.fixture(scope="module")
def controller() -> Iterator[ControllerThread]:
    with ControllerThread(security=RIGHT) as c:
        yield c


@pytest.fixture(scope="module")
def agent(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AgentThread]:
    token_file = tmp_path_factory.mktemp("agent-token") / "token"
    token_file.write_text(TOKEN)
    with AgentThread(agent_config(extra_config={"auth_token_file": str(token_file)})) as a:
        yield a


def _target(which: str, controller: ControllerThread, agent: AgentThread) -> str:
    return controller.grpc_target if which == "controller" else agent.target


RPCS = [pytest.param("controller", m, id=f"Controller.{m.name}") for m in CONTROLLER_SERVICE.methods] + \
       [pytest.param("agent", m, id=f"InstanceAgent.{m.name}") for m in AGENT_SERVICE.methods]


@pytest.fixture
def servers(request: pytest.FixtureRequest) -> Callable[[str], str]:
    def target(which: str) -> str:
        return _target(which, request.getfixturevalue("controller"), request.getfixturevalue("agent"))
    return target


@pytest.mark.parametrize("which,method", RPCS)
def test_no_token_is_unauthenticated(servers: Callable[[str], str], which: str, method) -> None:
    with grpc.insecure_channel(servers(which)) as ch:
        assert call_code(ch, method) == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("which,method", RPCS)
def test_wrong_token_is_unauthenticated(servers: Callable[[str], str], which: str, method) -> None:
    with grpc.insecure_channel(servers(which)) as ch:
        assert call_code(ch, method, bearer(WRONG_TOKEN)) == grpc.StatusCode.UNAUTHENTICATED
        assert call_code(ch, method, (("authorization", TOKEN),)) == grpc.StatusCode.UNAUTHENTICATED
        assert call_code(ch, method, (("authorization", f"Basic {TOKEN}"),)) == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize("which,method", RPCS)
def test_right_token_is_let_in(servers: Callable[[str], str], which: str, method) -> None:
    # Through the mesh's own channel factory, which adds the token to every call.
    with channel(servers(which), RIGHT) as ch:
        assert call_code(ch, method) != grpc.StatusCode.UNAUTHENTICATED
    with grpc.insecure_channel(servers(which)) as ch:
        assert call_code(ch, method, bearer(TOKEN)) != grpc.StatusCode.UNAUTHENTICATED


def test_every_rpc_is_enumerated() -> None:
    assert len(RPCS) == len(CONTROLLER_SERVICE.methods) + len(AGENT_SERVICE.methods) >= 30


@pytest.mark.parametrize("which", ["controller", "agent"])
def test_health_stays_open(servers: Callable[[str], str], which: str) -> None:
    with grpc.insecure_channel(servers(which)) as ch:
        stub = health_pb2_grpc.HealthStub(ch)
        assert stub.Check(health_pb2.HealthCheckRequest(), timeout=10).status == health_pb2.HealthCheckResponse.SERVING
        listed = stub.List(health_pb2.HealthListRequest(), timeout=10).statuses
        service = CONTROLLER_SERVICE if which == "controller" else AGENT_SERVICE
        assert listed[service.full_name].status == health_pb2.HealthCheckResponse.SERVING
        assert listed[""].status == health_pb2.HealthCheckResponse.SERVING


def test_a_caller_without_the_token_changes_and_reads_nothing(agent: AgentThread) -> None:
    tokens = list(range(500, 512))
    kv = common_pb2.Tensor(dtype="float32", shape=[2, 1, 12, 4], data=bytes(range(96)) * 4)
    with channel(agent.target, RIGHT) as ch:
        stub = agent_pb2_grpc.InstanceAgentStub(ch)
        assert stub.PutChunks(agent_pb2.PutChunksRequest(tokens=tokens, kv=kv), timeout=10).num_tokens == 12
    zeros = common_pb2.Tensor(dtype="float32", shape=[2, 1, 12, 4], data=bytes(384))
    with grpc.insecure_channel(agent.target) as ch:
        hostile = agent_pb2_grpc.InstanceAgentStub(ch)
        for attempt in (lambda: hostile.Clear(agent_pb2.ClearRequest(), timeout=10),
                        lambda: hostile.PutChunks(agent_pb2.PutChunksRequest(tokens=tokens, kv=zeros, overwrite=True),
                                                  timeout=10),
                        lambda: hostile.GetChunks(agent_pb2.GetChunksRequest(tokens=tokens), timeout=10)):
            with pytest.raises(grpc.RpcError) as info:
                attempt()
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    with channel(agent.target, RIGHT) as ch:
        got = agent_pb2_grpc.InstanceAgentStub(ch).GetChunks(agent_pb2.GetChunksRequest(tokens=tokens), timeout=10)
    assert got.num_tokens == 12 and got.kv.data == kv.data


def test_controller_and_agent_work_together_with_the_token(tmp_path: Path, token_file: Path,
                                                           agent_thread: Callable[..., AgentThread]) -> None:
    with ControllerThread(security=RIGHT) as ctl:
        a = agent_thread(agent_config(lmcache_instance_id="sec_pair", enable_controller=True,
                                      controller_pull_url=ctl.grpc_target,
                                      extra_config={"auth_token_file": str(token_file)}))
        with channel(ctl.grpc_target, RIGHT) as ch:
            stub = controller_pb2_grpc.ControllerStub(ch)
            poll("the agent registers through its token", lambda: _workers(stub, "sec_pair"))
            # The controller reaches the agent through its own token (AgentPool's channels).
            health = stub.Health(pb.HealthRequest(instance_id="sec_pair"), timeout=10)
            assert health.healthy, health
        assert a.agent._link.registrations >= 1


def test_an_agent_with_a_wrong_token_cannot_register(tmp_path: Path,
                                                      agent_thread: Callable[..., AgentThread]) -> None:
    wrong = tmp_path / "wrong"
    wrong.write_text(WRONG_TOKEN)
    with ControllerThread(security=RIGHT) as ctl:
        a = agent_thread(agent_config(lmcache_instance_id="sec_impostor", enable_controller=True,
                                      controller_pull_url=ctl.grpc_target, extra_config={"auth_token_file": str(wrong)}))
        poll("the link's first refusal", lambda: a.agent._link._failing)
        with channel(ctl.grpc_target, RIGHT) as ch:
            assert _workers(controller_pb2_grpc.ControllerStub(ch), "sec_impostor") == []
        assert a.agent._link.registrations == 0


def test_a_controller_without_the_agents_token_is_refused_by_the_agent(
        token_file: Path, agent_thread: Callable[..., AgentThread]) -> None:
    with ControllerThread() as ctl:  # no token: the agent can register, but the controller's calls fail
        agent_thread(agent_config(lmcache_instance_id="sec_locked", enable_controller=True,
                                  controller_pull_url=ctl.grpc_target, extra_config={"auth_token_file": str(token_file)}))
        with grpc.insecure_channel(ctl.grpc_target) as ch:
            stub = controller_pb2_grpc.ControllerStub(ch)
            poll("the agent registers", lambda: _workers(stub, "sec_locked"))
            health = stub.Health(pb.HealthRequest(instance_id="sec_locked"), timeout=10)
    assert not health.healthy and "UNAUTHENTICATED" in " ".join(health.errors.values()), health


def _workers(stub: controller_pb2_grpc.ControllerStub, instance_id: str) -> list[pb.WorkerInfo]:
    """The workers registered under ``instance_id`` ([] while it is unknown: NOT_FOUND)."""
    try:
        return list(stub.QueryWorkerInfo(pb.QueryWorkerInfoRequest(instance_id=instance_id), timeout=10).worker_infos)
    except grpc.RpcError as err:
        if err.code() == grpc.StatusCode.NOT_FOUND:
            return []
        raise


HOW_TO = ("without an auth token", "secrets.token_urlsafe", "--auth-token-file", "--insecure")


async def test_controller_refuses_a_public_bind_without_token() -> None:
    server = ControllerServer(ControllerSettings(host="0.0.0.0", port=0, monitor_port=0))
    with pytest.raises(BindRefused) as info:
        await server.start()
    assert all(part in str(info.value) for part in HOW_TO), str(info.value)
    await server.stop()


def test_agent_refuses_a_public_bind_without_token() -> None:
    with pytest.raises(BindRefused) as info:
        AgentThread(agent_config(), host="0.0.0.0").__enter__()
    assert all(part in str(info.value) for part in HOW_TO), str(info.value)


def test_the_controller_process_refuses_a_public_bind_without_token() -> None:
    proc = subprocess.run([sys.executable, "-m", "kvmesh.controller", "--host", "0.0.0.0", "--port", "0",
                           "--monitor-port", "0"], capture_output=True, text=True, timeout=60,
                          env={"PATH": "/usr/bin:/bin"})
    assert proc.returncode == 1, proc.stderr
    assert all(part in proc.stderr for part in HOW_TO), proc.stderr


def test_the_controller_process_rejects_an_unreadable_token_file(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "kvmesh.controller", "--auth-token-file", str(tmp_path / "none"),
                           "--port", "0", "--monitor-port", "0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "cannot read the auth token file" in proc.stderr, proc.stderr


def test_move_between_agents_carries_the_token(token_file: Path, agent_thread: Callable[..., AgentThread]) -> None:
    extra = {"auth_token_file": str(token_file)}
    source = agent_thread(agent_config(lmcache_instance_id="sec_src", extra_config=extra))
    target = agent_thread(agent_config(lmcache_instance_id="sec_dst", extra_config=extra))
    tokens = list(range(700, 708))
    kv = common_pb2.Tensor(dtype="float32", shape=[2, 1, 8, 4], data=bytes(range(64)) * 4)
    with channel(source.target, RIGHT) as ch:
        src = agent_pb2_grpc.InstanceAgentStub(ch)
        src.PutChunks(agent_pb2.PutChunksRequest(tokens=tokens, kv=kv), timeout=10)
        final = [m for m in src.Move(agent_pb2.MoveRequest(location="LocalCPUBackend", tokens=tokens,
                                                           target_url=target.target, copy=True), timeout=30)
                 if m.final][0]
    assert final.error == "" and final.chunks_done == 2, final
    with channel(target.target, RIGHT) as ch:
        got = agent_pb2_grpc.InstanceAgentStub(ch).GetChunks(agent_pb2.GetChunksRequest(tokens=tokens), timeout=10)
    assert got.num_tokens == 8 and got.kv.data == kv.data


def test_the_agents_metrics_port_needs_the_token(token_file: Path, agent_thread: Callable[..., AgentThread]) -> None:
    """An agent's own /metrics (port 9101 + worker id) is one of its planes: the token, as Prometheus
    sends it (``authorization`` in the scrape config), or 401."""
    import urllib.error
    import urllib.request

    agent = agent_thread(agent_config(lmcache_instance_id="sec_metrics",
                                      extra_config={"auth_token_file": str(token_file)}), metrics_port=0)
    url = f"http://127.0.0.1:{agent.agent.metrics_port}/metrics"
    for headers in ({}, {"Authorization": f"Bearer {WRONG_TOKEN}"}, {"Authorization": "Basic x"}):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=10)
        assert refused.value.code == 401 and refused.value.headers["WWW-Authenticate"] == "Bearer"
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Authorization": f"Bearer {TOKEN}"}),
                                timeout=10) as ok:
        assert ok.status == 200 and b"kvmesh_agent_chunks" in ok.read()


def test_the_controller_drives_streamed_agent_calls_with_the_token(
        token_file: Path, agent_thread: Callable[..., AgentThread]) -> None:
    """Compress is a server stream from the controller to the agent: the token must ride on streamed
    calls of the asyncio channels too, not only on unary ones (grpc.aio files an interceptor under one
    call kind only)."""
    security = SecuritySettings.load(token_file=token_file)
    with ControllerThread(security=security, min_chunk_size=4) as c:
        agent = agent_thread(agent_config(lmcache_instance_id="sec_stream", enable_controller=True,
                                          controller_pull_url=c.grpc_target,
                                          extra_config={"auth_token_file": str(token_file)}))
        poll("the agent registers", lambda: [w for w in c.stub.QueryWorkerInfo(
            pb.QueryWorkerInfoRequest(instance_id="all"), timeout=5).worker_infos if w.instance_id == "sec_stream"])
        tokens = list(range(900, 908))
        kv = common_pb2.Tensor(dtype="float32", shape=[2, 1, 8, 4], data=bytes(range(64)) * 4)
        with channel(agent.target, security) as ch:
            agent_pb2_grpc.InstanceAgentStub(ch).PutChunks(agent_pb2.PutChunksRequest(tokens=tokens, kv=kv),
                                                           timeout=10)
        for op, request in ((c.stub.Compress, pb.CompressRequest), (c.stub.Decompress, pb.DecompressRequest)):
            started = op(request(instance_id="sec_stream", method="lossless", location="LocalCPUBackend",
                                 tokens=tokens), timeout=10)
            event = c.wait_event(started.event_id).event
            assert event.status == common_pb2.COMPLETED and event.chunks_done == 2, event.error
