"""Instances and their workers (ranks): registration, heartbeats, liveness, and the lookup index.

A worker is *down* once it has missed ``missed_heartbeats`` heartbeats (at the interval it announced
when it registered, or ``worker_timeout`` when it announced none) and is dropped from the registry
after ``worker_timeout`` of silence. The lookup index holds, per worker and location, the chunk keys
the worker reported admitted; it is answered with the same chunking code the agents use.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvmesh.errors import InvalidArgument, NotFound
from kvmesh.core.keys import chunk_spans

logger = logging.getLogger(__name__)

UP = "up"
DOWN = "down"


@dataclass
class Worker:
    instance_id: str
    worker_id: int
    ip: str
    port: int
    peer_init_url: str
    methods: tuple[str, ...]
    locations: tuple[str, ...]
    chunk_size: int
    heartbeat_interval: float
    registration_time: float
    last_heartbeat_time: float
    state: str = UP
    # location -> chunk key (hex) -> token_end of the prefix it completes.
    index: dict[str, dict[str, int]] = field(default_factory=dict)

    @property
    def target(self) -> str:
        """host:port of the worker's InstanceAgent service."""
        host = self.ip if ":" not in self.ip or self.ip.startswith("[") else f"[{self.ip}]"
        return f"{host}:{self.port}"

    def prefix_tokens(self, tokens: Sequence[int], location: str) -> int:
        """Length of the prefix of ``tokens`` whose chunks this worker reported in ``location``."""
        held = self.index.get(location)
        if not held:
            return 0
        matched = 0
        for span in chunk_spans(tokens, self.chunk_size):
            if span.key not in held:
                break
            matched = span.end
        return matched


class Registry:
    """Every known worker, by (instance id, worker id)."""

    def __init__(self, worker_timeout: float = 300.0, missed_heartbeats: int = 3) -> None:
        if worker_timeout <= 0 or missed_heartbeats < 1:
            raise ValueError("worker timeout must be positive and missed heartbeats at least 1")
        self.worker_timeout = worker_timeout
        self.missed_heartbeats = missed_heartbeats
        self._workers: dict[tuple[str, int], Worker] = {}

    # --- agents' calls ---------------------------------------------------------------------------
    def register(self, *, instance_id: str, worker_id: int, ip: str, port: int, peer_init_url: str,
                 methods: Sequence[str], locations: Sequence[str], chunk_size: int,
                 heartbeat_interval: float) -> Worker:
        if not instance_id:
            raise InvalidArgument("instance_id is required")
        if worker_id < 0:
            raise InvalidArgument(f"worker_id must be >= 0, got {worker_id}")
        if not ip or not 0 < port < 65536:
            raise InvalidArgument(f"ip and a port in 1..65535 are required, got {ip!r}:{port}")
        if chunk_size <= 0:
            raise InvalidArgument(f"chunk_size must be positive, got {chunk_size}")
        if heartbeat_interval < 0:
            raise InvalidArgument(f"heartbeat_interval_seconds must be >= 0, got {heartbeat_interval}")
        now = time.time()
        worker = Worker(instance_id=instance_id, worker_id=worker_id, ip=ip, port=port,
                        peer_init_url=peer_init_url, methods=tuple(methods), locations=tuple(locations),
                        chunk_size=chunk_size, heartbeat_interval=heartbeat_interval,
                        registration_time=now, last_heartbeat_time=now)
        old = self._workers.get((instance_id, worker_id))
        if old is not None and (old.ip, old.port, old.chunk_size) == (ip, port, chunk_size):
            # A re-registration of the same agent keeps its index until the full resync replaces it.
            worker.index = old.index
        self._workers[(instance_id, worker_id)] = worker
        logger.info("worker %s/%s registered at %s (methods %s, locations %s, chunk_size %s)",
                    instance_id, worker_id, worker.target, list(methods), list(locations), chunk_size)
        return worker

    def heartbeat(self, instance_id: str, worker_id: int) -> Worker | None:
        """Record a heartbeat; None when the worker is unknown (it must re-register)."""
        worker = self._workers.get((instance_id, worker_id))
        if worker is None:
            return None
        worker.last_heartbeat_time = time.time()
        if worker.state == DOWN:
            logger.info("worker %s/%s is up again", instance_id, worker_id)
            worker.state = UP
        return worker

    def deregister(self, instance_id: str, worker_id: int) -> Worker | None:
        return self._workers.pop((instance_id, worker_id), None)

    def report_kv_events(self, instance_id: str, worker_id: int, events: Sequence[tuple[int, str, str, int]],
                         full_resync: bool) -> Worker:
        """Apply (type, location, key, token_end) admits (1) and evictions (2) to a worker's index."""
        worker = self._workers.get((instance_id, worker_id))
        if worker is None:
            raise NotFound(f"worker {worker_id} of instance {instance_id!r} is not registered; register first")
        if full_resync:
            worker.index = {}
        for kind, location, key, token_end in events:
            if kind == 1:
                worker.index.setdefault(location, {})[key] = token_end
            elif kind == 2:
                held = worker.index.get(location)
                if held is not None:
                    held.pop(key, None)
            else:
                raise InvalidArgument(f"KV event type {kind} is neither ADMIT nor EVICT")
        return worker

    # --- liveness ----------------------------------------------------------------------------------
    def down_after(self, worker: Worker) -> float:
        """Seconds of silence after which ``worker`` counts as down."""
        if worker.heartbeat_interval > 0:
            return min(self.worker_timeout, self.missed_heartbeats * worker.heartbeat_interval)
        return self.worker_timeout

    def sweep(self, now: float | None = None) -> tuple[list[Worker], list[Worker]]:
        """Mark silent workers down and drop long-silent ones; (newly down, dropped)."""
        now = time.time() if now is None else now
        newly_down: list[Worker] = []
        dropped: list[Worker] = []
        for key, worker in list(self._workers.items()):
            silent = now - worker.last_heartbeat_time
            if silent > max(self.worker_timeout, self.down_after(worker)):
                del self._workers[key]
                dropped.append(worker)
                if worker.state == UP:
                    newly_down.append(worker)
            elif worker.state == UP and silent > self.down_after(worker):
                worker.state = DOWN
                newly_down.append(worker)
        for w in newly_down:
            logger.warning("worker %s/%s missed its heartbeats (silent %.1fs): marked down",
                           w.instance_id, w.worker_id, now - w.last_heartbeat_time)
        for w in dropped:
            logger.warning("worker %s/%s silent for over %.0fs: dropped", w.instance_id, w.worker_id,
                           self.worker_timeout)
        return newly_down, dropped

    def counts(self) -> dict[str, int]:
        out = {UP: 0, DOWN: 0}
        for w in self._workers.values():
            out[w.state] += 1
        return out

    # --- queries -------------------------------------------------------------------------------------
    def get(self, instance_id: str, worker_id: int) -> Worker | None:
        return self._workers.get((instance_id, worker_id))

    def instance_ids(self) -> list[str]:
        return sorted({iid for iid, _ in self._workers})

    def workers(self, instance_id: str | None = None) -> list[Worker]:
        """Workers of one instance (all when None), by instance then rank."""
        return sorted((w for w in self._workers.values() if instance_id is None or w.instance_id == instance_id),
                      key=lambda w: (w.instance_id, w.worker_id))

    def instance(self, instance_id: str) -> list[Worker]:
        """The workers of a known instance (NotFound naming the known ones otherwise)."""
        workers = self.workers(instance_id)
        if not workers:
            known = self.instance_ids()
            raise NotFound(f"instance {instance_id!r} is not registered"
                           + (f"; registered instances: {', '.join(known)}" if known else "; no instance is registered"))
        return workers

    def lookup(self, tokens: Sequence[int]) -> list[tuple[str, str, int]]:
        """(instance, location, prefix tokens) for every location holding a prefix, longest first.

        An instance holds a prefix only where every one of its up workers (ranks) holds it.
        """
        by_instance: dict[str, list[Worker]] = {}
        for w in self._workers.values():
            if w.state == UP:
                by_instance.setdefault(w.instance_id, []).append(w)
        found: list[tuple[str, str, int]] = []
        for iid, workers in by_instance.items():
            locations = set().union(*(w.index.keys() for w in workers))
            for loc in sorted(locations):
                n = min(w.prefix_tokens(tokens, loc) for w in workers)
                if n > 0:
                    found.append((iid, loc, n))
        found.sort(key=lambda t: (-t[2], t[0], t[1]))
        return found
