"""Full disks (issue 14.2): a clear RESOURCE_EXHAUSTED, compress still frees space, health says so.

The first tests run on a real 1 MiB tmpfs (mounting one needs root; they skip saying so without
it); the last one injects ENOSPC into a real file write and runs anywhere.
"""
from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from kvmesh.api.agent.v1 import agent_pb2
from kvmesh.instance_agent.tensors import to_proto

from .conftest import DISK, make_config, make_kv, stub_for

FS_BYTES = 1 << 20
# chunk_size 16, 4 layers, 256 channels, fp16: 64 KiB raw per chunk (tmpfs pages are 4 KiB; the
# chunks must be much larger than a page for a smaller form to free anything).
CHUNK, LAYERS, CHANNELS = 16, 4, 256


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    if os.geteuid() != 0:
        pytest.skip("mounting a 1 MiB tmpfs needs root (test_injected_enospc covers ENOSPC without it)")
    mnt = tmp_path / "small_fs"
    mnt.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={FS_BYTES}", "tmpfs", str(mnt)],
                          capture_output=True, text=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=True)


def disk_config(root: Path, **extra_config):
    # A logical limit far above the filesystem: the filesystem is what fills.
    return make_config(None, chunk_size=CHUNK, local_cpu=False, local_disk=str(root / "kv"),
                       max_local_disk_size=1.0, extra_config=extra_config)


def kv(n: int, seed: int):
    return make_kv(n, layers=LAYERS, channels=CHANNELS, seed=seed)


async def fill(stub, max_puts: int = 64) -> tuple[list[list[int]], grpc.aio.AioRpcError]:
    """Put two-chunk sequences until the filesystem refuses one; (stored sequences, the refusal)."""
    stored = []
    for i in range(max_puts):
        tokens = list(range(i * 1000, i * 1000 + 2 * CHUNK))
        try:
            await stub.PutChunks(agent_pb2.PutChunksRequest(location=DISK, tokens=tokens, kv=to_proto(kv(2 * CHUNK, i))))
        except grpc.aio.AioRpcError as err:
            return stored, err
        stored.append(tokens)
    raise AssertionError(f"{max_puts} puts of 128 KiB fit on a 1 MiB filesystem")


async def test_full_disk_is_resource_exhausted_and_compress_frees_space(small_fs, agents) -> None:
    agent = await agents(disk_config(small_fs, min_free_disk_size=200_000 / (1 << 30)))
    channel, stub = stub_for(agent)
    async with channel:
        stored, refusal = await fill(stub)
        assert len(stored) >= 3
        assert refusal.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        details = refusal.details()
        assert "is full" in details and "bytes free there" in details and "Traceback" not in details
        failed = list(range(len(stored) * 1000, len(stored) * 1000 + 2 * CHUNK))
        look = await stub.Lookup(agent_pb2.LookupRequest(tokens=failed, location=DISK))
        assert look.matches[0].num_tokens == 0, "the refused put left nothing behind"

        health = await stub.Health(agent_pb2.HealthRequest())
        assert health.error_code == -1 and "under the threshold" in health.message
        disk = next(loc for loc in health.locations if loc.name == DISK)
        free_before = disk.free_bytes
        assert 0 <= free_before < 200_000

        # Compressing the full disk works chunk by chunk: the smaller form takes the raw one's room.
        for tokens in stored:
            final = [m async for m in stub.Compress(agent_pb2.CompressRequest(method="int4", location=DISK,
                                                                            tokens=tokens))][-1]
            assert final.chunks_failed == 0 and final.chunks_done == 2, final.error
        health = await stub.Health(agent_pb2.HealthRequest())
        disk = next(loc for loc in health.locations if loc.name == DISK)
        assert disk.free_bytes > free_before + len(stored) * 2 * 40_000
        assert health.error_code == 0, health.message
        # Every chunk is still there and decodes.
        for i, tokens in enumerate(stored):
            got = await stub.GetChunks(agent_pb2.GetChunksRequest(location=DISK, tokens=tokens))
            assert got.num_tokens == 2 * CHUNK
        # And the freed room takes new chunks.
        await stub.PutChunks(agent_pb2.PutChunksRequest(location=DISK, tokens=failed, kv=to_proto(kv(2 * CHUNK, 99))))
    assert not [p for p in (small_fs / "kv").iterdir() if p.name.startswith(".tmp-")]


async def test_injected_enospc_is_resource_exhausted_with_a_message(agents, tmp_path, monkeypatch) -> None:
    agent = await agents(make_config(tmp_path))
    import kvmesh.instance_agent.storage.disk as disk

    real = disk.write_chunk

    def full(f, chunk):  # the real file is opened; the write finds the device full
        real(f, chunk)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(disk, "write_chunk", full)
    channel, stub = stub_for(agent)
    async with channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await stub.PutChunks(agent_pb2.PutChunksRequest(location=DISK, tokens=list(range(8)),
                                                            kv=to_proto(make_kv(8))))
        assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "is full (No space left on device)" in info.value.details()
        assert "Traceback" not in info.value.details()
        look = await stub.Lookup(agent_pb2.LookupRequest(tokens=list(range(8)), location=DISK))
        assert look.matches[0].num_tokens == 0
        assert not list((tmp_path / "disk").glob(".tmp-*")), "no temporary file left behind"
        assert (await stub.Health(agent_pb2.HealthRequest())).error_code == 0
