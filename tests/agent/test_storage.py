"""Storage locations: LRU bound, pinning, clean failure when full, atomic disk writes, restart, corruption."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kvmesh.errors import DataCorrupt, ResourceExhausted
from kvmesh.instance_agent.keys import chunk_spans
from kvmesh.instance_agent.storage import ADMIT, EVICT, LocalCPUBackend, LocalDiskBackend, StoredChunk
from kvmesh.instance_agent.storage import chunkfile

from .conftest import make_kv

KEYS = [s.key for s in chunk_spans(list(range(40)), 4)]


def raw_chunk(i: int, tokens: int = 4, seed: int | None = None) -> StoredChunk:
    return StoredChunk(KEYS[i], 4 * i, 4 * i + tokens, raw=make_kv(tokens, seed=i if seed is None else seed))


CHUNK_BYTES = raw_chunk(0).nbytes  # 2*3*4*16 fp16 = 768


@pytest.fixture(params=["cpu", "disk"])
def backend_factory(request: pytest.FixtureRequest, tmp_path: Path):
    def make(capacity: int):
        if request.param == "cpu":
            return LocalCPUBackend(capacity)
        return LocalDiskBackend(tmp_path / "disk", capacity)
    return make


def test_lru_bound_evicts_least_recently_used(backend_factory) -> None:
    b = backend_factory(3 * CHUNK_BYTES)
    events: list[tuple[str, str]] = []
    b.add_listener(lambda kind, loc, key, end: events.append((kind, key)))
    for i in range(3):
        assert b.put(raw_chunk(i))
    assert b.get(KEYS[0]) is not None  # chunk 0 becomes the most recently used
    assert b.put(raw_chunk(3))
    assert not b.contains(KEYS[1]), "chunk 1 was the least recently used"
    assert all(b.contains(KEYS[i]) for i in (0, 2, 3))
    assert b.used_bytes == 3 * CHUNK_BYTES <= b.capacity_bytes
    assert b.evictions == 1
    assert events == [(ADMIT, KEYS[0]), (ADMIT, KEYS[1]), (ADMIT, KEYS[2]), (EVICT, KEYS[1]), (ADMIT, KEYS[3])]


def test_pinned_chunks_are_never_evicted(backend_factory) -> None:
    b = backend_factory(3 * CHUNK_BYTES)
    for i in range(3):
        b.put(raw_chunk(i))
    assert b.set_pinned(KEYS[0], True) and b.set_pinned(KEYS[1], True)
    for i in range(3, 8):
        assert b.put(raw_chunk(i))
        assert b.contains(KEYS[0]) and b.contains(KEYS[1])
    assert b.stats().num_pinned == 2


def test_full_of_pinned_chunks_fails_cleanly(backend_factory) -> None:
    b = backend_factory(2 * CHUNK_BYTES)
    for i in range(2):
        b.put(raw_chunk(i))
        b.set_pinned(KEYS[i], True)
    with pytest.raises(ResourceExhausted, match="pinned"):
        b.put(raw_chunk(2))
    with pytest.raises(ResourceExhausted, match="capacity"):
        b.put(StoredChunk(KEYS[3], 0, 12, raw=make_kv(12)))
    assert not b.contains(KEYS[2])
    assert b.used_bytes == 2 * CHUNK_BYTES
    for i in range(2):
        got = b.get(KEYS[i])
        assert got is not None and torch.equal(got.raw, raw_chunk(i).raw)


def test_compare_and_set_put(backend_factory) -> None:
    b = backend_factory(4 * CHUNK_BYTES)
    b.put(raw_chunk(0))
    enc = StoredChunk(KEYS[0], 0, 4, "lossless", payload=b"x" * 10)
    assert not b.put(enc, expect_method="int8"), "the chunk is raw, not int8"
    assert b.put(enc, expect_method="")
    assert b.get(KEYS[0]).payload == b"x" * 10
    assert b.used_bytes == 10
    assert not b.put(StoredChunk(KEYS[1], 4, 8, "lossless", payload=b"y"), expect_method="")


def test_disk_index_survives_a_restart(tmp_path: Path) -> None:
    root = tmp_path / "disk"
    b = LocalDiskBackend(root, 10 * CHUNK_BYTES)
    b.put(raw_chunk(0))
    b.put(raw_chunk(1, tokens=3))
    b.put(StoredChunk(KEYS[2], 8, 12, "lossless", payload=b"container-bytes"))
    used = b.used_bytes
    b2 = LocalDiskBackend(root, 10 * CHUNK_BYTES)
    assert b2.used_bytes == used
    assert [e.key for e in b2.entries()] == KEYS[:3]
    assert torch.equal(b2.get(KEYS[0]).raw, raw_chunk(0).raw)
    c1 = b2.get(KEYS[1])
    assert (c1.start, c1.end) == (4, 7) and torch.equal(c1.raw, raw_chunk(1, tokens=3).raw)
    c2 = b2.get(KEYS[2])
    assert c2.method == "lossless" and c2.payload == b"container-bytes"


def test_disk_restart_with_smaller_capacity_evicts_to_fit(tmp_path: Path) -> None:
    root = tmp_path / "disk"
    b = LocalDiskBackend(root, 10 * CHUNK_BYTES)
    for i in range(4):
        b.put(raw_chunk(i))
    b2 = LocalDiskBackend(root, 2 * CHUNK_BYTES)
    assert b2.used_bytes <= 2 * CHUNK_BYTES and len(b2.entries()) == 2
    assert len(list(root.glob("*" + chunkfile.SUFFIX))) == 2


def test_failed_disk_write_leaves_the_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "disk"
    b = LocalDiskBackend(root, 10 * CHUNK_BYTES)
    old = raw_chunk(0)
    b.put(old)

    def torn_write(f, chunk):  # injected fault: the disk fills up half-way through the payload
        head, payload = chunkfile.encode_chunk(chunk)
        f.write(head)
        f.write(payload[: len(payload) // 2])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("kvmesh.instance_agent.storage.disk.write_chunk", torn_write)
    with pytest.raises(ResourceExhausted, match="is full \\(No space left on device\\)"):
        b.put(StoredChunk(KEYS[0], 0, 4, raw=make_kv(4, seed=99)))
    monkeypatch.undo()
    assert torch.equal(b.get(KEYS[0]).raw, old.raw)
    assert [p.name for p in root.iterdir()] == [f"{KEYS[0]}{chunkfile.SUFFIX}"], "no temporary file left behind"
    assert torch.equal(LocalDiskBackend(root, 10 * CHUNK_BYTES).get(KEYS[0]).raw, old.raw)


def test_process_killed_mid_write_leaves_the_old_file(tmp_path: Path) -> None:
    """A real process is SIGKILLed while it writes a new version of a chunk (in the middle of
    the temporary file's payload); a restarted location reads the old version and cleans up."""
    root = tmp_path / "disk"
    old = raw_chunk(0)
    LocalDiskBackend(root, 1 << 30).put(old)
    script = textwrap.dedent(f"""
        import os, signal, torch
        from kvmesh.instance_agent.storage import LocalDiskBackend, StoredChunk
        from kvmesh.instance_agent.storage import chunkfile
        real = chunkfile.write_chunk
        def write_then_die(f, chunk):
            head, payload = chunkfile.encode_chunk(chunk)
            f.write(head); f.write(payload[: len(payload) // 3]); f.flush(); os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        import kvmesh.instance_agent.storage.disk as disk
        disk.write_chunk = write_then_die
        b = LocalDiskBackend({str(root)!r}, 1 << 30)
        b.put(StoredChunk({KEYS[0]!r}, 0, 4, raw=torch.ones(2, 3, 4, 16, dtype=torch.float16)))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()
    assert any(p.name.startswith(".tmp-") for p in root.iterdir()), "the killed write left its temporary file"
    b = LocalDiskBackend(root, 1 << 30)
    assert torch.equal(b.get(KEYS[0]).raw, old.raw)
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())
    assert b.corrupt_files == []


@pytest.mark.parametrize("damage", ["flip_payload", "truncate", "garbage"])
def test_corrupt_files_are_detected_not_served(tmp_path: Path, damage: str) -> None:
    root = tmp_path / "disk"
    b = LocalDiskBackend(root, 10 * CHUNK_BYTES)
    b.put(raw_chunk(0))
    b.put(raw_chunk(1))
    path = b.path_of(KEYS[0])
    data = bytearray(path.read_bytes())
    if damage == "flip_payload":
        data[-5] ^= 0xFF
    elif damage == "truncate":
        data = data[:-7]
    else:
        data = bytearray(b"not a chunk at all")
    path.write_bytes(bytes(data))
    if damage == "flip_payload":
        # Same length: only the payload digest can tell, on read.
        b2 = LocalDiskBackend(root, 10 * CHUNK_BYTES)
        assert b2.contains(KEYS[0])
        with pytest.raises(DataCorrupt, match="checksum"):
            b2.get(KEYS[0])
    else:
        b2 = LocalDiskBackend(root, 10 * CHUNK_BYTES)
    assert not b2.contains(KEYS[0])
    assert b2.corrupt_files and b2.corrupt_files[0].name.endswith(".corrupt")
    assert torch.equal(b2.get(KEYS[1]).raw, raw_chunk(1).raw)
    assert b2.used_bytes == CHUNK_BYTES


def test_cpu_backend_copies_the_callers_tensor() -> None:
    b = LocalCPUBackend(1 << 20)
    kv = make_kv(8)
    b.put(StoredChunk(KEYS[0], 0, 4, raw=kv[:, :, 0:4]))
    kv.zero_()
    assert b.get(KEYS[0]).raw.abs().sum() > 0
