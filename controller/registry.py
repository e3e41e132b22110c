"""Instances and their workers (ranks): registration, heartbeats, liveness, and the lookup index.

A worker is *down* once it has missed ``missed_heartbeats`` heartbeats (at the interval it announced
when it registered, or ``worker_timeout`` when it announced none) and is dropped from the registry
after ``worker_timeout`` of silence. Silence is measured on a liveness clock that stops while the
controller itself could not serve heartbeats (``credit_stall``: the sweeper's own lateness), so a
stalled event loop never turns a live worker down.

Heartbeats are served on threads of their own (``heartbeat_server``), apart from the event loop
that serves everything else, so that a loop merely *busy* with requests (not stalled: the credit
does not apply) cannot delay them either. The liveness state (the worker table's membership, each
worker's last-seen times and up/down state, the stall credit) is therefore guarded by a
``threading.Lock``; the rest of the registry (the lookup index, registration details) is touched by
the event loop only.

A registered (instance, worker) belongs to the endpoint (ip:port) that registered it: another
endpoint is refused (ALREADY_EXISTS) while it is up, and every later call of the worker
(heartbeat, KV reports, deregistration) must carry the secret its registration returned.

The lookup index holds, per worker and location, the chunk keys the worker reported admitted, bounded
per worker; it is answered with the same chunk keys the agents compute. A worker's index is
*complete* (authoritative) once its full resync has arrived whole and nothing was truncated.

Beside it, the *form* of indexed chunks (raw, or the method it is encoded with, and its stored bytes),
as the worker's agent last reported it in the progress of a compress or decompress event. A form is
known only from that progress and forgotten whenever the chunk's key is reported again (an ADMIT: a
new chunk, form unknown), evicted, resynced or fails an operation; a controller that does not know a
chunk's form asks the agent. Admission uses it to end at once an event that has nothing to do; as
with the index itself, an eviction whose report is still on its way can make that answer name a chunk
that has just left.
"""
from __future__ import annotations

import hmac
import logging
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from kvmesh.errors import AlreadyExists, InvalidArgument, NotFound, PermissionDenied, ResourceExhausted
from kvmesh.core.keys import KEY_BYTES, ROOT_KEY, chain_key

logger = logging.getLogger(__name__)

UP = "up"
DOWN = "down"
ADMIT = 1
EVICT = 2
_HEX = frozenset("0123456789abcdef")
# Bounds of what one registration may declare.
MAX_NAME_CHARS = 256
MAX_CHOICES = 64
# The form of a raw (not encoded) chunk.
RAW_FORM = ""


class SpanKeys:
    """The chunk keys of one token sequence, computed lazily per chunk size and shared by every worker.

    A lookup hashes only as far as the longest match needs, once per distinct chunk size, however
    many workers it asks about.
    """

    def __init__(self, tokens: Sequence[int]) -> None:
        self.tokens = tokens
        self._list: list[int] | None = None
        # chunk_size -> ([(key bytes, token end)], last key)
        self._by_size: dict[int, tuple[list[tuple[bytes, int]], bytes]] = {}

    def token_list(self) -> list[int]:
        """The tokens as a list of ints, for an agent request."""
        if self._list is None:
            self._list = self.tokens if isinstance(self.tokens, list) else list(self.tokens)
        return self._list

    def num_chunks(self, chunk_size: int) -> int:
        return -(-len(self.tokens) // chunk_size)

    def get(self, chunk_size: int, index: int) -> tuple[bytes, int] | None:
        """(key, token end) of chunk ``index``, or None past the end of the tokens."""
        found = self._by_size.get(chunk_size)
        if found is not None and index < len(found[0]):
            return found[0][index]  # hashed already: an admission reads each chunk's key 2-3 times
        spans, last = found or ([], ROOT_KEY)
        while len(spans) <= index:
            start = len(spans) * chunk_size
            if start >= len(self.tokens):
                break
            end = min(start + chunk_size, len(self.tokens))
            last = chain_key(last, self.tokens[start:end])
            spans.append((last, end))
        self._by_size[chunk_size] = (spans, last)
        return spans[index] if index < len(spans) else None

    def precompute(self, chunk_sizes: Sequence[int]) -> SpanKeys:
        """Hash every chunk for these chunk sizes (pure: safe to run in a worker thread)."""
        for size in chunk_sizes:
            self.get(size, self.num_chunks(size) - 1)
        return self


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
    secret: str = field(default="", repr=False)
    # The model files the agent holds (chunks coded with one decode only where it is held).
    model_files: tuple[str, ...] = ()
    state: str = UP
    # Liveness clock: when the last heartbeat was seen (monotonic) and the stall credit then.
    seen_mono: float = 0.0
    credit_at_seen: float = 0.0
    # location -> chunk key (16 bytes) -> token_end of the prefix it completes.
    index: dict[str, dict[bytes, int]] = field(default_factory=dict)
    index_entries: int = 0
    # location -> chunk key -> (form: RAW_FORM or a method, stored bytes), for indexed chunks only.
    forms: dict[str, dict[bytes, tuple[str, int]]] = field(default_factory=dict)
    # True once a full resync arrived whole and nothing was dropped: the index is authoritative.
    index_complete: bool = False
    resyncing: bool = False
    truncated: bool = False

    @property
    def target(self) -> str:
        """host:port of the worker's InstanceAgent service."""
        host = self.ip if ":" not in self.ip or self.ip.startswith("[") else f"[{self.ip}]"
        return f"{host}:{self.port}"

    @property
    def endpoint(self) -> tuple[str, int]:
        return self.ip, self.port

    def prefix(self, keys: SpanKeys, location: str) -> tuple[int, int]:
        """(tokens, chunks) of the prefix of ``keys``' tokens this worker reported in ``location``."""
        held = self.index.get(location)
        if not held:
            return 0, 0
        matched = chunks = 0
        while True:
            span = keys.get(self.chunk_size, chunks)
            if span is None or span[0] not in held:
                return matched, chunks
            matched = span[1]
            chunks += 1

    def prefix_tokens(self, tokens: Sequence[int], location: str) -> int:
        """Length of the prefix of ``tokens`` whose chunks this worker reported in ``location``."""
        return self.prefix(SpanKeys(tokens), location)[0]

    def clear_index(self) -> None:
        self.index = {}
        self.index_entries = 0
        self.truncated = False
        self.forms = {}


class Registry:
    """Every known worker, by (instance id, worker id)."""

    def __init__(self, worker_timeout: float = 300.0, missed_heartbeats: int = 3, *, min_chunk_size: int = 1,
                 max_chunk_size: int = 1 << 16, max_events_per_report: int = 50_000,
                 max_index_entries: int = 1 << 20, max_token_end: int = 1 << 30, max_workers: int = 4096) -> None:
        if worker_timeout <= 0 or missed_heartbeats < 1:
            raise ValueError("worker timeout must be positive and missed heartbeats at least 1")
        self.worker_timeout = worker_timeout
        self.missed_heartbeats = missed_heartbeats
        self.min_chunk_size = min_chunk_size
        self.max_chunk_size = max_chunk_size
        self.max_events_per_report = max_events_per_report
        self.max_index_entries = max_index_entries
        self.max_token_end = max_token_end
        self.max_workers = max_workers
        self._workers: dict[tuple[str, int], Worker] = {}
        # Seconds during which the controller could not serve heartbeats (its loop stalled).
        self._stall_credit = 0.0
        # Guards the liveness state against the heartbeat thread: membership of ``_workers``, each
        # worker's seen times and state, the stall credit. Held for microseconds, never across I/O.
        self._liveness = threading.Lock()

    # --- agents' calls ---------------------------------------------------------------------------
    def _validate_registration(self, instance_id: str, worker_id: int, ip: str, port: int, chunk_size: int,
                               heartbeat_interval: float, peer_init_url: str, methods: Sequence[str],
                               locations: Sequence[str], model_files: Sequence[str] = ()) -> None:
        if not instance_id:
            raise InvalidArgument("instance_id is required")
        for name, value in (("instance_id", instance_id), ("ip", ip), ("peer_init_url", peer_init_url)):
            if len(value) > MAX_NAME_CHARS:
                raise InvalidArgument(f"{name} is {len(value)} characters, over the limit of {MAX_NAME_CHARS}")
        for name, values in (("methods", methods), ("locations", locations), ("model_files", model_files)):
            if len(values) > MAX_CHOICES or any(not v or len(v) > MAX_NAME_CHARS for v in values):
                raise InvalidArgument(f"{name} must be at most {MAX_CHOICES} non-empty names of at most "
                                      f"{MAX_NAME_CHARS} characters each, got {len(values)}")
        if worker_id < 0:
            raise InvalidArgument(f"worker_id must be >= 0, got {worker_id}")
        if not ip or not 0 < port < 65536:
            raise InvalidArgument(f"ip and a port in 1..65535 are required, got {ip!r}:{port}")
        if not self.min_chunk_size <= chunk_size <= self.max_chunk_size:
            raise InvalidArgument(f"chunk_size must be in {self.min_chunk_size}..{self.max_chunk_size} tokens, "
                                  f"got {chunk_size}")
        if heartbeat_interval < 0:
            raise InvalidArgument(f"heartbeat_interval_seconds must be >= 0, got {heartbeat_interval}")

    def register(self, *, instance_id: str, worker_id: int, ip: str, port: int, peer_init_url: str,
                 methods: Sequence[str], locations: Sequence[str], chunk_size: int,
                 heartbeat_interval: float, secret: str = "", model_files: Sequence[str] = ()) -> Worker:
        """Register (or renew) a worker; the returned worker carries this registration's secret.

        A live worker registered from another endpoint is refused (AlreadyExists) until it misses
        its heartbeats; the same endpoint may register again (an agent restarted in place), and an
        agent presenting the current secret keeps it.
        """
        self._validate_registration(instance_id, worker_id, ip, port, chunk_size, heartbeat_interval,
                                    peer_init_url, methods, locations, model_files)
        with self._liveness:
            worker = self._register_locked(instance_id=instance_id, worker_id=worker_id, ip=ip, port=port,
                                           peer_init_url=peer_init_url, methods=methods, locations=locations,
                                           chunk_size=chunk_size, heartbeat_interval=heartbeat_interval,
                                           secret=secret, model_files=model_files)
        logger.info("worker %s/%s registered at %s (methods %s, locations %s, chunk_size %s)",
                    instance_id, worker_id, worker.target, list(methods), list(locations), chunk_size)
        return worker

    def _register_locked(self, *, instance_id: str, worker_id: int, ip: str, port: int, peer_init_url: str,
                         methods: Sequence[str], locations: Sequence[str], chunk_size: int,
                         heartbeat_interval: float, secret: str, model_files: Sequence[str]) -> Worker:
        old = self._workers.get((instance_id, worker_id))
        if old is None and len(self._workers) >= self.max_workers:
            raise ResourceExhausted(f"{len(self._workers)} workers are registered, the most this controller keeps "
                                    f"(--max-workers); deregister some, or wait for silent ones to be dropped")
        renewal = old is not None and bool(secret) and hmac.compare_digest(secret.encode(), old.secret.encode())
        if old is not None and old.state == UP and not renewal and old.endpoint != (ip, port):
            raise AlreadyExists(
                f"worker {worker_id} of instance {instance_id!r} is registered from {old.target} and alive; "
                f"a registration from {ip}:{port} is refused until that one misses its heartbeats "
                f"(down after {self.down_after(old):.0f}s of silence)")
        now = time.time()
        worker = Worker(instance_id=instance_id, worker_id=worker_id, ip=ip, port=port,
                        peer_init_url=peer_init_url, methods=tuple(methods), locations=tuple(locations),
                        chunk_size=chunk_size, heartbeat_interval=heartbeat_interval,
                        registration_time=now, last_heartbeat_time=now, model_files=tuple(model_files),
                        secret=old.secret if renewal and old is not None else secrets.token_urlsafe(24))
        self._seen(worker)
        if old is not None and (old.ip, old.port, old.chunk_size) == (ip, port, chunk_size):
            # A re-registration of the same agent keeps its index until the full resync replaces
            # it; not authoritative meanwhile.
            worker.index, worker.index_entries = old.index, old.index_entries
        self._workers[(instance_id, worker_id)] = worker
        return worker

    def _authorized(self, instance_id: str, worker_id: int, secret: str, what: str) -> Worker | None:
        """The worker when ``secret`` is its registration's; None when unknown; PermissionDenied otherwise."""
        worker = self._workers.get((instance_id, worker_id))
        if worker is None:
            return None
        if not secret or not hmac.compare_digest(secret.encode(), worker.secret.encode()):
            raise PermissionDenied(f"{what} for worker {worker_id} of instance {instance_id!r} refused: "
                                   f"{'no' if not secret else 'a wrong'} registration secret (only the agent "
                                   f"registered from {worker.target} may send it; register to get a secret)")
        return worker

    def _seen(self, worker: Worker) -> None:
        worker.last_heartbeat_time = time.time()
        worker.seen_mono = time.monotonic()
        worker.credit_at_seen = self._stall_credit

    def heartbeat(self, instance_id: str, worker_id: int, secret: str = "") -> tuple[Worker | None, bool]:
        """Record a heartbeat: (the worker, whether it was down and is up again); (None, False) when
        the worker is unknown (it must re-register). Safe from any thread."""
        with self._liveness:
            worker = self._authorized(instance_id, worker_id, secret, "heartbeat")
            if worker is None:
                return None, False
            self._seen(worker)
            revived = worker.state == DOWN
            worker.state = UP
        if revived:
            logger.info("worker %s/%s is up again", instance_id, worker_id)
        return worker, revived

    def deregister(self, instance_id: str, worker_id: int, secret: str = "") -> Worker | None:
        with self._liveness:
            worker = self._authorized(instance_id, worker_id, secret, "deregistration")
            if worker is None:
                return None
            return self._workers.pop((instance_id, worker_id), None)

    def _check_kv_events(self, worker: Worker,
                         events: Sequence[tuple[int, str, str, int]]) -> list[tuple[int, str, bytes, int]]:
        if len(events) > self.max_events_per_report:
            raise ResourceExhausted(f"a report of {len(events)} KV events is over the limit of "
                                    f"{self.max_events_per_report} per report; send them in batches")
        locations = set(worker.locations)
        out: list[tuple[int, str, bytes, int]] = []
        for i, (kind, location, key, token_end) in enumerate(events):
            if kind not in (ADMIT, EVICT):
                raise InvalidArgument(f"events[{i}]: KV event type {kind} is neither ADMIT nor EVICT")
            if location not in locations:
                raise InvalidArgument(f"events[{i}]: location {location!r} is not one this worker registered; "
                                      f"its locations: {', '.join(worker.locations) or 'none'}")
            if len(key) != 2 * KEY_BYTES or not _HEX.issuperset(key):
                raise InvalidArgument(f"events[{i}]: chunk_key must be {2 * KEY_BYTES} lowercase hex digits, "
                                      f"got {key[:80]!r}")
            if kind == ADMIT and not 0 < token_end <= self.max_token_end:
                raise InvalidArgument(f"events[{i}]: token_end must be in 1..{self.max_token_end}, got {token_end}")
            out.append((kind, location, bytes.fromhex(key), token_end))
        return out

    def report_kv_events(self, instance_id: str, worker_id: int, events: Sequence[tuple[int, str, str, int]],
                         full_resync: bool, *, secret: str = "", more: bool = False) -> Worker:
        """Apply (type, location, key, token_end) admits (1) and evictions (2) to a worker's index.

        The whole report is checked before any of it is applied. Admits beyond the per-worker bound
        are dropped and the index marked partial (admission then asks the agent).
        """
        worker = self._authorized(instance_id, worker_id, secret, "KV report")
        if worker is None:
            raise NotFound(f"worker {worker_id} of instance {instance_id!r} is not registered; register first")
        checked = self._check_kv_events(worker, events)
        if full_resync:
            worker.clear_index()
            worker.resyncing = True
            worker.index_complete = False
        for kind, location, key, token_end in checked:
            if kind == ADMIT:
                held = worker.index.setdefault(location, {})
                if key not in held:
                    if worker.index_entries >= self.max_index_entries:
                        if not worker.truncated:
                            logger.warning("worker %s/%s reported over %d chunks: its lookup index is partial "
                                           "(admission asks the agent)", instance_id, worker_id,
                                           self.max_index_entries)
                        worker.truncated = True
                        worker.index_complete = False
                        continue
                    worker.index_entries += 1
                held[key] = token_end
            else:
                held = worker.index.get(location)
                if held is not None and held.pop(key, None) is not None:
                    worker.index_entries -= 1
            known = worker.forms.get(location)
            if known:
                known.pop(key, None)  # a new chunk under this key, or none: its form is unknown
        if worker.resyncing and not more:
            worker.resyncing = False
            worker.index_complete = not worker.truncated
        return worker

    # --- chunk forms ---------------------------------------------------------------------------------
    @staticmethod
    def note_form(worker: Worker, location: str, keys: SpanKeys, chunk_index: int, form: str | None,
                  nbytes: int) -> None:
        """Chunk ``chunk_index`` of ``keys`` is in ``form`` with ``nbytes`` stored, as the agent just
        reported (None: unknown, e.g. the operation failed on it). Only indexed chunks are noted, so
        the forms stay within the index's bound."""
        span = keys.get(worker.chunk_size, chunk_index)
        if span is None:
            return
        key = span[0]
        known = worker.forms.setdefault(location, {})
        if form is None or nbytes <= 0 or key not in worker.index.get(location, ()):
            known.pop(key, None)
        else:
            known[key] = (form, nbytes)

    @staticmethod
    def all_in_form(worker: Worker, location: str, keys: SpanKeys, num_chunks: int, form: str) -> bool:
        """Whether the worker's index holds each of the first ``num_chunks`` chunks of ``keys`` in
        ``form``; False when any is not, or unknown."""
        known = worker.forms.get(location)
        held = worker.index.get(location)
        if not known or not held:
            return False
        for i in range(num_chunks):
            span = keys.get(worker.chunk_size, i)
            if span is None or span[0] not in held:
                return False
            got = known.get(span[0])
            if got is None or got[0] != form:
                return False
        return True

    # --- liveness ----------------------------------------------------------------------------------
    def credit_stall(self, seconds: float) -> None:
        """The controller could not serve heartbeats for ``seconds`` (its loop stalled): that time is
        not counted as any worker's silence."""
        if seconds > 0:
            with self._liveness:
                self._stall_credit += seconds

    def silence(self, worker: Worker, now_mono: float | None = None) -> float:
        """Seconds since the worker's last heartbeat, less the time the controller itself stalled."""
        with self._liveness:
            return self._silence(worker, time.monotonic() if now_mono is None else now_mono)

    def _silence(self, worker: Worker, now_mono: float) -> float:
        return max(0.0, now_mono - worker.seen_mono - (self._stall_credit - worker.credit_at_seen))

    def down_after(self, worker: Worker) -> float:
        """Seconds of silence after which ``worker`` counts as down."""
        if worker.heartbeat_interval > 0:
            return min(self.worker_timeout, self.missed_heartbeats * worker.heartbeat_interval)
        return self.worker_timeout

    def sweep(self, now_mono: float | None = None) -> tuple[list[Worker], list[Worker]]:
        """Mark silent workers down and drop long-silent ones; (newly down, dropped)."""
        now_mono = time.monotonic() if now_mono is None else now_mono
        newly_down: list[tuple[Worker, float]] = []
        dropped: list[Worker] = []
        with self._liveness:
            for key, worker in list(self._workers.items()):
                silent = self._silence(worker, now_mono)
                if silent > max(self.worker_timeout, self.down_after(worker)):
                    del self._workers[key]
                    dropped.append(worker)
                    if worker.state == UP:
                        newly_down.append((worker, silent))
                elif worker.state == UP and silent > self.down_after(worker):
                    worker.state = DOWN
                    newly_down.append((worker, silent))
        for w, silent in newly_down:
            logger.warning("worker %s/%s missed its heartbeats (silent %.1fs): marked down",
                           w.instance_id, w.worker_id, silent)
        for w in dropped:
            logger.warning("worker %s/%s silent for over %.0fs: dropped", w.instance_id, w.worker_id,
                           self.worker_timeout)
        return [w for w, _ in newly_down], dropped

    def counts(self) -> dict[str, int]:
        out = {UP: 0, DOWN: 0}
        with self._liveness:
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
                           + (f"; registered instances: {', '.join(known[:20])}" if known else
                              "; no instance is registered"))
        return workers

    def chunk_sizes(self) -> list[int]:
        return sorted({w.chunk_size for w in self._workers.values() if w.state == UP})

    def lookup(self, tokens: Sequence[int] | SpanKeys) -> list[tuple[str, str, int]]:
        """(instance, location, prefix tokens) for every location holding a prefix, longest first.

        An instance holds a prefix only where every one of its up workers (ranks) holds it.
        """
        keys = tokens if isinstance(tokens, SpanKeys) else SpanKeys(tokens)
        by_instance: dict[str, list[Worker]] = {}
        for w in self._workers.values():
            if w.state == UP:
                by_instance.setdefault(w.instance_id, []).append(w)
        found: list[tuple[str, str, int]] = []
        for iid, workers in by_instance.items():
            locations = set().union(*(w.index.keys() for w in workers))
            for loc in sorted(locations):
                n = min(w.prefix(keys, loc)[0] for w in workers)
                if n > 0:
                    found.append((iid, loc, n))
        found.sort(key=lambda t: (-t[2], t[0], t[1]))
        return found
