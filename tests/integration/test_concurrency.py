"""Many compress/decompress requests at once on overlapping tokens: no chunk lost or corrupted."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import torch

from kvmesh.codecs import get_codec
from tests.controller.harness import ControllerThread

from .conftest import LOCATION, make_kv, method_under_test

CHUNK = 8


def test_concurrent_overlapping_requests(controller: ControllerThread, start_agent) -> None:  # noqa: ANN001
    method = method_under_test()
    _, client = start_agent("inst", chunk_size=CHUNK)
    a = list(range(5000, 5048))                 # 6 chunks
    b = a[:24] + list(range(7000, 7024))        # shares its first 3 chunks with a
    kv_a = make_kv(len(a), layers=2, channels=32, seed=3)
    kv_b = torch.cat([kv_a[:, :, :24], make_kv(24, layers=2, channels=32, seed=4)], dim=2)
    assert client.put(a, kv_a) == len(a)
    assert client.put(b, kv_b) == len(b)

    # (tokens, stored prefix): a[:20]'s partial last chunk was never stored, only a's full chunks.
    shapes = [(a, 48), (b, 48), (a[:20], 16), (b[:40], 40)]
    requests = []
    for i in range(12):
        tokens, held = shapes[i % 4]
        requests.append(("/compress" if i % 3 != 2 else "/decompress", tokens, held))

    def send(req: tuple[str, list[int], int]) -> str:
        path, tokens, held = req
        r = controller.post(path, {"instance_id": "inst", "method": method, "location": LOCATION, "tokens": tokens})
        assert r.status == 200, r.body
        assert r.body["num_tokens"] == held
        return r.body["event_id"]

    with ThreadPoolExecutor(max_workers=8) as pool:
        event_ids = list(pool.map(send, requests))
        finals = list(pool.map(lambda e: controller.wait_event(e, timeout=120).event, event_ids))
    failed = [(e.event_id, e.error) for e in finals if e.status != 3]
    assert not failed, failed
    assert all(e.chunks_done == e.chunks_total > 0 for e in finals)

    codec = get_codec(method)
    for tokens, kv in ((a, kv_a), (b, kv_b)):
        n, got = client.get(tokens)
        assert n == len(tokens), "no chunk lost"
        for start in range(0, len(tokens), CHUNK):
            original = kv[:, :, start:start + CHUNK].contiguous()
            piece = got[:, :, start:start + CHUNK]
            # Each compress after a decompress codes the already decoded values again, and a lossy codec
            # need not be idempotent (cachegen's data-derived levels move by one fp16 step on some chunks):
            # a chunk is whole when it is the original or the result of some number of round trips.
            writer = codec.for_chunk(start) if hasattr(codec, "for_chunk") else codec  # as the agent writes it
            valid = [original]
            for _ in range(len(requests)):
                valid.append(codec.decode(writer.encode(valid[-1])))
            assert any(torch.equal(piece, v) for v in valid), f"chunk at token {start} is corrupted"
    # Everything still works afterwards: decompress all, read back the reconstruction or the original.
    for tokens in (a, b):
        r = controller.post("/decompress", {"instance_id": "inst", "location": LOCATION, "tokens": tokens})
        assert controller.wait_event(r.body["event_id"]).event.status == 3
    assert client.location_stats().num_encoded == 0
    assert client.location_stats().num_chunks == 9
