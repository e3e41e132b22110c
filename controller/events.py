"""The event table: asynchronous operations, their progress, and watchers of that progress.

Events live in memory, bounded by a time-to-live after they end and by a count (the oldest ended
events go first; events still in flight are never dropped). Every change is pushed to the event's
watchers, so a watch sees each chunk's progress, not only the latest state.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from kvmesh.api.common.v1 import common_pb2
from kvmesh.errors import NotFound

from .metrics import ControllerMetrics

logger = logging.getLogger(__name__)

EventStatus = common_pb2.EventStatus
Operation = common_pb2.Operation

TERMINAL = frozenset({common_pb2.COMPLETED, common_pb2.FAILED, common_pb2.CANCELLED})
_OUTCOME = {common_pb2.COMPLETED: "completed", common_pb2.FAILED: "failed", common_pb2.CANCELLED: "cancelled"}
# LMCache's event ids are the operation's name followed by a uuid4.
_ID_PREFIX = {
    common_pb2.COMPRESS: "Compress", common_pb2.DECOMPRESS: "Decompress", common_pb2.MOVE: "Move",
    common_pb2.CLEAR: "Clear", common_pb2.PIN: "Pin", common_pb2.UNPIN: "Unpin",
}


def new_event_id(prefix: str) -> str:
    """An id in LMCache's style: ``"Compress" + uuid4 hex``."""
    return prefix + uuid.uuid4().hex


def operation_name(op: int) -> str:
    return common_pb2.Operation.Name(op).lower()


@dataclass
class _Update:
    event: common_pb2.Event
    progress: common_pb2.ChunkProgress | None


@dataclass
class _Entry:
    event: common_pb2.Event
    watchers: set[asyncio.Queue[_Update]] = field(default_factory=set)
    # Per worker: index into event.workers.
    worker_index: dict[int, int] = field(default_factory=dict)


class EventTable:
    """Holds events by id; every mutation goes through its methods so watchers and metrics follow."""

    def __init__(self, metrics: ControllerMetrics, ttl_seconds: float = 3600.0, max_events: int = 10000) -> None:
        if ttl_seconds <= 0 or max_events <= 0:
            raise ValueError("event ttl and max events must be positive")
        self._metrics = metrics
        self._ttl = ttl_seconds
        self._max = max_events
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    # --- creation and updates ---------------------------------------------------------------
    def create(self, operation: int, *, instance_id: str, method: str = "", location: str = "",
               num_tokens: int = 0, worker_ids: list[int] | None = None, chunks_total: int = 0,
               target_instance_id: str = "", target_location: str = "") -> common_pb2.Event:
        """A new PENDING event (one WorkerResult per worker), counted as in flight."""
        self.prune()
        ev = common_pb2.Event(
            event_id=new_event_id(_ID_PREFIX[operation]), operation=operation, status=common_pb2.PENDING,
            instance_id=instance_id, method=method, location=location, num_tokens=num_tokens,
            chunks_total=chunks_total, created_time=time.time(),
            target_instance_id=target_instance_id, target_location=target_location)
        entry = _Entry(event=ev)
        for i, wid in enumerate(worker_ids or []):
            ev.workers.add(worker_id=wid, status=common_pb2.PENDING)
            entry.worker_index[wid] = i
        self._entries[ev.event_id] = entry
        self._metrics.events_in_flight.labels(operation=operation_name(operation)).inc()
        self._enforce_count()
        return ev

    def _entry(self, event_id: str) -> _Entry:
        entry = self._entries.get(event_id)
        if entry is None:
            raise NotFound(f"event {event_id!r} not found (unknown, or dropped after its time-to-live)")
        return entry

    def _worker(self, entry: _Entry, worker_id: int) -> common_pb2.WorkerResult:
        idx = entry.worker_index.get(worker_id)
        if idx is None:
            entry.worker_index[worker_id] = len(entry.event.workers)
            return entry.event.workers.add(worker_id=worker_id, status=common_pb2.PENDING)
        return entry.event.workers[idx]

    def _publish(self, entry: _Entry, progress: common_pb2.ChunkProgress | None = None) -> None:
        if not entry.watchers:
            return
        snapshot = common_pb2.Event()
        snapshot.CopyFrom(entry.event)
        for q in entry.watchers:
            q.put_nowait(_Update(snapshot, progress))

    def start(self, event_id: str, worker_chunks: dict[int, int] | None = None) -> None:
        """PENDING -> RUNNING; ``worker_chunks`` gives each worker's expected chunk count."""
        entry = self._entry(event_id)
        ev = entry.event
        if ev.status != common_pb2.PENDING:
            return
        ev.status = common_pb2.RUNNING
        ev.started_time = time.time()
        for wid, n in (worker_chunks or {}).items():
            w = self._worker(entry, wid)
            w.chunks_total = n
        for w in ev.workers:
            w.status = common_pb2.RUNNING
        if worker_chunks:
            ev.chunks_total = sum(w.chunks_total for w in ev.workers)
        self._publish(entry)

    def chunk_done(self, event_id: str, progress: common_pb2.ChunkProgress) -> None:
        """One chunk finished on one worker: counts, bytes and ratio move, watchers hear of it."""
        entry = self._entry(event_id)
        ev = entry.event
        if ev.status in TERMINAL:
            return
        w = self._worker(entry, progress.worker_id)
        w.chunks_done += 1
        ev.chunks_done += 1
        if w.chunks_done > w.chunks_total:
            # The agent found more chunks than its lookup said (admitted meanwhile): totals follow.
            w.chunks_total = w.chunks_done
            ev.chunks_total = max(ev.chunks_total, sum(x.chunks_total for x in ev.workers))
        if not progress.skipped and not progress.error:
            w.bytes_before += progress.bytes_before
            w.bytes_after += progress.bytes_after
            ev.bytes_before += progress.bytes_before
            ev.bytes_after += progress.bytes_after
            ev.compression_ratio = ev.bytes_before / ev.bytes_after if ev.bytes_after else 0.0
            labels = {"operation": operation_name(ev.operation), "method": ev.method, "location": ev.location}
            self._metrics.chunks_total.labels(**labels).inc()
            self._metrics.bytes_before_total.labels(**labels).inc(progress.bytes_before)
            self._metrics.bytes_after_total.labels(**labels).inc(progress.bytes_after)
        if progress.error and not w.error:
            w.error = f"chunk {progress.chunk_index}: {progress.error}"
        self._publish(entry, progress)

    def worker_finished(self, event_id: str, worker_id: int, *, error: str = "",
                        chunks_total: int | None = None, bytes_before: int | None = None,
                        bytes_after: int | None = None) -> None:
        """One worker's part ended (with ``error`` when it failed)."""
        entry = self._entry(event_id)
        if entry.event.status in TERMINAL:
            return
        w = self._worker(entry, worker_id)
        if chunks_total is not None:
            w.chunks_total = chunks_total
        if bytes_before is not None and not w.bytes_before:
            w.bytes_before = bytes_before
        if bytes_after is not None and not w.bytes_after:
            w.bytes_after = bytes_after
        if error:
            w.error = error
        w.status = common_pb2.FAILED if w.error else common_pb2.COMPLETED
        self._publish(entry)

    def finish(self, event_id: str, status: int, error: str = "") -> None:
        """End the event (COMPLETED/FAILED/CANCELLED); later calls change nothing."""
        entry = self._entry(event_id)
        ev = entry.event
        if ev.status in TERMINAL:
            return
        if status not in TERMINAL:
            raise ValueError(f"finish needs a terminal status, got {status}")
        ev.status = status
        if error:
            ev.error = error
        ev.finished_time = time.time()
        for w in ev.workers:
            if w.status not in TERMINAL:
                w.status = status
                if status != common_pb2.COMPLETED and not w.error:
                    w.error = error
        op = operation_name(ev.operation)
        self._metrics.events_in_flight.labels(operation=op).dec()
        self._metrics.events_total.labels(operation=op, method=ev.method, location=ev.location,
                                          outcome=_OUTCOME[status]).inc()
        self._metrics.event_duration_seconds.labels(operation=op).observe(ev.finished_time - ev.created_time)
        if status == common_pb2.COMPLETED and ev.operation == common_pb2.COMPRESS and ev.bytes_after:
            self._metrics.compression_ratio.labels(method=ev.method, location=ev.location).set(
                ev.bytes_before / ev.bytes_after)
        logger.info("event %s %s: %s%s", ev.event_id, op, EventStatus.Name(status),
                    f" ({error})" if error else "")
        self._publish(entry)

    def fail_in_flight(self, match: Callable[[common_pb2.Event], bool], error: str) -> list[str]:
        """FAIL every in-flight event for which ``match(event)`` holds; their ids."""
        failed = []
        for entry in list(self._entries.values()):
            if entry.event.status not in TERMINAL and match(entry.event):
                self.finish(entry.event.event_id, common_pb2.FAILED, error)
                failed.append(entry.event.event_id)
        return failed

    # --- reads ---------------------------------------------------------------------------------
    def get(self, event_id: str) -> common_pb2.Event:
        """A copy of the event (NotFound when unknown or dropped)."""
        self.prune()
        out = common_pb2.Event()
        out.CopyFrom(self._entry(event_id).event)
        return out

    def recent(self, limit: int = 0, instance_id: str = "") -> list[common_pb2.Event]:
        """Copies of the events, newest first."""
        self.prune()
        out: list[common_pb2.Event] = []
        for entry in reversed(self._entries.values()):
            if instance_id and entry.event.instance_id != instance_id:
                continue
            ev = common_pb2.Event()
            ev.CopyFrom(entry.event)
            out.append(ev)
            if limit and len(out) >= limit:
                break
        return out

    async def watch(self, event_id: str) -> AsyncIterator[tuple[common_pb2.Event, common_pb2.ChunkProgress | None]]:
        """The event now, then once per change, until it ends."""
        entry = self._entry(event_id)
        queue: asyncio.Queue[_Update] = asyncio.Queue()
        entry.watchers.add(queue)
        try:
            current = common_pb2.Event()
            current.CopyFrom(entry.event)
            yield current, None
            while current.status not in TERMINAL:
                update = await queue.get()
                current = update.event
                yield update.event, update.progress
        finally:
            entry.watchers.discard(queue)

    def in_flight(self) -> list[str]:
        return [eid for eid, e in self._entries.items() if e.event.status not in TERMINAL]

    # --- bounds ----------------------------------------------------------------------------------
    def prune(self, now: float | None = None) -> int:
        """Drop ended events older than the TTL; how many went."""
        now = time.time() if now is None else now
        stale = [eid for eid, e in self._entries.items()
                 if e.event.status in TERMINAL and not e.watchers and now - e.event.finished_time > self._ttl]
        for eid in stale:
            del self._entries[eid]
        return len(stale)

    def _enforce_count(self) -> None:
        if len(self._entries) <= self._max:
            return
        for eid in [eid for eid, e in self._entries.items() if e.event.status in TERMINAL]:
            if len(self._entries) <= self._max:
                break
            del self._entries[eid]
