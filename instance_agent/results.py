"""Plain results of the agent's operations: what the servicer (``service``) turns into messages.

Domain code builds no protos; these dataclasses are the boundary. Their field names follow the
messages of ``agent.proto`` so that the conversion is mechanical and a test reads either alike.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar


@dataclass(frozen=True, slots=True)
class ChunkOutcome:
    """What happened to one chunk in a compress, decompress or move (inside the agent)."""

    bytes_before: int = 0
    bytes_after: int = 0
    codec_seconds: float = 0.0
    skipped: bool = False
    error: str = ""
    method: str = ""  # the method the codec time belongs to


@dataclass(frozen=True, slots=True)
class ChunkProgress:
    """One chunk of a streamed operation, reported as it finishes."""

    final: ClassVar[bool] = False
    worker_id: int
    chunk_index: int
    chunk_key: str
    token_start: int
    token_end: int
    bytes_before: int = 0
    bytes_after: int = 0
    codec_seconds: float = 0.0
    skipped: bool = False
    error: str = ""


@dataclass(frozen=True, slots=True)
class OperationResult:
    """The totals of a streamed operation, its last message.

    ``chunks_done`` counts chunks that succeeded (skipped ones included); failed chunks are
    ``chunks_failed``, each with its error in ``errors``.
    """

    final: ClassVar[bool] = True
    num_tokens: int = 0
    chunks_total: int = 0
    chunks_done: int = 0
    chunks_failed: int = 0
    bytes_before: int = 0
    bytes_after: int = 0
    error: str = ""
    errors: tuple[str, ...] = ()


Progress = ChunkProgress | OperationResult


@dataclass(frozen=True, slots=True)
class LocationMatch:
    location: str
    num_tokens: int
    num_chunks: int


@dataclass(frozen=True, slots=True)
class LocationReport:
    """A location's state for Stats and Health."""

    name: str
    used_bytes: int
    capacity_bytes: int
    num_chunks: int
    num_encoded: int
    num_pinned: int
    # Bytes the location can still take: capacity left, bounded by the filesystem's free space
    # for a disk; -1 when unknown (a remote store that is down).
    free_bytes: int = -1
    available: bool = True
    problem: str = ""


@dataclass(frozen=True, slots=True)
class AgentStats:
    instance_id: str
    worker_id: int
    chunk_size: int
    methods: list[str]
    locations: list[LocationReport]
    # Model files the agent's codecs hold, as "kind:id" (e.g. "layer_predictor:1a2b..."): a chunk
    # coded with one decodes only where that file is held.
    model_files: list[str] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class HealthReport:
    """0 ok; -1 a memory/storage check failed; -1001 another error (LMCache's codes)."""

    error_code: int
    message: str
    locations: list[LocationReport] = field(default_factory=list)
    model_files: list[str] = field(default_factory=list)
