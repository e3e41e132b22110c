"""What every storage location shares: a bounded LRU index of chunks, pinning, admit/evict events.

A location's methods are blocking (memory copies, disk I/O) and thread-safe; the agent calls them
through ``asyncio.to_thread``. Writing a chunk happens in two steps so that slow work (a disk write
and its fsync) runs outside the index lock: ``_prepare`` makes the new form durable somewhere
private, ``_commit`` swaps it in under the lock. Until the commit the old form is untouched, so a
failure at any point leaves the location as it was.
"""
from __future__ import annotations

import contextlib
import logging
import threading
from abc import ABC, abstractmethod
from collections import Counter, OrderedDict
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any

from kvmesh.errors import ResourceExhausted

from .chunk import StoredChunk

logger = logging.getLogger(__name__)

ADMIT = "admit"
EVICT = "evict"
# (kind, location, chunk key, token end): kind is ADMIT or EVICT. Called with the index lock held:
# listeners must not block.
EventListener = Callable[[str, str, str, int], None]


@dataclass(slots=True)
class IndexEntry:
    """What a location knows about a chunk without loading it."""

    key: str
    start: int
    end: int
    method: str
    nbytes: int
    pinned: bool = False
    # Location-specific: the file of a disk chunk, the chunk object of a memory one.
    handle: Any = None
    # The key of the chunk before this one in its token sequence ("" for the first, or unknown).
    parent: str = ""

    def copy(self) -> IndexEntry:
        return IndexEntry(self.key, self.start, self.end, self.method, self.nbytes, self.pinned, parent=self.parent)

    @property
    def encoded(self) -> bool:
        return self.method != ""


@dataclass(frozen=True, slots=True)
class LocationStats:
    name: str
    used_bytes: int
    capacity_bytes: int
    num_chunks: int
    num_encoded: int
    num_pinned: int


class StorageBackend(ABC):
    """A bounded LRU store of chunks keyed by chunk key; pinned chunks are never evicted."""

    name: str = ""
    # A location shared with other agents (the remote store): not part of this agent's index at
    # the controller, never evicted from by kvmesh.
    shared: bool = False
    # Methods do network I/O: call even contains() off the event loop.
    blocking: bool = False

    def __init__(self, capacity_bytes: int) -> None:
        self.capacity_bytes = int(capacity_bytes)
        self._index: OrderedDict[str, IndexEntry] = OrderedDict()
        self._used = 0
        # Kept up to date on every change so that stats() stays O(1) with many chunks.
        self._num_encoded = 0
        self._num_pinned = 0
        self._lock = threading.RLock()
        self._listeners: list[EventListener] = []
        self.evictions = 0
        # Stored chunks per parent key: a chunk with none is the tail of its sequence, the only
        # part of it eviction may take (a prefix stays usable).
        self._children: Counter[str] = Counter()
        # Keys of chunks that running operations work on: never evicted meanwhile.
        self._protected: Counter[str] = Counter()

    # Subclasses: where the bytes live.
    @abstractmethod
    def _prepare(self, chunk: StoredChunk) -> Any:
        """Make ``chunk`` ready to commit (outside the lock); returns the handle to commit."""

    @abstractmethod
    def _commit(self, key: str, handle: Any) -> Any:
        """Make the prepared handle the chunk's stored form (inside the lock; quick, atomic).

        Returns what ``_load`` and ``_delete`` later get as ``entry.handle``.
        """

    @abstractmethod
    def _abort(self, handle: Any) -> None:
        """Drop a prepared handle that will not be committed."""

    @abstractmethod
    def _load(self, entry: IndexEntry) -> StoredChunk | None:
        """The chunk of ``entry`` (outside the lock); None when it vanished meanwhile."""

    @abstractmethod
    def _delete(self, entry: IndexEntry) -> None:
        """Drop the stored bytes of ``entry`` (inside the lock)."""

    # Events
    def add_listener(self, listener: EventListener) -> None:
        self._listeners.append(listener)

    def _emit(self, kind: str, entry: IndexEntry) -> None:
        for listener in self._listeners:
            try:
                listener(kind, self.name, entry.key, entry.end)
            except Exception:  # a listener's bug must not break storage
                logger.exception("storage event listener failed for %s %s", kind, entry.key)

    # Reads
    def contains(self, key: str) -> bool:
        with self._lock:
            return key in self._index

    def entry(self, key: str) -> IndexEntry | None:
        """The index entry of ``key`` (a copy), without touching its LRU position."""
        with self._lock:
            e = self._index.get(key)
            return None if e is None else e.copy()

    def get(self, key: str) -> StoredChunk | None:
        """The chunk stored under ``key`` (marks it recently used), or None."""
        with self._lock:
            entry = self._index.get(key)
            if entry is None:
                return None
            self._index.move_to_end(key)
        return self._load(entry)

    def prefix_length(self, keys: list[str]) -> int:
        """How many of ``keys`` are stored, in order from the first."""
        with self._lock:
            n = 0
            for key in keys:
                if key not in self._index:
                    break
                n += 1
            return n

    def refresh(self) -> LocationStats:
        """Up-to-date figures (a remote location asks its server; a local one knows them)."""
        return self.stats()

    def entries(self) -> list[IndexEntry]:
        """A snapshot of the index, least recently used first."""
        with self._lock:
            return [e.copy() for e in self._index.values()]

    @property
    def used_bytes(self) -> int:
        with self._lock:
            return self._used

    def stats(self) -> LocationStats:
        with self._lock:
            return LocationStats(self.name, self._used, self.capacity_bytes, len(self._index),
                                 self._num_encoded, self._num_pinned)

    def _account(self, entry: IndexEntry, sign: int) -> None:
        """Add (sign 1) or take out (sign -1) ``entry``'s bytes and counts (lock held)."""
        self._used += sign * entry.nbytes
        self._num_encoded += sign * entry.encoded
        self._num_pinned += sign * entry.pinned

    def _link(self, entry: IndexEntry, sign: int) -> None:
        """Count ``entry`` among its parent's children (sign 1) or take it out (-1) (lock held)."""
        if not entry.parent:
            return
        self._children[entry.parent] += sign
        if self._children[entry.parent] <= 0:
            del self._children[entry.parent]

    @contextlib.contextmanager
    def protecting(self, keys: Collection[str]) -> Iterator[None]:
        """While inside, the chunks of ``keys`` are never evicted (they may still be removed by a clear)."""
        keys = list(keys)
        with self._lock:
            self._protected.update(keys)
        try:
            yield
        finally:
            with self._lock:
                self._protected.subtract(keys)
                for key in keys:
                    if self._protected[key] <= 0:
                        del self._protected[key]

    def free_bytes(self) -> int:
        """Bytes the location can take without evicting anything."""
        with self._lock:
            return max(0, self.capacity_bytes - self._used)

    # Writes
    def put(self, chunk: StoredChunk, *, overwrite: bool = True, expect_method: str | None = None,
            protect: Collection[str] = ()) -> bool:
        """Store ``chunk`` under its key, evicting least recently used sequence tails as needed.

        Returns False (storing nothing) when the key is present and ``overwrite`` is false, or when
        ``expect_method`` is given and the key is absent or stored in another form: that makes a
        compress/decompress swap a compare-and-set. ResourceExhausted when the chunk cannot fit even
        with every evictable chunk evicted; nothing is evicted then. Chunks in ``protect`` (and
        those of running operations, ``protecting``) are never evicted.
        """
        return self.put_many([chunk], overwrite=overwrite, expect_method=expect_method, protect=protect)[0]

    def put_many(self, chunks: list[StoredChunk], *, overwrite: bool = True, expect_method: str | None = None,
                 protect: Collection[str] = ()) -> list[bool]:
        """Store ``chunks`` all together or none: room for all of them is made (by evicting) before
        any is committed, and when there is none ResourceExhausted names the numbers and nothing
        changes. Returns, per chunk, whether it was written (see ``put``)."""
        for chunk in chunks:
            if chunk.nbytes > self.capacity_bytes:
                raise ResourceExhausted(f"{self.name}: a chunk of {chunk.nbytes} bytes is over the location's "
                                        f"capacity of {self.capacity_bytes} bytes")
        keep = {c.key for c in chunks} | set(protect)
        with self._lock:
            todo = [c for c in chunks if self._may_write(c.key, overwrite, expect_method)]
            # Refuse before preparing (copying, writing files) what cannot fit anyway.
            self._plan_evictions(self._extra_bytes(todo), keep, len(todo))
        prepared: list[tuple[StoredChunk, Any]] = []
        try:
            for chunk in todo:
                prepared.append((chunk, self._prepare(chunk)))
            with self._lock:
                ok = [self._may_write(c.key, overwrite, expect_method) for c, _ in prepared]
                writes = [p for p, good in zip(prepared, ok) if good]
                skipped = [h for (_, h), good in zip(prepared, ok) if not good]
                victims = self._plan_evictions(self._extra_bytes([c for c, _ in writes]), keep, len(writes))
                for victim in victims:
                    self._remove_locked(victim)
                    self.evictions += 1
                for handle in skipped:
                    self._abort(handle)
                written = set()
                for chunk, handle in writes:
                    self._commit_locked(chunk, handle)
                    written.add(chunk.key)
                prepared.clear()
                return [c.key in written for c in chunks]
        finally:
            for _, handle in prepared:
                self._abort(handle)

    def _extra_bytes(self, chunks: list[StoredChunk]) -> int:
        """How many more bytes the location holds once ``chunks`` are written (lock held)."""
        return sum(c.nbytes - (self._index[c.key].nbytes if c.key in self._index else 0) for c in chunks)

    def _commit_locked(self, chunk: StoredChunk, handle: Any) -> None:
        old = self._index.get(chunk.key)
        stored = self._commit(chunk.key, handle)
        entry = IndexEntry(chunk.key, chunk.start, chunk.end, chunk.method, chunk.nbytes,
                           pinned=old.pinned if old else False, handle=stored,
                           parent=chunk.parent or (old.parent if old else ""))
        if old is not None:
            self._account(old, -1)
            self._link(old, -1)
        self._index[chunk.key] = entry
        self._index.move_to_end(chunk.key)
        self._account(entry, 1)
        self._link(entry, 1)
        if old is None:
            self._emit(ADMIT, entry)

    def _may_write(self, key: str, overwrite: bool, expect_method: str | None) -> bool:
        entry = self._index.get(key)
        if expect_method is not None:
            return entry is not None and entry.method == expect_method
        return entry is None or overwrite

    def _evictable(self, entry: IndexEntry, keep: Collection[str], gone_children: Counter[str]) -> bool:
        return (not entry.pinned and entry.key not in keep and entry.key not in self._protected
                and self._children.get(entry.key, 0) - gone_children.get(entry.key, 0) <= 0)

    def _plan_evictions(self, extra: int, keep: Collection[str], num_chunks: int = 1) -> list[IndexEntry]:
        """The chunks to drop so that ``extra`` more bytes fit (lock held): the least recently used
        sequence tails first, each sequence eaten from its tail so that what stays is a usable
        prefix; never a pinned chunk, one in ``keep`` or one a running operation works on."""
        need = self._used + extra - self.capacity_bytes
        victims: list[IndexEntry] = []
        if need <= 0:
            return victims
        gone: set[str] = set()
        gone_children: Counter[str] = Counter()
        for entry in list(self._index.values()):
            e: IndexEntry | None = entry
            while e is not None and e.key not in gone and self._evictable(e, keep, gone_children):
                victims.append(e)
                gone.add(e.key)
                need -= e.nbytes
                if need <= 0:
                    return victims
                # The tail is gone: its parent may now be its sequence's tail.
                if not e.parent:
                    break
                gone_children[e.parent] += 1
                e = self._index.get(e.parent)
        free = max(0, self.capacity_bytes - self._used)
        evictable = sum(v.nbytes for v in victims)
        pinned = sum(e.nbytes for e in self._index.values() if e.pinned)
        busy = sum(e.nbytes for e in self._index.values() if e.key in self._protected or e.key in keep)
        raise ResourceExhausted(
            f"{self.name}: no room for {num_chunks} chunk(s) of {extra} bytes: {free} bytes free of a "
            f"capacity of {self.capacity_bytes}, {evictable} more could be evicted ({self._used} used, "
            f"{pinned} of them pinned, {busy} held by the operations in progress or prefixes they extend); "
            "nothing was stored")

    def _remove_locked(self, entry: IndexEntry) -> None:
        self._delete(entry)
        self._index.pop(entry.key, None)
        self._account(entry, -1)
        self._link(entry, -1)
        self._emit(EVICT, entry)

    def remove(self, key: str) -> bool:
        """Drop ``key`` (pinned or not); False when it was absent."""
        with self._lock:
            entry = self._index.get(key)
            if entry is None:
                return False
            self._remove_locked(entry)
            return True

    def clear(self) -> int:
        """Drop every chunk; returns how many."""
        with self._lock:
            entries = list(self._index.values())
            for entry in entries:
                self._remove_locked(entry)
            return len(entries)

    def set_pinned(self, key: str, pinned: bool) -> bool:
        """Pin or unpin ``key``; False when it is absent."""
        with self._lock:
            entry = self._index.get(key)
            if entry is None:
                return False
            self._account(entry, -1)
            entry.pinned = pinned
            self._account(entry, 1)
            return True

    def close(self) -> None:
        """Release what the location holds open (nothing by default)."""
