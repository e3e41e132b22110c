"""The controller's logic as a plain async class: proto request in, proto response out.

The gRPC servicer and the HTTP gateway both call these methods (see ``rpc_table``); nothing here
knows about transports. Operations on chunks answer at once with an event and run in background
tasks that drive the agents' streaming RPCs and feed the event table.
"""
from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc

from kvmesh.api.agent.v1 import agent_pb2
from kvmesh.api.common.v1 import common_pb2
from kvmesh.api.controller.v1 import controller_pb2 as pb
from kvmesh.errors import (Conflict, InvalidArgument, KVMeshError, NotFound, ResourceExhausted, Unavailable,
                           from_grpc_error)
from kvmesh.core.keys import validate_tokens

from .agents import AgentPool
from .events import EventStore, EventTable, event_db_path, new_event_id, operation_name
from .metrics import ControllerMetrics
from .registry import DOWN, RAW_FORM, Registry, SpanKeys, Worker
from .settings import ControllerSettings

logger = logging.getLogger(__name__)

# LMCache's health codes, plus kvmesh's "down" for workers that missed their heartbeats.
HEALTH_OK = 0
HEALTH_WORKER_ERROR = -1001
HEALTH_DOWN = -1004

# Codes by which an agent refuses a request (the caller's fault), as opposed to failing to serve it.
_AGENT_REFUSALS = frozenset({grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                             grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED})

StreamCall = Callable[[Worker], AsyncIterator[agent_pb2.ProgressResponse]]
# Token lists longer than this are hashed into chunk keys off the event loop.
_HASH_IN_THREAD_TOKENS = 16_384


def _rpc_error_text(err: grpc.aio.AioRpcError) -> str:
    return f"{err.code().name}: {err.details() or 'no detail'}"


class ControllerService:
    """Registry, event table and agent calls behind every Controller RPC."""

    def __init__(self, settings: ControllerSettings, metrics: ControllerMetrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.registry = Registry(
            worker_timeout=settings.worker_timeout, missed_heartbeats=settings.missed_heartbeats,
            min_chunk_size=settings.min_chunk_size, max_chunk_size=settings.max_chunk_size,
            max_events_per_report=settings.max_kv_events_per_report,
            max_index_entries=settings.max_index_entries_per_worker, max_token_end=settings.max_tokens,
            max_workers=settings.max_workers)
        self.events = EventTable(metrics, ttl_seconds=settings.event_ttl, max_events=settings.max_events,
                                 max_in_flight=settings.max_in_flight, watch_queue_size=settings.watch_queue_size,
                                 max_watchers=settings.max_watchers)
        self.event_store: EventStore | None = None
        self._open_store()
        self.agents = AgentPool(settings.security)
        # (instance, worker) -> event id -> the task driving that worker's part of the event.
        self._worker_tasks: dict[tuple[str, int], dict[str, asyncio.Task[None]]] = {}
        self._event_tasks: set[asyncio.Task[None]] = set()
        self._from_index = metrics.admission_lookups_total.labels(source="index")
        self._from_agents = metrics.admission_lookups_total.labels(source="agent")
        self._answered: dict[int, Any] = {}  # operation -> its kvmesh_events_answered_from_index_total
        # The heartbeat server's port, advertised to agents at registration (0: none; beat here).
        self.heartbeat_port = 0

    def handlers(self) -> dict[str, Callable[..., object]]:
        """RPC name (as in the proto) -> the coroutine (or async generator) that serves it."""
        return {
            "Compress": self.compress, "Decompress": self.decompress, "Lookup": self.lookup,
            "Clear": self.clear, "Pin": self.pin, "Unpin": self.unpin, "Move": self.move,
            "Health": self.health, "CheckFinish": self.check_finish, "QueryWorkerInfo": self.query_worker_info,
            "QueryInstance": self.query_instance, "GetEvent": self.get_event, "WatchEvent": self.watch_event,
            "ListEvents": self.list_events, "RegisterWorker": self.register_worker, "Heartbeat": self.heartbeat,
            "DeregisterWorker": self.deregister_worker, "ReportKVEvents": self.report_kv_events,
        }

    # --- validation ------------------------------------------------------------------------------
    def _tokens(self, tokens: Sequence[int]) -> list[int]:
        if len(tokens) > self.settings.max_tokens:
            raise ResourceExhausted(f"{len(tokens)} tokens is over the limit of {self.settings.max_tokens} (--max-tokens)")
        if isinstance(tokens, (list, tuple)):
            try:
                return validate_tokens(list(tokens))
            except ValueError as err:
                raise InvalidArgument(str(err)) from None
        # A message's repeated int64 field: integers below 2^63 already, only the sign to check
        # (in C: min() over a list, not a Python loop per token, which cost 1 ms per 1,000 tokens).
        # A slice copies the field about twice as fast as list() (~20 vs ~40 µs per 1,000 tokens).
        # (numpy would copy and check it in 7 µs, but the controller loads no numpy: its process
        # test holds it to that.)
        out = tokens[:] if hasattr(tokens, "__getitem__") else list(tokens)
        if out and min(out) < 0:
            i = next(i for i, t in enumerate(out) if t < 0)
            raise InvalidArgument(f"tokens[{i}] is {out[i]}: tokens must be in [0, 2^63)")
        return out

    def _live_workers(self, instance_id: str) -> list[Worker]:
        if not instance_id:
            raise InvalidArgument("instance_id is required")
        workers = self.registry.instance(instance_id)
        down = [w for w in workers if w.state == DOWN]
        if down:
            ids = ", ".join(str(w.worker_id) for w in down)
            raise Conflict(f"instance {instance_id!r} has workers down (missed heartbeats): {ids}; "
                           "retry when they are back")
        return workers

    @staticmethod
    def _check_choice(kind: str, value: str, workers: Sequence[Worker], attr: str) -> None:
        if value and workers and all(value in getattr(w, attr) for w in workers):
            return  # the common case, without building the sets the message needs
        valid = set.intersection(*(set(getattr(w, attr)) for w in workers))
        if value not in valid:
            names = ", ".join(sorted(valid)) or "none"
            got = f"{value!r}" if value else "empty"
            raise InvalidArgument(f"{kind} {got} is not supported by instance {workers[0].instance_id!r}; "
                                  f"valid {kind}s: {names}")

    # --- agent calls -----------------------------------------------------------------------------
    async def _agent_unary(self, worker: Worker, rpc: str, call: Callable[[object], Awaitable[object]]) -> object:
        try:
            return await call(self.agents.stub(worker.target))
        except grpc.aio.AioRpcError as err:
            message = (f"worker {worker.worker_id} of instance {worker.instance_id!r} at {worker.target} "
                       f"failed {rpc}: {_rpc_error_text(err)}")
            if err.code() in _AGENT_REFUSALS:
                # The agent judged the request itself (bad tokens, a limit): pass its verdict on.
                raise type(from_grpc_error(err))(message) from None
            raise Unavailable(message) from None

    async def _span_keys(self, keys: SpanKeys | Sequence[int], chunk_sizes: Sequence[int]) -> SpanKeys:
        """The chunk keys of some tokens: hashed lazily on the loop when short, in a thread when long."""
        keys = keys if isinstance(keys, SpanKeys) else SpanKeys(keys)
        if len(keys.tokens) > _HASH_IN_THREAD_TOKENS:
            await asyncio.to_thread(keys.precompute, sorted(set(chunk_sizes)))
        return keys

    async def _indexed_prefix(self, workers: Sequence[Worker], location: str,
                              keys: SpanKeys) -> dict[int, tuple[int, int]] | None:
        """What each worker holds, from the controller's own index, when that answer is sure.

        Sure means: every worker's index is complete (its full resync arrived whole) and holds every
        token asked for. A shorter match may only mean that admits are still on their way, so the
        agents are asked then. (An eviction on its way can make this answer long; the event's
        progress then reports what the agent really found.)
        """
        num_tokens = len(keys.tokens)
        if not num_tokens or not all(w.index_complete for w in workers):
            return None
        await self._span_keys(keys, [w.chunk_size for w in workers])
        held: dict[int, tuple[int, int]] = {}
        for w in workers:
            if not w.index_complete:  # changed while hashing in a thread
                return None
            n, chunks = w.prefix(keys, location)
            if n != num_tokens:
                return None
            held[w.worker_id] = (n, chunks)
        return held

    async def _held_prefix(self, workers: Sequence[Worker], location: str,
                           keys: SpanKeys) -> tuple[dict[int, tuple[int, int]], bool]:
        """(worker id -> (prefix tokens, chunks) that each worker holds in ``location``, whether that
        came from the controller's index): from the index when it is authoritative, else from the
        agents (a Lookup round trip)."""
        fast = await self._indexed_prefix(workers, location, keys)
        if fast is not None:
            self._from_index.inc()
            return fast, True
        self._from_agents.inc()
        req = agent_pb2.LookupRequest(tokens=keys.token_list(), location=location)

        async def one(w: Worker) -> tuple[int, tuple[int, int]]:
            resp = await self._agent_unary(w, "Lookup", lambda s: s.Lookup(req, timeout=self.settings.agent_timeout))
            for m in resp.matches:  # type: ignore[attr-defined]
                if m.location == location:
                    return w.worker_id, (m.num_tokens, m.num_chunks)
            return w.worker_id, (0, 0)

        return dict(await asyncio.gather(*(one(w) for w in workers))), False

    @staticmethod
    def _disagreement(held: dict[int, tuple[int, int]]) -> str:
        if len({n for n, _ in held.values()}) <= 1:
            return ""
        parts = ", ".join(f"worker {wid} holds {n}" for wid, (n, _) in sorted(held.items()))
        return f"workers disagree on the stored prefix ({parts} tokens)"

    # --- background event runners ---------------------------------------------------------------
    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._event_tasks.add(task)
        task.add_done_callback(self._event_tasks.discard)

    def _track(self, worker: Worker, event_id: str, task: asyncio.Task[None]) -> None:
        key = (worker.instance_id, worker.worker_id)
        self._worker_tasks.setdefault(key, {})[event_id] = task

        def untrack(_: asyncio.Task[None]) -> None:
            tasks = self._worker_tasks.get(key)
            if tasks is not None:
                tasks.pop(event_id, None)
                if not tasks:
                    self._worker_tasks.pop(key, None)
        task.add_done_callback(untrack)

    async def _run_event(self, event_id: str, workers: Sequence[Worker], held: dict[int, tuple[int, int]],
                         part: Callable[[Worker], Awaitable[tuple[int, str]]], disagreement: str) -> None:
        """Run ``part`` on every worker, then end the event from what each one reported."""
        self.events.start(event_id, {wid: chunks for wid, (_, chunks) in held.items()})
        tasks = []
        for w in workers:
            task = asyncio.ensure_future(part(w))
            self._track(w, event_id, task)
            tasks.append(task)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        errors: list[str] = []
        done_tokens: dict[int, int] = {}
        for w, res in zip(workers, results):
            if isinstance(res, BaseException):
                if not isinstance(res, asyncio.CancelledError):
                    logger.error("event %s worker %s failed unexpectedly", event_id, w.worker_id, exc_info=res)
                    errors.append(f"worker {w.worker_id}: internal error: {res!r}")
                    self.events.worker_finished(event_id, w.worker_id, error=f"internal error: {res!r}")
                continue
            n, err = res
            done_tokens[w.worker_id] = n
            if err:
                errors.append(f"worker {w.worker_id}: {err}")
        if not errors and len(set(done_tokens.values())) > 1:
            parts = ", ".join(f"worker {wid}: {n}" for wid, n in sorted(done_tokens.items()))
            disagreement = disagreement or f"workers disagree on the tokens processed ({parts})"
        if disagreement:
            errors.append(disagreement)
        if errors:
            self.events.finish(event_id, common_pb2.FAILED, "; ".join(errors))
        else:
            self.events.finish(event_id, common_pb2.COMPLETED)

    def _stream_timeout(self, worker: Worker, num_tokens: int) -> float:
        """Deadline of a streamed agent call: a base plus a budget per chunk asked for, capped."""
        chunks = -(-num_tokens // worker.chunk_size)
        return min(self.settings.event_timeout, self.settings.agent_timeout + chunks * self.settings.chunk_timeout)

    def _progress_problem(self, p: common_pb2.ChunkProgress, worker: Worker, num_tokens: int,
                          seen: set[int]) -> str:
        """Why one chunk's progress cannot be true of what the event asked for ("" when it can)."""
        cs = worker.chunk_size
        asked = -(-num_tokens // cs)
        if not 0 <= p.chunk_index < asked:
            return f"chunk_index {p.chunk_index} is outside the {asked} chunks asked for"
        if p.chunk_index in seen:
            return f"chunk {p.chunk_index} reported twice"
        start, end = p.chunk_index * cs, min((p.chunk_index + 1) * cs, num_tokens)
        if (p.token_start, p.token_end) != (start, end):
            return (f"chunk {p.chunk_index} claims tokens [{p.token_start}, {p.token_end}), "
                    f"but holds [{start}, {end})")
        limit = (end - start) * self.settings.max_bytes_per_token
        for name in ("bytes_before", "bytes_after"):
            value = getattr(p, name)
            if not 0 <= value <= limit:
                return f"chunk {p.chunk_index} claims {name} {value}, outside 0..{limit} for {end - start} tokens"
        if not p.error and not p.skipped and (p.bytes_before == 0 or p.bytes_after == 0):
            return f"chunk {p.chunk_index} is reported done with no bytes ({p.bytes_before} -> {p.bytes_after})"
        if not math.isfinite(p.codec_seconds) or p.codec_seconds < 0:
            return f"chunk {p.chunk_index} claims codec_seconds {p.codec_seconds}"
        return ""

    @staticmethod
    def _final_problem(final: agent_pb2.ProgressResponse, worker: Worker, num_tokens: int, seen: set[int]) -> str:
        asked = -(-num_tokens // worker.chunk_size)
        if not 0 <= final.num_tokens <= num_tokens:
            return f"final num_tokens {final.num_tokens} is outside 0..{num_tokens} asked for"
        if not 0 <= final.chunks_total <= asked or not 0 <= final.chunks_done <= final.chunks_total:
            return (f"final chunks {final.chunks_done}/{final.chunks_total} do not fit the {asked} chunks "
                    "asked for")
        if final.chunks_total < len(seen):
            return f"final chunks_total {final.chunks_total} is below the {len(seen)} chunks it reported"
        return ""

    def _stream_part(self, event_id: str, num_tokens: int, call: StreamCall,
                     forms: tuple[str, str, SpanKeys] | None = None) -> Callable[[Worker], Awaitable[tuple[int, str]]]:
        """A worker's part of an event: drive its agent stream into the event table. ``forms`` =
        (location, the form every chunk done is in afterwards, the tokens' chunk keys): each chunk
        the agent reports done or skipped is recorded in that form in the controller's index, each
        failed chunk as unknown (see ``Registry.note_form``)."""
        async def part(w: Worker) -> tuple[int, str]:
            final: agent_pb2.ProgressResponse | None = None
            where = f"worker {w.worker_id} of instance {w.instance_id!r} at {w.target}"
            seen: set[int] = set()
            stream = call(w)
            try:
                async for msg in stream:
                    if msg.final:
                        final = msg
                        break
                    problem = self._progress_problem(msg.progress, w, num_tokens, seen)
                    if problem:
                        error = f"{where} reported impossible progress, refused: {problem}"
                        logger.warning("event %s: %s", event_id, error)
                        self.events.worker_finished(event_id, w.worker_id, error=error)
                        return 0, error
                    seen.add(msg.progress.chunk_index)
                    progress = msg.progress  # the received message is ours to stamp
                    progress.worker_id = w.worker_id
                    self.events.chunk_done(event_id, progress)
                    if forms is not None:
                        location, form, keys = forms
                        self.registry.note_form(w, location, keys, progress.chunk_index,
                                                None if progress.error else form, progress.bytes_after)
            except grpc.aio.AioRpcError as err:
                if err.code() in _AGENT_REFUSALS:
                    error = f"{where} refused the request: {_rpc_error_text(err)}"
                else:
                    error = f"agent stream from {where} broke mid-event: {_rpc_error_text(err)}"
                self.events.worker_finished(event_id, w.worker_id, error=error)
                return 0, error
            finally:
                if final is None and hasattr(stream, "cancel"):
                    stream.cancel()  # a stream left early (a refused report) stops on the agent too
            if final is None:
                error = f"agent stream from {where} ended without its final message"
                self.events.worker_finished(event_id, w.worker_id, error=error)
                return 0, error
            problem = self._final_problem(final, w, num_tokens, seen)
            if problem:
                error = f"{where} reported impossible progress, refused: {problem}"
                self.events.worker_finished(event_id, w.worker_id, error=error)
                return 0, error
            self.events.worker_finished(event_id, w.worker_id, error=final.error, chunks_total=final.chunks_total)
            return final.num_tokens, final.error
        return part

    def _unary_part(self, event_id: str, rpc: str,
                    call: Callable[[object], Awaitable[object]]) -> Callable[[Worker], Awaitable[tuple[int, str]]]:
        async def part(w: Worker) -> tuple[int, str]:
            try:
                resp = await self._agent_unary(w, rpc, call)
            except KVMeshError as err:
                self.events.worker_finished(event_id, w.worker_id, error=err.message)
                return 0, err.message
            chunks = getattr(resp, "num_chunks", None)
            self.events.worker_finished(event_id, w.worker_id, chunks_total=chunks)
            return resp.num_tokens, ""  # type: ignore[attr-defined]
        return part

    # --- chunk operations ---------------------------------------------------------------------------
    async def _start_chunk_op(self, operation: int, instance_id: str, location: str, tokens_in: Sequence[int], *,
                              method: str = "", check_method: bool = False, empty_means_all: bool = False,
                              part_for: Callable[[str, list[int], SpanKeys], Callable[[Worker], Awaitable[tuple[int, str]]]],
                              form: str | None = None,
                              target: tuple[str, str] = ("", "")) -> tuple[str, int]:
        workers = self._live_workers(instance_id)
        if check_method:
            self._check_choice("method", method, workers, "methods")
        self._check_choice("location", location, workers, "locations")
        keys = SpanKeys(self._tokens(tokens_in))
        num_asked = len(keys.tokens)
        # A place among the events in flight first: a full controller answers 429 at once.
        self.events.reserve()
        reserved = True
        settled: dict[int, int] | None = None
        try:
            if num_asked:
                held, from_index = await self._held_prefix(workers, location, keys)
                if from_index and form is not None:
                    settled = self._settled(workers, location, keys, held, form)
            else:
                held = {w.worker_id: (0, 0) for w in workers}
            num_tokens = min(n for n, _ in held.values())
            reserved = False
            ev = self.events.create(operation, instance_id=instance_id, method=method, location=location,
                                    num_tokens=num_tokens, worker_ids=[w.worker_id for w in workers],
                                    chunks_total=sum(c for _, c in held.values()),
                                    target_instance_id=target[0], target_location=target[1], reserved=True)
        finally:
            if reserved:
                self.events.release()
        if not num_asked and not empty_means_all:
            # Nothing asked for (LMCache's default of []): done at once, no agent call needed.
            settled = {w.worker_id: 0 for w in workers}
        if settled is not None:
            self._end_settled(ev.event_id, settled)
            return ev.event_id, num_tokens
        self._spawn(self._run_event(ev.event_id, workers, held, part_for(ev.event_id, keys.token_list(), keys),
                                    self._disagreement(held)))
        return ev.event_id, num_tokens

    def _settled(self, workers: Sequence[Worker], location: str, keys: SpanKeys, held: dict[int, tuple[int, int]],
                 form: str) -> dict[int, int] | None:
        """Each worker's number of chunks when there is nothing to do: every chunk asked for is, by the
        controller's index, already in ``form`` (as the worker's agent last reported it through an
        event's progress) and no event is running on any of the workers (one could be changing them).
        None otherwise: the agents are asked."""
        out: dict[int, int] = {}
        for w in workers:
            if (w.instance_id, w.worker_id) in self._worker_tasks:
                return None
            num_chunks = held[w.worker_id][1]
            if not self.registry.all_in_form(w, location, keys, num_chunks, form):
                return None
            out[w.worker_id] = num_chunks
        return out

    def _end_settled(self, event_id: str, settled: dict[int, int]) -> None:
        """End an event with nothing to do at once: every chunk counted done as the agent would report
        it (skipped: no bytes moved). The event was created in this same step, so no watcher can be
        waiting for its per-chunk progress; building none saves a message per chunk."""
        ev = self.events.settle(event_id, settled)
        if any(settled.values()):
            counter = self._answered.get(ev.operation)
            if counter is None:
                counter = self._answered[ev.operation] = self.metrics.events_answered_from_index_total.labels(
                    operation=operation_name(ev.operation))
            counter.inc()

    async def compress(self, req: pb.CompressRequest) -> pb.CompressResponse:
        def part_for(event_id: str, tokens: list[int], keys: SpanKeys) -> Callable[[Worker], Awaitable[tuple[int, str]]]:
            agent_req = agent_pb2.CompressRequest(event_id=event_id, method=req.method, location=req.location,
                                                  tokens=tokens)
            return self._stream_part(event_id, len(tokens), lambda w: self.agents.stub(w.target).Compress(
                agent_req, timeout=self._stream_timeout(w, len(tokens))), forms=(req.location, req.method, keys))
        eid, n = await self._start_chunk_op(common_pb2.COMPRESS, req.instance_id, req.location, req.tokens,
                                            method=req.method, check_method=True, part_for=part_for,
                                            form=req.method)
        return pb.CompressResponse(event_id=eid, num_tokens=n)

    async def decompress(self, req: pb.DecompressRequest) -> pb.DecompressResponse:
        def part_for(event_id: str, tokens: list[int], keys: SpanKeys) -> Callable[[Worker], Awaitable[tuple[int, str]]]:
            agent_req = agent_pb2.DecompressRequest(event_id=event_id, method=req.method, location=req.location,
                                                    tokens=tokens)
            return self._stream_part(event_id, len(tokens), lambda w: self.agents.stub(w.target).Decompress(
                agent_req, timeout=self._stream_timeout(w, len(tokens))), forms=(req.location, RAW_FORM, keys))
        # An empty method accepts whatever each chunk was compressed with.
        eid, n = await self._start_chunk_op(common_pb2.DECOMPRESS, req.instance_id, req.location, req.tokens,
                                            method=req.method, check_method=bool(req.method), part_for=part_for,
                                            form=RAW_FORM)
        return pb.DecompressResponse(event_id=eid, num_tokens=n)

    async def clear(self, req: pb.ClearRequest) -> pb.ClearResponse:
        def part_for(event_id: str, tokens: list[int], keys: SpanKeys) -> Callable[[Worker], Awaitable[tuple[int, str]]]:
            agent_req = agent_pb2.ClearRequest(location=req.location, tokens=tokens)
            return self._unary_part(event_id, "Clear", lambda s: s.Clear(agent_req, timeout=self.settings.agent_timeout))
        eid, n = await self._start_chunk_op(common_pb2.CLEAR, req.instance_id, req.location, req.tokens,
                                            empty_means_all=True, part_for=part_for)
        return pb.ClearResponse(event_id=eid, num_tokens=n)

    async def pin(self, req: pb.PinRequest) -> pb.PinResponse:
        def part_for(event_id: str, tokens: list[int], keys: SpanKeys) -> Callable[[Worker], Awaitable[tuple[int, str]]]:
            agent_req = agent_pb2.PinRequest(location=req.location, tokens=tokens)
            return self._unary_part(event_id, "Pin", lambda s: s.Pin(agent_req, timeout=self.settings.agent_timeout))
        eid, n = await self._start_chunk_op(common_pb2.PIN, req.instance_id, req.location, req.tokens,
                                            part_for=part_for)
        return pb.PinResponse(event_id=eid, num_tokens=n)

    async def unpin(self, req: pb.UnpinRequest) -> pb.UnpinResponse:
        def part_for(event_id: str, tokens: list[int], keys: SpanKeys) -> Callable[[Worker], Awaitable[tuple[int, str]]]:
            agent_req = agent_pb2.UnpinRequest(location=req.location, tokens=tokens)
            return self._unary_part(event_id, "Unpin", lambda s: s.Unpin(agent_req, timeout=self.settings.agent_timeout))
        eid, n = await self._start_chunk_op(common_pb2.UNPIN, req.instance_id, req.location, req.tokens,
                                            part_for=part_for)
        return pb.UnpinResponse(event_id=eid, num_tokens=n)

    @staticmethod
    def _position(name: str, value: Sequence[str]) -> tuple[str, str]:
        if len(value) != 2 or not all(value):
            raise InvalidArgument(f"{name} must be [instance_id, location], got {list(value)!r}")
        return value[0], value[1]

    async def move(self, req: pb.MoveRequest) -> pb.MoveResponse:
        src_instance, src_location = self._position("old_position", req.old_position)
        dst_instance, dst_location = self._position("new_position", req.new_position)
        if (src_instance, src_location) == (dst_instance, dst_location):
            raise InvalidArgument(f"old_position and new_position are the same: {[src_instance, src_location]!r}")
        sources = self._live_workers(src_instance)
        targets = {w.worker_id: w for w in self._live_workers(dst_instance)}
        self._check_choice("location", dst_location, list(targets.values()), "locations")
        missing = sorted(w.worker_id for w in sources if w.worker_id not in targets)
        if missing:
            raise InvalidArgument(f"instance {dst_instance!r} has no worker for rank(s) {missing} of {src_instance!r}; "
                                  f"its workers: {sorted(targets)}")

        def part_for(event_id: str, tokens: list[int], keys: SpanKeys) -> Callable[[Worker], Awaitable[tuple[int, str]]]:
            def call(w: Worker) -> AsyncIterator[agent_pb2.ProgressResponse]:
                agent_req = agent_pb2.MoveRequest(event_id=event_id, location=src_location, tokens=tokens,
                                                  target_url=targets[w.worker_id].target,
                                                  target_location=dst_location, copy=req.copy)
                return self.agents.stub(w.target).Move(agent_req, timeout=self._stream_timeout(w, len(tokens)))
            return self._stream_part(event_id, len(tokens), call)
        eid, n = await self._start_chunk_op(common_pb2.MOVE, src_instance, src_location, req.tokens,
                                            part_for=part_for, target=(dst_instance, dst_location))
        return pb.MoveResponse(event_id=eid, num_tokens=n)

    # --- queries ------------------------------------------------------------------------------------------
    async def lookup(self, req: pb.LookupRequest) -> pb.LookupResponse:
        tokens = self._tokens(req.tokens)
        resp = pb.LookupResponse(event_id=new_event_id("Lookup"))
        keys = await self._span_keys(tokens, self.registry.chunk_sizes())
        for instance_id, location, n in self.registry.lookup(keys):
            resp.matches.add(instance_id=instance_id, location=location, num_tokens=n)
            if instance_id not in resp.layout_info:
                # Matches come longest first, so the first per instance is LMCache's answer.
                resp.layout_info[instance_id].extend([location, n])
        return resp

    async def health(self, req: pb.HealthRequest) -> pb.HealthResponse:
        if not req.instance_id:
            raise InvalidArgument("instance_id is required")
        workers = self.registry.instance(req.instance_id)
        resp = pb.HealthResponse(event_id=new_event_id("Health"))

        async def one(w: Worker) -> tuple[int, int, str]:
            if w.state == DOWN:
                return w.worker_id, HEALTH_DOWN, (f"missed heartbeats: last seen "
                                                  f"{time.time() - w.last_heartbeat_time:.1f}s ago")
            try:
                r = await self.agents.stub(w.target).Health(agent_pb2.HealthRequest(),
                                                            timeout=self.settings.agent_timeout)
            except grpc.aio.AioRpcError as err:
                return w.worker_id, HEALTH_WORKER_ERROR, f"health call to {w.target} failed: {_rpc_error_text(err)}"
            return w.worker_id, r.error_code, r.message if r.error_code else ""

        for wid, code, message in await asyncio.gather(*(one(w) for w in workers)):
            resp.error_codes[wid] = code
            if code != HEALTH_OK:
                resp.errors[wid] = message or f"error code {code}"
        resp.healthy = all(c == HEALTH_OK for c in resp.error_codes.values())
        return resp

    async def check_finish(self, req: pb.CheckFinishRequest) -> pb.CheckFinishResponse:
        if not req.event_id:
            raise InvalidArgument("event_id is required")
        ev = self.events.peek(req.event_id)
        return pb.CheckFinishResponse(status=ev.status, chunks_done=ev.chunks_done, chunks_total=ev.chunks_total,
                                      error=ev.error, chunks_failed=ev.chunks_failed)

    async def query_worker_info(self, req: pb.QueryWorkerInfoRequest) -> pb.QueryWorkerInfoResponse:
        if not req.instance_id:
            raise InvalidArgument('instance_id is required: an instance id, or "all"')
        workers = self.registry.workers() if req.instance_id == "all" else self.registry.instance(req.instance_id)
        if req.worker_ids:
            have = {w.worker_id for w in workers}
            unknown = sorted(set(req.worker_ids) - have)
            if unknown:
                raise NotFound(f"worker_ids {unknown} are not registered for {req.instance_id!r}; "
                               f"registered: {sorted(have)}")
            workers = [w for w in workers if w.worker_id in set(req.worker_ids)]
        resp = pb.QueryWorkerInfoResponse(event_id=new_event_id("QueryWorkerInfo"))
        for w in workers:
            resp.worker_infos.add(instance_id=w.instance_id, worker_id=w.worker_id, ip=w.ip, port=w.port,
                                  peer_init_url=w.peer_init_url, registration_time=w.registration_time,
                                  last_heartbeat_time=w.last_heartbeat_time, state=w.state,
                                  methods=w.methods, locations=w.locations, chunk_size=w.chunk_size,
                                  model_files=w.model_files)
        return resp

    async def query_instance(self, req: pb.QueryInstanceRequest) -> pb.QueryInstanceResponse:
        if not req.ip:
            raise InvalidArgument("ip is required")
        for w in self.registry.workers():
            if w.ip == req.ip:
                return pb.QueryInstanceResponse(event_id=req.event_id or new_event_id("QueryInstance"),
                                                res=w.instance_id)
        known = sorted({w.ip for w in self.registry.workers()})
        raise NotFound(f"no instance registered at ip {req.ip!r}" + (f"; known ips: {', '.join(known)}" if known else ""))

    async def get_event(self, req: pb.GetEventRequest) -> pb.GetEventResponse:
        if not req.event_id:
            raise InvalidArgument("event_id is required")
        return pb.GetEventResponse(event=self.events.get(req.event_id))

    async def watch_event(self, req: pb.WatchEventRequest) -> AsyncIterator[pb.WatchEventResponse]:
        if not req.event_id:
            raise InvalidArgument("event_id is required")
        watch = self.events.watch(req.event_id)
        try:
            async for event, progress in watch:
                yield pb.WatchEventResponse(event=event, progress=progress)
        finally:
            await watch.aclose()

    async def list_events(self, req: pb.ListEventsRequest) -> pb.ListEventsResponse:
        if req.limit < 0:
            raise InvalidArgument(f"limit must be >= 0, got {req.limit}")
        return pb.ListEventsResponse(events=self.events.recent(limit=req.limit or 100, instance_id=req.instance_id))

    # --- agents' calls -----------------------------------------------------------------------------------
    def _update_worker_gauge(self) -> None:
        for state, n in self.registry.counts().items():
            self.metrics.workers.labels(state=state).set(n)

    async def register_worker(self, req: pb.RegisterWorkerRequest) -> pb.RegisterWorkerResponse:
        old = self.registry.get(req.instance_id, req.worker_id)
        worker = self.registry.register(
            instance_id=req.instance_id, worker_id=req.worker_id, ip=req.ip, port=req.port,
            peer_init_url=req.peer_init_url, methods=req.methods, locations=req.locations,
            chunk_size=req.chunk_size, heartbeat_interval=req.heartbeat_interval_seconds, secret=req.secret,
            model_files=req.model_files)
        if old is not None and old.target != worker.target:
            await self.agents.forget(old.target)
        self._update_worker_gauge()
        return pb.RegisterWorkerResponse(worker_timeout_seconds=self.registry.down_after(worker),
                                         secret=worker.secret, heartbeat_port=self.heartbeat_port)

    async def heartbeat(self, req: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
        return self.beat(req)

    def beat(self, req: pb.HeartbeatRequest) -> pb.HeartbeatResponse:
        """A heartbeat, from any thread (the main loop's, the heartbeat server's): it touches only the
        registry's lock-guarded liveness state and the (thread-safe) metrics."""
        worker, revived = self.registry.heartbeat(req.instance_id, req.worker_id, req.secret)
        if revived:
            self._update_worker_gauge()
        return pb.HeartbeatResponse(registered=worker is not None)

    async def deregister_worker(self, req: pb.DeregisterWorkerRequest) -> pb.DeregisterWorkerResponse:
        worker = self.registry.deregister(req.instance_id, req.worker_id, req.secret)
        if worker is not None:
            self._fail_worker_events(worker, f"worker {worker.worker_id} of instance {worker.instance_id!r} "
                                             "deregistered mid-event")
            await self.agents.forget(worker.target)
        self._update_worker_gauge()
        return pb.DeregisterWorkerResponse()

    async def report_kv_events(self, req: pb.ReportKVEventsRequest) -> pb.ReportKVEventsResponse:
        self.registry.report_kv_events(req.instance_id, req.worker_id,
                                       [(e.type, e.location, e.chunk_key, e.token_end) for e in req.events],
                                       req.full_resync, secret=req.secret, more=req.more)
        return pb.ReportKVEventsResponse()

    # --- liveness and shutdown -------------------------------------------------------------------------
    def _fail_worker_events(self, worker: Worker, error: str) -> None:
        tasks = self._worker_tasks.pop((worker.instance_id, worker.worker_id), {})
        for event_id, task in tasks.items():
            self.events.worker_finished(event_id, worker.worker_id, error=error)
            self.events.finish(event_id, common_pb2.FAILED, error)
            task.cancel()

    def sweep(self) -> None:
        """Mark silent workers down (failing their in-flight events) and prune the event table."""
        newly_down, dropped = self.registry.sweep()
        if newly_down:
            self.metrics.workers_marked_down_total.inc(len(newly_down))
        for w in newly_down:
            silent = self.registry.silence(w)
            self._fail_worker_events(w, f"worker {w.worker_id} of instance {w.instance_id!r} at {w.target} "
                                        f"missed its heartbeats (silent {silent:.1f}s): marked down")
        for w in dropped:
            self._spawn(self.agents.forget(w.target))
        if newly_down or dropped:
            self._update_worker_gauge()
        self.events.prune()

    async def run_sweeper(self) -> None:
        """Sweep every ``health_check_interval``, crediting the registry with the loop's stalls.

        The sweeper measures its own lateness: when it wakes late, the event loop was blocked or
        congested and could not serve heartbeats either, so that time is no worker's silence. A
        heartbeat queued during the stall is served right after it, before the next sweep can
        judge. A stalled loop thus never turns a live worker down.
        """
        interval = self.settings.health_check_interval
        # Lateness under this is ordinary scheduling jitter, not a stall.
        tolerance = min(0.05, interval / 2)
        self.events.start_flusher()
        last = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            now = time.monotonic()
            lag = max(0.0, now - last - interval)
            self.metrics.loop_lag_seconds.set(lag)
            if lag > tolerance:
                self.registry.credit_stall(lag)
                if lag > 1.0:
                    logger.warning("the controller's event loop stalled for %.1fs; not counted as worker silence",
                                   lag)
            try:
                self.sweep()
            except Exception:  # the loop must outlive a bug in one sweep
                logger.exception("liveness sweep failed")
            last = time.monotonic()

    def _open_store(self) -> None:
        """Attach the SQLite event store (``--event-db``) and load what it holds: at construction, so
        an earlier run's events answer from the first request on."""
        s = self.settings
        path = event_db_path(s.event_db, s.state_dir, s.monitor_port)
        if path is None:
            return
        try:
            store = EventStore(path)
            self.events.attach_store(store)
        except (sqlite3.Error, OSError) as err:
            raise OSError(f"cannot open the event database {str(path)!r}: {err} (choose another with --event-db, "
                          "or --event-db :memory: to keep events in memory only)") from None
        self.event_store = store

    async def close(self) -> None:
        """Cancel in-flight events (CANCELLED), write the event store, and close the agent channels."""
        for event_id in self.events.in_flight():
            self.events.finish(event_id, common_pb2.CANCELLED, "controller shut down before the event ended")
        for tasks in list(self._worker_tasks.values()):
            for task in tasks.values():
                task.cancel()
        pending = list(self._event_tasks)
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
        await self.events.close_store()
        await self.agents.close()
