"""The instance agent: one per engine worker, owning its storage locations and codecs.

The agent is split by concern; this module re-exports the public names:

- ``lifecycle``: state, start/stop, servers, metrics, health and stats (``AgentCore``);
- ``jobs``: the per-chunk runner with progress (``JobRunner``);
- ``chunk_ops``: store, retrieve, lookup, compress, decompress, clear, pin (``ChunkOperations``);
- ``transfers``: move and receive between agents (``Transfers``);
- ``instance``: ``InstanceAgent``, all of them composed with the servicer and controller link;
- ``embedded``: ``EmbeddedAgent``, an agent on its own thread with blocking methods;
- ``results``: the plain dataclasses the servicer converts to messages (``wire``).
"""
from __future__ import annotations

from .embedded import EmbeddedAgent
from .instance import InstanceAgent
from .lifecycle import DEFAULT_METRICS_PORT, GRPC_OPTIONS, MAX_MESSAGE_BYTES
from .peer import MOVE_CALL_TIMEOUT_S

__all__ = ["DEFAULT_METRICS_PORT", "EmbeddedAgent", "GRPC_OPTIONS", "InstanceAgent", "MAX_MESSAGE_BYTES",
           "MOVE_CALL_TIMEOUT_S"]
