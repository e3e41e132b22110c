"""Chunk operations: store, retrieve, lookup, compress, decompress, clear, pin.

A chunk's stored form changes only by a compare-and-set swap in its location after the new form is
complete and verified; operations on one chunk take turns through a per-chunk lock; codec work
runs on the codec pool and storage I/O on threads, never on the event loop.
"""
from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import torch

from kvmesh.errors import DataCorrupt, InvalidArgument, KVMeshError

from .jobs import JobRunner
from .keys import ChunkSpan
from .lifecycle import in_thread
from .methods import describe_missing
from .results import ChunkOutcome, LocationMatch, Progress
from .storage import RAW, StorageBackend, StoredChunk

logger = logging.getLogger(__name__)


def kv_shape_error(kv: torch.Tensor, num_tokens: int) -> str | None:
    """Why ``kv`` is not the KV of ``num_tokens`` tokens, or None."""
    if kv.dim() != 4 or kv.shape[0] != 2:
        return f"kv must be [2, layers, tokens, channels], got shape {list(kv.shape)}"
    if kv.shape[2] != num_tokens:
        return f"kv holds {kv.shape[2]} tokens (dim 2 of {list(kv.shape)}) but {num_tokens} tokens were given"
    if kv.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"kv dtype must be float16, bfloat16 or float32, got {kv.dtype}"
    return None


def check_decoded(kv: Any, span: ChunkSpan, method: str) -> None:
    if not isinstance(kv, torch.Tensor) or kv.dim() != 4 or kv.shape[0] != 2 or kv.shape[2] != span.num_tokens:
        shape = list(kv.shape) if isinstance(kv, torch.Tensor) else type(kv).__name__
        raise DataCorrupt(f"{method} decoded chunk {span.index} to {shape}, expected [2, L, {span.num_tokens}, C]")


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    """The chunks' KV as one tensor the caller owns (concatenated on the token dim)."""
    return torch.cat(parts, dim=2) if len(parts) > 1 else parts[0].clone()


class ChunkOperations(JobRunner):
    # Engine-facing operations
    async def store(self, tokens: Sequence[int], kv: torch.Tensor, location: str | None = None,
                    overwrite: bool = False) -> int:
        """Store the chunks of ``tokens`` not yet stored; returns how many tokens were newly stored.

        ``kv`` is [2, layers, len(tokens), channels]. All of them or none: ResourceExhausted, naming
        the bytes needed, free and the capacity, when they cannot fit even after evicting what may be.
        """
        return (await self.put_chunks(tokens, kv, location, overwrite))[0]

    async def put_chunks(self, tokens: Sequence[int], kv: torch.Tensor, location: str | None = None,
                         overwrite: bool = False) -> tuple[int, int]:
        """(tokens newly stored, chunks newly stored); chunks already present are kept unless ``overwrite``.

        The chunks go in together (``put_many``): room is made for all of them before any is
        committed, and the sequence's own chunks (those already stored, before and beyond the new
        ones) are never evicted to make it.
        """
        spans = await self.aspans(tokens)
        problem = kv_shape_error(kv, len(tokens))
        if problem:
            raise InvalidArgument(problem)
        backend = self.location(location)
        if not spans:
            return 0, 0
        chunks = [StoredChunk(span.key, span.start, span.end, RAW, raw=kv[:, :, span.start:span.end],
                              parent=spans[i - 1].key if i else "") for i, span in enumerate(spans)]
        written = await self._put_all(backend, chunks, overwrite)
        n_tokens = sum(span.num_tokens for span, ok in zip(spans, written) if ok)
        remote = self.remote
        if not location and remote is not None and remote is not backend and self.config.remote_write_through:
            await self._write_through(remote, chunks)
        return n_tokens, sum(written)

    async def _put_all(self, backend: StorageBackend, chunks: list[StoredChunk], overwrite: bool) -> list[bool]:
        """``backend.put_many`` under the chunks' locks (taken in sequence order, as every holder of
        several chunk locks takes them); chunks bound for the remote store are first encoded with
        ``remote_serde`` when that names a codec."""
        keys = [c.key for c in chunks]
        try:
            async with contextlib.AsyncExitStack() as stack:
                for key in keys:
                    await stack.enter_async_context(self._locks.hold((backend.name, key)))
                if backend.shared and self.remote_method:
                    if not overwrite:  # encode only what is missing: the store is shared
                        present = await asyncio.to_thread(backend.prefix_length, keys)
                        chunks = chunks[present:]
                        if not chunks:
                            return [False] * len(keys)
                    encoded = await self._run_codec(self._encode_all, chunks, self.remote_method)
                    done = await in_thread(None, functools.partial(backend.put_many, encoded, overwrite=overwrite,
                                                                   protect=keys))
                    return [False] * (len(keys) - len(done)) + done
                return await in_thread(None, functools.partial(backend.put_many, chunks, overwrite=overwrite,
                                                               protect=keys))
        finally:
            self._refresh_storage_metrics()

    def _encode_all(self, chunks: list[StoredChunk], method: str) -> list[StoredChunk]:
        out = []
        for c in chunks:
            assert c.raw is not None
            codec = self.codecs.get(method, c.start)  # a sequence's first chunk may be written differently
            out.append(StoredChunk(c.key, c.start, c.end, method, payload=bytes(codec.encode(c.raw)), parent=c.parent))
        return out

    async def _write_through(self, remote: StorageBackend, chunks: list[StoredChunk]) -> None:
        """Also store ``chunks`` in the remote store, once per key; a store that is down or full is
        logged, never the caller's error: the local copy is stored."""
        try:
            await self._put_all(remote, chunks, overwrite=False)
        except KVMeshError as err:
            logger.warning("write-through of %d chunks to %s failed: %s", len(chunks), remote.name, err.message)

    async def lookup(self, tokens: Sequence[int], location: str | None = None) -> int:
        """The stored prefix of ``tokens`` in tokens (None: a chunk may be in any location)."""
        spans = await self.aspans(tokens)
        holders = await self._holders(spans, location)
        return spans[len(holders) - 1].end if holders else 0

    async def _holders(self, spans: list[ChunkSpan], location: str | None) -> list[StorageBackend]:
        """For each chunk of the stored prefix, the first location holding it: local ones first,
        the remote store for what they miss (one pipelined round trip; when it is down, a miss,
        unless it was asked for by name)."""
        backends = self._selected(location)
        local = [b for b in backends if not b.blocking]
        holders: list[StorageBackend] = []
        for span in spans:
            holder = next((b for b in local if b.contains(span.key)), None)
            if holder is None:
                break
            holders.append(holder)
        remote = next((b for b in backends if b.blocking), None)
        if remote is None or len(holders) == len(spans):
            return holders
        rest = spans[len(holders):]
        # The remote store continues the prefix where the local locations stop.
        n_remote = await self._remote_prefix(remote, rest, strict=bool(location))
        for i, span in enumerate(rest):
            holder = next((b for b in local if b.contains(span.key)), None)
            if holder is None and i < n_remote:
                holder = remote
            if holder is None:
                break
            holders.append(holder)
        return holders

    async def lookup_locations(self, tokens: Sequence[int], location: str | None = None) -> list[LocationMatch]:
        """The stored prefix (tokens, chunks) in each location asked about."""
        spans = await self.aspans(tokens)
        out = []
        for backend in self._selected(location):
            if backend.blocking:
                n = await self._remote_prefix(backend, spans, strict=bool(location))
                prefix = spans[:n]
            else:
                prefix = await self._prefix(backend, spans)
            out.append(LocationMatch(backend.name, prefix[-1].end if prefix else 0, len(prefix)))
        return out

    async def retrieve(self, tokens: Sequence[int], location: str | None = None) -> tuple[int, torch.Tensor | None]:
        """The longest stored prefix of ``tokens`` and its KV, decoded, concatenated on dim 2.

        Each chunk comes from the first location holding it: memory, disk, then the remote store
        (the engine's fallback on a local miss)."""
        spans = await self.aspans(tokens)
        holders = await self._holders(spans, location)
        parts: list[torch.Tensor] = []
        n = 0
        for span, backend in zip(spans, holders):
            async with self._locks.hold((backend.name, span.key)):
                try:
                    kv = await self._run_codec(self._read_decoded, backend, span)
                except (KVMeshError, ValueError, RuntimeError) as err:
                    # A cache miss from here on: serving a prefix short of a bad chunk is safe.
                    logger.error("chunk %d (%s) in %s unreadable, prefix ends there: %s",
                                 span.index, span.key, backend.name, err)
                    break
            if kv is None:
                break
            if parts and (kv.shape[:2] != parts[0].shape[:2] or kv.shape[3] != parts[0].shape[3]
                          or kv.dtype != parts[0].dtype):
                logger.error("chunk %d (%s) has shape %s/%s unlike the prefix's %s/%s; prefix ends there",
                             span.index, span.key, list(kv.shape), kv.dtype, list(parts[0].shape), parts[0].dtype)
                break
            parts.append(kv)
            n = span.end
        if not parts:
            return 0, None
        # One copy of the whole prefix (GBs for a long context): off the event loop.
        return n, await asyncio.to_thread(_joined, parts)

    def _read_decoded(self, backend: StorageBackend, span: ChunkSpan) -> torch.Tensor | None:
        chunk = backend.get(span.key)
        if chunk is None:
            return None
        if not chunk.encoded:
            return chunk.raw
        kv = self.codecs.get(chunk.method).decode(chunk.payload or b"")
        check_decoded(kv, span, chunk.method)
        # A GPU codec decodes onto its device; reads are concatenated with raw (CPU) chunks.
        return kv.cpu()

    # Compress / decompress
    async def compress(self, tokens: Sequence[int], method: str, location: str,
                       event_id: str = "") -> AsyncIterator[Progress]:
        """Encode the stored prefix of ``tokens`` in ``location`` with ``method``, chunk by chunk."""
        if not method:
            raise InvalidArgument(f"method is required; available methods: {', '.join(self.codecs.available())}")
        self.codecs.check(method)
        backend = self._required_location(location)
        spans = await self._prefix(backend, await self.aspans(tokens))
        return self._run_chunks("compress", method, backend, spans, event_id,
                                lambda span: self._compress_chunk(backend, span, method))

    async def decompress(self, tokens: Sequence[int], method: str, location: str,
                         event_id: str = "") -> AsyncIterator[Progress]:
        """Decode the stored prefix's encoded chunks back to raw KV (``method`` empty: any method)."""
        if method:
            self.codecs.check(method)  # an unknown method is the caller's error, not each chunk's
        backend = self._required_location(location)
        spans = await self._prefix(backend, await self.aspans(tokens))
        return self._run_chunks("decompress", method, backend, spans, event_id,
                                lambda span: self._decompress_chunk(backend, span, method))

    def _compress_chunk(self, backend: StorageBackend, span: ChunkSpan, method: str) -> ChunkOutcome:
        # Runs on the codec pool with the chunk's lock held by the caller.
        try:
            codec = self.codecs.get(method, span.start)  # a sequence's first chunk may be written differently
            chunk = backend.get(span.key)
            if chunk is None:
                return ChunkOutcome(error="the chunk was removed (evicted or cleared) before it was compressed")
            if chunk.method == method:
                return ChunkOutcome(chunk.nbytes, chunk.nbytes, skipped=True, method=method)
            undecodable = self._undecodable(chunk)
            if undecodable:
                return ChunkOutcome(error=undecodable, method=method)
            t0 = time.perf_counter()
            raw = chunk.raw if not chunk.encoded else self.codecs.get(chunk.method).decode(chunk.payload or b"")
            if raw is None:
                return ChunkOutcome(error="the chunk holds no tensor")
            blob = codec.encode(raw)
            if not isinstance(blob, (bytes, bytearray, memoryview)):
                return ChunkOutcome(error=f"{method} encode returned {type(blob).__name__}, not bytes")
            blob = bytes(blob)
            # Verify before the swap: the container decodes, to the chunk's shape and dtype.
            check = codec.decode(blob)
            if not isinstance(check, torch.Tensor) or tuple(check.shape) != tuple(raw.shape) or check.dtype != raw.dtype:
                got = (list(check.shape), check.dtype) if isinstance(check, torch.Tensor) else type(check).__name__
                return ChunkOutcome(error=f"{method} container decodes to {got}, expected {list(raw.shape)} {raw.dtype}")
            seconds = time.perf_counter() - t0
            new = StoredChunk(span.key, span.start, span.end, method, payload=blob)
            if not backend.put(new, expect_method=chunk.method):
                now = backend.entry(span.key)
                if now is not None and now.method == method:  # another agent sharing the store did it
                    return ChunkOutcome(now.nbytes, now.nbytes, skipped=True, method=method)
                return ChunkOutcome(error="the chunk changed or was removed during compression; left as it is")
            raw_bytes = raw.numel() * raw.element_size()
            return ChunkOutcome(raw_bytes if not chunk.encoded else chunk.nbytes, len(blob), seconds, method=method)
        except KVMeshError as err:
            return ChunkOutcome(error=err.message, method=method)
        except Exception as err:  # any codec failure is this chunk's error; the old form stays
            logger.debug("compress of chunk %s failed", span.key, exc_info=True)
            return ChunkOutcome(error=f"{type(err).__name__}: {err}")

    def _decompress_chunk(self, backend: StorageBackend, span: ChunkSpan, method: str) -> ChunkOutcome:
        try:
            chunk = backend.get(span.key)
            if chunk is None:
                return ChunkOutcome(error="the chunk was removed (evicted or cleared) before it was decompressed")
            if not chunk.encoded:
                return ChunkOutcome(chunk.nbytes, chunk.nbytes, skipped=True, method=method)
            if method and chunk.method != method:
                return ChunkOutcome(error=f"the chunk is encoded with {chunk.method!r}, not {method!r}", method=method)
            undecodable = self._undecodable(chunk)
            if undecodable:
                return ChunkOutcome(error=undecodable, method=method)
            t0 = time.perf_counter()
            kv = self.codecs.get(chunk.method).decode(chunk.payload or b"")
            check_decoded(kv, span, chunk.method)
            kv = kv.cpu()  # raw chunks live in host memory, whatever device the codec used
            seconds = time.perf_counter() - t0
            new = StoredChunk(span.key, span.start, span.end, RAW, raw=kv)
            if not backend.put(new, expect_method=chunk.method):
                now = backend.entry(span.key)
                if now is not None and not now.encoded:  # another agent sharing the store did it
                    return ChunkOutcome(now.nbytes, now.nbytes, skipped=True, method=chunk.method)
                return ChunkOutcome(error="the chunk changed or was removed during decompression; left as it is")
            return ChunkOutcome(chunk.nbytes, new.nbytes, seconds, method=chunk.method)
        except KVMeshError as err:
            return ChunkOutcome(error=err.message, method=method)
        except Exception as err:
            logger.debug("decompress of chunk %s failed", span.key, exc_info=True)
            return ChunkOutcome(error=f"{type(err).__name__}: {err}", method=method)

    def _undecodable(self, chunk: StoredChunk) -> str:
        """Why this agent cannot decode ``chunk`` (a model file it lacks), or ""."""
        if not chunk.encoded:
            return ""
        missing = self.codecs.missing_files(chunk.method, chunk.payload)
        if not missing:
            return ""
        return f"chunk {chunk.key} cannot be decoded here: " + describe_missing(
            missing, self.model_files(), "this agent")

    # Clear / pin / unpin
    async def clear(self, location: str | None, tokens: Sequence[int] = ()) -> tuple[int, int]:
        """Drop the chunks of ``tokens`` (empty: everything) from ``location`` (empty: every one)."""
        backends = self._selected(location)
        spans = await self.aspans(tokens) if tokens else []
        n_tokens = n_chunks = 0
        for backend in backends:
            if not tokens:
                entries = await asyncio.to_thread(backend.entries) if backend.blocking else backend.entries()
                for entry in entries:
                    async with self._locks.hold((backend.name, entry.key)):
                        if await in_thread(None, backend.remove, entry.key):
                            n_tokens += entry.end - entry.start
                            n_chunks += 1
                continue
            for span in spans:
                async with self._locks.hold((backend.name, span.key)):
                    if await in_thread(None, backend.remove, span.key):
                        n_tokens += span.num_tokens
                        n_chunks += 1
        self._refresh_storage_metrics()
        return n_tokens, n_chunks

    async def set_pinned(self, location: str | None, tokens: Sequence[int], pinned: bool) -> int:
        """Pin (or unpin) the stored prefix of ``tokens``; returns its length (the most over locations)."""
        spans = await self.aspans(tokens)
        best = 0
        for backend in self._selected(location):
            prefix = await self._prefix(backend, spans)
            for span in prefix:
                if backend.blocking:
                    await asyncio.to_thread(backend.set_pinned, span.key, pinned)
                else:
                    backend.set_pinned(span.key, pinned)
            best = max(best, prefix[-1].end if prefix else 0)
        return best
