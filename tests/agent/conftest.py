"""Fixtures of the agent tests: configs in tmp dirs, real agents on loopback port 0, their stubs."""
from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from kvmesh.api.agent.v1 import agent_pb2_grpc
from kvmesh.instance_agent.agent import GRPC_OPTIONS, InstanceAgent
from kvmesh.instance_agent.config import AgentConfig

CPU = "LocalCPUBackend"
DISK = "LocalDiskBackend"


def make_config(tmp_path: Path | None = None, **overrides: Any) -> AgentConfig:
    """A small config: chunk_size 4, 8 MiB of memory, a disk folder under ``tmp_path``, free ports."""
    values: dict[str, Any] = dict(chunk_size=4, max_local_cpu_size=8 / 1024, lmcache_worker_ports=[0],
                                  lmcache_instance_id="test_instance")
    if tmp_path is not None:
        values.update(local_disk=str(tmp_path / "disk"), max_local_disk_size=8 / 1024)
    values.update(overrides)
    return AgentConfig(**values)


def make_kv(num_tokens: int, layers: int = 3, channels: int = 16, dtype: torch.dtype = torch.float16,
            seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, layers, num_tokens, channels, generator=g).to(dtype)


@pytest.fixture
async def agents(tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """``await agents(config=None, **kwargs)`` starts a real agent (gRPC and /metrics on free
    loopback ports); every agent started is stopped after the test."""
    started: list[InstanceAgent] = []

    async def start(config: AgentConfig | None = None, **kwargs: Any) -> InstanceAgent:
        kwargs.setdefault("metrics_port", 0)
        agent = InstanceAgent(config or make_config(tmp_path), **kwargs)
        await agent.start()
        started.append(agent)
        return agent

    yield start
    for agent in started:
        await agent.stop(grace=0.5)


@pytest.fixture
async def agent(agents: Callable[..., Any]) -> InstanceAgent:
    return await agents()


def stub_for(agent: InstanceAgent) -> tuple[grpc.aio.Channel, agent_pb2_grpc.InstanceAgentStub]:
    channel = grpc.aio.insecure_channel(f"localhost:{agent.grpc_port}", options=GRPC_OPTIONS)
    return channel, agent_pb2_grpc.InstanceAgentStub(channel)


@pytest.fixture
async def stub(agent: InstanceAgent) -> AsyncIterator[agent_pb2_grpc.InstanceAgentStub]:
    channel, s = stub_for(agent)
    yield s
    await channel.close()


@pytest.fixture
def redis_srv(tmp_path: Path):
    """A real redis-server on a free loopback port (no persistence), stopped after the test."""
    from .redis_server import redis_server

    with redis_server(tmp_path / "redis") as server:
        yield server
