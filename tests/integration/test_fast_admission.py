"""Admission without a round trip: when the controller's index of an agent is complete and holds
every token asked for, compress answers num_tokens from it; otherwise it asks the agent."""
from __future__ import annotations

from tests.controller.harness import ControllerThread

from .conftest import LOCATION, make_kv, method_under_test, wait_until


def lookups(c: ControllerThread, source: str) -> float:
    value = c.server.metrics.registry.get_sample_value(  # type: ignore[union-attr]
        "kvmesh_admission_lookups_total", {"source": source})
    return value or 0.0


def test_compress_answers_from_a_complete_index(controller: ControllerThread, start_agent) -> None:  # noqa: ANN001
    _agent, client = start_agent("fast", chunk_size=16)
    tokens = list(range(500, 564))  # 4 whole chunks
    client.put(tokens, make_kv(64, layers=2, channels=32, seed=3))
    wait_until(lambda: controller.post("/lookup", {"tokens": tokens}).body["layout_info"] == {"fast": [LOCATION, 64]},
               timeout=30, what="index fed by the agent")
    body = {"instance_id": "fast", "method": method_under_test(), "location": LOCATION}
    before_index, before_agent = lookups(controller, "index"), lookups(controller, "agent")
    r = controller.post("/compress", {**body, "tokens": tokens})
    assert r.status == 200 and r.body["num_tokens"] == 64
    assert (lookups(controller, "index"), lookups(controller, "agent")) == (before_index + 1, before_agent)
    ev = controller.wait_event(r.body["event_id"]).event
    assert ev.status == 3 and ev.chunks_done == 4  # COMPLETED
    # More tokens than are stored: the index cannot say whether admits are still on their way, so
    # the agent answers (and its answer is exact).
    r = controller.post("/compress", {**body, "tokens": [*tokens, *range(9000, 9016)]})
    assert r.status == 200 and r.body["num_tokens"] == 64
    assert lookups(controller, "agent") == before_agent + 1
    controller.wait_event(r.body["event_id"])
