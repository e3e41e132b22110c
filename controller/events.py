"""The event table: asynchronous operations, their progress, and watchers of that progress.

Every operation is O(1) (amortized): events are held in a dict by id; ended events also sit in an
ordered dict in the order they ended, which is their expiry order (one time-to-live for all), so
pruning by age and by count pops from its front and never scans the table. Events in flight are
bounded by admission (``reserve``/``create`` raise ``TooBusy`` at ``max_in_flight``), ended ones by
``max_events`` (the oldest ended go first).

Every change is pushed to the event's watchers, each through a bounded queue: a watcher that falls
``watch_queue_size`` updates behind is dropped, its stream ending with a ``TooBusy`` error, rather
than buffered without limit.

With an ``EventStore`` attached, changed events are written to SQLite in batches by one thread, so
an event id still answers after a restart (see ``EventStore``).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import sqlite3
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kvmesh.api.common.v1 import common_pb2
from kvmesh.errors import NotFound, TooBusy

from .metrics import ControllerMetrics

logger = logging.getLogger(__name__)

EventStatus = common_pb2.EventStatus
Operation = common_pb2.Operation

TERMINAL = frozenset({common_pb2.COMPLETED, common_pb2.FAILED, common_pb2.CANCELLED})
_OUTCOME = {common_pb2.COMPLETED: "completed", common_pb2.FAILED: "failed", common_pb2.CANCELLED: "cancelled"}
# LMCache's event ids are the operation's name followed by 32 hex digits (see ``new_event_id``).
_ID_PREFIX = {
    common_pb2.COMPRESS: "Compress", common_pb2.DECOMPRESS: "Decompress", common_pb2.MOVE: "Move",
    common_pb2.CLEAR: "Clear", common_pb2.PIN: "Pin", common_pb2.UNPIN: "Unpin",
}
# Chunk errors kept per worker (the count is exact; the list is the first ones).
MAX_CHUNK_ERRORS = 16
RESTARTED = "controller restarted while the event ran"


# ``--event-db`` values that keep events in memory only (nothing survives a restart).
EVENT_DB_DISABLED = frozenset({":memory:", "off", "none"})
ENV_STATE_DIR = "KVMESH_STATE_DIR"


def default_state_dir() -> Path:
    """``$KVMESH_STATE_DIR``, else ``$XDG_STATE_HOME/kvmesh``, else ``~/.local/state/kvmesh``."""
    explicit = os.environ.get(ENV_STATE_DIR, "").strip()
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_STATE_HOME", "").strip()
    return (Path(xdg) if xdg else Path.home() / ".local" / "state") / "kvmesh"


def event_db_path(event_db: str, state_dir: str, grpc_port: int) -> Path | None:
    """The SQLite file a controller's events persist in; None: memory only.

    The default name carries the gRPC port, the controller's identity on its host: a controller
    restarted with the same flags finds its events, and two controllers never share a file. With
    port 0 (a free port each start) there is no stable name, so the default is memory only.
    """
    if event_db.strip().lower() in EVENT_DB_DISABLED:
        return None
    if event_db:
        return Path(event_db)
    if grpc_port == 0:
        return None
    state = Path(state_dir) if state_dir else default_state_dir()
    return state / f"controller-events-{grpc_port}.sqlite3"


def new_event_id(prefix: str) -> str:
    """An id in LMCache's style, ``"Compress"`` + 32 hex digits: a UUIDv7 (RFC 9562: 48 bits of Unix
    milliseconds, then 74 random bits) rather than LMCache's uuid4, same shape and as unguessable to
    within the millisecond it was made.

    Why time-ordered: the event store's primary key index takes each new id at its right edge instead
    of at a random page, which halves the store's CPU per event (14-18 instead of 31-34 µs a row at
    20 rows a commit with 10,000 rows held) and its WAL writes."""
    value = (time.time_ns() // 1_000_000 & _MS_MASK) << 80 | int.from_bytes(os.urandom(10), "big")
    value = value & _V7_CLEAR | _V7_SET  # version 7, variant 10
    return f"{prefix}{value:032x}"


_MS_MASK = (1 << 48) - 1
_V7_CLEAR = ~((0xF << 76) | (0x3 << 62)) & ((1 << 128) - 1)
_V7_SET = (0x7 << 76) | (0x2 << 62)


def operation_name(op: int) -> str:
    return common_pb2.Operation.Name(op).lower()


@dataclass
class _Update:
    event: common_pb2.Event
    progress: common_pb2.ChunkProgress | None


class _Watcher:
    """One watch stream's queue: bounded; on overflow it is emptied and marked dropped."""

    __slots__ = ("updates", "wake", "dropped", "limit")

    def __init__(self, limit: int) -> None:
        self.updates: deque[_Update] = deque()
        self.wake = asyncio.Event()
        self.dropped = False
        self.limit = limit

    def push(self, update: _Update) -> bool:
        """Queue ``update``; False when this overflowed the bound (the watcher is dropped)."""
        if self.dropped:
            return False
        if len(self.updates) >= self.limit:
            self.dropped = True
            self.updates.clear()  # free what it held at once
            self.wake.set()
            return False
        self.updates.append(update)
        self.wake.set()
        return True


@dataclass
class _Entry:
    event: common_pb2.Event
    watchers: set[_Watcher] = field(default_factory=set)
    # Per worker: index into event.workers.
    worker_index: dict[int, int] = field(default_factory=dict)
    # The event's (chunks, bytes before, bytes after) counters, looked up once.
    counters: tuple[Any, Any, Any] | None = None


class EventStore:
    """The event table's copy in SQLite (WAL mode), for events that outlive a restart.

    Rows are whole ``Event`` messages (protobuf bytes, no pickle). Every call but ``load`` runs on
    the store's own thread (``submit``), so the event loop never waits on the disk. The store is
    bounded as the table is: at most ``max_ended`` ended rows (the oldest ended go first) plus the
    in-flight ones.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        # A state folder it creates is the controller's own (0700); an existing one is left as it is.
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="kvmesh-event-store")
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=10.0)
        self._conn.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a commit survives a crash of the process (not of the machine's power).
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("CREATE TABLE IF NOT EXISTS events (event_id TEXT PRIMARY KEY, created_time REAL NOT NULL,"
                           " finished_time REAL NOT NULL, data BLOB NOT NULL)")
        self._conn.execute("CREATE INDEX IF NOT EXISTS events_finished ON events (finished_time)")

    def load(self) -> list[common_pb2.Event]:
        """Every stored event, oldest first (unreadable rows are skipped with a warning)."""
        out: list[common_pb2.Event] = []
        for event_id, data in self._conn.execute("SELECT event_id, data FROM events ORDER BY created_time"):
            ev = common_pb2.Event()
            try:
                ev.ParseFromString(data)
            except Exception:  # noqa: BLE001 - a damaged row must not stop the controller
                logger.warning("event %s in %s is unreadable; skipped", event_id, self.path)
                continue
            out.append(ev)
        return out

    def submit(self, fn: Callable[..., object], *args: object) -> asyncio.Future[object]:
        return asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def write(self, rows: list[tuple[str, float, float, bytes]], max_ended: int, expired_before: float,
              trim: bool = True) -> None:
        """Upsert ``rows``, drop the ended rows that finished before ``expired_before`` and (with ``trim``)
        the ended rows past ``max_ended``, in one transaction (store thread). Trimming by count walks
        the ended rows, so callers do it now and then."""
        with self._conn:
            self._conn.execute("BEGIN")
            self._conn.executemany("INSERT OR REPLACE INTO events (event_id, created_time, finished_time, data)"
                                   " VALUES (?, ?, ?, ?)", rows)
            self._conn.execute("DELETE FROM events WHERE finished_time > 0 AND finished_time < ?", (expired_before,))
            if trim:
                self._conn.execute("DELETE FROM events WHERE rowid IN (SELECT rowid FROM events WHERE finished_time > 0"
                                   " ORDER BY finished_time DESC LIMIT -1 OFFSET ?)", (max_ended,))

    def close(self) -> None:
        self._executor.shutdown(wait=True)
        self._conn.close()


class EventTable:
    """Holds events by id; every mutation goes through its methods so watchers, metrics and the store follow."""

    def __init__(self, metrics: ControllerMetrics, ttl_seconds: float = 3600.0, max_events: int = 10000, *,
                 max_in_flight: int | None = None, watch_queue_size: int = 256, max_watchers: int = 1000,
                 flush_delay: float = 0.02) -> None:
        if ttl_seconds <= 0 or max_events <= 0 or watch_queue_size <= 0 or max_watchers <= 0:
            raise ValueError("event ttl, max events, watch queue size and max watchers must be positive")
        self._metrics = metrics
        self._ttl = ttl_seconds
        self._max = max_events
        # In flight never over the table's own bound.
        self._max_in_flight = min(max_in_flight or max_events, max_events)
        self._watch_queue_size = watch_queue_size
        self._max_watchers = max_watchers
        self._watchers = 0
        self._entries: dict[str, _Entry] = {}
        self._in_flight: dict[str, None] = {}
        # Ended events in the order they ended (= expiry order).
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._reserved = 0
        # Persistence: ids changed since the last flush, written by the flusher task.
        self._store: EventStore | None = None
        self._dirty: dict[str, None] = {}
        self._dirty_signal: asyncio.Event | None = None
        self._flusher: asyncio.Task[None] | None = None
        self._flush_delay = flush_delay
        self._last_trim = 0.0
        # Ended events end in time order (``_ended``'s order is finished_time's) unless the wall clock
        # stepped back; while it holds, the store drops every ended row older than the oldest ended
        # event still held with one indexed range delete (see ``flush``).
        self._last_finished = 0.0
        self._finish_order_ok = True
        # Labelled metric children by (metric name, label values): labels() costs ~10 µs a call, and
        # each event took five. Bounded as Prometheus' own children are (operations x the methods and
        # locations workers registered).
        self._children: dict[tuple[str, ...], Any] = {}

    def _child(self, metric: Any, *values: str) -> Any:
        key = (metric._name, *values)  # noqa: SLF001 - the metric's own name keys its children
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def in_flight_count(self) -> int:
        return len(self._in_flight)

    # --- admission --------------------------------------------------------------------------------
    def _check_room(self, extra: int = 0) -> None:
        if len(self._in_flight) + self._reserved + extra >= self._max_in_flight:
            self._metrics.admission_refused_total.labels(reason="events_in_flight").inc()
            raise TooBusy(f"{len(self._in_flight) + self._reserved} events are in flight or being admitted, the most "
                          f"this controller runs at once (--max-in-flight {self._max_in_flight}); retry after the "
                          "Retry-After delay", retry_after=1.0)

    def reserve(self) -> None:
        """Hold a place for an event about to be created (``create(reserved=True)`` takes it, ``release`` frees it).

        Raises ``TooBusy`` when the in-flight bound is reached. Reserving before the work that
        precedes ``create`` (an agent round trip) keeps concurrent requests from overshooting it.
        """
        self._check_room()
        self._reserved += 1

    def release(self) -> None:
        """Free a place ``reserve`` held when no event was created after all."""
        self._reserved = max(0, self._reserved - 1)

    # --- creation and updates ---------------------------------------------------------------
    def create(self, operation: int, *, instance_id: str, method: str = "", location: str = "",
               num_tokens: int = 0, worker_ids: list[int] | None = None, chunks_total: int = 0,
               target_instance_id: str = "", target_location: str = "", reserved: bool = False) -> common_pb2.Event:
        """A new PENDING event (one WorkerResult per worker), counted as in flight (TooBusy when full)."""
        if reserved:
            self.release()
        self._check_room()
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
        self._in_flight[ev.event_id] = None
        self._child(self._metrics.events_in_flight, operation_name(operation)).inc()
        self._enforce_count()
        self._changed(ev.event_id)
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
        self._changed(entry.event.event_id)
        if not entry.watchers:
            return
        snapshot = common_pb2.Event()
        snapshot.CopyFrom(entry.event)
        update = _Update(snapshot, progress)
        for w in entry.watchers:
            w.push(update)  # a watcher that overflows is dropped; its watch() ends with the error

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
        """One chunk ended on one worker: done (or skipped) or failed, counted apart; watchers hear of it."""
        entry = self._entry(event_id)
        ev = entry.event
        if ev.status in TERMINAL:
            return
        w = self._worker(entry, progress.worker_id)
        if progress.error:
            w.chunks_failed += 1
            ev.chunks_failed += 1
            if len(w.chunk_errors) < MAX_CHUNK_ERRORS:
                w.chunk_errors.append(f"chunk {progress.chunk_index}: {progress.error}")
            if not w.error:
                w.error = f"chunk {progress.chunk_index}: {progress.error}"
        else:
            w.chunks_done += 1
            ev.chunks_done += 1
        if w.chunks_done + w.chunks_failed > w.chunks_total:
            # The agent found more chunks than its lookup said (admitted meanwhile): totals follow.
            w.chunks_total = w.chunks_done + w.chunks_failed
            ev.chunks_total = max(ev.chunks_total, sum(x.chunks_total for x in ev.workers))
        if not progress.skipped and not progress.error:
            w.bytes_before += progress.bytes_before
            w.bytes_after += progress.bytes_after
            ev.bytes_before += progress.bytes_before
            ev.bytes_after += progress.bytes_after
            ev.compression_ratio = ev.bytes_before / ev.bytes_after if ev.bytes_after else 0.0
            if entry.counters is None:
                labels = {"operation": operation_name(ev.operation), "method": ev.method, "location": ev.location}
                m = self._metrics
                entry.counters = (m.chunks_total.labels(**labels), m.bytes_before_total.labels(**labels),
                                  m.bytes_after_total.labels(**labels))
            chunks, before, after = entry.counters
            chunks.inc()
            before.inc(progress.bytes_before)
            after.inc(progress.bytes_after)
        self._publish(entry, progress)

    def settle(self, event_id: str, worker_chunks: dict[int, int]) -> common_pb2.Event:
        """PENDING -> COMPLETED in one step, for an event with nothing to do: each worker's chunks all
        done (skipped, so no bytes), as ``start``, one ``chunk_done`` per skipped chunk,
        ``worker_finished`` and ``finish`` would leave it, with one update to watchers instead of one per
        chunk. The event itself (read it, never change it)."""
        entry = self._entry(event_id)
        ev = entry.event
        if ev.status != common_pb2.PENDING:
            raise ValueError(f"settle needs a PENDING event, {event_id} is {EventStatus.Name(ev.status)}")
        ev.started_time = time.time()
        for wid, n in worker_chunks.items():
            w = self._worker(entry, wid)
            w.chunks_total = w.chunks_done = n
            w.status = common_pb2.COMPLETED
        ev.chunks_total = ev.chunks_done = sum(w.chunks_total for w in ev.workers)
        self.finish(event_id, common_pb2.COMPLETED)
        return ev

    def worker_finished(self, event_id: str, worker_id: int, *, error: str = "",
                        chunks_total: int | None = None) -> None:
        """One worker's part ended (with ``error`` when it failed).

        Bytes come only from the chunks reported one by one (``chunk_done``), never from a total
        the agent claims at the end: the controller's figures are sums of what it checked.
        """
        entry = self._entry(event_id)
        if entry.event.status in TERMINAL:
            return
        w = self._worker(entry, worker_id)
        if chunks_total is not None:
            w.chunks_total = max(chunks_total, w.chunks_done + w.chunks_failed)
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
        if ev.finished_time < self._last_finished:
            self._finish_order_ok = False  # the clock stepped back: trim the store by count from now on
        self._last_finished = max(self._last_finished, ev.finished_time)
        for w in ev.workers:
            if w.status not in TERMINAL:
                w.status = status
                if status != common_pb2.COMPLETED and not w.error:
                    w.error = error
        self._in_flight.pop(event_id, None)
        self._ended[event_id] = None
        op = operation_name(ev.operation)
        m = self._metrics
        self._child(m.events_in_flight, op).dec()
        self._child(m.events_total, op, ev.method, ev.location, _OUTCOME[status]).inc()
        self._child(m.event_duration_seconds, op).observe(ev.finished_time - ev.created_time)
        if status == common_pb2.COMPLETED and ev.operation == common_pb2.COMPRESS and ev.bytes_after:
            self._metrics.compression_ratio.labels(method=ev.method, location=ev.location).set(
                ev.bytes_before / ev.bytes_after)
        logger.info("event %s %s: %s%s", ev.event_id, op, EventStatus.Name(status),
                    f" ({error})" if error else "")
        self._publish(entry)

    def fail_in_flight(self, match: Callable[[common_pb2.Event], bool], error: str) -> list[str]:
        """FAIL every in-flight event for which ``match(event)`` holds; their ids."""
        failed = [eid for eid in self._in_flight if match(self._entries[eid].event)]
        for eid in failed:
            self.finish(eid, common_pb2.FAILED, error)
        return failed

    # --- reads ---------------------------------------------------------------------------------
    def get(self, event_id: str) -> common_pb2.Event:
        """A copy of the event (NotFound when unknown or dropped)."""
        self.prune()
        out = common_pb2.Event()
        out.CopyFrom(self._entry(event_id).event)
        return out

    def peek(self, event_id: str) -> common_pb2.Event:
        """The event itself, not a copy: read it, never change it (check_finish's fast path)."""
        self.prune()
        return self._entry(event_id).event

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
        """The event now, then once per change, until it ends.

        Raises ``TooBusy`` when too many watches are open, and ends with ``TooBusy`` when this
        watcher fell more than ``watch_queue_size`` updates behind (it was dropped).
        """
        entry = self._entry(event_id)
        if self._watchers >= self._max_watchers:
            self._metrics.admission_refused_total.labels(reason="watchers").inc()
            raise TooBusy(f"{self._watchers} event watches are open, the most this controller serves at once; "
                          f"poll GET /events/{event_id} or retry later", retry_after=1.0)
        watcher = _Watcher(self._watch_queue_size)
        entry.watchers.add(watcher)
        self._watchers += 1
        try:
            current = common_pb2.Event()
            current.CopyFrom(entry.event)
            yield current, None
            while current.status not in TERMINAL:
                while not watcher.updates and not watcher.dropped:
                    watcher.wake.clear()
                    await watcher.wake.wait()
                if watcher.dropped:
                    self._metrics.watchers_dropped_total.inc()
                    raise TooBusy(f"watch of event {event_id} dropped: this watcher fell more than "
                                  f"{self._watch_queue_size} updates behind (too slow a reader); "
                                  f"read the stream faster or poll GET /events/{event_id}", retry_after=1.0)
                update = watcher.updates.popleft()
                current = update.event
                yield update.event, update.progress
        finally:
            entry.watchers.discard(watcher)
            self._watchers -= 1

    def in_flight(self) -> list[str]:
        return list(self._in_flight)

    # --- bounds ----------------------------------------------------------------------------------
    def prune(self, now: float | None = None) -> int:
        """Drop ended events older than the TTL (from the front of the ended order); how many went."""
        now = time.time() if now is None else now
        dropped = 0
        while self._ended:
            eid = next(iter(self._ended))
            entry = self._entries.get(eid)
            if entry is not None and now - entry.event.finished_time <= self._ttl:
                break
            self._drop(eid)
            dropped += 1
        return dropped

    def _drop(self, event_id: str) -> None:
        self._ended.pop(event_id, None)
        self._entries.pop(event_id, None)
        self._dirty.pop(event_id, None)

    def _enforce_count(self) -> None:
        while len(self._entries) > self._max and self._ended:
            self._drop(next(iter(self._ended)))

    # --- persistence -------------------------------------------------------------------------------
    def _changed(self, event_id: str) -> None:
        if self._store is None:
            return
        self._dirty[event_id] = None
        if self._dirty_signal is not None:
            self._dirty_signal.set()
        if self._flusher is None:
            self.start_flusher()

    def attach_store(self, store: EventStore) -> int:
        """Load the store's events (in-flight ones end FAILED: they ran in an earlier process), then
        write every later change to it (``start_flusher``); how many loaded. Call before serving."""
        loaded = store.load()
        now = time.time()
        self._store = store
        restarted = 0
        for ev in loaded:
            if ev.event_id in self._entries or ev.operation not in _ID_PREFIX:
                continue
            if ev.status not in TERMINAL:
                ev.status = common_pb2.FAILED
                ev.error = RESTARTED
                ev.finished_time = now
                for w in ev.workers:
                    if w.status not in TERMINAL:
                        w.status = common_pb2.FAILED
                        w.error = w.error or RESTARTED
                self._dirty[ev.event_id] = None
                restarted += 1
            entry = _Entry(event=ev, worker_index={w.worker_id: i for i, w in enumerate(ev.workers)})
            self._entries[ev.event_id] = entry
        ended = [eid for eid, e in self._entries.items() if e.event.status in TERMINAL and eid not in self._ended]
        for eid in sorted(ended, key=lambda e: self._entries[e].event.finished_time):
            self._ended[eid] = None
            self._last_finished = max(self._last_finished, self._entries[eid].event.finished_time)
        self.prune(now)
        self._enforce_count()
        self._dirty_signal = asyncio.Event()
        if self._dirty:
            self._dirty_signal.set()
        self.start_flusher()
        logger.info("event store %s: %d events loaded (%d were in flight: now FAILED)", store.path,
                    len(self._entries), restarted)
        return len(self._entries)

    def start_flusher(self) -> None:
        """Start the task that writes changes, once there is a store and a running event loop."""
        if self._store is None or self._flusher is not None:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # not on a loop yet: the first change or the sweeper starts it
        self._flusher = loop.create_task(self._flush_loop(), name="kvmesh-event-flush")

    def _rows(self, ids: Iterable[str]) -> list[tuple[str, float, float, bytes]]:
        rows = []
        for eid in ids:
            entry = self._entries.get(eid)
            if entry is not None:
                ev = entry.event
                rows.append((eid, ev.created_time, ev.finished_time, ev.SerializeToString()))
        return rows

    async def flush(self, trim: bool | None = None) -> None:
        """Write the changed events now (on the store's thread); ``trim`` the count bound too (None:
        when a second has passed since it last was)."""
        if self._store is None or (not self._dirty and not trim):
            return
        ids, self._dirty = self._dirty, {}
        rows = self._rows(ids)
        now = time.monotonic()
        # Every write drops, with one indexed range delete, the ended rows older than the time bound and
        # (while ended events end in time order) older than the oldest ended event still held: exactly
        # the ended events this table dropped. Trimming by count walks every ended row (16 ms for
        # 10,000, a cost per admission at 1,000/s when done each second), so it runs once a minute as a
        # safety net, or about once a second after the wall clock stepped back (the file then holds
        # at most a second's worth of events over the bound).
        drop_before = time.time() - self._ttl
        if self._finish_order_ok and self._ended:
            oldest = self._entries.get(next(iter(self._ended)))
            if oldest is not None:
                drop_before = max(drop_before, oldest.event.finished_time)
        if trim is None:
            trim = now - self._last_trim >= (60.0 if self._finish_order_ok else 1.0)
        if trim:
            self._last_trim = now
        try:
            await self._store.submit(self._store.write, rows, self._max, drop_before, trim)
        except (sqlite3.Error, OSError):
            # Keep them to write again; the set is bounded by the table itself.
            for eid in ids:
                if eid in self._entries:
                    self._dirty[eid] = None
            raise

    async def _flush_loop(self) -> None:
        """Batch changes: wake on the first change, wait ``flush_delay`` for more, write them all."""
        assert self._dirty_signal is not None
        while True:
            await self._dirty_signal.wait()
            self._dirty_signal.clear()
            await asyncio.sleep(self._flush_delay)
            try:
                await self.flush()
            except (sqlite3.Error, OSError) as err:
                logger.error("writing events to %s failed (retrying in 1s): %s",
                             self._store.path if self._store else "?", err)
                self._dirty_signal.set()
                await asyncio.sleep(1.0)

    async def close_store(self) -> None:
        """Write what changed, stop the flusher and close the store."""
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        store = self._store
        if store is None:
            return
        try:
            await self.flush(trim=True)
        except (sqlite3.Error, OSError) as err:
            logger.error("writing events to %s at shutdown failed: %s", store.path, err)
        self._store = None
        await asyncio.get_running_loop().run_in_executor(None, store.close)
