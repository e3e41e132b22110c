"""``LocalDiskBackend``: one self-describing file per chunk in the ``local_disk`` folder.

Writes are atomic: the chunk goes to a temporary file in the same folder, is fsynced, renamed over
the old file and the folder is fsynced, so a crash at any point leaves either the old file or the
new one, never a torn one. On start the folder is reindexed (the agent's chunks survive a restart);
leftover temporary files are removed, and files that fail their checks are moved aside as
``*.corrupt`` and reported, never served.
"""
from __future__ import annotations

import contextlib
import logging
import os
import uuid
from pathlib import Path
from typing import Any

from kvmesh.errors import DataCorrupt

from .base import EVICT, IndexEntry, StorageBackend
from .chunk import StoredChunk
from .chunkfile import SUFFIX, check_file, read_chunk, write_chunk

logger = logging.getLogger(__name__)

TMP_PREFIX = ".tmp-"
CORRUPT_SUFFIX = ".corrupt"


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
                               handle=path)
            found.append((path.stat().st_mtime, entry))
        for _, entry in sorted(found, key=lambda item: item[0]):
            self._index[entry.key] = entry
            self._account(entry, 1)
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
            with open(tmp, "wb") as f:
                write_chunk(f, chunk)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        return tmp

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
                    self._quarantine(Path(entry.handle), err.message)
                    self._emit(EVICT, current)
            raise
        if chunk.key != entry.key:
            raise DataCorrupt(f"{entry.handle}: holds chunk {chunk.key}, expected {entry.key}")
        return chunk

    def _delete(self, entry: IndexEntry) -> None:
        with contextlib.suppress(FileNotFoundError):
            Path(entry.handle).unlink()
