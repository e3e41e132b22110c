"""``RemoteBackend``: chunks in a Redis (or Valkey) server shared by every agent of every instance.

Selected by LMCache's ``remote_url: "redis://host:port"`` (also ``rediss://`` and ``unix://``).
Every chunk is one Redis hash, ``{prefix}w{worker_id}:{chunk_key}``: field ``h`` the chunk file
header (``chunkfile``: key, tokens, form, dtype, shape, payload length, BLAKE2b digest, parent
key), ``d`` the payload (raw tensor bytes or a codec container), ``m`` the method alone (so that a
compare-and-set reads one small field), ``p`` "1" when pinned. The worker id is in the key because
the ranks of a tensor-parallel engine hold different heads of the same tokens; the prefix
(``extra_config.remote_key_prefix``) must differ between models served with the same tokenizer.

Writes are whole-chunk and atomic: each is one MULTI/EXEC transaction (with WATCH for the
compare-and-set of compress/decompress and for "store only if absent"), so a writer killed at any
point leaves every chunk in its old form or its new one, never a torn one; reads verify the digest.
Expiry is Redis's: every chunk gets the TTL ``extra_config.remote_ttl_seconds`` (none by default)
when written; a pinned chunk has none (PERSIST) until it is unpinned. With a ``maxmemory`` limit
the server's ``maxmemory-policy`` evicts (``volatile-lru`` never takes pinned chunks).

All methods block (network I/O); the agent calls them off its event loop. The connection pool is
bounded (``remote_pool_size``), calls time out (``remote_timeout_seconds``), and a server that
cannot be reached is ``Unavailable`` naming it: the local locations keep serving meanwhile.
"""
from __future__ import annotations

import contextlib
import io
import logging
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import redis
from redis.exceptions import RedisError, ResponseError, WatchError

from kvmesh.errors import DataCorrupt, InvalidArgument, ResourceExhausted, Unavailable

from .base import IndexEntry, LocationStats, StorageBackend
from .chunk import StoredChunk
from .chunkfile import chunk_from_parts, encode_chunk, read_header

logger = logging.getLogger(__name__)

SCHEMES = ("redis://", "rediss://", "unix://")
F_HEADER, F_DATA, F_METHOD, F_PINNED = b"h", b"d", b"m", b"p"
# At most this many keys are looked at for Stats (SCAN): the store is shared and may be huge.
MAX_STATS_KEYS = 50_000
MAX_CAS_RETRIES = 8
T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class RemoteSettings:
    """How to reach the store and what to write there (from AgentConfig, see ``from_config``)."""

    url: str
    key_prefix: str = "kvmesh:"
    ttl_seconds: int = 0
    pool_size: int = 16
    timeout_seconds: float = 5.0
    max_chunk_bytes: int = 512 << 20  # Redis's limit on one value

    def redacted_url(self) -> str:
        """The URL without a password, for messages and logs."""
        head, sep, tail = self.url.partition("://")
        if "@" in tail:
            tail = "***@" + tail.split("@", 1)[1]
        return head + sep + tail


class RemoteBackend(StorageBackend):
    """A location in a shared Redis; the same interface as the local ones, every call a round trip."""

    name = "RemoteBackend"
    shared = True
    blocking = True

    def __init__(self, settings: RemoteSettings, worker_id: int = 0) -> None:
        super().__init__(capacity_bytes=0)
        if not settings.url.startswith(SCHEMES):
            raise InvalidArgument(f"remote_url {settings.redacted_url()!r} is not a Redis URL; kvmesh's remote "
                                  f"location speaks Redis/Valkey: {', '.join(s + '...' for s in SCHEMES)}")
        self.settings = settings
        self.where = settings.redacted_url()
        self._ns = f"{settings.key_prefix}w{worker_id}:".encode()
        # A bounded pool: callers wait (up to the timeout) for a free connection rather than open more.
        self._pool = redis.BlockingConnectionPool.from_url(
            settings.url, max_connections=settings.pool_size, timeout=settings.timeout_seconds,
            socket_timeout=settings.timeout_seconds, socket_connect_timeout=settings.timeout_seconds,
            health_check_interval=30)
        self._redis = redis.Redis(connection_pool=self._pool)
        self._stats = LocationStats(self.name, 0, 0, 0, 0, 0)
        self.last_error = ""

    # Helpers
    def _key(self, chunk_key: str) -> bytes:
        return self._ns + chunk_key.encode()

    def _call(self, what: str, fn: Callable[[], T]) -> T:
        """``fn()``, with a Redis failure turned into Unavailable naming the server."""
        try:
            out = fn()
        except ResponseError as err:
            if str(err).startswith("OOM"):  # maxmemory reached with nothing the policy may evict
                raise ResourceExhausted(f"{self.name}: the Redis server at {self.where} is full ({err}); raise its "
                                        "maxmemory, set remote_ttl_seconds so that volatile-lru can evict, "
                                        "or clear chunks") from None
            self.last_error = f"{type(err).__name__}: {err}"
            raise Unavailable(f"{self.name}: the Redis server at {self.where} refused to {what}: {err}") from None
        except RedisError as err:
            self.last_error = f"{type(err).__name__}: {err}"
            raise Unavailable(f"{self.name}: the Redis server at {self.where} failed to {what}: {err}; "
                              "the local locations keep serving") from None
        self.last_error = ""
        return out

    # Reads
    def contains(self, key: str) -> bool:
        return bool(self._call("look up a chunk", lambda: self._redis.exists(self._key(key))))

    def prefix_length(self, keys: list[str]) -> int:
        """How many of ``keys`` are present in order from the first (one pipelined round trip)."""
        if not keys:
            return 0

        def run() -> list[Any]:
            pipe = self._redis.pipeline(transaction=False)
            for key in keys:
                pipe.exists(self._key(key))
            return pipe.execute()

        found = self._call("look up chunks", run)
        n = 0
        for hit in found:
            if not hit:
                break
            n += 1
        return n

    def entry(self, key: str) -> IndexEntry | None:
        values = self._call("read a chunk's header", lambda: self._redis.hmget(self._key(key), F_HEADER, F_PINNED))
        if values[0] is None:
            return None
        header = read_header(io.BytesIO(values[0]), f"{self.where} {key}")
        return IndexEntry(header.key, header.start, header.end, header.method, header.payload_len,
                          pinned=values[1] == b"1", parent=header.parent)

    def get(self, key: str) -> StoredChunk | None:
        values = self._call("read a chunk", lambda: self._redis.hmget(self._key(key), F_HEADER, F_DATA))
        if values[0] is None or values[1] is None:
            return None
        where = f"{self.where} {key}"
        header = read_header(io.BytesIO(values[0]), where)
        chunk = chunk_from_parts(header, values[1], where)
        if chunk.key != key:
            raise DataCorrupt(f"{where}: holds chunk {chunk.key}, not {key}")
        return chunk

    def _scan(self) -> Iterator[bytes]:
        return self._redis.scan_iter(match=self._ns + b"*", count=1000)

    def entries(self) -> list[IndexEntry]:
        """This worker's chunks in the store (at most MAX_STATS_KEYS of them)."""
        keys = self._call("list chunks", lambda: [k for _, k in zip(range(MAX_STATS_KEYS), self._scan())])
        out = []
        for k in keys:
            e = self.entry(k[len(self._ns):].decode())
            if e is not None:
                out.append(e)
        return out

    @property
    def used_bytes(self) -> int:
        return self._stats.used_bytes

    def stats(self) -> LocationStats:
        """The last figures ``refresh`` found (no I/O: metrics read this on the event loop)."""
        return self._stats

    def refresh(self) -> LocationStats:
        """Count this worker's chunks in the store (bounded) and read the server's memory figures."""
        def run() -> LocationStats:
            keys = [k for _, k in zip(range(MAX_STATS_KEYS), self._scan())]
            pipe = self._redis.pipeline(transaction=False)
            for k in keys:
                pipe.hstrlen(k, F_DATA)
                pipe.hmget(k, F_METHOD, F_PINNED)
            res = pipe.execute() if keys else []
            used = encoded = pinned = n = 0
            for size, (method, pin) in zip(res[0::2], res[1::2]):
                if method is None:  # expired meanwhile
                    continue
                n += 1
                used += int(size)
                encoded += method != b""
                pinned += pin == b"1"
            info = self._redis.info("memory")
            capacity = int(info.get("maxmemory", 0) or 0)
            return LocationStats(self.name, used, capacity, n, encoded, pinned)

        self._stats = self._call("report its contents", run)
        self.capacity_bytes = self._stats.capacity_bytes
        return self._stats

    def ping(self) -> tuple[bool, str, int]:
        """(reachable, why not, bytes free under maxmemory or -1 when unbounded/unknown)."""
        try:
            info = self._call("answer PING", lambda: (self._redis.ping(), self._redis.info("memory"))[1])
        except Unavailable as err:
            return False, err.message, -1
        limit = int(info.get("maxmemory", 0) or 0)
        return True, "", (max(0, limit - int(info.get("used_memory", 0))) if limit else -1)

    def free_bytes(self) -> int:
        reachable, _, free = self.ping()
        return free if reachable else -1

    # Writes
    @contextlib.contextmanager
    def protecting(self, keys: Collection[str]) -> Iterator[None]:
        """Nothing to do: kvmesh never evicts from the shared store (Redis's policy does)."""
        yield

    def put_many(self, chunks: list[StoredChunk], *, overwrite: bool = True, expect_method: str | None = None,
                 protect: Collection[str] = ()) -> list[bool]:
        """Write ``chunks`` in one transaction: all of them or none (see ``StorageBackend.put``).

        With ``expect_method`` (a compress/decompress swap) or without ``overwrite``, the keys are
        WATCHed: a concurrent writer makes the transaction retry, so the check and the write are one
        atomic step as far as every other agent sees.
        """
        for chunk in chunks:
            if chunk.nbytes > self.settings.max_chunk_bytes:
                raise ResourceExhausted(f"{self.name}: a chunk of {chunk.nbytes} bytes is over the "
                                        f"{self.settings.max_chunk_bytes}-byte limit of one Redis value")
        encoded = [(self._key(c.key), *encode_chunk(c), c) for c in chunks]

        def attempt() -> list[bool] | None:
            try:
                return write_once()
            except WatchError:  # another writer touched a watched key: look again
                return None

        def write_once() -> list[bool]:
            with self._redis.pipeline(transaction=True) as pipe:
                # WATCH, read each chunk's form and pin, then MULTI: what is checked and what is
                # written are one atomic step as far as any other agent sees.
                pipe.watch(*{k for k, *_ in encoded})
                write, fresh = [], []
                for k, *_ in encoded:
                    method, pinned = pipe.hmget(k, F_METHOD, F_PINNED)
                    if expect_method is not None:
                        write.append(method is not None and method.decode() == expect_method)
                    else:
                        write.append(method is None or overwrite)
                    # A new chunk gets the TTL; a rewritten one keeps its expiry, or its pin.
                    fresh.append(method is None)
                pipe.multi()
                for (k, head, payload, c), ok, new in zip(encoded, write, fresh):
                    if not ok:
                        continue
                    pipe.hset(k, mapping={F_HEADER: head, F_DATA: payload, F_METHOD: c.method.encode()})
                    if new and self.settings.ttl_seconds > 0:
                        pipe.expire(k, self.settings.ttl_seconds)
                if any(write):
                    pipe.execute()
                return write

        for _ in range(MAX_CAS_RETRIES):
            written = self._call("store chunks", attempt)
            if written is not None:
                return written
        raise Unavailable(f"{self.name}: chunks at {self.where} kept changing under {MAX_CAS_RETRIES} attempts to "
                          "write them; try again")

    def remove(self, key: str) -> bool:
        return bool(self._call("delete a chunk", lambda: self._redis.delete(self._key(key))))

    def clear(self) -> int:
        def run() -> int:
            n = 0
            batch: list[bytes] = []
            for k in self._scan():
                batch.append(k)
                if len(batch) >= 1000:
                    n += self._redis.unlink(*batch)
                    batch.clear()
            if batch:
                n += self._redis.unlink(*batch)
            return n

        return self._call("clear its chunks", run)

    def set_pinned(self, key: str, pinned: bool) -> bool:
        k = self._key(key)

        def run() -> bool | None:
            try:
                with self._redis.pipeline(transaction=True) as pipe:
                    pipe.watch(k)
                    if not pipe.exists(k):
                        return False
                    pipe.multi()
                    pipe.hset(k, F_PINNED, b"1" if pinned else b"0")
                    if pinned:
                        pipe.persist(k)
                    elif self.settings.ttl_seconds > 0:
                        pipe.expire(k, self.settings.ttl_seconds)
                    pipe.execute()
                    return True
            except WatchError:
                return None

        for _ in range(MAX_CAS_RETRIES):
            done = self._call("pin a chunk", run)
            if done is not None:
                return done
        return False

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._pool.disconnect()

    # The local index's hooks do not apply: every call above goes to the server.
    def _prepare(self, chunk: StoredChunk) -> Any:
        raise NotImplementedError

    def _commit(self, key: str, handle: Any) -> Any:
        raise NotImplementedError

    def _abort(self, handle: Any) -> None:
        raise NotImplementedError

    def _load(self, entry: IndexEntry) -> StoredChunk | None:
        raise NotImplementedError

    def _delete(self, entry: IndexEntry) -> None:
        raise NotImplementedError


def wait_until_reachable(backend: RemoteBackend, timeout: float) -> bool:
    """True once the server answers PING (for tools and tests; the agent itself never waits)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if backend.ping()[0]:
            return True
        time.sleep(0.05)
    return False


__all__ = ["RemoteBackend", "RemoteSettings", "wait_until_reachable"]
