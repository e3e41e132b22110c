"""What every storage location shares: a bounded LRU index of chunks, pinning, admit/evict events.

A location's methods are blocking (memory copies, disk I/O) and thread-safe; the agent calls them
through ``asyncio.to_thread``. Writing a chunk happens in two steps so that slow work (a disk write
and its fsync) runs outside the index lock: ``_prepare`` makes the new form durable somewhere
private, ``_commit`` swaps it in under the lock. Until the commit the old form is untouched, so a
failure at any point leaves the location as it was.
"""
from __future__ import annotations

import logging
import threading
from abc import ABC, abstractmethod
from collections import OrderedDict
from collections.abc import Callable
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
            return None if e is None else IndexEntry(e.key, e.start, e.end, e.method, e.nbytes, e.pinned)

    def get(self, key: str) -> StoredChunk | None:
        """The chunk stored under ``key`` (marks it recently used), or None."""
        with self._lock:
            entry = self._index.get(key)
            if entry is None:
                return None
            self._index.move_to_end(key)
        return self._load(entry)

    def entries(self) -> list[IndexEntry]:
        """A snapshot of the index, least recently used first."""
        with self._lock:
            return [IndexEntry(e.key, e.start, e.end, e.method, e.nbytes, e.pinned) for e in self._index.values()]

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

    # Writes
    def put(self, chunk: StoredChunk, *, overwrite: bool = True, expect_method: str | None = None) -> bool:
        """Store ``chunk`` under its key, evicting least recently used unpinned chunks as needed.

        Returns False (storing nothing) when the key is present and ``overwrite`` is false, or when
        ``expect_method`` is given and the key is absent or stored in another form: that makes a
        compress/decompress swap a compare-and-set. ResourceExhausted when the chunk cannot fit even
        with every unpinned chunk evicted; nothing is evicted then.
        """
        size = chunk.nbytes
        if size > self.capacity_bytes:
            raise ResourceExhausted(f"{self.name}: a chunk of {size} bytes is over the location's capacity "
                                    f"of {self.capacity_bytes} bytes")
        with self._lock:
            if not self._may_write(chunk.key, overwrite, expect_method):
                return False
        handle = self._prepare(chunk)
        try:
            with self._lock:
                if not self._may_write(chunk.key, overwrite, expect_method):
                    self._abort(handle)
                    return False
                old = self._index.get(chunk.key)
                victims = self._plan_evictions(size - (old.nbytes if old else 0), keep=chunk.key)
                for victim in victims:
                    self._remove_locked(victim)
                    self.evictions += 1
                stored = self._commit(chunk.key, handle)
                entry = IndexEntry(chunk.key, chunk.start, chunk.end, chunk.method, size,
                                   pinned=old.pinned if old else False, handle=stored)
                if old is not None:
                    self._account(old, -1)
                self._index[chunk.key] = entry
                self._index.move_to_end(chunk.key)
                self._account(entry, 1)
                if old is None:
                    self._emit(ADMIT, entry)
                return True
        except BaseException:
            self._abort(handle)
            raise

    def _may_write(self, key: str, overwrite: bool, expect_method: str | None) -> bool:
        entry = self._index.get(key)
        if expect_method is not None:
            return entry is not None and entry.method == expect_method
        return entry is None or overwrite

    def _plan_evictions(self, extra: int, keep: str) -> list[IndexEntry]:
        """The LRU unpinned entries to drop so that ``extra`` more bytes fit (lock held)."""
        need = self._used + extra - self.capacity_bytes
        victims: list[IndexEntry] = []
        if need <= 0:
            return victims
        for entry in self._index.values():
            if entry.pinned or entry.key == keep:
                continue
            victims.append(entry)
            need -= entry.nbytes
            if need <= 0:
                return victims
        pinned = sum(e.nbytes for e in self._index.values() if e.pinned)
        raise ResourceExhausted(f"{self.name}: no room for {extra} more bytes: {self._used} of "
                                f"{self.capacity_bytes} bytes used, {pinned} of them pinned")

    def _remove_locked(self, entry: IndexEntry) -> None:
        self._delete(entry)
        self._index.pop(entry.key, None)
        self._account(entry, -1)
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
