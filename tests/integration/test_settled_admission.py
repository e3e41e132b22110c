"""With a real agent: a compress of chunks its agent already reported compressed with that method ends
at admission (no agent call) and says what the agent would have (every chunk skipped); the chunks
stay as they are; once they change form through the controller, the agent is asked again."""
from __future__ import annotations

from kvmesh.api.common.v1 import common_pb2
from tests.controller.harness import ControllerThread

from .conftest import LOCATION, make_kv, method_under_test, wait_until


def from_index(c: ControllerThread, operation: str) -> float:
    value = c.server.metrics.registry.get_sample_value(  # type: ignore[union-attr]
        "kvmesh_events_answered_from_index_total", {"operation": operation})
    return value or 0.0


def test_a_repeated_compress_is_answered_from_the_index(controller: ControllerThread, start_agent) -> None:  # noqa: ANN001
    _agent, client = start_agent("settled", chunk_size=16)
    tokens = list(range(700, 764))  # 4 whole chunks
    client.put(tokens, make_kv(64, layers=2, channels=32, seed=5))
    wait_until(lambda: controller.post("/lookup", {"tokens": tokens}).body["layout_info"] == {"settled": [LOCATION, 64]},
               timeout=30, what="index fed by the agent")
    body = {"instance_id": "settled", "method": method_under_test(), "location": LOCATION, "tokens": tokens}
    first = controller.wait_event(controller.post("/compress", body).body["event_id"]).event
    assert first.status == common_pb2.COMPLETED and first.bytes_after > 0
    assert from_index(controller, "compress") == 0
    assert client.location_stats().num_encoded == 4
    r = controller.post("/compress", body)
    assert r.status == 200 and r.body["num_tokens"] == 64
    ev = controller.wait_event(r.body["event_id"]).event
    assert ev.status == common_pb2.COMPLETED and (ev.chunks_done, ev.chunks_total) == (4, 4)
    assert from_index(controller, "compress") == 1
    assert client.location_stats().num_encoded == 4
    # Decompressed through the controller: raw now, so a compress goes to the agent again.
    dec = controller.wait_event(controller.post("/decompress", {**body, "method": ""}).body["event_id"]).event
    assert dec.status == common_pb2.COMPLETED and client.location_stats().num_encoded == 0
    again = controller.wait_event(controller.post("/compress", body).body["event_id"]).event
    assert again.status == common_pb2.COMPLETED and again.bytes_after > 0
    assert from_index(controller, "compress") == 1 and client.location_stats().num_encoded == 4
