"""``LocalDiskBackend``: one self-describing file per chunk in the ``local_disk`` folder.

Writes are atomic: the chunk goes to a temporary file in the same folder, is fsynced, renamed over
the old file and the folder is fsynced, so a crash at any point leaves either the old file or the
new one, never a torn one. On start the folder is reindexed (the agent's chunks survive a restart);
leftover temporary files are removed, and files that fail their checks are moved aside as
``*.corrupt`` and reported, never served.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from kvmesh.errors import DataCorrupt, ResourceExhausted

from .base import EVICT, IndexEntry, StorageBackend
from .chunk import StoredChunk
from .chunkfile import SUFFIX, check_file, read_chunk, write_chunk

logger = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
CORRUPT_SUFFIX = ".corrupt"
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(ResourceExhausted):
    """The filesystem under ``local_disk`` has no room for a write (ENOSPC or a quota)."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class LocalDiskBackend(StorageBackend):
    """Chunks as files under ``root``, bounded by ``capacity_bytes`` of payload."""

    name = "LocalDiskBackend"

    def __init__(self, root: str | os.PathLike[str], capacity_bytes: int) -> None:
        super().__init__(capacity_bytes)
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        # Files found corrupt (moved aside), for the operator and the tests.
        self.corrupt_files: list[Path] = []
        self._reindex()

    def fs_free_bytes(self) -> int:
        """Bytes free on the filesystem holding the folder (for an unprivileged writer)."""
        return shutil.disk_usage(self.root).free

    def free_bytes(self) -> int:
        """Bytes the location can take: capacity left, at most what the filesystem has free."""
        try:
            fs_free = self.fs_free_bytes()
        except OSError:
            fs_free = 0
        return min(super().free_bytes(), fs_free)

    def _full(self, err: OSError, what: str, nbytes: int) -> DiskFull:
        try:
            free = f"{self.fs_free_bytes()} bytes free there"
        except OSError:
            free = "free space unknown"
        return DiskFull(f"{self.name}: the filesystem of {self.root} is full ({os.strerror(err.errno or 0)}) "
                        f"{what} a chunk of {nbytes} bytes; {free}, {self.used_bytes} of the location's "
                        f"capacity of {self.capacity_bytes} bytes used. Free space there, lower "
                        "max_local_disk_size, or compress the stored chunks (compressing frees space)")

    def path_of(self, key: str) -> Path:
        return self.root / f"{key}{SUFFIX}"

    def _reindex(self) -> None:
        found: list[tuple[float, IndexEntry]] = []
        for path in self.root.iterdir():
            if path.name.startswith(TMP_PREFIX):
                # A write that never reached its rename: the old file (if any) is still whole.
                with contextlib.suppress(OSError):
                    path.unlink()
                continue
            if not path.name.endswith(SUFFIX) or not path.is_file():
                continue
            try:
                header = check_file(path)
                if header.key != path.name[: -len(SUFFIX)]:
                    raise DataCorrupt(f"{path}: holds chunk {header.key}, not the one its name says")
            except (DataCorrupt, OSError) as err:
                self._quarantine(path, str(err))
                continue
            entry = IndexEntry(header.key, header.start, header.end, header.method, header.payload_len,
                               handle=path, parent=header.parent)
            found.append((path.stat().st_mtime, entry))
        for _, entry in sorted(found, key=lambda item: item[0]):
            self._index[entry.key] = entry
            self._account(entry, 1)
            self._link(entry, 1)
        if found:
            logger.info("%s: reindexed %d chunks (%d bytes) in %s", self.name, len(found), self._used, self.root)
        # A smaller capacity than last time: drop the least recently written chunks.
        while self._used > self.capacity_bytes and self._index:
            oldest = next(iter(self._index.values()))
            self._remove_locked(oldest)
            self.evictions += 1

    def _quarantine(self, path: Path, why: str) -> None:
        logger.error("%s: corrupt chunk file %s (%s); moved aside", self.name, path, why)
        target = path.with_name(path.name + CORRUPT_SUFFIX)
        try:
            os.replace(path, target)
        except OSError:
            target = path
        self.corrupt_files.append(target)

    def _prepare(self, chunk: StoredChunk) -> Any:
        tmp = self.root / f"{TMP_PREFIX}{chunk.key}-{uuid.uuid4().hex}"
        try:
            self._write_file(tmp, chunk)
        except OSError as err:
            if err.errno in FULL_ERRNOS:
                raise self._full(err, "writing", chunk.nbytes) from None
            raise
        return tmp

    @staticmethod
    def _write_file(path: Path, chunk: StoredChunk) -> None:
        """``chunk`` into ``path``, fsynced; nothing left at ``path`` when it fails."""
        try:
            with open(path, "wb") as f:
                write_chunk(f, chunk)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                path.unlink()
            raise

    def put_many(self, chunks: list[StoredChunk], *, overwrite: bool = True, expect_method: str | None = None,
                 protect: Any = ()) -> list[bool]:
        try:
            return super().put_many(chunks, overwrite=overwrite, expect_method=expect_method, protect=protect)
        except DiskFull:
            if expect_method is None or len(chunks) != 1:
                raise
            # A compress on a full disk: the smaller form goes where the larger one was.
            return [self._swap_when_full(chunks[0], expect_method)]

    def _swap_when_full(self, chunk: StoredChunk, expect_method: str) -> bool:
        """Replace a chunk by a smaller form of it when the filesystem has no room for both.

        The old file's bytes are staged in memory, the file is removed, and the new form is written
        and renamed into place as usual. Should that write fail too, the old bytes go back (they fit:
        they held that room a moment ago). The index lock is held throughout: this is the rare path
        of a full disk, and no other write may take the room freed for this one.
        """
        with self._lock:
            old = self._index.get(chunk.key)
            if old is None or old.method != expect_method:
                return False
            if chunk.nbytes >= old.nbytes:
                raise self._full(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), "growing", chunk.nbytes)
            path = Path(old.handle)
            staged = path.read_bytes()
            tmp = self.root / f"{TMP_PREFIX}{chunk.key}-{uuid.uuid4().hex}"
            path.unlink()
            try:
                self._write_file(tmp, chunk)
            except OSError as err:
                self._restore(path, staged)
                if err.errno in FULL_ERRNOS:
                    raise self._full(err, "writing", chunk.nbytes) from None
                raise
            self._commit_locked(chunk, tmp)
            logger.info("%s: disk full; chunk %s rewritten in place (%d -> %d bytes)", self.name, chunk.key,
                        old.nbytes, chunk.nbytes)
            return True

    def _restore(self, path: Path, data: bytes) -> None:
        tmp = self.root / f"{TMP_PREFIX}restore-{uuid.uuid4().hex}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(self.root)

    def _commit(self, key: str, handle: Any) -> Any:
        final = self.path_of(key)
        os.replace(handle, final)
        _fsync_dir(self.root)
        return final

    def _abort(self, handle: Any) -> None:
        with contextlib.suppress(OSError):
            Path(handle).unlink()

    def _load(self, entry: IndexEntry) -> StoredChunk | None:
        try:
            chunk = read_chunk(entry.handle)
        except FileNotFoundError:
            return None
        except DataCorrupt as err:
            with self._lock:
                current = self._index.get(entry.key)
                if current is not None and current.handle == entry.handle:
                    self._index.pop(entry.key)
                    self._account(current, -1)
                    self._link(current, -1)
                    self._quarantine(Path(entry.handle), err.message)
                    self._emit(EVICT, current)
            raise
        if chunk.key != entry.key:
            raise DataCorrupt(f"{entry.handle}: holds chunk {chunk.key}, expected {entry.key}")
        return chunk

    def _delete(self, entry: IndexEntry) -> None:
        with contextlib.suppress(FileNotFoundError):
            Path(entry.handle).unlink()
