"""The agent and a real controller (in-process, gRPC on loopback): registration, heartbeats,
admit/evict reports feeding the controller's lookup, re-registration after a restart or a drop."""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import grpc
import pytest

from kvmesh.api.agent.v1 import agent_pb2
from kvmesh.api.controller.v1 import controller_pb2 as cpb
from kvmesh.api.controller.v1 import controller_pb2_grpc
from kvmesh.controller.server import ControllerServer
from kvmesh.controller.settings import ControllerSettings
from kvmesh.instance_agent.tensors import to_proto

from .conftest import CPU, DISK, make_config, make_kv, stub_for


async def start_controller(port: int = 0) -> ControllerServer:
    server = ControllerServer(ControllerSettings(host="127.0.0.1", port=0, monitor_port=port,
                                                 health_check_interval=0.1, shutdown_grace=0.5,
                                                 event_db=":memory:", min_chunk_size=4))
    await server.start()
    return server


async def eventually(check: Callable[[], Any], until: Callable[[Any], bool] = bool, timeout: float = 30.0) -> Any:
    """Poll the async ``check`` until ``until(result)`` holds (or raise with the last result)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = await check()
        except grpc.aio.AioRpcError as err:
            last = err
        if not isinstance(last, Exception) and until(last):
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"condition not met in {timeout}s; last: {last}")


def lookup(ctl_stub: controller_pb2_grpc.ControllerStub, tokens: list[int]) -> Callable[[], Any]:
    async def check() -> dict[tuple[str, str], int]:
        resp = await ctl_stub.Lookup(cpb.LookupRequest(tokens=tokens), timeout=5)
        return {(m.instance_id, m.location): m.num_tokens for m in resp.matches}
    return check


async def workers(ctl_stub: controller_pb2_grpc.ControllerStub) -> list[cpb.WorkerInfo]:
    resp = await ctl_stub.QueryWorkerInfo(cpb.QueryWorkerInfoRequest(instance_id="all"), timeout=5)
    return [w for w in resp.worker_infos if w.state == "up"]


@pytest.fixture
async def controller() -> Any:
    servers: list[ControllerServer] = []

    async def start(port: int = 0) -> ControllerServer:
        s = await start_controller(port)
        servers.append(s)
        return s

    yield start
    for s in servers:
        if s._grpc is not None:
            await s.stop()


async def test_register_report_and_reregister_after_restart(agents, controller, tmp_path: Path) -> None:
    ctl = await controller()
    port = ctl.grpc_port
    agent = await agents(make_config(tmp_path, enable_controller=True, controller_pull_url=f"127.0.0.1:{port}",
                                     lmcache_worker_heartbeat_time=0.2))
    a_channel, a_stub = stub_for(agent)
    c_channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
    ctl_stub = controller_pb2_grpc.ControllerStub(c_channel)
    try:
        [info] = await eventually(lambda: workers(ctl_stub))
        assert (info.instance_id, info.worker_id, info.port) == ("test_instance", 0, agent.grpc_port)
        assert info.chunk_size == 4 and set(info.locations) == {CPU, DISK} and "lossless" in info.methods
        assert info.peer_init_url.endswith(f":{agent.grpc_port}")
        await eventually(lambda: _is_connected(agent))
        assert agent.metrics.controller_connected._value.get() == 1

        # Admits feed the controller's lookup, with the same keys.
        first = list(range(10))
        await a_stub.PutChunks(agent_pb2.PutChunksRequest(location=CPU, tokens=first, kv=to_proto(make_kv(10))))
        await eventually(lookup(ctl_stub, first), lambda r: r == {("test_instance", CPU): 10})
        # Evictions (here: a clear of the sequence's chunks) take them out again.
        cleared = await a_stub.Clear(agent_pb2.ClearRequest(location=CPU, tokens=first))
        assert cleared.num_chunks == 3
        await eventually(lookup(ctl_stub, first), lambda r: r == {})
        await a_stub.PutChunks(agent_pb2.PutChunksRequest(location=CPU, tokens=first[:8], kv=to_proto(make_kv(8))))
        await eventually(lookup(ctl_stub, first), lambda r: r == {("test_instance", CPU): 8})

        # The controller goes away: the agent keeps serving, and stores more meanwhile.
        await c_channel.close()
        await ctl.stop()
        second = list(range(100, 106))
        await a_stub.PutChunks(agent_pb2.PutChunksRequest(location=DISK, tokens=second, kv=to_proto(make_kv(6))))
        await eventually(lambda: _is_disconnected(agent))

        # A new controller on the same port knows nothing; the agent registers again and resends its index.
        ctl2 = await controller(port)
        c_channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        ctl_stub = controller_pb2_grpc.ControllerStub(c_channel)
        await eventually(lambda: workers(ctl_stub))
        await eventually(lookup(ctl_stub, first), lambda r: r == {("test_instance", CPU): 8})
        await eventually(lookup(ctl_stub, second), lambda r: r == {("test_instance", DISK): 6})
        assert agent._link.registrations >= 2
        del ctl2
    finally:
        await a_channel.close()
        await c_channel.close()


async def test_heartbeat_answered_unregistered_triggers_reregistration(agents, controller, tmp_path: Path) -> None:
    ctl = await controller()
    agent = await agents(make_config(tmp_path, enable_controller=True,
                                     controller_pull_url=f"127.0.0.1:{ctl.grpc_port}",
                                     lmcache_worker_heartbeat_time=0.2))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ctl.grpc_port}") as channel:
        ctl_stub = controller_pb2_grpc.ControllerStub(channel)
        await eventually(lambda: workers(ctl_stub))
        tokens = list(range(8))
        await agent.store(tokens, make_kv(8))
        await eventually(lookup(ctl_stub, tokens), lambda r: r == {("test_instance", CPU): 8})
        before = agent._link.registrations
        # The controller forgets the worker (as after a restart that kept its port open).
        await ctl_stub.DeregisterWorker(cpb.DeregisterWorkerRequest(instance_id="test_instance", worker_id=0,
                                                                    secret=agent._link.secret))
        await eventually(lambda: _more_registrations(agent, before))
        await eventually(lookup(ctl_stub, tokens), lambda r: r == {("test_instance", CPU): 8})


async def test_unreachable_controller_never_blocks_the_agent(agents, tmp_path: Path) -> None:
    from tests.support import free_port

    agent = await agents(make_config(tmp_path, enable_controller=True,
                                     controller_pull_url=f"127.0.0.1:{free_port()}",
                                     lmcache_worker_heartbeat_time=0.2))
    channel, stub = stub_for(agent)
    async with channel:
        resp = await stub.PutChunks(agent_pb2.PutChunksRequest(tokens=list(range(8)), kv=to_proto(make_kv(8))),
                                    timeout=10)
        assert resp.num_tokens == 8
        assert (await stub.Health(agent_pb2.HealthRequest(), timeout=10)).error_code == 0
    assert not agent.controller_connected
    started = time.monotonic()
    await agent.stop(grace=0.5)
    assert time.monotonic() - started < 10, "stopping must not wait on the controller"


async def _is_connected(agent: Any) -> bool:
    return agent.controller_connected


async def _is_disconnected(agent: Any) -> bool:
    return not agent.controller_connected


async def _more_registrations(agent: Any, before: int) -> bool:
    return agent._link.registrations > before


async def test_full_resync_goes_in_batches_and_completes_the_index(agents, controller, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from kvmesh.instance_agent import controller_link

    monkeypatch.setattr(controller_link, "MAX_EVENTS_PER_REPORT", 2)
    ctl = await controller()
    agent = await agents(make_config(tmp_path, enable_controller=True,
                                     controller_pull_url=f"127.0.0.1:{ctl.grpc_port}",
                                     lmcache_worker_heartbeat_time=0.2))
    async with grpc.aio.insecure_channel(f"127.0.0.1:{ctl.grpc_port}") as channel:
        ctl_stub = controller_pb2_grpc.ControllerStub(channel)
        await eventually(lambda: workers(ctl_stub))
        # The controller lists the worker before the agent has read RegisterWorker's answer (its secret).
        await eventually(lambda: asyncio.sleep(0, agent._link.secret))
        tokens = list(range(20))  # 5 chunks of 4: three reports of at most 2
        await agent.store(tokens, make_kv(20))
        before = agent._link.registrations
        await ctl_stub.DeregisterWorker(cpb.DeregisterWorkerRequest(instance_id="test_instance", worker_id=0,
                                                                    secret=agent._link.secret))
        await eventually(lambda: _more_registrations(agent, before))
        await eventually(lookup(ctl_stub, tokens), lambda r: r == {("test_instance", CPU): 20})
        worker = ctl.service.registry.get("test_instance", 0)
        assert worker.index_complete and worker.index_entries == 5


async def test_a_late_controller_keeps_the_registration(agents, controller, tmp_path: Path) -> None:
    ctl = await controller()
    agent = await agents(make_config(tmp_path, enable_controller=True,
                                     controller_pull_url=f"127.0.0.1:{ctl.grpc_port}",
                                     lmcache_worker_heartbeat_time=0.2))
    await eventually(lambda: _is_connected(agent))
    link = agent._link
    before, secret = link.registrations, link.secret
    # A deadline missed (a busy controller) is retried without registering again.
    err = grpc.aio.AioRpcError(grpc.StatusCode.DEADLINE_EXCEEDED, grpc.aio.Metadata(), grpc.aio.Metadata(), "late")
    assert link._still_registered_after(err)
    refused = grpc.aio.AioRpcError(grpc.StatusCode.PERMISSION_DENIED, grpc.aio.Metadata(), grpc.aio.Metadata(), "no")
    assert not link._still_registered_after(refused)
    assert link.registrations == before and link.secret == secret and agent.controller_connected
