"""The agent's lifecycle and shared state: locations, codecs, thread pools, servers, metrics.

``AgentCore`` opens the storage locations, starts the gRPC server (through ``_build_server``, which
the composed ``InstanceAgent`` provides, so that this module imports no servicer), /metrics and
the controller link, and stops them in order. It also holds the argument checks every operation
shares (token spans, location names) and health/stats, which read only this state.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

from kvmesh import codecs
from kvmesh.core.grpc_server import MeshServer
from kvmesh.errors import InvalidArgument, Unavailable

from .config import AgentConfig, ConfigError
from .keys import ChunkSpan, chunk_spans, validate_tokens
from .locks import KeyedLocks
from .methods import Codec, CodecSet
from .metrics import AgentMetrics
from .results import AgentStats, HealthReport, LocationReport
from .storage import LocalCPUBackend, LocalDiskBackend, RemoteBackend, StorageBackend

logger = logging.getLogger(__name__)

DEFAULT_METRICS_PORT = 9101
MAX_MESSAGE_BYTES = 1 << 30
# Token sequences up to this long are checked and hashed on the event loop (well under a millisecond).
SPANS_ON_LOOP_MAX_TOKENS = 16_384
GRPC_OPTIONS = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]


async def in_thread(pool: concurrent.futures.Executor | None, fn: Any, *args: Any) -> Any:
    """``fn(*args)`` on ``pool`` (None: the loop's default pool).

    When the caller is cancelled the work is still waited for, so that a per-chunk lock held by
    the caller is released only after the chunk's thread is done with it.
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


class AgentCore:
    """State and lifecycle of one worker's agent; the operations are mixed in on top (``instance``)."""

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
        # The model's codec files (config model / model_files) and the explicit extra_config paths.
        self.codecs = CodecSet(extra_codecs, method_options=config.codec_options(codecs.available_methods()))
        self.remote_method = config.remote_method
        if self.remote_method and self.remote_method not in self.codecs.available():
            raise ConfigError(f"config key 'remote_serde' is {config.remote_serde!r}: not a method here; use "
                              f"'naive' (raw) or one of {', '.join(self.codecs.available())}")
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
        self._server: MeshServer | None = None
        self._link: Any = None
        self._evictions_seen: dict[str, int] = {}
        self.grpc_port: int | None = None
        self.p2p_port: int | None = None
        self.metrics_port: int | None = None
        self.started = False

    # Hooks of the composed agent (instance.py): the servicer and the controller link.
    async def _build_server(self) -> tuple[MeshServer, int, int | None]:
        raise NotImplementedError

    def _make_link(self) -> Any:
        raise NotImplementedError

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
            if not backend.shared:  # the shared store is no part of this agent's index at the controller
                backend.add_listener(self._on_storage_event)
        self._refresh_storage_metrics()
        self._server, self.grpc_port, self.p2p_port = await self._build_server()
        if self._metrics_port_wanted >= 0:
            self.metrics_port = self._serve_metrics()
        if self.config.enable_controller and self.config.controller_pull_url:
            self._link = self._make_link()
            self._link.start()
        self.started = True
        logger.info("instance agent %s worker %d serving on %s:%d (locations %s, methods %s)",
                    self.config.lmcache_instance_id, self.worker_id, self.host, self.grpc_port,
                    ", ".join(self.locations), ", ".join(self.codecs.available()) or "none")

    def _serve_metrics(self) -> int:
        # /metrics listens where gRPC does (p2p_host / --host), so that Prometheus reaches it in a pod.
        try:
            return self.metrics.serve(self._metrics_port_wanted, host=self.host, security=self.config.security)
        except OSError as err:
            if self._metrics_port_explicit:
                raise
            # The default port (9101 + worker) may be taken by another agent on this host.
            logger.warning("metrics port %d unavailable (%s); serving /metrics on a free port",
                           self._metrics_port_wanted, err)
            return self.metrics.serve(0, host=self.host, security=self.config.security)

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
        settings = self.config.remote_settings()
        if settings is not None:
            # Not contacted here: a store that is down at start is reported by health, and the
            # local locations serve meanwhile.
            out[RemoteBackend.name] = RemoteBackend(settings, self.worker_id)
        return out

    @property
    def remote(self) -> RemoteBackend | None:
        backend = self.locations.get(RemoteBackend.name)
        return backend if isinstance(backend, RemoteBackend) else None

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
        return [(name, e.key, e.end) for name, backend in self.locations.items() if not backend.shared
                for e in backend.entries()]

    @property
    def controller_connected(self) -> bool:
        return bool(self._link is not None and self._link.registered)

    # Argument checks every operation shares
    def spans(self, tokens: Sequence[int]) -> list[ChunkSpan]:
        try:
            toks = validate_tokens(list(tokens), self.config.max_tokens)
        except ValueError as err:
            raise InvalidArgument(str(err)) from None
        spans = chunk_spans(toks, self.config.chunk_size)
        if spans and not self.config.save_unfull_chunk and spans[-1].num_tokens < self.config.chunk_size:
            spans.pop()
        return spans

    async def aspans(self, tokens: Sequence[int]) -> list[ChunkSpan]:
        """``spans`` for a coroutine: a long sequence is checked and hashed on a thread (millions of
        tokens take long enough to stall the event loop)."""
        if len(tokens) <= SPANS_ON_LOOP_MAX_TOKENS:
            return self.spans(tokens)
        return await asyncio.to_thread(self.spans, tokens)

    def location(self, name: str | None) -> StorageBackend:
        """The location called ``name`` (None or empty: the default, memory first)."""
        if not name:
            return next(iter(self.locations.values()))
        backend = self.locations.get(name)
        if backend is None:
            raise InvalidArgument(f"unknown location {name!r}; this agent's locations: {', '.join(self.locations)}")
        return backend

    def _required_location(self, name: str) -> StorageBackend:
        if not name:
            raise InvalidArgument(f"location is required; this agent's locations: {', '.join(self.locations)}")
        return self.location(name)

    def _selected(self, name: str | None) -> list[StorageBackend]:
        return list(self.locations.values()) if not name else [self.location(name)]

    async def _prefix(self, backend: StorageBackend, spans: list[ChunkSpan]) -> list[ChunkSpan]:
        """The spans ``backend`` holds, in order from the first (a round trip for the remote store)."""
        keys = [span.key for span in spans]
        if backend.blocking:
            n = await asyncio.to_thread(backend.prefix_length, keys)
        else:
            n = backend.prefix_length(keys)
        return spans[:n]

    async def _remote_prefix(self, backend: StorageBackend, spans: list[ChunkSpan], strict: bool) -> int:
        """How many of ``spans`` the remote store holds in order; when it is down, 0 (``strict``:
        Unavailable) so that the local locations keep serving."""
        try:
            return len(await self._prefix(backend, spans))
        except Unavailable as err:
            if strict:
                raise
            logger.warning("%s; serving from the local locations", err.message)
            return 0

    async def _run_codec(self, fn: Any, *args: Any) -> Any:
        return await in_thread(self._codec_pool, fn, *args)

    # Health and stats
    async def health(self) -> HealthReport:
        """error_code 0 ok, -1 when a memory/storage check fails, -1001 on another error."""
        try:
            problems = await asyncio.to_thread(self._check_storage)
        except Exception as err:  # health must answer, whatever broke
            logger.exception("health check failed")
            return HealthReport(-1001, f"health check error: {type(err).__name__}: {err}")
        reports = await asyncio.to_thread(self._location_reports, False)
        if problems:
            return HealthReport(-1, "; ".join(problems), reports, self.model_files())
        return HealthReport(0, "ok", reports, self.model_files())

    def _check_storage(self) -> list[str]:
        problems = []
        for name, backend in self.locations.items():
            if isinstance(backend, RemoteBackend):
                reachable, why, _ = backend.ping()
                if not reachable:
                    problems.append(why)
                continue
            entries = backend.entries()
            used = sum(e.nbytes for e in entries)
            if used != backend.used_bytes:
                problems.append(f"{name}: index holds {used} bytes but {backend.used_bytes} are accounted")
            if backend.used_bytes > backend.capacity_bytes:
                problems.append(f"{name}: {backend.used_bytes} bytes used over capacity {backend.capacity_bytes}")
            if isinstance(backend, LocalDiskBackend):
                if not os.access(backend.root, os.W_OK):
                    problems.append(f"{name}: folder {backend.root} is not writable")
                free, floor = backend.fs_free_bytes(), self.config.min_free_disk_bytes
                if free < floor:
                    problems.append(f"{name}: {free} bytes free on the filesystem of {backend.root}, under the "
                                    f"threshold of {floor} (extra_config.min_free_disk_size, GiB); compress or "
                                    "clear chunks, or free space there")
        return problems

    def _location_reports(self, count_remote: bool) -> list[LocationReport]:
        """Each location's figures (blocking: a thread). ``count_remote``: also count this worker's
        chunks in the remote store (a bounded SCAN: Stats does, health does not)."""
        out = []
        for backend in self.locations.values():
            if isinstance(backend, RemoteBackend):
                reachable, why, free = backend.ping()
                st = backend.stats()
                if reachable and count_remote:
                    try:
                        st = backend.refresh()
                    except Unavailable as err:
                        reachable, why = False, err.message
                out.append(LocationReport(st.name, st.used_bytes, st.capacity_bytes, st.num_chunks, st.num_encoded,
                                          st.num_pinned, free_bytes=free if reachable else -1,
                                          available=reachable, problem=why))
                continue
            st = backend.stats()
            out.append(LocationReport(st.name, st.used_bytes, st.capacity_bytes, st.num_chunks, st.num_encoded,
                                      st.num_pinned, free_bytes=backend.free_bytes()))
        return out

    def model_files(self) -> list[str]:
        """The model files this agent's codecs hold, as "kind:id" (what a chunk may need to decode)."""
        return self.codecs.model_files()

    async def stats(self) -> AgentStats:
        reports = await asyncio.to_thread(self._location_reports, True)
        return AgentStats(self.config.lmcache_instance_id, self.worker_id, self.config.chunk_size,
                          self.codecs.available(), reports, self.model_files())
