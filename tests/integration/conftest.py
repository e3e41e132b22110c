"""Mesh fixtures: a real controller and real instance agents (in-process and as processes).

KV goes into the agents through their ``PutChunks`` RPC and comes back through ``GetChunks``, as an
engine's would. The KV is seeded random data in the shape of the embedded engine's model
(SmolLM2-135M: 30 layers, 3 KV heads x 64), fp16; what is checked is the mesh moving and
transforming it exactly as the codec does, which does not depend on the values.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
import yaml

from kvmesh.api.agent.v1 import agent_pb2, agent_pb2_grpc
from kvmesh.instance_agent.agent import EmbeddedAgent
from kvmesh.instance_agent.config import config_from_dict
from kvmesh.instance_agent.tensors import from_proto, to_proto
from tests.controller.harness import ControllerThread
from tests.support import free_port

LOCATION = "LocalCPUBackend"


def method_under_test() -> str:
    """cachegen when the codec registry has it, lossless otherwise (the issue allows the stand-in)."""
    from kvmesh.codecs import available_methods
    return "cachegen" if "cachegen" in available_methods() else "lossless"


def make_kv(num_tokens: int, *, layers: int = 30, channels: int = 192, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    # Channels with different scales, as real K/V have; fp16 like an engine's cache.
    scale = torch.rand(1, layers, 1, channels, generator=g) * 2 + 0.1
    return (torch.randn(2, layers, num_tokens, channels, generator=g) * scale).to(torch.float16)


def wait_until(predicate: Callable[[], Any], timeout: float = 30.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"{what} not met within {timeout}s")


class AgentClient:
    """The InstanceAgent gRPC service of one agent, as an engine talks to it."""

    def __init__(self, target: str) -> None:
        self.target = target
        self._channel = grpc.insecure_channel(target, options=[("grpc.max_receive_message_length", 1 << 30),
                                                               ("grpc.max_send_message_length", 1 << 30)])
        self.stub = agent_pb2_grpc.InstanceAgentStub(self._channel)

    def put(self, tokens: list[int], kv: torch.Tensor, location: str = LOCATION) -> int:
        resp = self.stub.PutChunks(agent_pb2.PutChunksRequest(location=location, tokens=tokens, kv=to_proto(kv)),
                                   timeout=60)
        return resp.num_tokens

    def get(self, tokens: list[int], location: str = LOCATION) -> tuple[int, torch.Tensor | None]:
        resp = self.stub.GetChunks(agent_pb2.GetChunksRequest(location=location, tokens=tokens), timeout=60)
        return resp.num_tokens, (from_proto(resp.kv) if resp.num_tokens else None)

    def stats(self) -> agent_pb2.StatsResponse:
        return self.stub.Stats(agent_pb2.StatsRequest(), timeout=30)

    def location_stats(self, name: str = LOCATION) -> agent_pb2.LocationStats:
        return next(loc for loc in self.stats().locations if loc.name == name)

    def close(self) -> None:
        self._channel.close()


def agent_config(controller_target: str, instance_id: str, *, chunk_size: int, heartbeat: float = 1.0,
                 port: int = 0, **extra: Any) -> dict[str, Any]:
    return {"chunk_size": chunk_size, "local_cpu": True, "max_local_cpu_size": 0.5, "enable_controller": True,
            "lmcache_instance_id": instance_id, "controller_pull_url": controller_target,
            "lmcache_worker_ports": port, "lmcache_worker_heartbeat_time": heartbeat,
            "p2p_host": "127.0.0.1", **extra}


def write_agent_yaml(path: Path, controller_target: str, instance_id: str, *, chunk_size: int,
                     heartbeat: float = 1.0, workers: int = 1) -> list[int]:
    """An agent yaml on free ports; the gRPC ports, one per worker."""
    ports = [free_port() for _ in range(workers)]
    cfg = agent_config(controller_target, instance_id, chunk_size=chunk_size, heartbeat=heartbeat, port=ports[0])
    cfg["lmcache_worker_ports"] = ports
    cfg["p2p_init_ports"] = [free_port() for _ in range(workers)]
    path.write_text(yaml.safe_dump(cfg))
    return ports


def wait_registered(c: ControllerThread, instance_id: str, workers: int = 1, timeout: float = 60.0) -> None:
    def ready() -> bool:
        r = c.post("/query_worker_info", {"instance_id": "all"})
        up = [w for w in r.body["worker_infos"] if w["instance_id"] == instance_id and w["state"] == "up"]
        return len(up) >= workers
    wait_until(ready, timeout, f"{workers} worker(s) of {instance_id} registered")


@pytest.fixture
def controller() -> Iterator[ControllerThread]:
    with ControllerThread(max_tokens=100_000) as c:
        yield c


@pytest.fixture
def start_agent(controller: ControllerThread) -> Iterator[Callable[..., tuple[EmbeddedAgent, AgentClient]]]:
    """Start in-process agents registered with ``controller``; all stopped at the end."""
    started: list[tuple[EmbeddedAgent, AgentClient]] = []

    def start(instance_id: str = "inst", worker_id: int = 0, *, chunk_size: int = 16, heartbeat: float = 1.0,
              **extra: Any) -> tuple[EmbeddedAgent, AgentClient]:
        cfg = config_from_dict(agent_config(controller.grpc_target, instance_id, chunk_size=chunk_size,
                                            heartbeat=heartbeat, **extra), env={})
        agent = EmbeddedAgent(cfg, worker_id=worker_id, metrics_port=-1)
        agent.start()
        client = AgentClient(f"127.0.0.1:{agent.grpc_port}")
        started.append((agent, client))
        wait_registered(controller, instance_id, worker_id + 1)
        return agent, client

    yield start
    for agent, client in reversed(started):
        client.close()
        agent.stop()
