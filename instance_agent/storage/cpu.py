"""``LocalCPUBackend``: chunks in process memory, bounded by ``max_local_cpu_size`` GiB."""
from __future__ import annotations

from typing import Any

from .base import IndexEntry, StorageBackend
from .chunk import StoredChunk


class LocalCPUBackend(StorageBackend):
    """Chunks kept as objects in memory; raw tensors are private contiguous CPU copies."""

    name = "LocalCPUBackend"

    def _prepare(self, chunk: StoredChunk) -> Any:
        if chunk.raw is not None and not chunk.encoded:
            # A private copy: a caller's tensor (or a view into a larger one) must not alias storage.
            raw = chunk.raw.detach().to("cpu", copy=True).contiguous()
            return StoredChunk(chunk.key, chunk.start, chunk.end, chunk.method, raw=raw)
        return chunk

    def _commit(self, key: str, handle: Any) -> Any:
        return handle

    def _abort(self, handle: Any) -> None:
        pass

    def _load(self, entry: IndexEntry) -> StoredChunk | None:
        chunk: StoredChunk = entry.handle
        return chunk

    def _delete(self, entry: IndexEntry) -> None:
        entry.handle = None
