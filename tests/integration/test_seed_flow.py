"""The seed's flow through real servers: KV in via PutChunks, compress, watch, decompress, read back."""
from __future__ import annotations

import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from kvmesh.instance_agent.methods import CodecSet
from tests.controller.harness import ControllerThread, iter_ndjson

from .conftest import LOCATION, make_kv

SEED_TOKENS = [128000, 849, 21435, 279, 26431, 315, 85748, 6636, 304, 4221, 4211, 13]


def reconstruction(kv: torch.Tensor, method: str, chunk_size: int) -> torch.Tensor:
    """What the codec gives back for ``kv`` stored chunk by chunk, each chunk written as the agent writes it
    (CodecSet.get by the chunk's start: cachegen's later chunks have no lead row)."""
    codecs = CodecSet()
    parts = [codecs.get(method, s).decode(codecs.get(method, s).encode(kv[:, :, s:s + chunk_size].contiguous()))
             for s in range(0, kv.shape[2], chunk_size)]
    return torch.cat(parts, dim=2)


def watch_http(c: ControllerThread, event_id: str) -> list[dict]:
    lines = list(iter_ndjson(c.http_port, f"/events/{event_id}/watch"))
    assert lines, "the watch stream sends the current state first"
    return lines


def run_seed_flow(c: ControllerThread, client, tokens: list[int], kv: torch.Tensor, method: str,  # noqa: ANN001
                  chunk_size: int) -> None:
    assert client.put(tokens, kv) == len(tokens)
    raw_bytes = client.location_stats().used_bytes
    body = {"instance_id": "lmcache_default_instance", "method": method, "location": LOCATION, "tokens": tokens}

    r = c.post("/compress", body)
    assert r.status == 200, r.body
    assert set(r.body) == {"event_id", "num_tokens"}
    assert r.body["num_tokens"] == len(tokens)  # a partial last chunk is stored and counted
    assert r.body["event_id"].startswith("Compress")
    lines = watch_http(c, r.body["event_id"])
    final = lines[-1]["event"]
    assert final["status"] == "COMPLETED", final
    n_chunks = -(-len(tokens) // chunk_size)
    assert final["chunks_done"] == final["chunks_total"] == n_chunks
    # One update per chunk reached the watcher, each naming its chunk.
    assert sorted(l["progress"]["chunk_index"] for l in lines if "progress" in l) == list(range(n_chunks))
    assert int(final["bytes_after"]) < int(final["bytes_before"])
    assert final["compression_ratio"] > 1.0
    assert c.post("/check_finish", {"event_id": r.body["event_id"]}).body["status"] == "COMPLETED"
    stats = client.location_stats()
    assert stats.num_encoded == n_chunks
    assert stats.used_bytes < raw_bytes

    expected = reconstruction(kv, method, chunk_size)
    n, got = client.get(tokens)
    assert n == len(tokens)
    assert got is not None and got.dtype == kv.dtype and got.shape == kv.shape
    assert torch.equal(got, expected)

    r = c.post("/decompress", body)
    assert r.status == 200 and r.body["num_tokens"] == len(tokens)
    final = watch_http(c, r.body["event_id"])[-1]["event"]
    assert final["status"] == "COMPLETED", final
    assert int(final["bytes_after"]) > int(final["bytes_before"])
    assert client.location_stats().num_encoded == 0
    n, got = client.get(tokens)
    assert n == len(tokens) and torch.equal(got, expected)

    event = c.http("GET", f"/events/{r.body['event_id']}").body["event"]
    assert event["operation"] == "DECOMPRESS" and event["instance_id"] == "lmcache_default_instance"
    assert [w["worker_id"] for w in event["workers"]] == [0]


def test_seed_flow_cachegen_12_tokens(controller: ControllerThread, start_agent) -> None:  # noqa: ANN001
    # example.yaml's chunk_size: the 12-token prompt is one partial chunk.
    _, client = start_agent("lmcache_default_instance", chunk_size=256)
    run_seed_flow(controller, client, SEED_TOKENS, make_kv(len(SEED_TOKENS), seed=1), "cachegen", 256)


def test_seed_flow_cachegen_multi_chunk(controller: ControllerThread, start_agent) -> None:  # noqa: ANN001
    _, client = start_agent("lmcache_default_instance", chunk_size=16)
    tokens = list(range(1000, 1040))  # chunks of 16, 16 and 8 tokens
    run_seed_flow(controller, client, tokens, make_kv(len(tokens), layers=8, seed=2), "cachegen", 16)

    # The controller's metrics saw it.
    fams = {f.name: f for f in text_string_to_metric_families(controller.http("GET", "/metrics").body.decode())}

    def sample(family: str, name: str, **labels: str) -> float | None:
        for s in fams[family].samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return s.value
        return None
    labels = {"operation": "compress", "method": "cachegen", "location": LOCATION}
    assert sample("kvmesh_events", "kvmesh_events_total", **labels, outcome="completed") == 1
    assert sample("kvmesh_chunks", "kvmesh_chunks_total", **labels) == 3
    before = sample("kvmesh_bytes_before", "kvmesh_bytes_before_total", **labels)
    after = sample("kvmesh_bytes_after", "kvmesh_bytes_after_total", **labels)
    assert before and after and before > after
    assert sample("kvmesh_compression_ratio", "kvmesh_compression_ratio", method="cachegen",
                  location=LOCATION) == pytest.approx(before / after)
    assert sample("kvmesh_events_in_flight", "kvmesh_events_in_flight", operation="compress") == 0
    assert sample("kvmesh_workers", "kvmesh_workers", state="up") == 1


def test_lookup_pin_unpin_clear(controller: ControllerThread, start_agent) -> None:  # noqa: ANN001
    _, client = start_agent("inst", chunk_size=16)
    tokens = list(range(40))
    client.put(tokens, make_kv(40, layers=2, channels=64))
    # The lookup index follows the agent's admit reports.
    from .conftest import wait_until
    wait_until(lambda: controller.post("/lookup", {"tokens": tokens}).body["layout_info"]
               == {"inst": [LOCATION, 40]}, what="lookup index updated")
    assert controller.post("/lookup", {"tokens": tokens[:20]}).body["layout_info"] == {"inst": [LOCATION, 16]}
    body = {"instance_id": "inst", "location": LOCATION, "tokens": tokens}
    for path, field in (("/pin", 3), ("/unpin", 0)):
        r = controller.post(path, body)
        assert r.status == 200 and r.body["num_tokens"] == 40
        assert controller.wait_event(r.body["event_id"]).event.status == 3  # COMPLETED
        assert client.location_stats().num_pinned == field
    r = controller.post("/clear", {"instance_id": "inst", "location": LOCATION, "tokens": tokens[:16]})
    assert r.status == 200 and r.body["num_tokens"] == 16
    assert controller.wait_event(r.body["event_id"]).event.status == 3
    # Chunk 0 is gone, so no prefix is held any more.
    wait_until(lambda: controller.post("/lookup", {"tokens": tokens}).body["layout_info"] == {},
               what="evictions reported")
    r = controller.post("/clear", {"instance_id": "inst", "location": LOCATION})
    assert controller.wait_event(r.body["event_id"]).event.status == 3
    assert client.location_stats().num_chunks == 0
    health = controller.post("/health", {"instance_id": "inst"}).body
    assert health["healthy"] is True and health["error_codes"] == {"0": 0}
