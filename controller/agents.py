"""gRPC channels to the instance agents, one per agent address, reused across calls."""
from __future__ import annotations

import logging

import grpc

from kvmesh.api.agent.v1 import agent_pb2_grpc
from kvmesh.core.channels import aio_channel
from kvmesh.core.security import NO_SECURITY, SecuritySettings

logger = logging.getLogger(__name__)

_CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 256 * 1024 * 1024),
    # Fail fast on a dead agent instead of waiting for the reconnect backoff to give up.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
]


class AgentPool:
    """InstanceAgent stubs by ``host:port`` (TLS and the token as ``security`` says)."""

    def __init__(self, security: SecuritySettings = NO_SECURITY) -> None:
        self.security = security
        self._channels: dict[str, tuple[grpc.aio.Channel, agent_pb2_grpc.InstanceAgentStub]] = {}

    def stub(self, target: str) -> agent_pb2_grpc.InstanceAgentStub:
        found = self._channels.get(target)
        if found is None:
            channel = aio_channel(target, self.security, options=_CHANNEL_OPTIONS)
            found = (channel, agent_pb2_grpc.InstanceAgentStub(channel))
            self._channels[target] = found
        return found[1]

    async def forget(self, target: str) -> None:
        found = self._channels.pop(target, None)
        if found is not None:
            await found[0].close()

    async def close(self) -> None:
        channels = [c for c, _ in self._channels.values()]
        self._channels.clear()
        for channel in channels:
            await channel.close()
