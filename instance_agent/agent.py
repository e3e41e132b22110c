"""The instance agent: one per engine worker, owning its storage locations and codecs.

``InstanceAgent`` holds the logic as coroutines (the gRPC servicer in ``service`` only converts
messages); ``EmbeddedAgent`` runs one on a thread of its own with blocking, thread-safe methods for
an engine. Codec work and disk I/O run on thread pools, never on the event loop. Operations on one
chunk take turns through a per-chunk lock; a chunk's stored form changes only by a compare-and-set
swap in its location after the new form is complete and verified.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import threading
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import torch

from kvmesh.api.agent.v1 import agent_pb2, agent_pb2_grpc
from kvmesh.api.common.v1 import common_pb2
from kvmesh.errors import DataCorrupt, InvalidArgument, KVMeshError, from_grpc_error

from .config import AgentConfig
from .keys import ChunkSpan, chunk_spans, validate_tokens
from .locks import KeyedLocks
from .methods import Codec, CodecSet
from .metrics import AgentMetrics
from .storage import RAW, LocalCPUBackend, LocalDiskBackend, StorageBackend, StoredChunk
from .tensors import from_proto, to_proto

logger = logging.getLogger(__name__)

DEFAULT_METRICS_PORT = 9101
MAX_MESSAGE_BYTES = 1 << 30
GRPC_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
MOVE_CALL_TIMEOUT_S = 120.0


@dataclass(frozen=True, slots=True)
class ChunkOutcome:
    """What happened to one chunk in a compress, decompress or move."""

    bytes_before: int = 0
    bytes_after: int = 0
    codec_seconds: float = 0.0
    skipped: bool = False
    error: str = ""
    method: str = ""  # the method the codec time belongs to


def _kv_shape_error(kv: torch.Tensor, num_tokens: int) -> str | None:
    if kv.dim() != 4 or kv.shape[0] != 2:
        return f"kv must be [2, layers, tokens, channels], got shape {list(kv.shape)}"
    if kv.shape[2] != num_tokens:
        return f"kv holds {kv.shape[2]} tokens (dim 2 of {list(kv.shape)}) but {num_tokens} tokens were given"
    if kv.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return f"kv dtype must be float16, bfloat16 or float32, got {kv.dtype}"
    return None


class InstanceAgent:
    """The agent of one worker: storage locations, codecs, the gRPC service and the controller link."""

    def __init__(self, config: AgentConfig, worker_id: int = 0, *, host: str | None = None,
                 metrics_port: int | None = None, extra_codecs: Mapping[str, Codec] | None = None,
                 codec_threads: int | None = None) -> None:
        if worker_id < 0:
            raise InvalidArgument(f"worker_id must be >= 0, got {worker_id}")
        self.config = config
        self.worker_id = worker_id
        self.host = host or config.host
        self.grpc_port_wanted = config.worker_port(worker_id)
        if metrics_port is None:
            extra = config.extra_config.get("metrics_port")
            self._metrics_port_wanted = int(extra) if extra is not None else DEFAULT_METRICS_PORT + worker_id
            self._metrics_port_explicit = extra is not None
        else:
            self._metrics_port_wanted, self._metrics_port_explicit = metrics_port, True
        self.codecs = CodecSet(extra_codecs, {"key_profile": config.key_profile(),
                                              "predictor": config.layer_predictor()})
        self.metrics = AgentMetrics()
        self.locations: dict[str, StorageBackend] = {}
        self._locks = KeyedLocks()
        # Codec calls are CPU-heavy and release the GIL in torch: one thread per core.
        threads = codec_threads or max(1, os.cpu_count() or 1)
        self._codec_pool = concurrent.futures.ThreadPoolExecutor(
            max_workers=threads, thread_name_prefix=f"kvmesh-codec-{worker_id}")
        # Chunks of one compress/decompress in flight at once (extra_config.chunk_parallelism).
        self.chunk_parallelism = max(1, int(config.extra_config.get("chunk_parallelism", min(threads, 4))))
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: grpc.aio.Server | None = None
        self._link: Any = None
        self._evictions_seen: dict[str, int] = {}
        self.grpc_port: int | None = None
        self.p2p_port: int | None = None
        self.metrics_port: int | None = None
        self.started = False

    # Lifecycle
    async def start(self) -> None:
        """Open the locations, serve gRPC and /metrics, and connect to the controller if enabled."""
        try:
            await self._start()
        except BaseException:
            # Leave nothing half-open (a bound port, a metrics thread) behind a failed start.
            await self.stop(grace=0)
            raise

    async def _start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.locations = await asyncio.to_thread(self._open_locations)
        for backend in self.locations.values():
            backend.add_listener(self._on_storage_event)
        self._refresh_storage_metrics()
        from .service import build_server  # the servicer imports this module

        self._server, self.grpc_port, self.p2p_port = await build_server(self)
        if self._metrics_port_wanted >= 0:
            self.metrics_port = self._serve_metrics()
        if self.config.enable_controller and self.config.controller_pull_url:
            from .controller_link import ControllerLink

            self._link = ControllerLink(self)
            self._link.start()
        self.started = True
        logger.info("instance agent %s worker %d serving on %s:%d (locations %s, methods %s)",
                    self.config.lmcache_instance_id, self.worker_id, self.host, self.grpc_port,
                    ", ".join(self.locations), ", ".join(self.codecs.available()) or "none")

    def _serve_metrics(self) -> int:
        # /metrics listens where gRPC does (p2p_host / --host), so that Prometheus reaches it in a pod.
        try:
            return self.metrics.serve(self._metrics_port_wanted, host=self.host)
        except OSError as err:
            if self._metrics_port_explicit:
                raise
            # The default port (9101 + worker) may be taken by another agent on this host.
            logger.warning("metrics port %d unavailable (%s); serving /metrics on a free port",
                           self._metrics_port_wanted, err)
            return self.metrics.serve(0, host=self.host)

    async def stop(self, grace: float = 2.0) -> None:
        """Deregister, stop serving (in-flight calls get ``grace`` seconds) and release resources."""
        if self._link is not None:
            await self._link.stop()
            self._link = None
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        # Both wait (for the metrics thread's poll, for running codec calls): off the loop.
        await asyncio.to_thread(self.metrics.stop)
        await asyncio.to_thread(self._codec_pool.shutdown, wait=True, cancel_futures=True)
        for backend in self.locations.values():
            backend.close()
        self.started = False

    def _open_locations(self) -> dict[str, StorageBackend]:
        out: dict[str, StorageBackend] = {}
        if self.config.local_cpu:
            out[LocalCPUBackend.name] = LocalCPUBackend(self.config.max_local_cpu_bytes)
        if self.config.local_disk:
            out[LocalDiskBackend.name] = LocalDiskBackend(self.config.local_disk, self.config.max_local_disk_bytes)
        if self.config.remote_url:
            logger.warning("remote_url %s is configured but kvmesh has no remote location yet; ignored",
                           self.config.remote_url)
        return out

    # Storage events -> metrics and the controller's lookup index
    def _on_storage_event(self, kind: str, location: str, key: str, token_end: int) -> None:
        # Called from storage threads with the location's lock held: hand off, never block.
        loop, link = self._loop, self._link
        if link is None or loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(link.enqueue, kind, location, key, token_end)
        except RuntimeError:  # the loop is shutting down
            pass

    def _refresh_storage_metrics(self) -> None:
        for name, backend in self.locations.items():
            st = backend.stats()
            m = self.metrics
            m.storage_used.labels(name).set(st.used_bytes)
            m.storage_capacity.labels(name).set(st.capacity_bytes)
            m.stored_chunks.labels(name, "raw").set(st.num_chunks - st.num_encoded)
            m.stored_chunks.labels(name, "encoded").set(st.num_encoded)
            seen = self._evictions_seen.get(name, 0)
            if backend.evictions > seen:
                m.evictions.labels(name).inc(backend.evictions - seen)
                self._evictions_seen[name] = backend.evictions

    def index_snapshot(self) -> list[tuple[str, str, int]]:
        """Every stored chunk as (location, key, token end), for the controller's full resync."""
        return [(name, e.key, e.end) for name, backend in self.locations.items() for e in backend.entries()]

    # Argument checks
    def spans(self, tokens: Sequence[int]) -> list[ChunkSpan]:
        try:
            toks = validate_tokens(list(tokens), self.config.max_tokens)
        except ValueError as err:
            raise InvalidArgument(str(err)) from None
        spans = chunk_spans(toks, self.config.chunk_size)
        if spans and not self.config.save_unfull_chunk and spans[-1].num_tokens < self.config.chunk_size:
            spans.pop()
        return spans

    def location(self, name: str | None) -> StorageBackend:
        """The location called ``name`` (None or empty: the default, memory first)."""
        if not name:
            return next(iter(self.locations.values()))
        backend = self.locations.get(name)
        if backend is None:
            raise InvalidArgument(f"unknown location {name!r}; this agent's locations: {', '.join(self.locations)}")
        return backend

    def _selected(self, name: str | None) -> list[StorageBackend]:
        return list(self.locations.values()) if not name else [self.location(name)]

    @staticmethod
    def _prefix(backend: StorageBackend, spans: list[ChunkSpan]) -> list[ChunkSpan]:
        out: list[ChunkSpan] = []
        for span in spans:
            if not backend.contains(span.key):
                break
            out.append(span)
        return out

    def _holder(self, key: str, name: str | None) -> StorageBackend | None:
        for backend in self._selected(name):
            if backend.contains(key):
                return backend
        return None

    async def _in_thread(self, pool: concurrent.futures.Executor | None, fn: Any, *args: Any) -> Any:
        """``fn(*args)`` on ``pool`` (None: the loop's default pool).

        When the caller is cancelled the work is still waited for, so that a per-chunk lock held
        by the caller is released only after the chunk's thread is done with it.
        """
        fut = asyncio.get_running_loop().run_in_executor(pool, fn, *args)
        try:
            return await asyncio.shield(fut)
        except asyncio.CancelledError:
            while not fut.done():
                try:
                    await asyncio.shield(fut)
                except asyncio.CancelledError:
                    continue
                except Exception:  # the caller is gone; its outcome no longer matters
                    break
            raise

    async def _run_codec(self, fn: Any, *args: Any) -> Any:
        return await self._in_thread(self._codec_pool, fn, *args)

    # Engine-facing operations
    async def store(self, tokens: Sequence[int], kv: torch.Tensor, location: str | None = None,
                    overwrite: bool = False) -> int:
        """Store the chunks of ``tokens`` not yet stored; returns how many tokens were newly stored.

        ``kv`` is [2, layers, len(tokens), channels]. ResourceExhausted when the location is full
        of pinned chunks; the chunks stored before that stay stored.
        """
        return (await self.put_chunks(tokens, kv, location, overwrite))[0]

    async def put_chunks(self, tokens: Sequence[int], kv: torch.Tensor, location: str | None = None,
                         overwrite: bool = False) -> tuple[int, int]:
        """(tokens newly stored, chunks newly stored); chunks already present are kept unless ``overwrite``."""
        spans = self.spans(tokens)
        problem = _kv_shape_error(kv, len(tokens))
        if problem:
            raise InvalidArgument(problem)
        backend = self.location(location)
        n_tokens = n_chunks = 0
        try:
            for span in spans:
                async with self._locks.hold((backend.name, span.key)):
                    if not overwrite and backend.contains(span.key):
                        continue
                    chunk = StoredChunk(span.key, span.start, span.end, RAW, raw=kv[:, :, span.start:span.end])
                    if await self._in_thread(None, backend.put, chunk):
                        n_tokens += span.num_tokens
                        n_chunks += 1
        finally:
            self._refresh_storage_metrics()
        return n_tokens, n_chunks

    async def lookup(self, tokens: Sequence[int], location: str | None = None) -> int:
        """The stored prefix of ``tokens`` in tokens (None: a chunk may be in any location)."""
        spans = self.spans(tokens)
        backends = self._selected(location)
        n = 0
        for span in spans:
            if not any(b.contains(span.key) for b in backends):
                break
            n = span.end
        return n

    async def lookup_locations(self, tokens: Sequence[int], location: str | None = None) -> list[tuple[str, int, int]]:
        """(location, prefix tokens, prefix chunks) for each location asked about."""
        spans = self.spans(tokens)
        out = []
        for backend in self._selected(location):
            prefix = self._prefix(backend, spans)
            out.append((backend.name, prefix[-1].end if prefix else 0, len(prefix)))
        return out

    async def retrieve(self, tokens: Sequence[int], location: str | None = None) -> tuple[int, torch.Tensor | None]:
        """The longest stored prefix of ``tokens`` and its KV, decoded, concatenated on dim 2."""
        spans = self.spans(tokens)
        self._selected(location)  # validates the name
        parts: list[torch.Tensor] = []
        n = 0
        for span in spans:
            backend = self._holder(span.key, location)
            if backend is None:
                break
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
        return n, torch.cat(parts, dim=2) if len(parts) > 1 else parts[0].clone()

    def _read_decoded(self, backend: StorageBackend, span: ChunkSpan) -> torch.Tensor | None:
        chunk = backend.get(span.key)
        if chunk is None:
            return None
        if not chunk.encoded:
            return chunk.raw
        kv = self.codecs.get(chunk.method).decode(chunk.payload or b"")
        self._check_decoded(kv, span, chunk.method)
        # A GPU codec decodes onto its device; reads are concatenated with raw (CPU) chunks.
        return kv.cpu()

    @staticmethod
    def _check_decoded(kv: Any, span: ChunkSpan, method: str) -> None:
        if not isinstance(kv, torch.Tensor) or kv.dim() != 4 or kv.shape[0] != 2 or kv.shape[2] != span.num_tokens:
            shape = list(kv.shape) if isinstance(kv, torch.Tensor) else type(kv).__name__
            raise DataCorrupt(f"{method} decoded chunk {span.index} to {shape}, expected [2, L, {span.num_tokens}, C]")

    # Compress / decompress
    async def compress(self, tokens: Sequence[int], method: str, location: str,
                       event_id: str = "") -> AsyncIterator[agent_pb2.ProgressResponse]:
        """Encode the stored prefix of ``tokens`` in ``location`` with ``method``, chunk by chunk."""
        if not method:
            raise InvalidArgument(f"method is required; available methods: {', '.join(self.codecs.available())}")
        self.codecs.check(method)
        backend = self._required_location(location)
        spans = self._prefix(backend, self.spans(tokens))
        return self._run_chunks("compress", method, backend, spans, event_id,
                                lambda span: self._compress_chunk(backend, span, method))

    async def decompress(self, tokens: Sequence[int], method: str, location: str,
                         event_id: str = "") -> AsyncIterator[agent_pb2.ProgressResponse]:
        """Decode the stored prefix's encoded chunks back to raw KV (``method`` empty: any method)."""
        if method:
            self.codecs.check(method)  # an unknown method is the caller's error, not each chunk's
        backend = self._required_location(location)
        spans = self._prefix(backend, self.spans(tokens))
        return self._run_chunks("decompress", method, backend, spans, event_id,
                                lambda span: self._decompress_chunk(backend, span, method))

    def _required_location(self, name: str) -> StorageBackend:
        if not name:
            raise InvalidArgument(f"location is required; this agent's locations: {', '.join(self.locations)}")
        return self.location(name)

    async def _run_chunks(self, operation: str, method: str, backend: StorageBackend, spans: list[ChunkSpan],
                          event_id: str, work: Any) -> AsyncIterator[agent_pb2.ProgressResponse]:
        """Run ``work(span)`` for each chunk, a few chunks at a time, reporting each as it finishes."""
        total_before = total_after = 0
        done = 0
        errors: list[str] = []
        todo = iter(spans)
        running: set[asyncio.Future[tuple[ChunkSpan, ChunkOutcome]]] = set()

        async def one(span: ChunkSpan) -> tuple[ChunkSpan, ChunkOutcome]:
            async with self._locks.hold((backend.name, span.key)):
                return span, await self._run_codec(work, span)

        def refill() -> None:
            # A bounded window: enough chunks in flight to keep the codec threads busy, few
            # enough that their raw and encoded copies stay small.
            while len(running) < self.chunk_parallelism:
                span = next(todo, None)
                if span is None:
                    return
                running.add(asyncio.ensure_future(one(span)))

        refill()
        try:
            while running:
                finished, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
                for task in sorted(finished, key=lambda t: t.result()[0].index):
                    running.discard(task)
                    span, outcome = task.result()
                    self._count(operation, method or outcome.method, backend.name, outcome)
                    if outcome.error:
                        errors.append(f"chunk {span.index}: {outcome.error}")
                        logger.warning("%s %s chunk %d (%s) in %s failed: %s", operation, event_id, span.index,
                                       span.key, backend.name, outcome.error)
                    else:
                        done += 1
                        total_before += outcome.bytes_before
                        total_after += outcome.bytes_after
                    yield agent_pb2.ProgressResponse(progress=common_pb2.ChunkProgress(
                        worker_id=self.worker_id, chunk_index=span.index, chunk_key=span.key,
                        token_start=span.start, token_end=span.end, bytes_before=outcome.bytes_before,
                        bytes_after=outcome.bytes_after, codec_seconds=outcome.codec_seconds,
                        skipped=outcome.skipped, error=outcome.error))
                self._refresh_storage_metrics()
                refill()
        finally:
            # The caller went away (stream cancelled): let the chunks in flight finish their swap
            # before their locks go, and start no more.
            if running:
                await asyncio.gather(*running, return_exceptions=True)
                self._refresh_storage_metrics()
        errors.sort(key=lambda e: int(e.split(":", 1)[0].split()[1]))
        error = ""
        if errors:
            error = f"{len(errors)} of {len(spans)} chunks failed ({operation} {method or 'any'} in {backend.name}); " \
                    + "; ".join(errors[:5]) + ("; ..." if len(errors) > 5 else "")
        yield agent_pb2.ProgressResponse(final=True, num_tokens=spans[-1].end if spans else 0,
                                         chunks_total=len(spans), chunks_done=done, bytes_before=total_before,
                                         bytes_after=total_after, error=error)

    def _count(self, operation: str, method: str, location: str, outcome: ChunkOutcome) -> None:
        m = self.metrics
        result = "failed" if outcome.error else "skipped" if outcome.skipped else "ok"
        m.chunks.labels(operation, method, location, result).inc()
        if result != "ok":
            return
        m.codec_seconds.labels(operation, method).observe(outcome.codec_seconds)
        m.codec_input_bytes.labels(operation, method).inc(outcome.bytes_before)
        m.codec_output_bytes.labels(operation, method).inc(outcome.bytes_after)
        if operation == "compress" and outcome.bytes_after > 0:
            m.compression_ratio.labels(method).observe(outcome.bytes_before / outcome.bytes_after)

    def _compress_chunk(self, backend: StorageBackend, span: ChunkSpan, method: str) -> ChunkOutcome:
        # Runs on the codec pool with the chunk's lock held by the caller.
        try:
            codec = self.codecs.get(method)
            chunk = backend.get(span.key)
            if chunk is None:
                return ChunkOutcome(error="the chunk was removed (evicted or cleared) before it was compressed")
            if chunk.method == method:
                return ChunkOutcome(chunk.nbytes, chunk.nbytes, skipped=True, method=method)
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
                return ChunkOutcome(error="the chunk changed or was removed during compression; left as it is")
            raw_bytes = raw.numel() * raw.element_size()
            return ChunkOutcome(raw_bytes if not chunk.encoded else chunk.nbytes, len(blob), seconds, method=method)
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
            t0 = time.perf_counter()
            kv = self.codecs.get(chunk.method).decode(chunk.payload or b"")
            self._check_decoded(kv, span, chunk.method)
            kv = kv.cpu()  # raw chunks live in host memory, whatever device the codec used
            seconds = time.perf_counter() - t0
            new = StoredChunk(span.key, span.start, span.end, RAW, raw=kv)
            if not backend.put(new, expect_method=chunk.method):
                return ChunkOutcome(error="the chunk changed or was removed during decompression; left as it is")
            return ChunkOutcome(chunk.nbytes, new.nbytes, seconds, method=chunk.method)
        except Exception as err:
            logger.debug("decompress of chunk %s failed", span.key, exc_info=True)
            return ChunkOutcome(error=f"{type(err).__name__}: {err}", method=method)

    # Clear / pin / unpin
    async def clear(self, location: str | None, tokens: Sequence[int] = ()) -> tuple[int, int]:
        """Drop the chunks of ``tokens`` (empty: everything) from ``location`` (empty: every one)."""
        backends = self._selected(location)
        spans = self.spans(tokens) if tokens else []
        n_tokens = n_chunks = 0
        for backend in backends:
            if not tokens:
                for entry in backend.entries():
                    async with self._locks.hold((backend.name, entry.key)):
                        if await self._in_thread(None, backend.remove, entry.key):
                            n_tokens += entry.end - entry.start
                            n_chunks += 1
                continue
            for span in spans:
                async with self._locks.hold((backend.name, span.key)):
                    if await self._in_thread(None, backend.remove, span.key):
                        n_tokens += span.num_tokens
                        n_chunks += 1
        self._refresh_storage_metrics()
        return n_tokens, n_chunks

    async def set_pinned(self, location: str | None, tokens: Sequence[int], pinned: bool) -> int:
        """Pin (or unpin) the stored prefix of ``tokens``; returns its length (the most over locations)."""
        spans = self.spans(tokens)
        best = 0
        for backend in self._selected(location):
            prefix = self._prefix(backend, spans)
            for span in prefix:
                backend.set_pinned(span.key, pinned)
            best = max(best, prefix[-1].end if prefix else 0)
        return best

    # Move between agents
    def _is_self(self, target_url: str) -> bool:
        host, _, port = target_url.rpartition(":")
        return port.isdigit() and int(port) in (self.grpc_port, self.p2p_port) and \
            host in (self.host, "localhost", "127.0.0.1", "[::1]", "::1", "0.0.0.0")

    async def move(self, tokens: Sequence[int], location: str, target_url: str, target_location: str = "",
                   copy: bool = False, event_id: str = "") -> AsyncIterator[agent_pb2.ProgressResponse]:
        """Send the stored prefix of ``tokens`` to the agent at ``target_url`` in its stored form."""
        backend = self._required_location(location)
        if not target_url or ":" not in target_url:
            raise InvalidArgument(f"target_url must be host:port of the receiving agent, got {target_url!r}")
        target_location = target_location or backend.name
        if self._is_self(target_url) and target_location == backend.name:
            raise InvalidArgument(f"move from {backend.name} to itself on the same agent ({target_url}) would do nothing")
        spans = self._prefix(backend, self.spans(tokens))
        return self._move_chunks(backend, spans, target_url, target_location, copy, event_id)

    async def _move_chunks(self, backend: StorageBackend, spans: list[ChunkSpan], target_url: str,
                           target_location: str, copy: bool, event_id: str) -> AsyncIterator[agent_pb2.ProgressResponse]:
        done = moved_bytes = 0
        error = ""
        async with grpc.aio.insecure_channel(target_url, options=GRPC_OPTIONS) as channel:
            stub = agent_pb2_grpc.InstanceAgentStub(channel)
            for i, span in enumerate(spans):
                chunk_error = ""
                nbytes = 0
                async with self._locks.hold((backend.name, span.key)):
                    try:
                        chunk = await asyncio.to_thread(backend.get, span.key)
                        if chunk is None:
                            chunk_error = "the chunk was removed before it was sent"
                        else:
                            nbytes = chunk.nbytes
                            msg = await asyncio.to_thread(self._stored_chunk_proto, chunk)
                            await stub.ReceiveChunks(agent_pb2.ReceiveChunksRequest(
                                location=target_location, chunks=[msg]), timeout=MOVE_CALL_TIMEOUT_S)
                            if not copy:
                                await self._in_thread(None, backend.remove, span.key)
                    except grpc.RpcError as err:
                        chunk_error = f"sending to {target_url} failed: {from_grpc_error(err).message}"
                    except KVMeshError as err:
                        chunk_error = err.message
                if chunk_error:
                    error = f"move {event_id} stopped at chunk {span.index} of {len(spans)}: {chunk_error}"
                    self.metrics.chunks.labels("move", "", backend.name, "failed").inc()
                else:
                    done += 1
                    moved_bytes += nbytes
                    self.metrics.chunks.labels("move", "", backend.name, "ok").inc()
                yield agent_pb2.ProgressResponse(progress=common_pb2.ChunkProgress(
                    worker_id=self.worker_id, chunk_index=span.index, chunk_key=span.key, token_start=span.start,
                    token_end=span.end, bytes_before=nbytes, bytes_after=nbytes if not chunk_error else 0,
                    error=chunk_error))
                if chunk_error:
                    # The peer is unreachable or refusing: the chunks after this one stay where they are.
                    break
        self._refresh_storage_metrics()
        yield agent_pb2.ProgressResponse(final=True, num_tokens=spans[-1].end if spans else 0,
                                         chunks_total=len(spans), chunks_done=done, bytes_before=moved_bytes,
                                         bytes_after=moved_bytes, error=error)

    @staticmethod
    def _stored_chunk_proto(chunk: StoredChunk) -> agent_pb2.StoredChunk:
        msg = agent_pb2.StoredChunk(chunk_key=chunk.key, token_start=chunk.start, token_end=chunk.end,
                                    method=chunk.method)
        if chunk.encoded:
            msg.payload = chunk.payload or b""
        elif chunk.raw is not None:
            msg.raw.CopyFrom(to_proto(chunk.raw))
        return msg

    async def receive_chunks(self, location: str, chunks: Sequence[agent_pb2.StoredChunk]) -> int:
        """Store chunks a peer sent in their stored form; returns how many were stored."""
        backend = self.location(location)
        parsed: list[StoredChunk] = []
        for i, msg in enumerate(chunks):
            key = msg.chunk_key
            if len(key) != 32 or any(c not in "0123456789abcdef" for c in key):
                raise InvalidArgument(f"chunks[{i}].chunk_key {key!r} is not a 32-digit hex chunk key")
            if not 0 <= msg.token_start < msg.token_end:
                raise InvalidArgument(f"chunks[{i}] has tokens [{msg.token_start}, {msg.token_end}): not a chunk")
            if msg.method:
                if msg.method not in self.codecs.available():
                    raise InvalidArgument(f"chunks[{i}] is encoded with unknown method {msg.method!r}; "
                                          f"available methods: {', '.join(self.codecs.available())}")
                parsed.append(StoredChunk(key, msg.token_start, msg.token_end, msg.method, payload=msg.payload))
                continue
            if not msg.HasField("raw"):
                raise InvalidArgument(f"chunks[{i}] has neither a method nor a raw tensor")
            raw = from_proto(msg.raw)
            problem = _kv_shape_error(raw, msg.token_end - msg.token_start)
            if problem:
                raise InvalidArgument(f"chunks[{i}]: {problem}")
            parsed.append(StoredChunk(key, msg.token_start, msg.token_end, RAW, raw=raw))
        stored = 0
        for chunk in parsed:
            async with self._locks.hold((backend.name, chunk.key)):
                if await self._in_thread(None, backend.put, chunk):
                    stored += 1
        self._refresh_storage_metrics()
        return stored

    # Health and stats
    async def health(self) -> tuple[int, str]:
        """(0, "ok"), (-1, why) when a memory/storage check fails, (-1001, why) on another error."""
        try:
            problems = await asyncio.to_thread(self._check_storage)
        except Exception as err:  # health must answer, whatever broke
            logger.exception("health check failed")
            return -1001, f"health check error: {type(err).__name__}: {err}"
        if problems:
            return -1, "; ".join(problems)
        return 0, "ok"

    def _check_storage(self) -> list[str]:
        problems = []
        for name, backend in self.locations.items():
            entries = backend.entries()
            used = sum(e.nbytes for e in entries)
            if used != backend.used_bytes:
                problems.append(f"{name}: index holds {used} bytes but {backend.used_bytes} are accounted")
            if backend.used_bytes > backend.capacity_bytes:
                problems.append(f"{name}: {backend.used_bytes} bytes used over capacity {backend.capacity_bytes}")
            if isinstance(backend, LocalDiskBackend) and not os.access(backend.root, os.W_OK):
                problems.append(f"{name}: folder {backend.root} is not writable")
        return problems

    def stats(self) -> agent_pb2.StatsResponse:
        resp = agent_pb2.StatsResponse(instance_id=self.config.lmcache_instance_id, worker_id=self.worker_id,
                                       chunk_size=self.config.chunk_size, methods=self.codecs.available())
        for backend in self.locations.values():
            st = backend.stats()
            resp.locations.add(name=st.name, used_bytes=st.used_bytes, capacity_bytes=st.capacity_bytes,
                               num_chunks=st.num_chunks, num_encoded=st.num_encoded, num_pinned=st.num_pinned)
        return resp

    @property
    def controller_connected(self) -> bool:
        return bool(self._link is not None and self._link.registered)


class EmbeddedAgent:
    """An ``InstanceAgent`` on its own thread and event loop, with blocking thread-safe methods.

    For engines that are not asyncio programs: ``start()`` returns once the gRPC server is up (and
    raises what stopped it otherwise); every method may be called from any thread.
    """

    def __init__(self, config: AgentConfig, worker_id: int = 0, **kwargs: Any) -> None:
        self.agent = InstanceAgent(config, worker_id, **kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self.call_timeout = 600.0

    def start(self, timeout: float = 60.0) -> None:
        if self._thread is not None:
            raise RuntimeError("agent already started")
        started: concurrent.futures.Future[None] = concurrent.futures.Future()
        loop = asyncio.new_event_loop()

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(self.agent.start())
            except BaseException as err:  # hand the failure to start()'s caller
                started.set_exception(err)
                loop.close()
                return
            started.set_result(None)
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._loop = loop
        self._thread = threading.Thread(target=run, name=f"kvmesh-agent-{self.agent.worker_id}", daemon=True)
        self._thread.start()
        try:
            started.result(timeout)
        except BaseException:
            self._thread.join(5)
            self._thread = None
            raise

    def stop(self, timeout: float = 30.0) -> None:
        if self._thread is None or self._loop is None:
            return
        try:
            self._call(self.agent.stop(), timeout)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> EmbeddedAgent:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _call(self, coro: Any, timeout: float | None = None) -> Any:
        if self._loop is None or self._thread is None:
            coro.close()
            raise RuntimeError("agent not started")
        fut = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return fut.result(self.call_timeout if timeout is None else timeout)

    def store(self, tokens: Sequence[int], kv: torch.Tensor, location: str | None = None) -> int:
        """Store every chunk of ``tokens`` not yet stored; returns how many tokens were newly stored."""
        return int(self._call(self.agent.store(tokens, kv, location)))

    def retrieve(self, tokens: Sequence[int], location: str | None = None) -> tuple[int, torch.Tensor | None]:
        """The longest stored prefix of ``tokens`` and its KV, decoded ([2, L, n, C]); (0, None) on a miss."""
        n, kv = self._call(self.agent.retrieve(tokens, location))
        return int(n), kv

    def lookup(self, tokens: Sequence[int], location: str | None = None) -> int:
        return int(self._call(self.agent.lookup(tokens, location)))

    @property
    def grpc_port(self) -> int | None:
        return self.agent.grpc_port

    @property
    def metrics_port(self) -> int | None:
        return self.agent.metrics_port

    @property
    def config(self) -> AgentConfig:
        return self.agent.config


__all__ = ["EmbeddedAgent", "InstanceAgent"]
